//! Relays on Redis: lookups against the in-memory relay in the same run,
//! two relays on one Redis against one, Redis's memory per peer and per
//! holding at 100,000 peers, what the expiry sweep costs, and what
//! killing a client's relay costs that client.

use std::{
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use protocol::relay::Request;
use relay_server::testing::RedisServer;

use crate::{
    index::{self, Catalog},
    load::{self, Load},
    procs::{self, Server},
    report::{median, mib, ms, Row},
    sign, Setup,
};

/// Peers loaded before the lookups, each with the catalog's files.
const LOOKUP_PEERS: usize = 1000;
/// Most connections in one load run: bounds the sockets left in TIME_WAIT.
const MAX_CONNECTIONS: u64 = 60_000;
/// Threads that register the big network.
const REGISTRARS: usize = 4;
/// What the failover figures allow beyond one `--timeout`: a frozen relay
/// costs the whole timeout (the timer cannot fire sooner), then a new
/// connection to the next relay, a few milliseconds.
const SLACK: f64 = 0.1;
/// The longest the big network's expiry may take.
const SWEEP_LIMIT: Duration = Duration::from_secs(120);

pub struct Sizes {
    pub peers: usize,
    pub clients: usize,
    pub secs: u64,
    pub rounds: usize,
}

pub fn run(setup: &Setup, catalog: &Catalog, sizes: &Sizes) -> anyhow::Result<Vec<Row>> {
    // Writes reach the disk once a second, as a deployment would run it;
    // the tests' Redis writes each one before answering.
    let redis = RedisServer::start_with("bench", &["--appendfsync", "everysec"])
        .context("redis-server is not installed (apt-get install redis-server)")?;
    let url = redis.url();
    let mut rows = lookups(setup, &redis, &url, catalog, sizes)?;
    rows.extend(big_network(setup, &redis, &url, catalog, sizes.peers)?);
    rows.extend(failover(setup, &url)?);
    Ok(rows)
}

fn relay_on(
    setup: &Setup,
    name: &str,
    store: Option<&str>,
    peers: usize,
) -> anyhow::Result<Server> {
    let max = (peers + 1000).to_string();
    let mut args = vec!["--ttl", "3600", "--max-registered", &max];
    if let Some(url) = store {
        args.extend(["--store", url]);
    }
    setup.start_relay_with(name, &args)
}

/// WHO and PEERS at `clients` clients: the relay in memory, one on Redis,
/// and two on one Redis sharing the clients.
fn lookups(
    setup: &Setup,
    redis: &RedisServer,
    url: &str,
    catalog: &Catalog,
    sizes: &Sizes,
) -> anyhow::Result<Vec<Row>> {
    let memory = relay_on(setup, "shared-memory", None, LOOKUP_PEERS)?;
    let (one, two) = (
        relay_on(setup, "shared-redis-1", Some(url), LOOKUP_PEERS)?,
        relay_on(setup, "shared-redis-2", Some(url), LOOKUP_PEERS)?,
    );
    for relay in [&memory, &one] {
        let loaded = index::load_peers(relay.addr, catalog, LOOKUP_PEERS)?;
        ensure!(
            loaded.ok == LOOKUP_PEERS as u64,
            "loading the lookups' peers: {}",
            describe(&loaded)
        );
    }
    ensure!(
        redis.query(&["ZCARD", "rp2p:live"]) == LOOKUP_PEERS.to_string(),
        "redis does not hold the {LOOKUP_PEERS} peers"
    );
    let who = "RP2P/1 WHO f0000000\n";
    let span = Duration::from_secs(sizes.secs);
    let hammer = |addr: SocketAddr, request: &str, expect: &str, clients: usize| {
        load::hammer(addr, request, expect, clients, span, MAX_CONNECTIONS)
    };
    let mut figures = Vec::new();
    for (what, request, expect) in [
        ("WHO", who, "HOLDERS "),
        ("PEERS", "RP2P/1 PEERS\n", "PEERS "),
    ] {
        let (mut mem, mut red, mut both) = (vec![], vec![], vec![]);
        for round in 1..=sizes.rounds {
            eprintln!("shared: {what} lookups, round {round} of {}", sizes.rounds);
            mem.push(checked(
                hammer(memory.addr, request, expect, sizes.clients),
                "memory",
            )?);
            red.push(checked(
                hammer(one.addr, request, expect, sizes.clients),
                "redis",
            )?);
            let half = sizes.clients / 2;
            let (a, b) = thread::scope(|s| {
                let a = s.spawn(|| hammer(one.addr, request, expect, half));
                let b = hammer(two.addr, request, expect, sizes.clients - half);
                (a.join(), b)
            });
            let a = checked(
                a.map_err(|_| anyhow::anyhow!("a load thread panicked"))?,
                "relay 1 of 2",
            )?;
            let b = checked(b, "relay 2 of 2")?;
            both.push(a + b);
        }
        figures.push((what, median(&mem), median(&red), median(&both)));
    }
    let mut rows = Vec::new();
    for (what, mem, red, both) in figures {
        let ratio = red / mem;
        rows.push(
            Row::new(
                format!(
                    "{what} lookups, {} clients, relay on Redis ({LOOKUP_PEERS} peers × {} files)",
                    sizes.clients,
                    catalog_files(catalog)
                ),
                format!("{red:.0}/s"),
            )
            .baseline("relay in memory", format!("{mem:.0}/s"))
            .ratio(ratio)
            .target(">= 0.5x memory", ratio >= 0.5),
        );
        rows.push(
            Row::new(
                format!(
                    "  two relays on one Redis, {} clients split between them",
                    sizes.clients
                ),
                format!("{both:.0}/s"),
            )
            .baseline("one relay on Redis", format!("{red:.0}/s"))
            .ratio(both / red),
        );
    }
    Ok(rows)
}

fn catalog_files(catalog: &Catalog) -> usize {
    catalog.files()
}

/// What went wrong in `load`, in a line.
fn describe(load: &Load) -> String {
    format!(
        "{} ok, {} refused ({:?}), {} failed ({:?})",
        load.ok, load.refused, load.first_refusal, load.failed, load.first_failure
    )
}

/// The median rate of `load`, failing on refusals and failures.
fn checked(load: Load, what: &str) -> anyhow::Result<f64> {
    ensure!(
        load.refused == 0 && load.failed == 0 && load.ok > 0,
        "{what}: {}",
        describe(&load)
    );
    Ok(load.rate())
}

/// `peers` peers registered, then each offering its files, on a relay on
/// an empty Redis: Redis's memory after each step, then the expiry of all
/// of them at once.
fn big_network(
    setup: &Setup,
    redis: &RedisServer,
    url: &str,
    catalog: &Catalog,
    peers: usize,
) -> anyhow::Result<Vec<Row>> {
    redis.query(&["FLUSHALL"]);
    let relay = relay_on(setup, "shared-big", Some(url), peers)?;
    let used = || -> anyhow::Result<u64> { info_field(redis, "memory", "used_memory") };
    let empty = used()?;
    eprintln!("shared: {peers} peers register on the relay on Redis");
    let t0 = Instant::now();
    register(relay.addr, peers)?;
    let register_secs = t0.elapsed().as_secs_f64();
    let registered = used()?;
    eprintln!(
        "shared: {peers} peers offer {} files each",
        catalog_files(catalog)
    );
    let t0 = Instant::now();
    let loaded = index::load_peers(relay.addr, catalog, peers)?;
    let offer_secs = t0.elapsed().as_secs_f64();
    ensure!(loaded.ok == peers as u64, "offering: {}", describe(&loaded));
    let holdings: u64 = redis.query(&["GET", "rp2p:holdings"]).parse()?;
    let indexed = used()?;

    // The sweep with nothing to expire, as every relay runs it each second.
    let cpu = || -> anyhow::Result<f64> {
        Ok(info_float(redis, "cpu", "used_cpu_user")? + info_float(redis, "cpu", "used_cpu_sys")?)
    };
    let (idle_cpu0, idle_t0) = (cpu()?, Instant::now());
    thread::sleep(Duration::from_secs(5));
    let idle_share = (cpu()? - idle_cpu0) / idle_t0.elapsed().as_secs_f64();

    // Every peer silent at once: made due by setting their expiry to 0.
    let script = "local m = redis.call('ZRANGE', KEYS[1], 0, -1) \
                  for i = 1, #m do redis.call('ZADD', KEYS[1], 0, m[i]) end return #m";
    redis.query(&["EVAL", script, "1", "rp2p:live"]);
    let (cpu0, t0) = (cpu()?, Instant::now());
    let relay_cpu0 = procs::cpu_secs(relay.pid()).unwrap_or(0.0);
    while redis.query(&["ZCARD", "rp2p:live"]) != "0" {
        if t0.elapsed() > SWEEP_LIMIT {
            bail!("the sweep did not expire {peers} peers within {SWEEP_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let sweep = t0.elapsed();
    let sweep_cpu = cpu()? - cpu0;
    let relay_cpu = procs::cpu_secs(relay.pid()).unwrap_or(0.0) - relay_cpu0;
    let left: u64 = redis
        .query(&["GET", "rp2p:holdings"])
        .parse()
        .unwrap_or(u64::MAX);
    let names_left = redis.query(&["ZCARD", "rp2p:names"]);
    drop(relay);

    let per = |bytes: u64, n: u64| bytes as f64 / n.max(1) as f64;
    Ok(vec![
        Row::new(
            format!("Redis memory, {peers} peers registered"),
            format!(
                "{} ({:.0} B per peer)",
                mib(registered.saturating_sub(empty) / 1024),
                per(registered.saturating_sub(empty), peers as u64)
            ),
        )
        .baseline("empty Redis", mib(empty / 1024)),
        Row::new(
            format!("  with their index ({holdings} holdings)"),
            format!(
                "{} ({:.0} B per holding)",
                mib(indexed.saturating_sub(empty) / 1024),
                per(indexed.saturating_sub(registered), holdings)
            ),
        ),
        Row::new(
            "  loading: registrations / offers per second",
            format!(
                "{:.0} / {:.0}",
                peers as f64 / register_secs,
                peers as f64 / offer_secs
            ),
        ),
        Row::new(
            format!("expiry sweep, nothing due, {peers} peers: Redis CPU"),
            format!("{:.2}% of a core", idle_share * 100.0),
        ),
        Row::new(
            format!("expiry sweep, all {peers} peers due at once"),
            format!(
                "{} ({:.1} µs Redis CPU per peer, relay CPU {:.2} s)",
                ms(sweep),
                sweep_cpu * 1e6 / peers as f64,
                relay_cpu
            ),
        )
        .target("index empty afterwards", left == 0 && names_left == "0"),
    ])
}

/// REGISTERs of `peers` simulated peers, from `REGISTRARS` threads.
fn register(relay: SocketAddr, peers: usize) -> anyhow::Result<()> {
    let loads = thread::scope(|scope| {
        let workers: Vec<_> = (0..REGISTRARS)
            .map(|t| {
                scope.spawn(move || {
                    let (mut load, mut buf) = (Load::default(), Vec::new());
                    for i in (t..peers).step_by(REGISTRARS) {
                        let (ip, port) = index::peer_addr(i);
                        let line =
                            sign::Peer::new(i as u64).sign(&Request::Register { port, host: None });
                        let started = Instant::now();
                        let result = load::exchange_from(ip, relay, &line, &mut buf);
                        load.record(started, result, &buf, "REGISTERED ");
                    }
                    load
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join()).collect::<Vec<_>>()
    });
    let mut total = Load::default();
    for load in loads {
        total.merge(load.map_err(|_| anyhow::anyhow!("a registering thread panicked"))?);
    }
    ensure!(
        total.ok == peers as u64,
        "registering: {}",
        describe(&total)
    );
    Ok(())
}

/// Two relays on one Redis; a peer registered with both; a client given
/// both that asks the first, which is killed: how long the client's
/// `peers` takes then, against its `--timeout`.
fn failover(setup: &Setup, url: &str) -> anyhow::Result<Vec<Row>> {
    let timeout = Duration::from_secs(2);
    let (first, second) = (
        relay_on(setup, "failover-1", Some(url), 10)?,
        relay_on(setup, "failover-2", Some(url), 10)?,
    );
    let client = setup.bin("peer-client");
    let relays = [first.addr, second.addr];
    let ask = |relays: &[SocketAddr]| -> anyhow::Result<Duration> {
        let mut cmd = Command::new(&client);
        for relay in relays {
            cmd.args(["--relay", &relay.to_string()]);
        }
        cmd.args(["--timeout", &timeout.as_secs().to_string(), "peers"]);
        procs::timed(&mut cmd, "peer-client peers", timeout * 4)
    };
    let times = |relays: &[SocketAddr]| -> anyhow::Result<Vec<f64>> {
        (0..5)
            .map(|_| ask(relays).map(|d| d.as_secs_f64()))
            .collect()
    };
    let both_up = median(&times(&relays)?);
    // The guard kills and reaps it.
    drop(first);
    let first_dead = median(&times(&relays)?);
    // A relay that accepts and never answers: the slow way to be down.
    let frozen = std::net::TcpListener::bind("127.0.0.1:0")?;
    let frozen_first = median(&times(&[frozen.local_addr()?, second.addr])?);
    let d = Duration::from_secs_f64;
    Ok(vec![
        Row::new(
            "failover: `peers` with the first of two relays killed",
            ms(d(first_dead)),
        )
        .baseline("both relays up", ms(d(both_up)))
        .ratio(first_dead / both_up)
        .target(
            format!("<= one --timeout ({}s) more", timeout.as_secs()),
            first_dead <= both_up + timeout.as_secs_f64() + SLACK,
        ),
        Row::new(
            "  the first relay frozen (accepts, never answers)",
            ms(d(frozen_first)),
        )
        .target(
            format!("<= one --timeout ({}s) more", timeout.as_secs()),
            frozen_first <= both_up + timeout.as_secs_f64() + SLACK,
        ),
    ])
}

/// A number from a section of `INFO`.
fn info_field(redis: &RedisServer, section: &str, field: &str) -> anyhow::Result<u64> {
    Ok(info_float(redis, section, field)? as u64)
}

fn info_float(redis: &RedisServer, section: &str, field: &str) -> anyhow::Result<f64> {
    let info = redis.query(&["INFO", section]);
    info.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in INFO {section}"))
}
