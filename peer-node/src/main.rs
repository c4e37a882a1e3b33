//! `peer-node`: serves the files of one folder to relay-p2p clients and
//! keeps itself on a relay's list of live peers. See PROTOCOL.md.
#![forbid(unsafe_code)]

mod announce;
mod docs;
mod files;
mod serve;
mod shutdown;
mod stall;

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{builder::FalseyValueParser, Parser};

/// Peer of a relay-p2p network: serves the files of one folder.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Host name or IP address of the relay
    #[arg(env = "PEER_RELAY_HOST")]
    relay_host: String,
    /// TCP port of the relay
    #[arg(env = "PEER_RELAY_PORT")]
    relay_port: u16,
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
    /// Seconds between two registrations with the relay
    #[arg(long, env = "PEER_HEARTBEAT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    heartbeat: u64,
    /// Most connections served at once; more are answered `ERR busy`
    #[arg(long, env = "PEER_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_connections: u64,
    /// Seconds a connection may take to send its request, and a client may
    /// go without taking any of the file it asked for
    #[arg(long, env = "PEER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Also serve and list files that have more than one hard link (off by
    /// default: another link to such a file may be outside the folder)
    #[arg(long, env = "PEER_ALLOW_HARDLINKS", value_parser = FalseyValueParser::new())]
    allow_hardlinks: bool,
    /// More log output (debug); RUST_LOG overrides
    #[arg(short, long, env = "PEER_VERBOSE", value_parser = FalseyValueParser::new())]
    verbose: bool,
    /// Less log output (warnings and errors only); RUST_LOG overrides
    #[arg(short, long, env = "PEER_QUIET", value_parser = FalseyValueParser::new())]
    quiet: bool,
    /// Answered by `docs::parse`
    #[command(flatten)]
    _docs: docs::Docs,
}

fn main() -> ExitCode {
    let args: Args = docs::parse(1);
    init_logging(args.verbose, args.quiet);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let options = files::Options {
        allow_hardlinks: args.allow_hardlinks,
    };
    let library = files::Library::open_with(&args.dir, options)?;
    let advertise = args.advertise.as_deref().map(resolve_host).transpose()?;
    let relay = format!("{}:{}", args.relay_host, args.relay_port);
    // Fail fast on a relay name that does not exist; a relay that is only
    // down is waited for (the peer serves meanwhile and keeps retrying).
    relay
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve relay {relay}"))?;
    let timeout = Duration::from_secs(args.timeout);
    let config = serve::Config {
        bind: SocketAddr::new(args.bind, args.port),
        max_connections: args.max_connections as usize,
        idle_timeout: timeout,
        write_timeout: timeout,
        grace: Duration::from_secs(5),
    };
    serve::run(config, library, |port| announce::Announcer {
        relay,
        port,
        advertise,
        heartbeat: Duration::from_secs(args.heartbeat),
        timeout,
    })
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

fn init_logging(verbose: bool, quiet: bool) {
    let level = match (verbose, quiet) {
        (true, _) => log::LevelFilter::Debug,
        (_, true) => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("RUST_LOG")
        .init();
}

/// The bound address is the first line on stdout, so scripts and tests can
/// use port 0 and still find the server.
fn announce_address(addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{addr}").and_then(|()| out.flush())?;
    Ok(())
}
