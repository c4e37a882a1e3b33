//! The client of a relay-p2p network: asks the relay who is live, then
//! fetches files from those peers. [`run`] carries out one command line;
//! the `peer-client` binary is a thin `main` around it. PROTOCOL.md says
//! what it speaks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod complete;
mod discover;
mod failure;
mod fetch;
mod input;
mod interactive;
mod listing;
mod print;
mod progress;
mod save;

use std::{io, path::PathBuf, time::Duration};

use clap::{builder::FalseyValueParser, Parser, Subcommand};
use netkit::cli::Docs;
use protocol::FileName;

pub use crate::failure::Failure;
use crate::{
    discover::Relay,
    fetch::{FetchError, Fetcher, Limits, Options},
    print::Format,
    progress::Bar,
    save::{FileSink, StdoutSink},
};

/// Client of a relay-p2p network: asks the relay who is live, then fetches
/// files from those peers. Without a command it asks for file names interactively.
#[derive(Parser)]
#[command(name = "peer-client", version, about, after_help = EXIT_CODES)]
pub struct Args {
    /// Host name or IP address of the relay
    #[arg(env = "PEER_CLIENT_RELAY_HOST")]
    host: String,
    /// TCP port of the relay
    #[arg(env = "PEER_CLIENT_RELAY_PORT")]
    port: u16,
    /// Seconds to wait for a connection, and for each read, before giving up on a peer
    #[arg(long, env = "PEER_CLIENT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Refuse files bigger than this many bytes (K, M, G, T suffixes)
    #[arg(long, env = "PEER_CLIENT_MAX_SIZE", value_name = "SIZE", value_parser = netkit::cli::parse_size)]
    max_size: Option<u64>,
    /// Drop a peer that sends fewer bytes a second than this, on average
    /// over --speed-time, and go on with the next holder (0: never)
    #[arg(long, env = "PEER_CLIENT_SPEED_LIMIT", value_name = "RATE", default_value = "1K", value_parser = netkit::cli::parse_size)]
    speed_limit: u64,
    /// The window over which --speed-limit is judged, in seconds
    #[arg(long, env = "PEER_CLIENT_SPEED_TIME", value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    speed_time: u64,
    /// More log output; RUST_LOG overrides
    #[arg(short, long, env = "PEER_CLIENT_VERBOSE", value_parser = FalseyValueParser::new())]
    verbose: bool,
    /// Answered by `netkit::cli::parse`
    #[command(flatten)]
    _docs: Docs,
    #[command(subcommand)]
    command: Option<Command>,
}

const EXIT_CODES: &str = "Exit codes: 0 success, 1 not found (every live peer answered that it \
does not have the file, or none is live), 2 usage error, 3 network error (relay or a peer \
unreachable, busy or refusing, transfer failed: worth a retry), 4 local error (cannot write the output, file over --max-size or the free space), 130 interrupted (SIGINT), 143 terminated (SIGTERM)";

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
        /// Fetch from at most this many holders at once
        #[arg(short = 'j', long = "sources", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=fetch::MAX_SOURCES as u64))]
        sources: u64,
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

impl Args {
    /// True with `-v`: debug log output.
    pub fn verbose(&self) -> bool {
        self.verbose
    }
}

/// Carries out one command line.
pub fn run(args: Args) -> Result<(), Failure> {
    save::clean_up_on_interrupt().map_err(Failure::Signal)?;
    let relay = Relay {
        host: args.host,
        port: args.port,
        timeout: Duration::from_secs(args.timeout),
    };
    let limits = Limits {
        max_size: args.max_size,
        speed_limit: args.speed_limit,
        speed_time: Duration::from_secs(args.speed_time),
    };
    match args.command {
        None => interactive::run(&relay, limits),
        Some(Command::Get {
            name,
            output,
            sources,
        }) => {
            let options = Options {
                sources: sources as usize,
            };
            get(&relay, limits, &name, output, options)
        }
        Some(Command::Peers { json }) => {
            let peers = relay.peers()?;
            stdout(print::peers(&mut io::stdout(), &peers, format(json)))
        }
        Some(Command::Ls { pattern, json }) => {
            let listing =
                listing::collect(&relay, pattern.as_deref(), &mut |line| eprintln!("{line}"))?;
            stdout(print::files(
                &mut io::stdout(),
                &listing.files,
                format(json),
            ))?;
            if listing.asked > 0 && listing.failed == listing.asked {
                // An empty list would read as "no files": say it is unknown.
                return Err(Failure::NoListing {
                    failed: listing.failed,
                    asked: listing.asked,
                });
            }
            Ok(())
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
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Failure::Stdout(e)),
        _ => Ok(()),
    }
}

fn get(
    relay: &Relay,
    limits: Limits,
    name: &FileName,
    output: Option<PathBuf>,
    options: Options,
) -> Result<(), Failure> {
    let peers = relay.peers()?;
    let mut bar = Bar::new(output.is_none());
    let mut fetcher = Fetcher {
        timeout: relay.timeout,
        limits,
        note: &mut bar.printer(),
        progress: &mut bar,
    };
    match output {
        None => match fetcher.fetch_with(&peers, name, &mut StdoutSink::new(), options) {
            // The reader went away (`| head`): not a failure, as for cat.
            Err(FetchError::Output { source, .. })
                if source.kind() == io::ErrorKind::BrokenPipe => {}
            result => {
                result?;
            }
        },
        Some(path) => {
            let mut sink = FileSink::create(&path, name)?;
            let fetched = fetcher.fetch_with(&peers, name, &mut sink, options)?;
            let dest = sink.commit()?;
            let from: Vec<String> = fetched.from.iter().map(|(p, _)| p.to_string()).collect();
            eprintln!(
                "saved {} ({} bytes, from {})",
                dest.display(),
                fetched.size,
                if from.is_empty() {
                    fetched.peer.to_string()
                } else {
                    from.join(", ")
                }
            );
        }
    }
    Ok(())
}
