//! Where fetched content goes: stdout, or a file that appears only once
//! complete and verified. A file is fetched into `PATH.part` beside it
//! (with `PATH.part.ranges`, the record of what is verified: see
//! `resume`), renamed into place once whole, so a failed fetch never
//! leaves half a file under its name, and a fetch that fails or is
//! interrupted leaves what it verified for the same command to continue.
//!
//! As with `curl -o`, a destination that is not a regular file is used as
//! it is: a symlink is written through (the rename happens beside its
//! final target, and the link stays), and a device or FIFO is written to
//! directly (`-o /dev/null` discards, `-o fifo` feeds whoever reads it).
//! Opening a FIFO waits for a reader, as curl does; that wait has no
//! bound, since the user chose the FIFO and can interrupt.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{
    fetch::{Sink, WriteAt},
    resume::Partial,
};

/// Why content cannot be saved where the user asked.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The path ends in `/` but names no folder.
    #[error("cannot save to {}: no such folder", .0.display())]
    NoFolder(PathBuf),
    /// The path is a folder (after adding the file's name to it).
    #[error("cannot save to {}: it is a folder", .0.display())]
    IsFolder(PathBuf),
    /// Another run is downloading to the same path.
    #[error("cannot save to {}: another download to it is running ({} is locked)", .dest.display(), .part.display())]
    InUse {
        /// The destination.
        dest: PathBuf,
        /// Its partial download.
        part: PathBuf,
    },
    /// A step on `path` failed: opening, creating the partial file,
    /// keeping the permissions, writing or renaming.
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        /// What was being done, as a verb phrase.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

fn failed<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SaveError + 'a {
    move |source| SaveError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Downloads in progress, kept for a later run (or removed when nothing
/// of them is verified) if the user interrupts.
static IN_PROGRESS: Mutex<Vec<Arc<Partial>>> = Mutex::new(Vec::new());

/// What a user is told about a partial download that is kept.
pub fn kept_message(part: &Path) -> String {
    format!(
        "partial download kept in {}; run the same command again to continue",
        part.display()
    )
}

/// Keeps `partial` for a later run if any of it is verified (recording
/// what is), removes it otherwise; returns its path if it is kept.
fn set_aside(partial: &Partial) -> Option<PathBuf> {
    if partial.bytes() == 0 {
        partial.remove();
        return None;
    }
    if let Err(e) = partial.save() {
        // The last record saved still holds; it names no lost byte.
        eprintln!(
            "cannot record the progress of {}: {e}",
            partial.path().display()
        );
    }
    Some(partial.path().to_path_buf())
}

/// On Ctrl-C (SIGINT) or SIGTERM, keeps partial downloads for the next run
/// (and says so), then exits as a shell expects of a process ended by
/// that signal: 128 + its number (130, 143).
pub fn clean_up_on_interrupt() -> io::Result<()> {
    use signal_hook::{
        consts::{SIGINT, SIGTERM},
        iterator::Signals,
    };
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    // Lives as long as the process: signals can come at any time.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let pending = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
                for partial in pending.iter() {
                    if let Some(part) = set_aside(partial) {
                        eprintln!("{}", kept_message(&part));
                    }
                }
                eprintln!("interrupted");
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// Raw standard output: content is written in large chunks straight to the
/// file descriptor, without Rust's line buffering of `Stdout`.
pub struct StdoutSink {
    out: Box<dyn Write + Send>,
    /// The last byte written, to know whether output ended a line.
    pub last: Option<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            out: raw_stdout(),
            last: None,
        }
    }
}

#[cfg(unix)]
fn raw_stdout() -> Box<dyn Write + Send> {
    use std::os::fd::AsFd;
    match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        Err(_) => Box::new(io::stdout()),
    }
}

#[cfg(not(unix))]
fn raw_stdout() -> Box<dyn Write + Send> {
    Box::new(io::stdout())
}

impl Sink for StdoutSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        if let Some(&b) = buf.last() {
            self.last = Some(b);
        }
        Ok(())
    }

    /// Known when stdout is a regular file (`> file`).
    fn room(&self) -> Option<u64> {
        let stdout = io::stdout();
        let meta = rustix::fs::fstat(&stdout).ok()?;
        let regular =
            rustix::fs::FileType::from_raw_mode(meta.st_mode) == rustix::fs::FileType::RegularFile;
        regular.then(|| free_space(&stdout)).flatten()
    }
}

/// Bytes an unprivileged writer can still put on the file system of `fd`.
fn free_space(fd: impl std::os::fd::AsFd) -> Option<u64> {
    let stats = rustix::fs::fstatvfs(fd).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

impl Drop for StdoutSink {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// A file being downloaded to `dest`.
pub struct FileSink {
    /// `None` once committed or set aside.
    out: Option<Out>,
    dest: PathBuf,
    /// The permissions of the file being replaced, kept for its successor.
    replaced: Option<std::fs::Permissions>,
}

enum Out {
    /// `dest.part`, renamed over `dest` once complete.
    Part(Arc<Partial>),
    /// A device or FIFO, written as the content comes: what is written
    /// cannot be taken back.
    Direct(File),
}

impl FileSink {
    /// Prepares to save to `dest`; a folder means a file in it named like
    /// the last part of `name`.
    pub fn create(dest: &Path, name: &protocol::FileName) -> Result<Self, SaveError> {
        // Checked now, not after a long download.
        let dest = if dest.is_dir() {
            let base = name.as_str().rsplit('/').next().unwrap_or(name.as_str());
            dest.join(base)
        } else if dest.as_os_str().as_encoded_bytes().ends_with(b"/") {
            return Err(SaveError::NoFolder(dest.to_path_buf()));
        } else {
            dest.to_path_buf()
        };
        if dest.is_dir() {
            return Err(SaveError::IsFolder(dest));
        }
        // A symlink is written through: the file replaced is its target.
        let dest = final_target(dest);
        if let Ok(meta) = std::fs::metadata(&dest) {
            if !meta.is_file() {
                // No truncation (a device) and no creation (it is there).
                let file = File::options()
                    .write(true)
                    .open(&dest)
                    .map_err(failed("write to", &dest))?;
                return Ok(FileSink {
                    out: Some(Out::Direct(file)),
                    dest,
                    replaced: None,
                });
            }
        }
        let partial = match Partial::open(&dest) {
            Ok(partial) => Arc::new(partial),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let part = PathBuf::from(format!("{}.part", dest.display()));
                return Err(SaveError::InUse { dest, part });
            }
            Err(e) => return Err(failed("create a file beside", &dest)(e)),
        };
        IN_PROGRESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&partial));
        let replaced = std::fs::metadata(&dest).ok().map(|m| m.permissions());
        Ok(FileSink {
            out: Some(Out::Part(partial)),
            dest,
            replaced,
        })
    }

    /// Moves the complete file into place.
    pub fn commit(mut self) -> Result<PathBuf, SaveError> {
        let partial = match self.out.take() {
            Some(Out::Part(partial)) => partial,
            Some(Out::Direct(mut file)) => {
                file.flush().map_err(failed("write to", &self.dest))?;
                return Ok(self.dest.clone());
            }
            // `commit` takes `self`: it cannot run twice.
            None => return Ok(self.dest.clone()),
        };
        forget(&partial);
        let dest = self.dest.clone();
        let part = partial.path().to_path_buf();
        if let Some(permissions) = self.replaced.take() {
            partial
                .file()
                .set_permissions(permissions)
                .map_err(failed("set permissions of", &part))?;
        }
        // No fsync, like curl and rsync: the rename keeps a crash or a kill
        // from leaving half a file, and durability is the file system's.
        std::fs::rename(&part, &dest).map_err(failed("save", &dest))?;
        partial.remove_record();
        Ok(dest)
    }

    /// Gives up on this run: keeps what is verified for the next one (and
    /// returns where), or removes the partial file when nothing is.
    pub fn set_aside(mut self) -> Option<PathBuf> {
        match self.out.take()? {
            Out::Part(partial) => {
                forget(&partial);
                set_aside(&partial)
            }
            Out::Direct(_) => None,
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if let Some(Out::Part(partial)) = self.out.take() {
            forget(&partial);
            set_aside(&partial);
        }
    }
}

fn forget(partial: &Arc<Partial>) {
    IN_PROGRESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| !Arc::ptr_eq(p, partial));
}

impl Sink for FileSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.out {
            Some(Out::Part(partial)) => partial.file().write_all(buf),
            Some(Out::Direct(file)) => file.write_all(buf),
            None => Err(io::Error::other("download already saved")),
        }
    }

    /// The free space beside the destination; unknown for a device or FIFO.
    fn room(&self) -> Option<u64> {
        match &self.out {
            Some(Out::Part(partial)) => free_space(partial.file()),
            _ => None,
        }
    }

    /// The partial file takes pieces at their offsets; a device or FIFO
    /// only in order.
    fn positional(&mut self) -> Option<Box<dyn WriteAt>> {
        match &self.out {
            Some(Out::Part(partial)) => partial
                .file()
                .try_clone()
                .ok()
                .map(|file| Box::new(file) as Box<dyn WriteAt>),
            _ => None,
        }
    }

    fn partial(&self) -> Option<Arc<Partial>> {
        match &self.out {
            Some(Out::Part(partial)) => Some(Arc::clone(partial)),
            _ => None,
        }
    }
}

/// Where a chain of symlinks at `path` ends (the path itself when it is
/// not a symlink), whether or not anything is there yet. Bounded like the
/// kernel's own resolution; a longer chain is left to fail when used.
fn final_target(mut path: PathBuf) -> PathBuf {
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        fs,
        io::Read,
        os::unix::fs::{symlink, FileTypeExt},
        process::Command,
        thread,
    };

    fn name() -> protocol::FileName {
        protocol::FileName::new("dir/file.txt").unwrap()
    }

    fn save(dest: &Path, content: &[u8]) -> PathBuf {
        let mut sink = FileSink::create(dest, &name()).unwrap();
        sink.write_all(content).unwrap();
        sink.commit().unwrap()
    }

    /// Files in `dir` other than the ones named: leftovers of a download.
    fn others(dir: &Path, expected: &[&str]) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !expected.contains(&n.as_str()))
            .collect()
    }

    #[test]
    fn a_regular_file_is_replaced_only_when_complete() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        fs::write(&dest, "old").unwrap();
        let mut sink = FileSink::create(&dest, &name()).unwrap();
        sink.write_all(b"half").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        drop(sink);
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert_eq!(others(dir.path(), &["out"]), Vec::<String>::new());
        save(&dest, b"new");
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        // A folder takes the file under its own name.
        assert_eq!(save(dir.path(), b"x"), dir.path().join("file.txt"));
    }

    #[test]
    fn a_symlink_is_written_through_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("real")).unwrap();
        let target = dir.path().join("real/target");
        fs::write(&target, "old").unwrap();
        let link = dir.path().join("link");
        symlink("real/target", &link).unwrap();
        let chain = dir.path().join("chain");
        symlink("link", &chain).unwrap();
        save(&chain, b"new");
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(fs::symlink_metadata(&chain).unwrap().is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(
            others(&dir.path().join("real"), &["target"]),
            Vec::<String>::new()
        );
        // A link to nothing yet: its target is created.
        let dangling = dir.path().join("dangling");
        symlink("real/new", &dangling).unwrap();
        save(&dangling, b"fresh");
        assert!(fs::symlink_metadata(&dangling).unwrap().is_symlink());
        assert_eq!(fs::read(dir.path().join("real/new")).unwrap(), b"fresh");
    }

    #[test]
    fn a_fifo_is_fed_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let reader = {
            let fifo = fifo.clone();
            // Opening a FIFO waits for the other end: the sink's open below.
            thread::spawn(move || {
                let mut got = Vec::new();
                fs::File::open(fifo).unwrap().read_to_end(&mut got).unwrap();
                got
            })
        };
        let mut sink = FileSink::create(&fifo, &name()).unwrap();
        sink.write_all(b"through the pipe").unwrap();
        sink.commit().unwrap();
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert_eq!(others(dir.path(), &["fifo"]), Vec::<String>::new());
    }

    /// A device node like /dev/null, made in a temporary folder so that a
    /// failure of this test cannot replace the real one.
    #[test]
    fn a_device_stays_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let null = dir.path().join("null");
        let made = Command::new("mknod")
            .arg(&null)
            .args(["c", "1", "3"])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: cannot make a device node here");
            return;
        }
        let mut sink = FileSink::create(&null, &name()).unwrap();
        sink.write_all(b"into nothing").unwrap();
        sink.commit().unwrap();
        assert!(fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(others(dir.path(), &["null"]), Vec::<String>::new());
        // The real one, which cannot be harmed by a read of its type.
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
    }
}
