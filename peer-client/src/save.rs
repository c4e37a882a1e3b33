//! Where fetched content goes: stdout, or a file that appears only once
//! complete and verified (written beside it under a temporary name, then
//! renamed into place), so a failed fetch never leaves half a file.

use std::{
    fs::File,
    io::{self, Seek, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::Context;
use tempfile::NamedTempFile;

use crate::fetch::Sink;

/// Why content cannot be saved where the user asked.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct SaveError(#[from] anyhow::Error);

/// Temporary files of downloads in progress, removed if the user interrupts.
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// On Ctrl-C or SIGTERM, remove partial downloads before exiting.
pub fn clean_up_on_interrupt() -> io::Result<()> {
    ctrlc::set_handler(|| {
        let pending = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
        for path in pending.iter() {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("interrupted");
        std::process::exit(130);
    })
    .map_err(io::Error::other)
}

/// Raw standard output: content is written in large chunks straight to the
/// file descriptor, without Rust's line buffering of `Stdout`.
pub struct StdoutSink {
    out: Box<dyn Write>,
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
fn raw_stdout() -> Box<dyn Write> {
    use std::os::fd::AsFd;
    match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        Err(_) => Box::new(io::stdout()),
    }
}

#[cfg(not(unix))]
fn raw_stdout() -> Box<dyn Write> {
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

    fn restart(&mut self) -> io::Result<bool> {
        Ok(false)
    }
}

impl Drop for StdoutSink {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// A file being downloaded to `dest`.
pub struct FileSink {
    /// `None` once committed.
    temp: Option<NamedTempFile>,
    dest: PathBuf,
    /// The permissions of the file being replaced, kept for its successor.
    replaced: Option<std::fs::Permissions>,
}

impl FileSink {
    /// Prepares to save to `dest`; a folder means a file in it named like
    /// the last part of `name`.
    pub fn create(dest: &Path, name: &protocol::FileName) -> Result<Self, SaveError> {
        Self::create_inner(dest, name).map_err(SaveError)
    }

    fn create_inner(dest: &Path, name: &protocol::FileName) -> anyhow::Result<Self> {
        // Checked now, not after a long download.
        let dest = if dest.is_dir() {
            let base = name.as_str().rsplit('/').next().unwrap_or(name.as_str());
            dest.join(base)
        } else if dest.as_os_str().as_encoded_bytes().ends_with(b"/") {
            anyhow::bail!("cannot save to {}: no such folder", dest.display());
        } else {
            dest.to_path_buf()
        };
        if dest.is_dir() {
            anyhow::bail!("cannot save to {}: it is a folder", dest.display());
        }
        let dir = match dest.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let prefix = format!(".{base}.");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".part");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Temporary files are private by default; this one becomes an
            // ordinary file, so create it as one (the umask applies).
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let temp = builder
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        IN_PROGRESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(temp.path().to_path_buf());
        let replaced = std::fs::metadata(&dest).ok().map(|m| m.permissions());
        Ok(FileSink {
            temp: Some(temp),
            dest,
            replaced,
        })
    }

    /// Moves the complete file into place.
    pub fn commit(self) -> Result<PathBuf, SaveError> {
        self.commit_inner().map_err(SaveError)
    }

    fn commit_inner(mut self) -> anyhow::Result<PathBuf> {
        let temp = self.temp.take().context("download already saved")?;
        let dest = self.dest.clone();
        let temp_path = temp.path().to_path_buf();
        if let Some(permissions) = self.replaced.take() {
            temp.as_file()
                .set_permissions(permissions)
                .with_context(|| format!("cannot set permissions of {}", temp_path.display()))?;
        }
        // No fsync, like curl and rsync: the rename keeps a crash or a kill
        // from leaving half a file, and durability is the file system's.
        temp.persist(&dest)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot save {}", dest.display()))?;
        forget(&temp_path);
        Ok(dest)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // NamedTempFile removes the file itself; just stop tracking it.
        if let Some(temp) = &self.temp {
            forget(temp.path());
        }
    }
}

fn forget(path: &Path) {
    IN_PROGRESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|p| p != path);
}

impl FileSink {
    fn file(&mut self) -> io::Result<&mut File> {
        match &mut self.temp {
            Some(temp) => Ok(temp.as_file_mut()),
            None => Err(io::Error::other("download already saved")),
        }
    }
}

impl Sink for FileSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file()?.write_all(buf)
    }

    fn restart(&mut self) -> io::Result<bool> {
        let file = self.file()?;
        file.set_len(0)?;
        file.rewind()?;
        Ok(true)
    }
}
