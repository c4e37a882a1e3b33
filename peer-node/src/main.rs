//! `peer-node`: the command line around the `peer_node` library.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{builder::FalseyValueParser, Parser};
use netkit::cli;

/// Peer of a relay-p2p network: serves the files of one folder.
#[derive(Parser)]
#[command(name = "peer-node", version, about)]
struct Args {
    /// Host name or IP address of the relay (the first one, when --relay
    /// names more)
    #[arg(env = "PEER_RELAY_HOST")]
    relay_host: Option<String>,
    /// TCP port of the relay
    #[arg(env = "PEER_RELAY_PORT")]
    relay_port: Option<u16>,
    /// A relay to register with, as HOST:PORT; repeat it (or separate with
    /// commas) for several: the peer registers and announces with each
    #[arg(long = "relay", env = "PEER_RELAYS", value_name = "HOST:PORT", value_delimiter = ',', value_parser = cli::parse_relay)]
    relays: Vec<String>,
    /// Folder whose files are served (subfolders included)
    #[arg(long, env = "PEER_DIR")]
    dir: PathBuf,
    /// TCP port to serve on (0 picks a free one)
    #[arg(long, env = "PEER_PORT", default_value_t = 0)]
    port: u16,
    /// Address to serve on
    #[arg(long, env = "PEER_BIND", default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Address the relay should list for this peer, instead of the one its
    /// connection comes from (behind NAT, or with several interfaces)
    #[arg(long, env = "PEER_ADVERTISE")]
    advertise: Option<String>,
    /// Seconds between two registrations with each relay
    #[arg(long, env = "PEER_HEARTBEAT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    heartbeat: u64,
    /// Most connections served at once; more are answered `ERR busy`
    #[arg(long, env = "PEER_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_connections: u64,
    /// Most connections served at once from one address (0: no limit)
    #[arg(long, env = "PEER_MAX_CONNECTIONS_PER_IP", default_value_t = 32)]
    max_connections_per_ip: usize,
    /// Hold loopback addresses to --max-connections-per-ip too (they are
    /// exempt otherwise, so that one machine can run a whole test network)
    #[arg(long, env = "PEER_LIMIT_LOOPBACK", value_parser = FalseyValueParser::new())]
    limit_loopback: bool,
    /// Seconds a connection may take to send its request, and a client may
    /// go without taking any of the file it asked for
    #[arg(long, env = "PEER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Also serve and list files that have more than one hard link (off by
    /// default: another link to such a file may be outside the folder)
    #[arg(long, env = "PEER_ALLOW_HARDLINKS", value_parser = FalseyValueParser::new())]
    allow_hardlinks: bool,
    /// The peer's key file, made (mode 0600) on first start [default: one
    /// per served folder, under $XDG_DATA_HOME or ~/.local/share/relay-p2p]
    #[arg(long, env = "PEER_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Do not watch the folder for changes; find them by rescanning it at
    /// each heartbeat instead
    #[arg(long, env = "PEER_NO_WATCH", value_parser = FalseyValueParser::new())]
    no_watch: bool,
    /// Most bytes of file content sent a second, over all connections
    /// together (K, M, G suffixes; 0: no cap)
    #[arg(long, env = "PEER_RATE_LIMIT", value_name = "RATE", value_parser = cli::parse_size)]
    rate_limit: Option<u64>,
    /// More log output (debug); RUST_LOG overrides
    #[arg(short, long, env = "PEER_VERBOSE", value_parser = FalseyValueParser::new())]
    verbose: bool,
    /// Less log output (warnings and errors only); RUST_LOG overrides
    #[arg(short, long, env = "PEER_QUIET", value_parser = FalseyValueParser::new())]
    quiet: bool,
    /// Answered by `cli::parse`
    #[command(flatten)]
    _docs: cli::Docs,
}

fn main() -> ExitCode {
    let mut args: Args = cli::parse(1);
    let relays = cli::relay_list(
        args.relay_host.take(),
        args.relay_port,
        std::mem::take(&mut args.relays),
        "PEER_RELAYS",
    )
    .unwrap_or_else(|e| cli::usage_error::<Args>(e));
    cli::init_logging(args.verbose, args.quiet, log::LevelFilter::Info);
    cli::exit("peer-node", run(args, relays))
}

fn run(args: Args, relays: Vec<String>) -> anyhow::Result<()> {
    let key = match args.key {
        Some(key) => key,
        None => peer_node::default_key_path(&args.dir).context(
            "no data folder for the key (neither XDG_DATA_HOME nor HOME is set): give --key FILE",
        )?,
    };
    let advertise = args.advertise.as_deref().map(resolve_host).transpose()?;
    let node = peer_node::bind(peer_node::Config {
        dir: args.dir,
        bind: SocketAddr::new(args.bind, args.port),
        relays,
        advertise,
        heartbeat: Duration::from_secs(args.heartbeat),
        max_connections: args.max_connections as usize,
        max_connections_per_ip: args.max_connections_per_ip,
        limit_loopback: args.limit_loopback,
        timeout: Duration::from_secs(args.timeout),
        grace: Duration::from_secs(5),
        allow_hardlinks: args.allow_hardlinks,
        watch: !args.no_watch,
        key: Some(key),
        rate_limit: args.rate_limit.filter(|&rate| rate > 0),
    })?;
    cli::serve_until_signal(node).map_err(anyhow::Error::msg)
}

/// `--advertise` takes an IP address or a host name, sent to the relay as an IP.
fn resolve_host(host: &str) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    (host, 0)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --advertise {host}"))?
        .next()
        .map(|addr| addr.ip())
        .with_context(|| format!("--advertise {host} has no address"))
}
