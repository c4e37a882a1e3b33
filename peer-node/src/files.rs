//! The served folder: turns a requested name into an open file that is
//! certainly inside it, lists what it holds, and caches content hashes.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, TryLockError,
    },
    thread,
    time::{Instant, SystemTime},
};

use anyhow::Context;
use log::{debug, info, warn};
use protocol::{
    peer::{FileEntry, MAX_FILES},
    ContentHash, ErrorCode, ErrorReply, FileName,
};

/// How many content hashes are remembered: more than a folder can list, so
/// that warming up never evicts its own work.
const HASH_CACHE_LEN: usize = 2 * MAX_FILES;
/// How deep `LIST` descends into subfolders.
const MAX_DEPTH: usize = 16;
/// Files up to this size are hashed while their first request waits (well
/// under a second, even from disk); bigger ones in the background, their
/// requests answered `busy` meanwhile (clients ask again), rather than left
/// waiting past the client's timeout.
const INLINE_HASH_MAX: u64 = 64 << 20;
/// Big files hashed in the background at once.
const MAX_BACKGROUND_HASHES: usize = 2;

pub struct Library {
    /// Canonical (symlink-free, absolute) path of the served folder.
    root: PathBuf,
    /// Hash of each file per version of it, so that a file is read for
    /// hashing once, not once per request.
    hashes: Mutex<HashMap<PathBuf, Entry>>,
    background: Arc<AtomicUsize>,
    inline_hash_max: u64,
}

struct Entry {
    version: Version,
    /// Filled by whichever request hashes first; the others wait on the
    /// lock instead of reading the file again.
    hash: Arc<Mutex<Option<ContentHash>>>,
}

/// What tells one version of a file's content from another. Size and
/// modification time can be kept by a replacement (`rsync -a`, `cp -p`,
/// `touch -r`, then `mv`); the inode and the change time cannot, since no
/// program can set ctime.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Version {
    size: u64,
    modified: SystemTime,
    #[cfg(unix)]
    inode: (u64, u64, i64, i64),
}

impl Version {
    fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Version {
            size: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A file ready to be sent.
pub struct Served {
    pub file: File,
    pub size: u64,
    pub hash: ContentHash,
}

impl Library {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let root = fs::canonicalize(dir)
            .with_context(|| format!("cannot use folder {}", dir.display()))?;
        if !root.is_dir() {
            anyhow::bail!("cannot use folder {}: not a directory", dir.display());
        }
        Ok(Library {
            root,
            hashes: Mutex::default(),
            background: Arc::default(),
            inline_hash_max: INLINE_HASH_MAX,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `name` if it is a regular file inside the folder once every
    /// symlink is followed; anything else is refused.
    pub fn open_file(&self, name: &FileName) -> Result<Served, ErrorReply> {
        self.open_hashed(name, false)
    }

    fn open_hashed(&self, name: &FileName, always_inline: bool) -> Result<Served, ErrorReply> {
        let path = self.resolve(name)?;
        // The path was checked a moment ago; whoever can write to the folder
        // could have swapped something in since. So open without following
        // a final symlink and without blocking (a FIFO would block the
        // open), then check what was actually opened.
        let file = open_checked(&path).map_err(|e| io_refusal(name, &e))?;
        // Size and time of the open file itself, not of whatever the path
        // points to by now.
        let meta = file.metadata().map_err(|e| io_refusal(name, &e))?;
        if !meta.is_file() {
            return Err(not_found(name));
        }
        if !self.holds(&file) {
            return Err(ErrorReply::new(
                ErrorCode::Forbidden,
                format!("{name:?} leads outside the shared folder"),
            ));
        }
        let size = meta.len();
        let slot = self.slot(&path, Version::of(&meta));
        let hash = if size <= self.inline_hash_max || always_inline {
            hash_into(&slot, &file, size).map_err(|e| io_refusal(name, &e))?
        } else {
            self.hash_in_background(name, slot, path, size)?
        };
        Ok(Served { file, size, hash })
    }

    /// Whether an open file lies inside the folder, judged by where the
    /// kernel says it is (Linux); elsewhere the check of its path stands.
    fn holds(&self, file: &File) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
            if let Ok(real) = fs::read_link(fd) {
                return real.starts_with(&self.root);
            }
        }
        let _ = file;
        true
    }

    /// The real path of `name` once every symlink is followed, if it is
    /// inside the folder. Whether it is a regular file is for the caller to
    /// check, on the file it opens.
    fn resolve(&self, name: &FileName) -> Result<PathBuf, ErrorReply> {
        let real =
            fs::canonicalize(self.root.join(name.to_path())).map_err(|e| io_refusal(name, &e))?;
        if !real.starts_with(&self.root) {
            return Err(ErrorReply::new(
                ErrorCode::Forbidden,
                format!("{name:?} leads outside the shared folder"),
            ));
        }
        Ok(real)
    }

    /// The cache entry for this version of the file at `path`.
    fn slot(&self, path: &Path, version: Version) -> Arc<Mutex<Option<ContentHash>>> {
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = cache.get(path) {
            if entry.version == version {
                return Arc::clone(&entry.hash);
            }
        }
        if cache.len() >= HASH_CACHE_LEN {
            // Full (a folder that keeps changing): make room for one.
            if let Some(old) = cache.keys().next().cloned() {
                cache.remove(&old);
            }
        }
        let hash = Arc::default();
        let entry = Entry {
            version,
            hash: Arc::clone(&hash),
        };
        cache.insert(path.to_path_buf(), entry);
        hash
    }

    /// The hash of a big file if known; otherwise starts hashing it (once)
    /// and answers `busy`.
    fn hash_in_background(
        &self,
        name: &FileName,
        slot: Arc<Mutex<Option<ContentHash>>>,
        path: PathBuf,
        size: u64,
    ) -> Result<ContentHash, ErrorReply> {
        let busy = || {
            ErrorReply::new(
                ErrorCode::Busy,
                format!("{name:?} ({size} bytes) is being hashed; try again in a few seconds"),
            )
        };
        match slot.try_lock() {
            Ok(done) => {
                if let Some(hash) = *done {
                    return Ok(hash);
                }
            }
            Err(TryLockError::Poisoned(done)) => {
                if let Some(hash) = *done.into_inner() {
                    return Ok(hash);
                }
            }
            // Another thread holds it: it is hashing.
            Err(TryLockError::WouldBlock) => return Err(busy()),
        }
        if self.background.fetch_add(1, Ordering::SeqCst) >= MAX_BACKGROUND_HASHES {
            self.background.fetch_sub(1, Ordering::SeqCst);
            return Err(busy());
        }
        let background = Arc::clone(&self.background);
        let name = name.clone();
        let spawned = thread::Builder::new().name("hash".into()).spawn(move || {
            let started = Instant::now();
            match open_checked(&path).and_then(|file| hash_into(&slot, &file, size)) {
                Ok(_) => info!(
                    "hashed {name:?} ({size} bytes) in {:.1?}",
                    started.elapsed()
                ),
                Err(e) => warn!("cannot hash {name:?}: {e}"),
            }
            background.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            self.background.fetch_sub(1, Ordering::SeqCst);
        }
        Err(busy())
    }

    /// Computes and caches the hash of every file listed, until `stop`.
    pub fn warm_up(&self, stop: &dyn Fn() -> bool) {
        let started = Instant::now();
        let Ok(entries) = self.list(MAX_FILES) else {
            return;
        };
        let hashed = entries
            .iter()
            .take_while(|_| !stop())
            .filter(|e| self.open_hashed(&e.name, true).is_ok())
            .count();
        info!("files hashed: {hashed}, in {:.1?}", started.elapsed());
    }

    /// Every regular file in the folder, sorted by name, at most `limit`.
    /// Names that cannot travel (not UTF-8, control characters) are skipped.
    pub fn list(&self, limit: usize) -> io::Result<Vec<FileEntry>> {
        let mut entries = Vec::new();
        self.walk(&self.root, "", 0, limit, &mut entries)?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        depth: usize,
        limit: usize,
        out: &mut Vec<FileEntry>,
    ) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // Only the folder itself must be readable; an unreadable
            // subfolder (lost+found, another user's) is left out.
            Err(e) if depth > 0 => {
                debug!("not listing {}: {e}", dir.display());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            if out.len() >= limit {
                return Ok(());
            }
            let Ok(entry) = entry else { continue };
            let Some(part) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let joined = format!("{prefix}{part}");
            let Ok(name) = FileName::new(&joined) else {
                continue;
            };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    self.walk(&entry.path(), &format!("{joined}/"), depth + 1, limit, out)?;
                }
            } else if kind.is_file() || (kind.is_symlink() && self.resolve(&name).is_ok()) {
                // Symlinks are listed only when they lead to a file inside;
                // symlinked folders are not entered, so no loops.
                if let Some(meta) = fs::metadata(entry.path()).ok().filter(|m| m.is_file()) {
                    out.push(FileEntry {
                        size: meta.len(),
                        name,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Opens for reading without following a final symlink or blocking on a
/// FIFO (non-blocking mode changes nothing for regular files).
fn open_checked(path: &Path) -> io::Result<File> {
    let mut options = File::options();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    options.open(path)
}

/// Hashes the first `size` bytes of `file` into `slot`, unless a request
/// for the same version already did; waits if one is at it.
fn hash_into(slot: &Mutex<Option<ContentHash>>, file: &File, size: u64) -> io::Result<ContentHash> {
    let mut done = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(hash) = *done {
        return Ok(hash);
    }
    // Only `size` bytes: a file still growing must hash to what is sent.
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file.take(size))?;
    let hash = hasher.finalize();
    *done = Some(hash);
    Ok(hash)
}

fn not_found(name: &FileName) -> ErrorReply {
    ErrorReply::new(ErrorCode::NotFound, format!("no file {name:?}"))
}

fn io_refusal(name: &FileName, e: &io::Error) -> ErrorReply {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => not_found(name),
        io::ErrorKind::PermissionDenied => ErrorReply::new(
            ErrorCode::Forbidden,
            format!("cannot read {name:?}: permission denied"),
        ),
        _ => ErrorReply::new(ErrorCode::Internal, format!("cannot read {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, Library) {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.txt"), "hello").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b.txt"), "bee").unwrap();
        symlink(outside.path().join("secret"), dir.path().join("escape")).unwrap();
        symlink(outside.path(), dir.path().join("escape-dir")).unwrap();
        symlink(dir.path().join("a.txt"), dir.path().join("alias")).unwrap();
        symlink(dir.path().join("sub"), dir.path().join("subalias")).unwrap();
        let lib = Library::open(dir.path()).unwrap();
        (outside, dir, lib)
    }

    #[test]
    fn serves_files_inside_with_their_hash() {
        let (_outside, _dir, lib) = setup();
        let served = lib.open_file(&name("a.txt")).unwrap();
        assert_eq!(served.size, 5);
        assert_eq!(served.hash, blake3::hash(b"hello"));
        assert_eq!(lib.open_file(&name("sub/b.txt")).unwrap().size, 3);
        assert_eq!(
            lib.open_file(&name("alias")).unwrap().hash,
            blake3::hash(b"hello")
        );
    }

    #[test]
    fn symlinks_out_of_the_folder_are_forbidden() {
        let (_outside, _dir, lib) = setup();
        for n in ["escape", "escape-dir/secret"] {
            let err = lib.open_file(&name(n)).err().unwrap();
            assert_eq!(err.code, ErrorCode::Forbidden, "{n}");
        }
    }

    #[test]
    fn an_open_file_is_judged_by_where_it_really_is() {
        let (outside, _dir, lib) = setup();
        let inside = File::open(lib.root().join("a.txt")).unwrap();
        assert!(lib.holds(&inside));
        let secret = File::open(outside.path().join("secret")).unwrap();
        assert!(!lib.holds(&secret));
    }

    #[test]
    fn a_fifo_or_a_final_symlink_is_not_opened_blindly() {
        let (_outside, dir, _lib) = setup();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Would block forever without O_NONBLOCK: no writer ever comes.
        let opened = open_checked(&fifo).unwrap();
        assert!(!opened.metadata().unwrap().is_file());
        // A symlink as the last part is refused, not followed.
        assert!(open_checked(&dir.path().join("escape")).is_err());
    }

    #[test]
    fn missing_files_and_folders_are_not_found() {
        let (_outside, _dir, lib) = setup();
        for n in ["nope", "sub", "a.txt/x", "sub/nope"] {
            assert_eq!(
                lib.open_file(&name(n)).err().unwrap().code,
                ErrorCode::NotFound,
                "{n}"
            );
        }
    }

    #[test]
    fn a_changed_file_is_hashed_again() {
        let (_outside, dir, lib) = setup();
        assert_eq!(
            lib.open_file(&name("a.txt")).unwrap().hash,
            blake3::hash(b"hello")
        );
        fs::write(dir.path().join("a.txt"), "hello, world").unwrap();
        assert_eq!(
            lib.open_file(&name("a.txt")).unwrap().hash,
            blake3::hash(b"hello, world")
        );
    }

    #[test]
    fn a_replacement_with_the_same_size_and_time_is_hashed_again() {
        let (_outside, dir, lib) = setup();
        let path = dir.path().join("a.txt");
        assert_eq!(
            lib.open_file(&name("a.txt")).unwrap().hash,
            blake3::hash(b"hello")
        );
        let modified = fs::metadata(&path).unwrap().modified().unwrap();
        // Like `rsync -a`: same size, same modification time, new content.
        let new = dir.path().join("new");
        fs::write(&new, "HELLO").unwrap();
        File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        fs::rename(&new, &path).unwrap();
        assert_eq!(
            lib.open_file(&name("a.txt")).unwrap().hash,
            blake3::hash(b"HELLO")
        );
    }

    #[test]
    fn a_growing_file_hashes_to_the_size_sent() {
        let (_outside, dir, lib) = setup();
        let served = lib.open_file(&name("a.txt")).unwrap();
        let path = dir.path().join("a.txt");
        // Grows after the size was taken: only 5 bytes go out, and the hash says so.
        let slot = Arc::new(Mutex::new(None));
        fs::write(&path, "hello, and more").unwrap();
        let hash = hash_into(&slot, &File::open(&path).unwrap(), served.size).unwrap();
        assert_eq!(hash, blake3::hash(b"hello"));
    }

    #[test]
    fn one_request_hashes_and_the_others_reuse_it() {
        let (_outside, _dir, lib) = setup();
        let first = lib.open_file(&name("a.txt")).unwrap();
        let meta = first.file.metadata().unwrap();
        let path = fs::canonicalize(lib.root().join("a.txt")).unwrap();
        let slot = lib.slot(&path, Version::of(&meta));
        assert_eq!(*slot.lock().unwrap(), Some(blake3::hash(b"hello")));
    }

    #[test]
    fn a_big_file_is_hashed_in_the_background_while_requests_get_busy() {
        let (_outside, _dir, mut lib) = setup();
        lib.inline_hash_max = 2;
        let err = lib
            .open_file(&name("a.txt"))
            .err()
            .expect("busy while hashing");
        assert_eq!(err.code, ErrorCode::Busy);
        assert!(err.message.contains("is being hashed"), "{err}");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match lib.open_file(&name("a.txt")) {
                Ok(served) => break assert_eq!(served.hash, blake3::hash(b"hello")),
                Err(e) => assert_eq!(e.code, ErrorCode::Busy),
            }
            assert!(Instant::now() < deadline, "never hashed");
            thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn listing_holds_only_files_inside() {
        let (_outside, _dir, lib) = setup();
        let names: Vec<_> = lib
            .list(100)
            .unwrap()
            .into_iter()
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names, ["a.txt", "alias", "sub/b.txt"]);
        assert_eq!(lib.list(1).unwrap().len(), 1);
    }
}
