//! The served folder: turns a requested name into an open file that is
//! certainly inside it, lists what it holds, and caches content hashes.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use anyhow::Context;
use protocol::{
    peer::{FileEntry, MAX_FILES},
    ContentHash, ErrorCode, ErrorReply, FileName,
};

/// How many content hashes are remembered before the cache starts over.
const HASH_CACHE_LEN: usize = 4096;
/// How deep `LIST` descends into subfolders.
const MAX_DEPTH: usize = 16;

pub struct Library {
    /// Canonical (symlink-free, absolute) path of the served folder.
    root: PathBuf,
    /// Hash of each file as of its size and modification time, so a file
    /// is read for hashing once, not once per request.
    hashes: Mutex<HashMap<PathBuf, (u64, SystemTime, ContentHash)>>,
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
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `name` if it is a regular file inside the folder once every
    /// symlink is followed; anything else is refused.
    pub fn open_file(&self, name: &FileName) -> Result<Served, ErrorReply> {
        let path = self.resolve(name)?;
        let file = File::open(&path).map_err(|e| io_refusal(name, &e))?;
        // Size and time of the open file itself, not of whatever the path
        // points to by now.
        let meta = file.metadata().map_err(|e| io_refusal(name, &e))?;
        if !meta.is_file() {
            return Err(not_found(name));
        }
        let size = meta.len();
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let hash = self
            .hash(&path, &file, size, modified)
            .map_err(|e| io_refusal(name, &e))?;
        Ok(Served { file, size, hash })
    }

    fn resolve(&self, name: &FileName) -> Result<PathBuf, ErrorReply> {
        let real =
            fs::canonicalize(self.root.join(name.to_path())).map_err(|e| io_refusal(name, &e))?;
        if !real.starts_with(&self.root) {
            return Err(ErrorReply::new(
                ErrorCode::Forbidden,
                format!("{name:?} leads outside the shared folder"),
            ));
        }
        match fs::metadata(&real) {
            Ok(meta) if meta.is_file() => Ok(real),
            Ok(_) => Err(not_found(name)),
            Err(e) => Err(io_refusal(name, &e)),
        }
    }

    fn hash(
        &self,
        path: &Path,
        file: &File,
        size: u64,
        modified: SystemTime,
    ) -> io::Result<ContentHash> {
        let lock = || self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(s, m, hash)) = lock().get(path) {
            if (s, m) == (size, modified) {
                return Ok(hash);
            }
        }
        // Hash without holding the lock: other files keep being served.
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file)?;
        let hash = hasher.finalize();
        let mut cache = lock();
        if cache.len() >= HASH_CACHE_LEN {
            cache.clear();
        }
        cache.insert(path.to_path_buf(), (size, modified, hash));
        Ok(hash)
    }

    /// Computes and caches the hash of every file listed.
    pub fn warm_up(&self) {
        let started = std::time::Instant::now();
        let Ok(entries) = self.list(MAX_FILES) else {
            return;
        };
        let hashed = entries
            .iter()
            .filter(|e| self.open_file(&e.name).is_ok())
            .count();
        log::info!("files hashed: {hashed}, in {:.1?}", started.elapsed());
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
        for entry in fs::read_dir(dir)? {
            if out.len() >= limit {
                return Ok(());
            }
            let entry = entry?;
            let Some(part) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let joined = format!("{prefix}{part}");
            let Ok(name) = FileName::new(&joined) else {
                continue;
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    self.walk(&entry.path(), &format!("{joined}/"), depth + 1, limit, out)?;
                }
            } else if kind.is_file() || (kind.is_symlink() && self.resolve(&name).is_ok()) {
                // Symlinks are listed only when they lead to a file inside;
                // symlinked folders are not entered, so no loops.
                if let Ok(meta) = fs::metadata(entry.path()) {
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
