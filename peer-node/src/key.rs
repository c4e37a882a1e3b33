//! The peer's key file: created on first start (mode 0600), reused after,
//! refused when others may read it. It holds the 32-byte secret seed as 64
//! hex digits and a line end.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
};

use protocol::identity::Identity;

/// Why the key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the file failed.
    #[error("cannot use key file {}: {source}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Others than its owner may read it: it may be known to them.
    #[error("key file {} can be read by others (mode {mode:o}): run chmod 600 on it", .path.display())]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It does not hold a key.
    #[error("key file {} does not hold a key (64 hex digits)", .path.display())]
    Garbled {
        /// The key file.
        path: PathBuf,
    },
    /// No randomness to make a key with.
    #[error("cannot make a key: {0}")]
    Random(String),
}

/// Where a peer serving `dir` keeps its key unless told otherwise: in the
/// user's data folder (`$XDG_DATA_HOME`, else `~/.local/share`), one key
/// per served folder, so that several peers on one machine are several
/// peers, and a peer restarted on the same folder is the same peer.
pub fn default_path(dir: &Path) -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    let folder = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let tag = blake3::hash(folder.as_os_str().as_encoded_bytes()).to_hex();
    Some(
        data.join("relay-p2p")
            .join(format!("peer-{}.key", &tag[..16])),
    )
}

/// A new key, from the system's random source.
pub fn generate() -> Result<Identity, KeyError> {
    let mut seed = [0; 32];
    getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(Identity::from_seed(seed))
}

/// The key in `path`, made there first if there is none.
pub fn load_or_create(path: &Path) -> Result<Identity, KeyError> {
    let io_error = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::File::open(path) {
        Ok(file) => {
            check_private(path, &file)?;
            let text = fs::read_to_string(path).map_err(io_error)?;
            parse(text.trim()).ok_or_else(|| KeyError::Garbled {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let identity = generate()?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_error)?;
            }
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                // Private from the first byte: never readable by others, not even briefly.
                options.mode(0o600);
            }
            let mut file = options.open(path).map_err(io_error)?;
            let seed: String = identity.seed().iter().map(|b| format!("{b:02x}")).collect();
            file.write_all(format!("{seed}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io_error)?;
            Ok(identity)
        }
        Err(e) => Err(io_error(e)),
    }
}

#[cfg(unix)]
fn check_private(path: &Path, file: &fs::File) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path, _: &fs::File) -> Result<(), KeyError> {
    Ok(())
}

fn parse(hex: &str) -> Option<Identity> {
    if hex.len() != 64 {
        return None;
    }
    let mut seed = [0; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Identity::from_seed(seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_made_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/peer.key");
        let first = load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap().key(), first.key());
    }

    #[test]
    fn an_exposed_or_garbled_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Exposed { mode: 0o644, .. })
        ));
        fs::write(&path, "not a key\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Garbled { .. })
        ));
    }
}
