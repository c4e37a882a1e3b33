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
mod resume;
mod save;

use std::{collections::HashMap, io, path::PathBuf, time::Duration};

use clap::{builder::FalseyValueParser, Parser, Subcommand};
use netkit::cli::Docs;
use protocol::{identity::PeerKey, index::Pattern, ContentHash, FileName, PeerAddr};

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
    /// Host name or IP address of the relay (the first one, when --relay
    /// names more)
    #[arg(env = "PEER_CLIENT_RELAY_HOST")]
    host: Option<String>,
    /// TCP port of the relay
    #[arg(env = "PEER_CLIENT_RELAY_PORT")]
    port: Option<u16>,
    /// A relay to ask, as HOST:PORT; repeat it (or separate with commas)
    /// for several: the first that answers is asked, the next when one is
    /// down, slow or in trouble
    #[arg(long = "relay", env = "PEER_CLIENT_RELAYS", value_name = "HOST:PORT", value_delimiter = ',', value_parser = netkit::cli::parse_relay)]
    relays: Vec<String>,
    /// Seconds to wait for a connection, and for each read, before giving
    /// up on a peer or a relay
    #[arg(long, env = "PEER_CLIENT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// The private network's secret file (64 hex digits, mode 0600), for a
    /// relay that serves only clients that know it
    #[arg(long, env = "PEER_CLIENT_NETWORK_SECRET", value_name = "FILE")]
    network_secret: Option<PathBuf>,
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

const EXIT_CODES: &str = "Exit codes: 0 success, 1 not found (no live holder in the relay's index; \
without an index, every live peer answered that it does not have the file), 2 usage error, 3 network error (relay or a peer \
unreachable, busy or refusing, transfer failed: worth a retry), 4 local error (cannot write the output, file over --max-size or the free space), 130 interrupted (SIGINT), 143 terminated (SIGTERM)";

#[derive(Subcommand)]
enum Command {
    /// Fetch one file, by name or by content: its exact bytes to stdout,
    /// or into a file with -o
    Get {
        /// Name of the file, relative to the peers' folders
        #[arg(value_parser = parse_name, required_unless_present = "hash", conflicts_with = "hash")]
        name: Option<FileName>,
        /// Fetch the content with this BLAKE3 hash (64 hex digits), under
        /// whatever name its holders have it
        #[arg(long, value_name = "HEX", value_parser = parse_hash)]
        hash: Option<ContentHash>,
        /// Save to this path instead (a folder keeps the file's name); the
        /// file appears only once complete and verified, and a download
        /// cut short continues from PATH.part when run again
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Fetch from at most this many holders at once
        #[arg(short = 'j', long = "sources", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=fetch::MAX_SOURCES as u64))]
        sources: u64,
    },
    /// Print the live peers, one IP:PORT per line
    Peers {
        /// Also each peer's id (the short form of its key)
        #[arg(short, long)]
        long: bool,
        /// One JSON object per line: {"addr":"IP:PORT","ip":"IP","port":PORT,"key":"HEX"}
        #[arg(long)]
        json: bool,
    },
    /// List the files the network holds: size, number of peers, name (one
    /// line per version of a name)
    Ls {
        /// Only names matching this glob: `*.txt` (`*` stays within a
        /// folder), `docs/**` (`**` crosses folders); all when left out
        #[arg(value_parser = parse_pattern)]
        pattern: Option<Pattern>,
        /// Also the content hash of each
        #[arg(short, long)]
        long: bool,
        /// One JSON object per line: {"name":"NAME","size":BYTES,"peers":N,"hash":"HEX"}
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

fn parse_hash(s: &str) -> Result<ContentHash, String> {
    if s.len() != 64 {
        return Err(format!("{s:?} is not 64 hex digits"));
    }
    ContentHash::from_hex(s.to_ascii_lowercase()).map_err(|e| e.to_string())
}

pub(crate) fn parse_pattern(s: &str) -> Result<Pattern, String> {
    let pattern = Pattern::new(s).map_err(|e| e.to_string())?;
    listing::matcher(&pattern).map_err(|e| e.kind().to_string())?;
    Ok(pattern)
}

/// All names.
pub(crate) fn everything() -> Pattern {
    // "**" is a valid pattern by construction.
    Pattern::new("**").unwrap_or_else(|_| unreachable!())
}

impl Args {
    /// True with `-v`: debug log output.
    pub fn verbose(&self) -> bool {
        self.verbose
    }
}

/// Carries out one command line.
pub fn run(mut args: Args) -> Result<(), Failure> {
    let relays = netkit::cli::relay_list(
        args.host.take(),
        args.port,
        std::mem::take(&mut args.relays),
        "PEER_CLIENT_RELAYS",
    )
    .map_err(Failure::Usage)?;
    save::clean_up_on_interrupt().map_err(Failure::Signal)?;
    let secret = args
        .network_secret
        .as_deref()
        .map(netkit::cli::read_secret)
        .transpose()
        .map_err(Failure::Secret)?;
    let relay = Relay::new(relays, Duration::from_secs(args.timeout), secret);
    let limits = Limits {
        max_size: args.max_size,
        speed_limit: args.speed_limit,
        speed_time: Duration::from_secs(args.speed_time),
    };
    match args.command {
        None => interactive::run(&relay, limits),
        Some(Command::Get {
            name,
            hash,
            output,
            sources,
        }) => {
            let options = Options {
                sources: sources as usize,
            };
            get(&relay, limits, Wanted::new(name, hash), output, options)
        }
        Some(Command::Peers { long, json }) => {
            let peers: Vec<(PeerAddr, Option<PeerKey>)> = if long || json {
                match relay.peers_long()? {
                    Some(peers) => peers.into_iter().map(|(a, k)| (a, Some(k))).collect(),
                    None => relay.peers()?.into_iter().map(|a| (a, None)).collect(),
                }
            } else {
                relay.peers()?.into_iter().map(|a| (a, None)).collect()
            };
            stdout(print::peers(&mut io::stdout(), &peers, format(json), long))
        }
        Some(Command::Ls {
            pattern,
            long,
            json,
        }) => ls(
            &relay,
            &pattern.unwrap_or_else(everything),
            long,
            format(json),
            &mut |_| {},
        ),
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

/// `ls`: from the relay's index, streamed page by page; from a relay
/// without one, by asking every live peer.
/// `seen` sees every page printed (the interactive client's completion
/// learns the names from it).
pub(crate) fn ls(
    relay: &Relay,
    pattern: &Pattern,
    long: bool,
    format: Format,
    seen: &mut dyn FnMut(&[listing::Listed]),
) -> Result<(), Failure> {
    let mut out = io::stdout();
    let streamed = listing::stream(relay, pattern, &mut |page| {
        seen(page);
        print::files(&mut out, page, format, long).map(|()| std::ops::ControlFlow::Continue(()))
    });
    match streamed {
        Ok(Some(_)) => return Ok(()),
        Ok(None) => {}
        Err(listing::StreamError::Relay(e)) => return Err(e.into()),
        Err(listing::StreamError::Output(e)) => return stdout(Err(e)),
    }
    let matcher = listing::matcher(pattern).map_err(|e| Failure::Pattern(e.to_string()))?;
    let listing = listing::collect(relay, &matcher, &mut |line| eprintln!("{line}"))?;
    seen(&listing.files);
    stdout(print::files(&mut out, &listing.files, format, long))?;
    if listing.asked > 0 && listing.failed == listing.asked {
        // An empty list would read as "no files": say it is unknown.
        return Err(Failure::NoListing {
            failed: listing.failed,
            asked: listing.asked,
        });
    }
    Ok(())
}

/// What `get` asks for: a name, or content by its hash.
pub(crate) enum Wanted {
    Name(FileName),
    Hash(ContentHash),
}

impl Wanted {
    fn new(name: Option<FileName>, hash: Option<ContentHash>) -> Self {
        match (name, hash) {
            (_, Some(hash)) => Wanted::Hash(hash),
            (Some(name), None) => Wanted::Name(name),
            // clap requires one of them.
            (None, None) => unreachable!("get needs a name or --hash"),
        }
    }
}

/// Whom to ask for what: the holders the relay's index names (the
/// version most of them hold, when they differ), or every live peer from
/// a relay without an index.
pub(crate) fn sources(relay: &Relay, wanted: &Wanted) -> Result<Sources, Failure> {
    let holders = match wanted {
        Wanted::Name(name) => relay.who(name)?,
        Wanted::Hash(hash) => relay.who_has(*hash)?,
    };
    let Some(holders) = holders else {
        return match wanted {
            Wanted::Name(name) => Ok(Sources {
                name: name.clone(),
                peers: relay.peers()?,
                expect: None,
                keys: HashMap::new(),
            }),
            Wanted::Hash(hash) => Err(Failure::NotHeld {
                what: format!("content {hash} (this relay keeps no index to find it by)"),
            }),
        };
    };
    let what = match wanted {
        Wanted::Name(name) => format!("{name:?}"),
        Wanted::Hash(hash) => format!("content {hash}"),
    };
    // Versions (name, size, hash) with their holder counts, most held first.
    let mut versions: Vec<(&FileName, u64, ContentHash, u64)> = Vec::new();
    for h in &holders {
        if !versions
            .iter()
            .any(|v| (v.0, v.1, v.2) == (&h.name, h.size, h.hash))
        {
            versions.push((&h.name, h.size, h.hash, h.holders));
        }
    }
    versions.sort_by_key(|v| std::cmp::Reverse(v.3));
    let Some(&(name, size, hash, count)) = versions.first() else {
        return Err(Failure::NotHeld { what });
    };
    if versions.len() > 1 {
        let others: Vec<String> = versions[1..]
            .iter()
            .map(|(n, s, h, c)| format!("{n:?} {s} bytes {} held by {c}", &h.to_hex()[..12]))
            .collect();
        eprintln!(
            "{what}: {} versions; taking {name:?} {size} bytes {} held by {count} peers (others: {})",
            versions.len(),
            &hash.to_hex()[..12],
            others.join(", ")
        );
    }
    let chosen: Vec<_> = holders
        .iter()
        .filter(|h| (&h.name, h.size, h.hash) == (name, size, hash))
        .collect();
    Ok(Sources {
        name: name.clone(),
        peers: chosen.iter().map(|h| h.addr).collect(),
        expect: Some(hash),
        keys: chosen.iter().map(|h| (h.addr, h.key)).collect(),
    })
}

/// Whom `get` asks, for what, and the keys they must prove.
pub(crate) struct Sources {
    pub(crate) name: FileName,
    pub(crate) peers: Vec<PeerAddr>,
    pub(crate) expect: Option<ContentHash>,
    pub(crate) keys: HashMap<PeerAddr, PeerKey>,
}

fn get(
    relay: &Relay,
    limits: Limits,
    wanted: Wanted,
    output: Option<PathBuf>,
    options: Options,
) -> Result<(), Failure> {
    let Sources {
        name,
        peers,
        expect,
        keys,
    } = sources(relay, &wanted)?;
    let name = &name;
    let mut bar = Bar::new(output.is_none());
    let mut fetcher = Fetcher {
        timeout: relay.timeout,
        limits,
        expect,
        keys,
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
            let fetched = match fetcher.fetch_with(&peers, name, &mut sink, options) {
                Ok(fetched) => fetched,
                Err(e) => {
                    if let Some(part) = sink.set_aside() {
                        eprintln!("{}", save::kept_message(&part));
                    }
                    return Err(e.into());
                }
            };
            let dest = sink.commit()?;
            let from: Vec<String> = fetched.from.iter().map(|(p, _)| p.to_string()).collect();
            let resumed = match fetched.resumed {
                0 => String::new(),
                n => format!("; {n} bytes verified by an earlier run"),
            };
            eprintln!(
                "saved {} ({} bytes, from {}{resumed})",
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
