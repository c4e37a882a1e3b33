//! `relay-server`: the command line around the `relay_server` library.
#![forbid(unsafe_code)]

use std::{net::IpAddr, net::SocketAddr, process::ExitCode, time::Duration};

use clap::{builder::FalseyValueParser, Parser};
use netkit::cli;

/// Relay of a relay-p2p network: peers register here, clients ask here who is live.
#[derive(Parser)]
#[command(name = "relay-server", version, about)]
struct Args {
    /// TCP port to listen on (0 picks a free one)
    #[arg(env = "RELAY_PORT")]
    port: u16,
    /// Address to listen on
    #[arg(long, env = "RELAY_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Forget a peer not heard from for this many seconds
    #[arg(long, env = "RELAY_TTL", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    ttl: u64,
    /// Most peers in one answer to a lookup (a random sample when more are live)
    #[arg(long, env = "RELAY_MAX_PEERS_RETURNED", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=protocol::relay::MAX_PEERS as u64))]
    max_peers_returned: u64,
    /// Most peers held at once; registrations beyond it are refused as busy
    #[arg(long, env = "RELAY_MAX_REGISTERED", default_value_t = 250_000)]
    max_registered: usize,
    /// Most connections served at once; more are answered `ERR busy`
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_connections: u64,
    /// Most files indexed for one peer (a peer is told so and leaves the rest out)
    #[arg(long, env = "RELAY_MAX_FILES_PER_PEER", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=protocol::index::MAX_OFFER as u64))]
    max_files_per_peer: u64,
    /// Most holdings (one file on one peer) in the index; offers beyond are refused as busy
    #[arg(long, env = "RELAY_MAX_HOLDINGS", default_value_t = 20_000_000)]
    max_holdings: usize,
    /// Registrations, announcements, offers and unregistrations one address
    /// may send a second (0: no limit)
    #[arg(long, env = "RELAY_WRITE_RATE", default_value_t = 20.0, value_parser = parse_rate)]
    write_rate: f64,
    /// How many of those one address may send at once after a quiet spell
    #[arg(long, env = "RELAY_WRITE_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    write_burst: u32,
    /// Lookups (PEERS, WHO, WHOHAS, LS, STATS) one address may send a second (0: no limit)
    #[arg(long, env = "RELAY_READ_RATE", default_value_t = 100.0, value_parser = parse_rate)]
    read_rate: f64,
    /// How many of those one address may send at once after a quiet spell
    #[arg(long, env = "RELAY_READ_BURST", default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
    read_burst: u32,
    /// Most peers registered from one address (0: no limit)
    #[arg(long, env = "RELAY_MAX_PEERS_PER_IP", default_value_t = 256)]
    max_peers_per_ip: usize,
    /// Most connections open at once from one address (0: no limit)
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Hold loopback addresses to the limits per address too (they are
    /// exempt otherwise, so that one machine can run a whole test network)
    #[arg(long, env = "RELAY_LIMIT_LOOPBACK", value_parser = FalseyValueParser::new())]
    limit_loopback: bool,
    /// Only peers whose keys this file lists (one hex key a line, `#`
    /// comments) may register; re-read on SIGHUP
    #[arg(long, env = "RELAY_ALLOW_KEYS", value_name = "FILE")]
    allow_keys: Option<std::path::PathBuf>,
    /// Serve lookups only to clients that know this network's secret (a
    /// file of 64 hex digits, mode 0600)
    #[arg(long, env = "RELAY_NETWORK_SECRET", value_name = "FILE")]
    network_secret: Option<std::path::PathBuf>,
    /// Keep the live peers, the index and the counters on this Redis
    /// server (redis://HOST:PORT/DB) instead of in memory: several relays
    /// on one Redis serve one network, and a restart loses nothing
    #[arg(long, env = "RELAY_STORE", value_name = "URL", value_parser = parse_store)]
    store: Option<relay_server::RedisTarget>,
    /// Close a connection that sends or accepts nothing for this many seconds
    #[arg(long, env = "RELAY_IDLE_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_timeout: u64,
    /// More log output (debug); RUST_LOG overrides
    #[arg(short, long, env = "RELAY_VERBOSE", value_parser = FalseyValueParser::new())]
    verbose: bool,
    /// Less log output (warnings and errors only); RUST_LOG overrides
    #[arg(short, long, env = "RELAY_QUIET", value_parser = FalseyValueParser::new())]
    quiet: bool,
    /// Answered by `cli::parse`
    #[command(flatten)]
    _docs: cli::Docs,
}

fn main() -> ExitCode {
    let args: Args = cli::parse(1);
    cli::init_logging(args.verbose, args.quiet, log::LevelFilter::Info);
    cli::exit("relay-server", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let network_secret = args
        .network_secret
        .as_deref()
        .map(cli::read_secret)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let relay = relay_server::bind(relay_server::Config {
        bind: SocketAddr::new(args.bind, args.port),
        ttl: Duration::from_secs(args.ttl),
        max_registered: args.max_registered,
        max_peers_returned: args.max_peers_returned as usize,
        max_connections: args.max_connections as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout),
        grace: Duration::from_secs(5),
        max_files_per_peer: args.max_files_per_peer as usize,
        max_holdings: args.max_holdings,
        limits: relay_server::SourceLimits {
            exempt_loopback: !args.limit_loopback,
            write_rate: args.write_rate,
            write_burst: args.write_burst,
            read_rate: args.read_rate,
            read_burst: args.read_burst,
            max_peers_per_ip: args.max_peers_per_ip,
            max_connections_per_ip: args.max_connections_per_ip,
        },
        allow_keys: args.allow_keys.clone(),
        network_secret,
        store: args.store.map_or(
            relay_server::StoreConfig::Memory,
            relay_server::StoreConfig::Redis,
        ),
    })?;
    if args.allow_keys.is_some() {
        let reload = relay.key_reloader();
        let mut hangups = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        // Lives as long as the process: SIGHUP can come at any time.
        std::thread::Builder::new()
            .name("sighup".into())
            .spawn(move || {
                for _ in hangups.forever() {
                    match reload() {
                        Ok(count) => log::info!("allowed keys reloaded: {}", count.unwrap_or(0)),
                        Err(e) => log::warn!("{e}; keeping the keys read before"),
                    }
                }
            })?;
    }
    cli::serve_until_signal(relay).map_err(anyhow::Error::msg)
}

/// A rate a second: a number from 0 (no limit) to a million.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if (0.0..=1e6).contains(&rate) => Ok(rate),
        _ => Err(format!("{s:?} is not a rate from 0 to 1000000")),
    }
}

/// `--store`: a Redis URL.
fn parse_store(s: &str) -> Result<relay_server::RedisTarget, String> {
    relay_server::RedisTarget::parse(s).map_err(|e| e.to_string())
}
