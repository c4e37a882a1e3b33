//! The served folder: turns a requested name into an open file that is
//! certainly inside it, lists what it holds, and caches content hashes and,
//! beside them, the outboards (BLAKE3 trees) that `RANGE` proofs come from.

use std::{
    collections::{HashMap, VecDeque},
    fs::{self, File},
    io::{self, BufReader, Read},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, TryLockError,
    },
    thread,
    time::{Instant, SystemTime},
};

use log::{debug, info, warn};
use protocol::{
    index::Holding,
    peer::{
        proof::{self, Outboard},
        FileEntry, MAX_FILES,
    },
    ContentHash, ErrorCode, ErrorReply, FileName,
};

/// How many content hashes are remembered: more than a folder can list, so
/// that warming up never evicts its own work.
const HASH_CACHE_LEN: usize = 2 * MAX_FILES;
/// Bytes of outboards kept (0.4% of each file hashed): those of 16 GiB of
/// files. One that is evicted is made again from the file when a `RANGE`
/// needs it.
const OUTBOARD_CACHE_BYTES: usize = 64 << 20;
/// How much of a file is read at once while hashing it.
const HASH_READ: usize = 1 << 20;
/// How many folders deep `LIST` goes: a file in 16 nested folders is
/// listed, one in 17 is not.
const MAX_DEPTH: usize = 16;
/// How many folder entries one `LIST` looks at, at most. Everything up to
/// this is sorted before the listing is cut to `MAX_FILES`, so that which
/// files are listed does not depend on the order of the directory.
const MAX_VISITED: usize = 10 * MAX_FILES;
/// Files up to this size are hashed while their first request waits (well
/// under a second, even from disk); bigger ones in the background, their
/// requests answered `busy` meanwhile (clients ask again), rather than left
/// waiting past the client's timeout.
const INLINE_HASH_MAX: u64 = 64 << 20;
/// Big files hashed in the background at once.
const MAX_BACKGROUND_HASHES: usize = 2;
/// A big file that changed while it was hashed this many times in a row
/// keeps changing (a log being appended to): each request would find a
/// new version and be answered `busy` for ever. It is served as it was at
/// its newest complete hash instead.
const KEEP_CHANGING: u32 = 2;
/// How often an open that lost a race with a rename (a final symlink that
/// appeared after the path was resolved) is tried again.
const RACE_RETRIES: usize = 3;

/// Why a requested file is not served. Turned into the wire's `ErrorReply`
/// by `From<&Refusal>`, which keeps the operating system's own words (the
/// `Display` here, for the log) out of replies.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such file, or not a regular file (folder, FIFO, socket, device),
    /// or a name too long for the file system.
    #[error("no file {0:?}")]
    NotFound(FileName),
    #[error("{name:?} {reason}")]
    Forbidden {
        name: FileName,
        reason: &'static str,
    },
    /// Try again later.
    #[error("{0}")]
    Busy(String),
    #[error("cannot read {name:?}: {source}")]
    Io {
        name: FileName,
        #[source]
        source: io::Error,
    },
}

impl From<&Refusal> for ErrorReply {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::NotFound(name) => {
                ErrorReply::new(ErrorCode::NotFound, format!("no file {name:?}"))
            }
            Refusal::Forbidden { name, reason } => {
                ErrorReply::new(ErrorCode::Forbidden, format!("{name:?} {reason}"))
            }
            Refusal::Busy(message) => ErrorReply::new(ErrorCode::Busy, message.clone()),
            Refusal::Io { name, .. } => {
                ErrorReply::new(ErrorCode::Internal, format!("cannot read {name:?}"))
            }
        }
    }
}

const OUTSIDE: &str = "leads outside the shared folder";
const SYMLINK: &str =
    "is or goes through a symlink that is not followed (a loop, or one that changed)";
const UNREADABLE: &str = "cannot be read: permission denied";
const HARD_LINKED: &str =
    "has other hard links, which may be outside the shared folder (the peer serves such files only with --allow-hardlinks)";
const UNCHECKED: &str = "cannot be checked to lie inside the shared folder";

/// How a peer serves its folder, beyond the folder itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Serve files with more than one hard link. Off by default: another
    /// name of such a file may be outside the folder (a link made to a
    /// secret by whoever can write to the folder), and nothing cheap tells.
    pub allow_hardlinks: bool,
}

/// What `LIST` answers.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<FileEntry>,
    /// The folder holds more files than were listed.
    pub truncated: bool,
}

pub struct Library {
    /// Canonical (symlink-free, absolute) path of the served folder.
    root: PathBuf,
    /// How an open is kept inside the folder.
    confine: Confine,
    options: Options,
    /// Hash of each file per version of it, so that a file is read for
    /// hashing once, not once per request. Keyed by the path inside the
    /// folder, symlinks resolved.
    hashes: Arc<Mutex<HashMap<PathBuf, Entry>>>,
    /// The outboard of each content hashed, by its hash, within a budget.
    outboards: Arc<Mutex<Outboards>>,
    background: Arc<AtomicUsize>,
    /// Called when a background hash is done, so that the announcer can
    /// tell the relay about the file at once (set once, by the peer).
    on_hashed: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>,
    inline_hash_max: u64,
    /// Background hashes finished, for tests to wait on.
    #[cfg(test)]
    hashed: Arc<(Mutex<usize>, std::sync::Condvar)>,
    /// Held by a test to keep background hashes from starting.
    #[cfg(test)]
    gate: Arc<Mutex<()>>,
}

/// How an open is kept inside the folder.
enum Confine {
    /// The kernel resolves the name beneath the folder's descriptor
    /// (openat2 with RESOLVE_BENEATH, Linux 5.6 and later) and refuses
    /// whatever would leave it, whatever was swapped in meanwhile.
    #[cfg(target_os = "linux")]
    Beneath(std::os::fd::OwnedFd),
    /// The path is checked, then where the opened file really is, as told
    /// by `locate`; a file that cannot be located is refused. Without
    /// `locate` (systems other than Linux), the check of the path stands.
    Paths {
        locate: Option<fn(&File) -> io::Result<PathBuf>>,
    },
}

struct Entry {
    version: Version,
    /// Filled by whichever request hashes first; the others wait on the
    /// lock instead of reading the file again.
    hash: Arc<Mutex<Option<ContentHash>>>,
    /// Counts the versions of this file seen; orders hashes that finish.
    seq: u64,
    /// The newest complete hash of this file, whatever its version.
    done: Option<Done>,
    /// How many background hashes in a row found the file changed by the
    /// time they finished.
    changed_while_hashing: u32,
}

/// A complete hash of one version of a file: of its first `version.size` bytes.
#[derive(Clone, Copy, Debug)]
struct Done {
    seq: u64,
    version: Version,
    hash: ContentHash,
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

    /// Whether both are versions of the same file (not a replacement).
    fn same_file(&self, other: &Version) -> bool {
        #[cfg(unix)]
        return (self.inode.0, self.inode.1) == (other.inode.0, other.inode.1);
        #[cfg(not(unix))]
        return false;
    }
}

/// A file ready to be sent.
pub struct Served {
    pub file: File,
    /// How many bytes to send: the whole file, or the part of a file that
    /// keeps changing that `hash` covers.
    pub size: u64,
    pub hash: ContentHash,
}

/// What `slot` found for one version of a file.
struct Slot {
    hash: Arc<Mutex<Option<ContentHash>>>,
    seq: u64,
    /// The newest complete hash of an earlier version, when the file keeps
    /// changing; what to serve rather than `busy`.
    stale: Option<Done>,
    /// The file changed while it was last hashed.
    changing: bool,
}

/// The folder given cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot use folder {}: {source}", .path.display())]
pub struct FolderError {
    /// The folder as given.
    pub path: PathBuf,
    /// What the system said.
    #[source]
    pub source: io::Error,
}

impl Library {
    #[cfg(test)]
    pub fn open(dir: &Path) -> Result<Self, FolderError> {
        Library::open_with(dir, Options::default())
    }

    pub fn open_with(dir: &Path, options: Options) -> Result<Self, FolderError> {
        let failed = |source| FolderError {
            path: dir.to_path_buf(),
            source,
        };
        let root = fs::canonicalize(dir).map_err(failed)?;
        if !root.is_dir() {
            return Err(failed(io::ErrorKind::NotADirectory.into()));
        }
        let confine = Confine::best(&root).map_err(failed)?;
        Ok(Library {
            root,
            confine,
            options,
            hashes: Arc::default(),
            outboards: Arc::default(),
            background: Arc::default(),
            on_hashed: Arc::default(),
            inline_hash_max: INLINE_HASH_MAX,
            #[cfg(test)]
            hashed: Arc::default(),
            #[cfg(test)]
            gate: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `name` if it is a regular file inside the folder once every
    /// symlink is followed; anything else is refused.
    pub fn open_file(&self, name: &FileName) -> Result<Served, Refusal> {
        self.open_hashed(name, false)
    }

    fn open_hashed(&self, name: &FileName, always_inline: bool) -> Result<Served, Refusal> {
        let (file, meta, key) = self.open_regular(name)?;
        // Size and time of the open file itself, not of whatever the path
        // points to by now.
        let size = meta.len();
        let version = Version::of(&meta);
        let slot = self.slot(&key, version);
        if size <= self.inline_hash_max || always_inline {
            let hash = hash_into(&slot.hash, &file, size, &self.outboards)
                .map_err(|e| refusal(name, e))?;
            record(&self.hashes, &key, slot.seq, version, hash, false);
            return Ok(Served { file, size, hash });
        }
        let stale = slot.stale;
        match self.hash_in_background(name, slot, key, version, &file) {
            Ok(hash) => Ok(Served { file, size, hash }),
            // Only what was there when it was hashed goes out: if that part
            // changed since (not just appended to), the client's check of
            // the hash fails and says so.
            Err(busy) => match stale {
                Some(done) if done.version.same_file(&version) && done.version.size <= size => {
                    debug!(
                        "{name:?} keeps changing: serving its first {} of {size} bytes, as last hashed",
                        done.version.size
                    );
                    Ok(Served {
                        file,
                        size: done.version.size,
                        hash: done.hash,
                    })
                }
                _ => Err(busy),
            },
        }
    }

    /// Opens `name` if it would be served: a regular file inside the folder
    /// that the peer can read, with no other hard link unless allowed.
    /// Returns it with its metadata and its path inside the folder.
    fn open_regular(&self, name: &FileName) -> Result<(File, fs::Metadata, PathBuf), Refusal> {
        let (file, inside) = self.open_confined(name)?;
        let meta = file.metadata().map_err(|e| refusal(name, e))?;
        if !meta.is_file() {
            return Err(Refusal::NotFound(name.clone()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if meta.nlink() > 1 && !self.options.allow_hardlinks {
                return Err(forbidden(name, HARD_LINKED));
            }
        }
        Ok((file, meta, inside))
    }

    /// Opens `name` for reading if it is inside the folder once every
    /// symlink is followed, without blocking on a FIFO; returns it with its
    /// path inside the folder, symlinks resolved.
    fn open_confined(&self, name: &FileName) -> Result<(File, PathBuf), Refusal> {
        let mut tries = 0;
        loop {
            // Every symlink is followed first, so that absolute symlinks to
            // files inside are served too (openat2 beneath the folder
            // refuses every absolute symlink); what is left is a path
            // without symlinks, opened beneath the folder.
            let real =
                fs::canonicalize(self.root.join(name.to_path())).map_err(|e| refusal(name, e))?;
            let inside = real
                .strip_prefix(&self.root)
                .map_err(|_| forbidden(name, OUTSIDE))?;
            match self.open_beneath(inside) {
                Ok(file) => return Ok((self.check_location(name, file)?, inside.to_path_buf())),
                // Something was swapped in since the path was resolved (a
                // symlink where a file was): resolve it again.
                Err(e) if lost_a_race(&e) && tries < RACE_RETRIES => tries += 1,
                Err(e) => return Err(refusal(name, e)),
            }
        }
    }

    /// Opens a path inside the folder for reading, following no final
    /// symlink, without blocking on a FIFO (non-blocking mode changes
    /// nothing for regular files).
    fn open_beneath(&self, inside: &Path) -> io::Result<File> {
        match &self.confine {
            #[cfg(target_os = "linux")]
            Confine::Beneath(dir) => {
                use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
                let fd = openat2(
                    dir,
                    inside,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
                )?;
                Ok(File::from(fd))
            }
            Confine::Paths { .. } => open_checked(&self.root.join(inside)),
        }
    }

    /// Without openat2, the path was checked a moment ago, and whoever can
    /// write to the folder could have swapped something in since: so check
    /// where the file opened really is, and refuse it when that cannot be
    /// told.
    fn check_location(&self, name: &FileName, file: File) -> Result<File, Refusal> {
        let Confine::Paths {
            locate: Some(locate),
        } = &self.confine
        else {
            return Ok(file);
        };
        match locate(&file) {
            Ok(real) if real.starts_with(&self.root) => Ok(file),
            Ok(_) => Err(forbidden(name, OUTSIDE)),
            Err(e) => {
                debug!("cannot tell where {name:?} is: {e}");
                Err(forbidden(name, UNCHECKED))
            }
        }
    }

    /// The cache entry for this version of the file at `key`.
    fn slot(&self, key: &Path, version: Version) -> Slot {
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(key) && cache.len() >= HASH_CACHE_LEN {
            // Full (a folder that keeps changing): make room for one.
            if let Some(old) = cache.keys().next().cloned() {
                cache.remove(&old);
            }
        }
        let entry = cache.entry(key.to_path_buf()).or_insert_with(|| Entry {
            version,
            hash: Arc::default(),
            seq: 0,
            done: None,
            changed_while_hashing: 0,
        });
        if entry.version != version {
            entry.version = version;
            entry.hash = Arc::default();
            entry.seq += 1;
        }
        Slot {
            hash: Arc::clone(&entry.hash),
            seq: entry.seq,
            stale: entry
                .done
                .filter(|_| entry.changed_while_hashing >= KEEP_CHANGING),
            changing: entry.changed_while_hashing > 0,
        }
    }

    /// The hash of a big file if known; otherwise starts hashing it (once)
    /// and answers `busy`.
    fn hash_in_background(
        &self,
        name: &FileName,
        slot: Slot,
        key: PathBuf,
        version: Version,
        file: &File,
    ) -> Result<ContentHash, Refusal> {
        let size = version.size;
        let busy = || {
            Refusal::Busy(if slot.changing {
                format!("{name:?} ({size} bytes) keeps changing and is being hashed again; try again in a few seconds")
            } else {
                format!("{name:?} ({size} bytes) is being hashed; try again in a few seconds")
            })
        };
        match slot.hash.try_lock() {
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
        // The very file opened and checked, not the path again.
        let file = match file.try_clone() {
            Ok(file) => file,
            Err(e) => {
                self.background.fetch_sub(1, Ordering::SeqCst);
                return Err(refusal(name, e));
            }
        };
        let message = busy();
        let background = Arc::clone(&self.background);
        let hashes = Arc::clone(&self.hashes);
        let outboards = Arc::clone(&self.outboards);
        let on_hashed = Arc::clone(&self.on_hashed);
        #[cfg(test)]
        let hashed = Arc::clone(&self.hashed);
        #[cfg(test)]
        let gate = Arc::clone(&self.gate);
        let name = name.clone();
        let seq = slot.seq;
        let spawned = thread::Builder::new().name("hash".into()).spawn(move || {
            #[cfg(test)]
            drop(lock(&gate));
            let started = Instant::now();
            match hash_into(&slot.hash, &file, size, &outboards) {
                Ok(hash) => {
                    let changed = file
                        .metadata()
                        .map_or(true, |meta| Version::of(&meta) != version);
                    record(&hashes, &key, seq, version, hash, changed);
                    info!(
                        "hashed {name:?} ({size} bytes) in {:.1?}{}",
                        started.elapsed(),
                        if changed {
                            "; it changed meanwhile"
                        } else {
                            ""
                        }
                    );
                }
                Err(e) => warn!("cannot hash {name:?}: {e}"),
            }
            background.fetch_sub(1, Ordering::SeqCst);
            if let Some(hook) = on_hashed.get() {
                hook();
            }
            #[cfg(test)]
            {
                let (count, finished) = &*hashed;
                *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                finished.notify_all();
            }
        });
        if spawned.is_err() {
            self.background.fetch_sub(1, Ordering::SeqCst);
        }
        Err(message)
    }

    /// Has `hook` called after each background hash (once set, for good).
    pub fn on_hashed(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_hashed.set(Box::new(hook));
    }

    /// The outboard of the content `served` (made when it was hashed, or
    /// now from the open file if it was evicted since); `None` when the
    /// file no longer has that content (it changed in place).
    pub fn outboard(&self, served: &Served) -> io::Result<Option<Arc<Outboard>>> {
        if let Some(found) = lock(&self.outboards).get(&served.hash) {
            return Ok(Some(found));
        }
        let made = make_outboard(&served.file, served.size)?;
        if made.hash() != served.hash {
            return Ok(None);
        }
        Ok(Some(lock(&self.outboards).insert(made)))
    }

    /// Computes and caches the hash of every file listed, until `stop`.
    pub fn warm_up(&self, stop: &dyn Fn() -> bool) {
        let started = Instant::now();
        let Ok(listing) = self.list(MAX_FILES) else {
            return;
        };
        let hashed = listing
            .entries
            .iter()
            .take_while(|_| !stop())
            .filter(|e| self.open_hashed(&e.name, true).is_ok())
            .count();
        info!("files hashed: {hashed}, in {:.1?}", started.elapsed());
        // Big files hashed only now were left out of earlier announcements.
        if let Some(hook) = self.on_hashed.get() {
            hook();
        }
    }

    /// Every file `GET` would serve, sorted by name, at most `limit`; says
    /// whether there were more. Names that cannot travel (not UTF-8, control
    /// characters) are left out.
    ///
    /// Each file is opened, as a `GET` would: only that tells whether the
    /// peer may read it (permission bits do not, for root, or with ACLs),
    /// and it is done for at most `limit` files plus those refused.
    /// What to announce to the relay: the first `limit` files by name with
    /// their sizes and hashes, and how many files were left out (over the
    /// limit, or not hashed yet: a big file still being hashed in the
    /// background is announced once it is done).
    pub fn holdings(&self, limit: usize) -> io::Result<(Vec<Holding>, usize)> {
        let listing = self.list(MAX_FILES)?;
        let mut holdings = Vec::with_capacity(listing.entries.len().min(limit));
        let mut left_out = 0;
        for entry in listing.entries {
            if holdings.len() >= limit {
                left_out += 1;
                continue;
            }
            match self.open_hashed(&entry.name, false) {
                Ok(served) => holdings.push(Holding {
                    name: entry.name,
                    size: served.size,
                    hash: served.hash,
                }),
                Err(refusal) => {
                    debug!("not announced: {refusal}");
                    left_out += 1;
                }
            }
        }
        Ok((holdings, left_out))
    }

    pub fn list(&self, limit: usize) -> io::Result<Listing> {
        let mut walk = Walk::default();
        self.walk(&self.root, "", 0, &mut walk)?;
        if walk.unnamed > 0 {
            debug!(
                "not listed: {} names that cannot be sent (not UTF-8, control characters, too long)",
                walk.unnamed
            );
        }
        let mut listing = Listing {
            entries: Vec::new(),
            truncated: walk.visited >= MAX_VISITED,
        };
        walk.found.sort();
        for name in walk.found {
            match self.open_regular(&name) {
                Ok(_) if listing.entries.len() >= limit => {
                    listing.truncated = true;
                    break;
                }
                Ok((_, meta, _)) => listing.entries.push(FileEntry {
                    size: meta.len(),
                    name,
                }),
                Err(refusal) => debug!("not listed: {refusal}"),
            }
        }
        Ok(listing)
    }

    /// Collects the names of files and symlinks under `dir`.
    fn walk(&self, dir: &Path, prefix: &str, depth: usize, walk: &mut Walk) -> io::Result<()> {
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
            if walk.visited >= MAX_VISITED {
                return Ok(());
            }
            walk.visited += 1;
            let Ok(entry) = entry else { continue };
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            // FIFOs, sockets and devices are never served.
            if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
                continue;
            }
            let part = entry.file_name();
            let name = part
                .to_str()
                .and_then(|part| FileName::new(&format!("{prefix}{part}")).ok());
            let Some(name) = name else {
                walk.unnamed += 1;
                continue;
            };
            if kind.is_dir() {
                if depth < MAX_DEPTH {
                    self.walk(&entry.path(), &format!("{name}/"), depth + 1, walk)?;
                }
            } else {
                // Symlinks count when they lead to a file inside, which
                // opening them tells; symlinked folders are not entered, so
                // no loops.
                walk.found.push(name);
            }
        }
        Ok(())
    }
}

/// What a walk of the folder found.
#[derive(Default)]
struct Walk {
    found: Vec<FileName>,
    /// Entries looked at.
    visited: usize,
    /// Names left out because they cannot travel.
    unnamed: usize,
}

impl Confine {
    /// openat2 where the kernel has it; path checks where not.
    fn best(root: &Path) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{open, openat2, Mode, OFlags, ResolveFlags};
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let dir = open(root, flags, Mode::empty())?;
            let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
            match openat2(&dir, ".", flags, Mode::empty(), beneath) {
                Ok(_) => return Ok(Confine::Beneath(dir)),
                // ENOSYS before Linux 5.6; EPERM or ENOSYS under some
                // container seccomp filters.
                Err(e) => warn!(
                    "openat2 is not available ({e}): checking the path, then where each opened file is"
                ),
            }
        }
        Ok(Confine::paths())
    }

    fn paths() -> Self {
        Confine::Paths {
            locate: LOCATE_OPEN_FILE,
        }
    }
}

/// Tells where an open file is, as the kernel sees it (Linux). Elsewhere
/// there is no such check, and the check of the path stands alone.
#[cfg(target_os = "linux")]
const LOCATE_OPEN_FILE: Option<fn(&File) -> io::Result<PathBuf>> = Some(|file| {
    use std::os::fd::AsRawFd;
    fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
});
#[cfg(not(target_os = "linux"))]
const LOCATE_OPEN_FILE: Option<fn(&File) -> io::Result<PathBuf>> = None;

/// Records a finished hash as the newest complete one of `key`, unless a
/// later version's finished first.
fn record(
    hashes: &Mutex<HashMap<PathBuf, Entry>>,
    key: &Path,
    seq: u64,
    version: Version,
    hash: ContentHash,
    changed_meanwhile: bool,
) {
    let mut cache = hashes.lock().unwrap_or_else(|p| p.into_inner());
    let Some(entry) = cache.get_mut(key) else {
        return;
    };
    if entry.done.is_some_and(|done| done.seq >= seq) {
        return;
    }
    entry.done = Some(Done { seq, version, hash });
    entry.changed_while_hashing = if changed_meanwhile {
        entry.changed_while_hashing.saturating_add(1)
    } else {
        0
    };
}

/// Whether an open failed because the folder changed between resolving a
/// name and opening it, so that trying again may well succeed.
fn lost_a_race(e: &io::Error) -> bool {
    #[cfg(unix)]
    return matches!(
        e.raw_os_error(),
        Some(libc::ELOOP | libc::EAGAIN | libc::EXDEV)
    );
    #[cfg(not(unix))]
    return false;
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
/// for the same version already did; waits if one is at it. The outboard
/// made on the way is kept in `outboards`. Reads at positions, so that the
/// file's offset (shared with the request that sends it) is left alone.
fn hash_into(
    slot: &Mutex<Option<ContentHash>>,
    file: &File,
    size: u64,
    outboards: &Mutex<Outboards>,
) -> io::Result<ContentHash> {
    let mut done = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(hash) = *done {
        return Ok(hash);
    }
    let made = make_outboard(file, size)?;
    let hash = made.hash();
    lock(outboards).insert(made);
    *done = Some(hash);
    Ok(hash)
}

/// The outboard of the first `size` bytes of `file` (only those: a file
/// still growing must hash to what is sent), read by position.
fn make_outboard(file: &File, size: u64) -> io::Result<Outboard> {
    let reader = BufReader::with_capacity(HASH_READ, ReadAt { file, at: 0 }.take(size));
    proof::outboard(reader, size)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Outboards by content hash, oldest evicted first once over
/// `OUTBOARD_CACHE_BYTES`.
#[derive(Default)]
struct Outboards {
    by_hash: HashMap<ContentHash, Arc<Outboard>>,
    order: VecDeque<ContentHash>,
    bytes: usize,
}

impl Outboards {
    fn get(&self, hash: &ContentHash) -> Option<Arc<Outboard>> {
        self.by_hash.get(hash).cloned()
    }

    /// Keeps `made` unless it alone is over the budget; returns it shared.
    fn insert(&mut self, made: Outboard) -> Arc<Outboard> {
        let hash = made.hash();
        if let Some(found) = self.by_hash.get(&hash) {
            return Arc::clone(found);
        }
        let made = Arc::new(made);
        if made.bytes() > OUTBOARD_CACHE_BYTES {
            return made;
        }
        while self.bytes + made.bytes() > OUTBOARD_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.by_hash.remove(&old) {
                self.bytes -= gone.bytes();
            }
        }
        self.bytes += made.bytes();
        self.order.push_back(hash);
        self.by_hash.insert(hash, Arc::clone(&made));
        made
    }
}

/// Reads a file from the start by position, not through its offset.
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(unix)]
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        #[cfg(not(unix))]
        let n = {
            use std::io::{Seek, SeekFrom};
            let mut file = self.file;
            file.seek(SeekFrom::Start(self.at))?;
            file.read(buf)?
        };
        self.at += n as u64;
        Ok(n)
    }
}

fn forbidden(name: &FileName, reason: &'static str) -> Refusal {
    Refusal::Forbidden {
        name: name.clone(),
        reason,
    }
}

/// What an error opening or reading `name` means for the caller; the
/// error itself stays in the log.
fn refusal(name: &FileName, e: io::Error) -> Refusal {
    #[cfg(unix)]
    match e.raw_os_error() {
        // A symlink loop, a final symlink (O_NOFOLLOW), a magic link.
        Some(libc::ELOOP) => return forbidden(name, SYMLINK),
        // openat2 beneath the folder: the path would leave it.
        Some(libc::EXDEV) => return forbidden(name, OUTSIDE),
        // A name longer than the file system allows names no file.
        Some(libc::ENAMETOOLONG) => return Refusal::NotFound(name.clone()),
        // Opening a socket (ENXIO) or a device without its driver: not a
        // regular file, like a FIFO or a folder.
        Some(libc::ENXIO | libc::ENODEV) => return Refusal::NotFound(name.clone()),
        // Resolution raced with a rename every time it was tried.
        Some(libc::EAGAIN) => {
            return Refusal::Busy(format!("{name:?} is being moved; try again"));
        }
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Refusal::NotFound(name.clone()),
        io::ErrorKind::PermissionDenied => forbidden(name, UNREADABLE),
        _ => Refusal::Io {
            name: name.clone(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::time::Duration;

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    fn code(refusal: &Refusal) -> ErrorCode {
        ErrorReply::from(refusal).code
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
        symlink("sub/b.txt", dir.path().join("relative-alias")).unwrap();
        let lib = Library::open(dir.path()).unwrap();
        (outside, dir, lib)
    }

    /// The same folder, confined the way kernels without openat2 are.
    fn by_paths(dir: &Path, locate: fn(&File) -> io::Result<PathBuf>) -> Library {
        let mut lib = Library::open(dir).unwrap();
        lib.confine = Confine::Paths {
            locate: Some(locate),
        };
        lib
    }

    fn names(listing: &Listing) -> Vec<String> {
        listing.entries.iter().map(|e| e.name.to_string()).collect()
    }

    #[test]
    fn serves_files_inside_with_their_hash() {
        let (_outside, dir, lib) = setup();
        let paths = by_paths(dir.path(), LOCATE_OPEN_FILE.unwrap());
        for lib in [lib, paths] {
            let served = lib.open_file(&name("a.txt")).unwrap();
            assert_eq!(served.size, 5);
            assert_eq!(served.hash, blake3::hash(b"hello"));
            assert_eq!(lib.open_file(&name("sub/b.txt")).unwrap().size, 3);
            for alias in ["alias", "subalias/b.txt", "relative-alias"] {
                assert!(lib.open_file(&name(alias)).is_ok(), "{alias}");
            }
            assert_eq!(
                lib.open_file(&name("alias")).unwrap().hash,
                blake3::hash(b"hello")
            );
        }
    }

    #[test]
    fn symlinks_out_of_the_folder_are_forbidden() {
        let (_outside, dir, lib) = setup();
        let paths = by_paths(dir.path(), LOCATE_OPEN_FILE.unwrap());
        for lib in [lib, paths] {
            for n in ["escape", "escape-dir/secret"] {
                let err = lib.open_file(&name(n)).err().unwrap();
                assert_eq!(code(&err), ErrorCode::Forbidden, "{n}");
            }
        }
    }

    #[test]
    fn the_kernel_confines_opens_on_this_machine() {
        let (_outside, _dir, lib) = setup();
        assert!(
            matches!(lib.confine, Confine::Beneath(_)),
            "openat2 is expected on the kernels this runs on"
        );
    }

    /// What a swap between resolving a name and opening it would leave:
    /// a path whose parts are symlinks out of the folder. openat2 beneath
    /// the folder refuses to follow them, absolute or relative.
    #[test]
    fn a_symlink_swapped_in_after_the_check_cannot_lead_out() {
        let (outside, dir, lib) = setup();
        let secret_dir = outside.path().file_name().unwrap().to_str().unwrap();
        symlink(
            format!("../{secret_dir}/secret"),
            dir.path().join("relative-escape"),
        )
        .unwrap();
        symlink(format!("../{secret_dir}"), dir.path().join("relative-dir")).unwrap();
        for inside in ["escape-dir/secret", "relative-dir/secret", "sub/../../x"] {
            let err = lib.open_beneath(Path::new(inside)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{inside}: {err}");
        }
        // A final symlink is not followed at all.
        for inside in ["escape", "relative-escape", "alias"] {
            let err = lib.open_beneath(Path::new(inside)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{inside}: {err}");
        }
        // And the whole request is refused.
        for n in ["relative-escape", "relative-dir/secret"] {
            let err = lib.open_file(&name(n)).err().unwrap();
            assert_eq!(code(&err), ErrorCode::Forbidden, "{n}");
        }
    }

    #[test]
    fn an_open_file_is_judged_by_where_it_really_is() {
        let (outside, dir, _lib) = setup();
        let lib = by_paths(dir.path(), LOCATE_OPEN_FILE.unwrap());
        let inside = File::open(lib.root().join("a.txt")).unwrap();
        assert!(lib.check_location(&name("a.txt"), inside).is_ok());
        let secret = File::open(outside.path().join("secret")).unwrap();
        let err = lib.check_location(&name("a.txt"), secret).unwrap_err();
        assert_eq!(code(&err), ErrorCode::Forbidden);
    }

    #[test]
    fn without_openat2_a_file_that_cannot_be_located_is_refused() {
        let (_outside, dir, _lib) = setup();
        let lib = by_paths(dir.path(), |_| Err(io::Error::other("no /proc here")));
        let err = lib.open_file(&name("a.txt")).err().unwrap();
        assert_eq!(code(&err), ErrorCode::Forbidden, "{err}");
        assert!(err.to_string().contains("cannot be checked"), "{err}");
        assert!(lib.list(100).unwrap().entries.is_empty());
    }

    #[test]
    fn a_fifo_or_a_final_symlink_is_not_opened_blindly() {
        let (_outside, dir, lib) = setup();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // Would block forever without O_NONBLOCK: no writer ever comes.
        let opened = open_checked(&fifo).unwrap();
        assert!(!opened.metadata().unwrap().is_file());
        let opened = lib.open_beneath(Path::new("fifo")).unwrap();
        assert!(!opened.metadata().unwrap().is_file());
        assert!(matches!(
            lib.open_file(&name("fifo")),
            Err(Refusal::NotFound(_))
        ));
        // A symlink as the last part is refused, not followed.
        assert!(open_checked(&dir.path().join("escape")).is_err());
    }

    #[test]
    fn missing_files_and_folders_are_not_found() {
        let (_outside, _dir, lib) = setup();
        for n in ["nope", "sub", "a.txt/x", "sub/nope"] {
            assert_eq!(
                code(&lib.open_file(&name(n)).err().unwrap()),
                ErrorCode::NotFound,
                "{n}"
            );
        }
    }

    #[test]
    fn odd_files_get_the_codes_of_the_spec() {
        let (_outside, dir, lib) = setup();
        symlink("loop", dir.path().join("loop")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("socket")).unwrap();
        let long = "a".repeat(256);
        for (n, expected) in [
            ("loop", ErrorCode::Forbidden),
            ("loop/x", ErrorCode::Forbidden),
            ("socket", ErrorCode::NotFound),
            (long.as_str(), ErrorCode::NotFound),
            (&format!("sub/{long}/x"), ErrorCode::NotFound),
        ] {
            let err = lib.open_file(&name(n)).err().unwrap();
            let reply = ErrorReply::from(&err);
            assert_eq!(reply.code, expected, "{n}: {err}");
            assert!(!reply.message.contains("os error"), "{n}: {reply}");
        }
    }

    #[test]
    fn an_internal_error_keeps_the_system_error_out_of_the_reply() {
        let err = refusal(&name("a"), io::Error::from_raw_os_error(libc::EIO));
        assert!(
            err.to_string().contains("os error"),
            "the log has it: {err}"
        );
        let reply = ErrorReply::from(&err);
        assert_eq!(reply.code, ErrorCode::Internal);
        assert_eq!(reply.message, "cannot read \"a\"");
    }

    /// A file swapped for symlinks (one out, one in) and back while it is
    /// asked for: every answer is the file, not-found or forbidden, never
    /// `internal`, never the secret.
    #[test]
    fn a_symlink_swap_race_never_gets_internal_nor_the_secret() {
        let (outside, dir, lib) = setup();
        let target = dir.path().join("x");
        fs::write(&target, "inside").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swaps = Arc::new(AtomicUsize::new(0));
        let swapper = {
            let (dir, outside, stop, swaps) = (
                dir.path().to_path_buf(),
                outside.path().to_path_buf(),
                Arc::clone(&stop),
                Arc::clone(&swaps),
            );
            thread::spawn(move || {
                for i in 0..10_000_000 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let temp = dir.join(format!("swap{}", i % 16));
                    match i % 3 {
                        0 => symlink(outside.join("secret"), &temp).unwrap(),
                        1 => symlink("a.txt", &temp).unwrap(),
                        _ => fs::write(&temp, "inside").unwrap(),
                    }
                    fs::rename(&temp, dir.join("x")).unwrap();
                    swaps.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // Until both sides have done enough to meet many times, however
        // the two threads are scheduled on a busy machine.
        let started = std::time::Instant::now();
        let mut asked = 0;
        while asked < 10_000 || swaps.load(Ordering::SeqCst) < 3_000 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "{asked} requests and {} swaps in a minute",
                swaps.load(Ordering::SeqCst)
            );
            match lib.open_file(&name("x")) {
                Ok(mut served) => {
                    let mut content = String::new();
                    served.file.read_to_string(&mut content).unwrap();
                    assert!(content == "inside" || content == "hello", "{content}");
                }
                Err(e) => assert!(
                    matches!(code(&e), ErrorCode::Forbidden | ErrorCode::NotFound),
                    "request {asked}: {e}"
                ),
            }
            asked += 1;
        }
        stop.store(true, Ordering::SeqCst);
        swapper.join().unwrap();
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
        let outboards = Mutex::default();
        let hash = hash_into(&slot, &File::open(&path).unwrap(), served.size, &outboards).unwrap();
        assert_eq!(hash, blake3::hash(b"hello"));
    }

    #[test]
    fn one_request_hashes_and_the_others_reuse_it() {
        let (_outside, _dir, lib) = setup();
        let first = lib.open_file(&name("a.txt")).unwrap();
        let meta = first.file.metadata().unwrap();
        let slot = lib.slot(Path::new("a.txt"), Version::of(&meta));
        assert_eq!(*slot.hash.lock().unwrap(), Some(blake3::hash(b"hello")));
    }

    /// Waits until `count` background hashes have finished.
    fn hashes_finished(lib: &Library, count: usize) {
        let (finished, changed) = &*lib.hashed;
        let (done, timeout) = changed
            .wait_timeout_while(finished.lock().unwrap(), Duration::from_secs(10), |n| {
                *n < count
            })
            .unwrap();
        assert!(!timeout.timed_out(), "{} of {count} hashes finished", *done);
    }

    #[test]
    fn a_big_file_is_hashed_in_the_background_while_requests_get_busy() {
        let (_outside, _dir, mut lib) = setup();
        lib.inline_hash_max = 2;
        let err = lib
            .open_file(&name("a.txt"))
            .err()
            .expect("busy while hashing");
        assert_eq!(code(&err), ErrorCode::Busy);
        assert!(err.to_string().contains("is being hashed"), "{err}");
        hashes_finished(&lib, 1);
        let served = lib.open_file(&name("a.txt")).unwrap();
        assert_eq!(served.hash, blake3::hash(b"hello"));
    }

    /// A log that is appended to all the time: every request would find a
    /// new version not hashed yet. Once the file has changed while being
    /// hashed twice in a row, it is served as last hashed: that many bytes,
    /// with their hash.
    #[test]
    fn a_big_file_that_keeps_changing_is_served_as_last_hashed() {
        let (_outside, dir, mut lib) = setup();
        lib.inline_hash_max = 1000;
        let path = dir.path().join("log");
        fs::write(&path, vec![b'x'; 2000]).unwrap();
        let mut log = File::options().append(true).open(&path).unwrap();
        let mut started = 0;
        let mut served = None;
        for round in 0..10 {
            // The log grows while the hash runs: the hash waits for it.
            let gate = Arc::clone(&lib.gate);
            let held = lock(&gate);
            match lib.open_file(&name("log")) {
                Ok(s) => {
                    served = Some((round, s));
                    break;
                }
                Err(e) => assert_eq!(code(&e), ErrorCode::Busy, "{e}"),
            }
            started += 1;
            // The log grows while the hash runs, and before the next request.
            std::io::Write::write_all(&mut log, &[b'y'; 100]).unwrap();
            drop(held);
            hashes_finished(&lib, started);
        }
        let (round, mut served) = served.expect("served within 10 requests");
        assert!(round <= KEEP_CHANGING as usize + 1, "took {round} requests");
        let content = fs::read(&path).unwrap();
        assert!(served.size < content.len() as u64);
        assert_eq!(served.hash, blake3::hash(&content[..served.size as usize]));
        // What goes out is the same prefix (the sender sends `size` bytes).
        let mut sent = Vec::new();
        (&mut served.file)
            .take(served.size)
            .read_to_end(&mut sent)
            .unwrap();
        assert_eq!(blake3::hash(&sent), served.hash);
    }

    #[test]
    fn a_big_file_changed_once_is_not_served_stale() {
        let (_outside, dir, mut lib) = setup();
        lib.inline_hash_max = 2;
        assert!(lib.open_file(&name("a.txt")).is_err());
        hashes_finished(&lib, 1);
        assert!(lib.open_file(&name("a.txt")).is_ok());
        fs::write(dir.path().join("a.txt"), "hello, world").unwrap();
        // Busy until its new hash is done (which may be at once), and
        // never the old content's hash.
        for _ in 0..5 {
            match lib.open_file(&name("a.txt")) {
                Ok(served) => assert_eq!(served.hash, blake3::hash(b"hello, world")),
                Err(e) => assert_eq!(code(&e), ErrorCode::Busy),
            }
        }
        hashes_finished(&lib, 2);
        let served = lib.open_file(&name("a.txt")).unwrap();
        assert_eq!(served.hash, blake3::hash(b"hello, world"));
    }

    #[test]
    fn listing_holds_only_files_inside() {
        let (_outside, _dir, lib) = setup();
        let listing = lib.list(100).unwrap();
        assert_eq!(
            names(&listing),
            ["a.txt", "alias", "relative-alias", "sub/b.txt"]
        );
        assert!(!listing.truncated);
    }

    #[test]
    fn a_listing_is_sorted_then_cut_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // Created in an order unlike the sorted one.
        for n in ["m", "c", "x", "a", "q", "b"] {
            fs::write(dir.path().join(n), n).unwrap();
        }
        let lib = Library::open(dir.path()).unwrap();
        let cut = lib.list(3).unwrap();
        assert_eq!(names(&cut), ["a", "b", "c"]);
        assert!(cut.truncated);
        let whole = lib.list(6).unwrap();
        assert_eq!(names(&whole), ["a", "b", "c", "m", "q", "x"]);
        assert!(!whole.truncated);
    }

    #[test]
    fn a_listing_cut_where_only_refused_files_follow_is_whole() {
        let (_outside, _dir, lib) = setup();
        // "escape" and friends sort after "a.txt" but are not served.
        let listing = lib.list(4).unwrap();
        assert_eq!(listing.entries.len(), 4);
        assert!(!listing.truncated);
    }

    #[test]
    fn the_listing_goes_exactly_sixteen_folders_deep() {
        let dir = tempfile::tempdir().unwrap();
        let sixteen: PathBuf = (0..16).map(|i| format!("d{i}")).collect();
        let seventeen = sixteen.join("d16");
        fs::create_dir_all(dir.path().join(&seventeen)).unwrap();
        fs::write(dir.path().join(&sixteen).join("in"), "").unwrap();
        fs::write(dir.path().join(&seventeen).join("out"), "").unwrap();
        let lib = Library::open(dir.path()).unwrap();
        let listing = lib.list(100).unwrap();
        let expected = format!("{}/in", sixteen.display());
        assert_eq!(names(&listing), [expected]);
    }

    #[test]
    fn hard_links_are_refused_unless_allowed() {
        let (_outside, dir, lib) = setup();
        fs::hard_link(dir.path().join("a.txt"), dir.path().join("b.txt")).unwrap();
        for n in ["a.txt", "b.txt", "alias"] {
            let err = lib.open_file(&name(n)).err().unwrap();
            assert_eq!(code(&err), ErrorCode::Forbidden, "{n}");
            assert!(err.to_string().contains("--allow-hardlinks"), "{err}");
        }
        assert_eq!(
            names(&lib.list(100).unwrap()),
            ["relative-alias", "sub/b.txt"]
        );
        let allowed = Library::open_with(
            dir.path(),
            Options {
                allow_hardlinks: true,
            },
        )
        .unwrap();
        assert!(allowed.open_file(&name("b.txt")).is_ok());
        assert_eq!(allowed.list(100).unwrap().entries.len(), 5);
    }

    #[test]
    fn unreadable_files_are_not_listed() {
        let (_outside, dir, lib) = setup();
        let path = dir.path().join("locked");
        fs::write(&path, "locked").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).unwrap();
        if File::open(&path).is_ok() {
            // Root (or a capability) reads it anyway, and so would the peer.
            eprintln!("skipped: this user can read a file with mode 000");
            return;
        }
        assert!(!names(&lib.list(100).unwrap()).contains(&"locked".to_string()));
        let err = lib.open_file(&name("locked")).err().unwrap();
        assert_eq!(code(&err), ErrorCode::Forbidden);
    }

    #[test]
    fn nothing_that_would_be_refused_is_listed() {
        let (_outside, dir, lib) = setup();
        symlink("loop", dir.path().join("loop")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("socket")).unwrap();
        fs::create_dir(dir.path().join("linked")).unwrap();
        fs::hard_link(dir.path().join("sub/b.txt"), dir.path().join("linked/b")).unwrap();
        let listing = lib.list(100).unwrap();
        assert_eq!(names(&listing), ["a.txt", "alias"]);
        for entry in &listing.entries {
            assert!(lib.open_file(&entry.name).is_ok(), "{}", entry.name);
        }
    }
}
