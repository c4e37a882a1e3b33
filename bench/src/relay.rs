//! The relay under load: lookups against the trivial server, a herd of
//! registrations, and a registry of 100,000 peers.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};

use crate::{
    load::{self, Load, Trivial},
    procs,
    report::{median, mib, ms, percentile, Row},
    Setup,
};

const PEERS: &str = "RP2P/1 PEERS\n";
/// What the trivial server answers: one line, the shape of an empty list.
const ONE_LINE: &str = "PEERS 0\n";
/// The trivial server listens on another loopback address than the relay,
/// so the two loads do not share one range of ephemeral ports.
const TRIVIAL_IP: [u8; 4] = [127, 0, 0, 2];
/// Most connections in one load run: bounds the sockets left in TIME_WAIT.
const MAX_CONNECTIONS: u64 = 60_000;
/// Lookups made one at a time to read the relay's own time per lookup.
const SEQUENTIAL_LOOKUPS: usize = 2000;

pub struct Lookups {
    pub rows: Vec<Row>,
    /// Server time of lookups in the small registry, for comparison later.
    pub server_times: Vec<Duration>,
}

/// Lookups by `clients` threads, alternating relay and trivial server.
pub fn lookups(setup: &Setup, clients: usize, secs: u64, rounds: usize) -> anyhow::Result<Lookups> {
    let trivial = Trivial::start(IpAddr::from(TRIVIAL_IP), ONE_LINE, 4)?;
    let span = Duration::from_secs(secs);
    let server_times = sequential_server_times(setup.relay.addr, &setup.relay.log)?;
    let (mut relay_loads, mut trivial_loads) = (vec![], vec![]);
    for round in 1..=rounds {
        eprintln!("lookups: round {round} of {rounds}");
        relay_loads.push(checked(
            load::hammer(
                setup.relay.addr,
                PEERS,
                "PEERS ",
                clients,
                span,
                MAX_CONNECTIONS,
            ),
            "relay",
        )?);
        trivial_loads.push(checked(
            load::hammer(
                trivial.addr,
                PEERS,
                "PEERS ",
                clients,
                span,
                MAX_CONNECTIONS,
            ),
            "trivial server",
        )?);
    }
    let ratios: Vec<f64> = relay_loads
        .iter()
        .zip(&trivial_loads)
        .map(|(r, t)| r.rate() / t.rate())
        .collect();
    let ratio = median(&ratios);
    let rate = |loads: &[Load]| {
        format!(
            "{:.0} req/s",
            median(&loads.iter().map(Load::rate).collect::<Vec<_>>())
        )
    };
    let p99 = |loads: &[Load]| {
        let all: Vec<Duration> = loads
            .iter()
            .flat_map(|l| l.latencies.iter().copied())
            .collect();
        percentile(&all, 99.0)
    };
    let (relay_p99, trivial_p99) = (p99(&relay_loads), p99(&trivial_loads));
    Ok(Lookups {
        rows: vec![
            Row::new(
                format!("relay lookups, {clients} clients (connect, PEERS, close)"),
                rate(&relay_loads),
            )
            .baseline("trivial one-line server", rate(&trivial_loads))
            .ratio(ratio)
            .target(">= 0.80", ratio >= 0.8),
            Row::new("relay lookup latency p99 (client side)", ms(relay_p99))
                .baseline("trivial one-line server", ms(trivial_p99))
                .ratio(relay_p99.as_secs_f64() / trivial_p99.as_secs_f64()),
        ],
        server_times,
    })
}

/// A herd of `peers` simulated peers registering at once, then heartbeating.
pub fn registration(setup: &Setup, peers: usize, rounds: u32) -> anyhow::Result<Vec<Row>> {
    let relay = setup.start_relay("herd")?;
    let interval = Duration::from_secs(1);
    eprintln!("registration: {peers} peers, {rounds} rounds, one thread each");
    let overflows_before = listen_overflows();
    let ours = load::herd(
        relay.addr,
        peers,
        rounds,
        interval,
        register_line,
        "REGISTERED ",
    )?;
    let ours_overflows = listen_overflows() - overflows_before;
    let stats = stats(relay.addr)?;
    let trivial = Trivial::start(IpAddr::from(TRIVIAL_IP), "REGISTERED 90\n", 4)?;
    eprintln!("registration: the same herd against the trivial server");
    let overflows_before = listen_overflows();
    let base = load::herd(
        trivial.addr,
        peers,
        rounds,
        interval,
        register_line,
        "REGISTERED ",
    )?;
    let base_overflows = listen_overflows() - overflows_before;

    let live = stat(&stats, "peers_live");
    let expected = (peers as u64) * u64::from(rounds);
    let held = live == peers as u64 && ours.ok == expected && ours.refused + ours.failed == 0;
    let slowest = |l: &Load| l.latencies.iter().max().copied().unwrap_or_default();
    let first = |what: &str, p: &Option<String>| {
        p.as_deref()
            .map_or(String::new(), |p| format!("; first {what}: {p}"))
    };
    let problem = first("ERR", &ours.first_refusal) + &first("failure", &ours.first_failure);

    Ok(vec![
        Row::new(
            format!(
                "{peers} peers register at once + {} heartbeats: held",
                rounds - 1
            ),
            format!(
                "{live} live, {} of {expected} answered REGISTERED, {} ERR, {} failed{problem}; \
                 accept-queue overflows: {ours_overflows}",
                ours.ok, ours.refused, ours.failed
            ),
        )
        .baseline(
            "trivial server, answered",
            format!(
                "{} of {expected}, accept-queue overflows: {base_overflows}",
                base.ok
            ),
        )
        .target(format!("{peers} live, 0 ERR, 0 failed"), held),
        Row::new("  slowest registration of the herd", ms(slowest(&ours)))
            .baseline("trivial server", ms(slowest(&base)))
            .ratio(slowest(&ours).as_secs_f64() / slowest(&base).as_secs_f64().max(1e-9)),
    ])
}

/// 127.1.x.y for peer `i`: a distinct address per simulated peer.
fn register_line(i: usize) -> String {
    format!(
        "RP2P/1 REGISTER 7000 127.{}.{}.{}\n",
        1 + i / 65_536,
        (i / 256) % 256,
        i % 256
    )
}

/// A relay holding `peers` peers: its memory and its lookup time.
pub fn big_registry(
    setup: &Setup,
    peers: usize,
    clients: usize,
    secs: u64,
    small_times: &[Duration],
) -> anyhow::Result<Vec<Row>> {
    let relay = setup.start_relay("big")?;
    let empty_rss = procs::vm_kib(relay.pid(), "VmRSS").context("relay is gone")?;
    eprintln!("big registry: registering {peers} peers");
    let t0 = Instant::now();
    let threads = 16;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let addr = relay.addr;
            thread::spawn(move || {
                let (mut buf, mut load) = (Vec::new(), Load::default());
                for i in (t..peers).step_by(threads) {
                    let started = Instant::now();
                    let result = load::exchange(addr, register_line(i).as_bytes(), &mut buf);
                    load.record(started, result, &buf, "REGISTERED ");
                    if t0.elapsed() > Duration::from_secs(120) {
                        break;
                    }
                }
                load
            })
        })
        .collect();
    let mut reg = Load::default();
    for worker in workers {
        if let Ok(load) = worker.join() {
            reg.merge(load);
        }
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    let live = stat(&stats(relay.addr)?, "peers_live");
    ensure!(
        live == peers as u64,
        "only {live} of {peers} peers registered ({} ERR, {} failed; first: {:?} {:?})",
        reg.refused,
        reg.failed,
        reg.first_refusal,
        reg.first_failure
    );
    eprintln!("big registry: lookups");
    let times = sequential_server_times(relay.addr, &relay.log)?;
    let span = Duration::from_secs(secs);
    let lookups = checked(
        load::hammer(relay.addr, PEERS, "PEERS ", clients, span, MAX_CONNECTIONS),
        "relay",
    )?;
    let peak = procs::vm_kib(relay.pid(), "VmHWM").context("relay is gone")?;
    let (p50, p99) = (percentile(&times, 50.0), percentile(&times, 99.0));
    let (small50, small99) = (percentile(small_times, 50.0), percentile(small_times, 99.0));
    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    Ok(vec![
        Row::new(
            format!("{peers} peers registered: relay peak RSS"),
            mib(peak),
        )
        .baseline("same relay, empty", mib(empty_rss))
        .ratio(peak as f64 / empty_rss as f64)
        .target("< 64 MiB", peak < 64 * 1024),
        Row::new(
            format!("{peers} peers: lookup server time p50 / p99 (one client)"),
            format!("{} / {}", us(p50), us(p99)),
        )
        .baseline(
            "relay with 1 peer",
            format!("{} / {}", us(small50), us(small99)),
        )
        .ratio(p99.as_secs_f64() / small99.as_secs_f64().max(1e-9))
        .target("p99 < 1 ms", p99 < Duration::from_millis(1)),
        Row::new(
            format!("{peers} peers: lookups, {clients} clients"),
            format!(
                "{:.0} req/s, p99 {}",
                lookups.rate(),
                ms(percentile(&lookups.latencies, 99.0))
            ),
        ),
        Row::new(
            format!("registering {peers} peers, 16 threads"),
            format!("{:.0} reg/s", reg.ok as f64 / reg_secs),
        ),
    ])
}

/// Fails when a load run had problems: a figure over failed requests would lie.
pub fn checked(load: Load, what: &str) -> anyhow::Result<Load> {
    ensure!(
        load.refused + load.failed == 0,
        "{what}: {} refused and {} failed of {} requests (first: {})",
        load.refused,
        load.failed,
        load.ok + load.refused + load.failed,
        load.first_refusal
            .as_ref()
            .or(load.first_failure.as_ref())
            .map_or("-", |s| s.as_str())
    );
    Ok(load)
}

pub fn stats(relay: SocketAddr) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    load::exchange(relay, b"RP2P/1 STATS\n", &mut buf).context("cannot ask the relay for STATS")?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

pub fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Server time of lookups made one after another: under the 64-client load
/// the logged time mostly measures waiting for a CPU, not the relay's work.
fn sequential_server_times(relay: SocketAddr, log: &Path) -> anyhow::Result<Vec<Duration>> {
    let before = log_len(log);
    let mut buf = Vec::new();
    for _ in 0..SEQUENTIAL_LOOKUPS {
        load::exchange(relay, PEERS.as_bytes(), &mut buf).context("lookup failed")?;
    }
    // The relay logs after replying: give the last line time to land.
    thread::sleep(Duration::from_millis(100));
    server_times(log, before, |l| l.contains(" PEERS -> "))
}

/// Connections the kernel dropped because a listener's accept queue was
/// full (`TcpExt: ListenOverflows`), machine-wide.
fn listen_overflows() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

pub fn log_len(log: &Path) -> usize {
    fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// Server time of each request whose log line passes `wanted`, as the
/// relay logs it (`PEERS -> n: 56 bytes (12.3µs)`), from byte `from` of its
/// log on, in log order.
pub fn server_times(
    log: &Path,
    from: usize,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<Duration>> {
    let text = fs::read(log).with_context(|| format!("cannot read {}", log.display()))?;
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
    let times: Vec<Duration> = text
        .lines()
        .filter(|l| wanted(l))
        .filter_map(|l| parse_duration(l.rsplit_once('(')?.1.strip_suffix(')')?))
        .collect();
    ensure!(
        !times.is_empty(),
        "no such requests in {} (is its log level info?)",
        log.display()
    );
    Ok(times)
}

/// `Duration`'s Debug format: `850ns`, `12.3µs`, `1.2ms`, `1.0s`.
fn parse_duration(s: &str) -> Option<Duration> {
    let (number, scale) = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)]
        .iter()
        .find_map(|(unit, scale)| Some((s.strip_suffix(unit)?, *scale)))?;
    Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
}
