//! `peer-client`: finds the live peers of a relay-p2p network through its
//! relay and fetches files from them. See PROTOCOL.md.
#![forbid(unsafe_code)]

mod complete;
mod discover;
mod docs;
mod fetch;
mod input;
mod interactive;
mod listing;
mod net;
mod print;
mod progress;
mod save;

use std::{io, path::PathBuf, process::ExitCode, time::Duration};

use clap::{builder::FalseyValueParser, Parser, Subcommand};
use protocol::FileName;

use crate::{
    discover::{Relay, RelayError},
    fetch::{FetchError, Fetcher},
    print::Format,
    progress::Bar,
    save::{FileSink, StdoutSink},
};

/// Client of a relay-p2p network: asks the relay who is live, then fetches
/// files from those peers. Without a command it asks for file names interactively.
#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
struct Args {
    /// Host name or IP address of the relay
    #[arg(env = "PEER_CLIENT_RELAY_HOST")]
    host: String,
    /// TCP port of the relay
    #[arg(env = "PEER_CLIENT_RELAY_PORT")]
    port: u16,
    /// Seconds to wait for a connection, and for each read, before giving up on a peer
    #[arg(long, env = "PEER_CLIENT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// More log output; RUST_LOG overrides
    #[arg(short, long, env = "PEER_CLIENT_VERBOSE", value_parser = FalseyValueParser::new())]
    verbose: bool,
    /// Answered by `docs::parse`
    #[command(flatten)]
    _docs: docs::Docs,
    #[command(subcommand)]
    command: Option<Command>,
}

const EXIT_CODES: &str = "Exit codes: 0 success, 1 not found (every live peer answered that it \
does not have the file, or none is live), 2 usage error, 3 network error (relay or a peer \
unreachable, busy or refusing, transfer failed: worth a retry), 4 local error (cannot write the output)";

#[derive(Subcommand)]
enum Command {
    /// Fetch one file: its exact bytes to stdout, or into a file with -o
    Get {
        /// Name of the file, relative to the peers' folders
        #[arg(value_parser = parse_name)]
        name: FileName,
        /// Save to this path instead (a folder keeps the file's name); the
        /// file appears only once complete and verified
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the live peers, one IP:PORT per line
    Peers {
        /// One JSON object per line: {"addr":"IP:PORT","ip":"IP","port":PORT}
        #[arg(long)]
        json: bool,
    },
    /// List the files on all live peers: size, number of peers, name
    Ls {
        /// Only names containing this text (plain, case-sensitive substring, not a glob)
        pattern: Option<String>,
        /// One JSON object per line: {"name":"NAME","size":BYTES,"peers":N}
        #[arg(long)]
        json: bool,
    },
    /// Print the relay's counters, one NAME VALUE per line
    Stats {
        /// One JSON object of all counters: {"NAME":VALUE,...}
        #[arg(long)]
        json: bool,
    },
}

fn format(json: bool) -> Format {
    if json {
        Format::Json
    } else {
        Format::Text
    }
}

fn parse_name(s: &str) -> Result<FileName, String> {
    FileName::new(s).map_err(|e| e.to_string())
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Local(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::NotFound(_) => 1,
            Failure::Network(_) => 3,
            Failure::Local(_) => 4,
        }
    }
}

impl From<RelayError> for Failure {
    fn from(e: RelayError) -> Self {
        Failure::Network(e.to_string())
    }
}

impl From<FetchError> for Failure {
    fn from(e: FetchError) -> Self {
        match e {
            e if e.is_not_found() => Failure::NotFound(e.to_string()),
            e @ FetchError::Output { .. } => Failure::Local(e.to_string()),
            e => Failure::Network(e.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let args: Args = docs::parse(4);
    let level = if args.verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("RUST_LOG")
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer-client: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(args: Args) -> Result<(), Failure> {
    save::clean_up_on_interrupt().map_err(|e| Failure::Local(format!("{e:#}")))?;
    let relay = Relay {
        host: args.host,
        port: args.port,
        timeout: Duration::from_secs(args.timeout),
    };
    match args.command {
        None => interactive::run(&relay),
        Some(Command::Get { name, output }) => get(&relay, &name, output),
        Some(Command::Peers { json }) => {
            let peers = relay.peers()?;
            stdout(print::peers(&mut io::stdout(), &peers, format(json)))
        }
        Some(Command::Ls { pattern, json }) => {
            let files =
                listing::collect(&relay, pattern.as_deref(), &mut |line| eprintln!("{line}"))?;
            stdout(print::files(&mut io::stdout(), &files, format(json)))
        }
        Some(Command::Stats { json }) => {
            let stats = relay.stats()?;
            stdout(print::stats(&mut io::stdout(), &stats, format(json)))
        }
    }
}

/// A reader that went away (`| head`) is not a failure; a full disk is.
fn stdout(written: io::Result<()>) -> Result<(), Failure> {
    match written {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(Failure::Local(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn get(relay: &Relay, name: &FileName, output: Option<PathBuf>) -> Result<(), Failure> {
    let peers = relay.peers()?;
    let mut bar = Bar::new(output.is_none());
    let mut fetcher = Fetcher {
        timeout: relay.timeout,
        note: &mut bar.printer(),
        progress: &mut bar,
    };
    match output {
        None => match fetcher.fetch(&peers, name, &mut StdoutSink::new()) {
            // The reader went away (`| head`): not a failure, as for cat.
            Err(FetchError::Output { source, .. })
                if source.kind() == io::ErrorKind::BrokenPipe => {}
            result => {
                result?;
            }
        },
        Some(path) => {
            let mut sink =
                FileSink::create(&path, name).map_err(|e| Failure::Local(format!("{e:#}")))?;
            let fetched = fetcher.fetch(&peers, name, &mut sink)?;
            let dest = sink
                .commit()
                .map_err(|e| Failure::Local(format!("{e:#}")))?;
            eprintln!(
                "saved {} ({} bytes, from {})",
                dest.display(),
                fetched.size,
                fetched.peer
            );
        }
    }
    Ok(())
}
