//! Why a command failed, and the exit code that says so: the one place
//! where failures become exit codes.

use std::io;

use crate::{discover::RelayError, fetch::FetchError, input::InputError, save::SaveError};

/// Why a command of the client failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No relay could be asked, or one answered wrongly.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A fetch failed: not found, network, or the output.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The relay's index has no live holder of what was asked for.
    #[error("{what} not found: no live holder in the relay's index")]
    NotHeld {
        /// The name, quoted, or the hash.
        what: String,
    },
    /// A mistake on the command line that clap cannot see (no relay).
    #[error("{0}")]
    Usage(String),
    /// A glob that does not parse.
    #[error("invalid pattern: {0}")]
    Pattern(String),
    /// `ls`: live peers exist, but none could be asked.
    #[error("no peer could list its files ({failed} of {asked} could not be asked)")]
    NoListing {
        /// Peers that failed.
        failed: usize,
        /// Peers asked.
        asked: usize,
    },
    /// Output to stdout failed (a full disk; a reader that went away is not a failure).
    #[error("cannot write to stdout: {0}")]
    Stdout(#[source] io::Error),
    /// A file given with `-o` cannot be written.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// The prompt cannot read its input.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The network secret file cannot be used.
    #[error("{0}")]
    Secret(String),
    /// The Ctrl-C / SIGTERM handler cannot be installed.
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] io::Error),
}

impl Failure {
    /// 1 not found, 3 network (worth a retry), 4 local; 2 (usage) is clap's.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Fetch(e) if e.is_not_found() => 1,
            Failure::NotHeld { .. } => 1,
            Failure::Pattern(_) | Failure::Usage(_) => 2,
            Failure::Fetch(FetchError::Output { .. } | FetchError::TooBig { .. }) => 4,
            Failure::Relay(_) | Failure::Fetch(_) | Failure::NoListing { .. } => 3,
            Failure::Stdout(_)
            | Failure::Save(_)
            | Failure::Input(_)
            | Failure::Signal(_)
            | Failure::Secret(_) => 4,
        }
    }
}
