//! A small file fetched end to end by a whole `peer-client` process, and
//! where its time goes.

use std::{
    fs::File,
    net::IpAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    load::{self, Trivial},
    procs,
    report::{median, ms, secs, Row},
    Setup,
};

const LIMIT: Duration = Duration::from_secs(20);

pub fn run(setup: &Setup, runs: usize) -> anyhow::Result<Vec<Row>> {
    let trivial = Trivial::start(IpAddr::from([127, 0, 0, 3]), "FILE 0 x\n", 2)?;
    let client = setup.bin("peer-client");
    let port = setup.relay.addr.port().to_string();
    let quiet = |cmd: &mut Command| -> anyhow::Result<()> {
        cmd.stdin(Stdio::null())
            .stdout(File::create("/dev/null")?)
            .stderr(Stdio::null());
        Ok(())
    };
    let mut get = Command::new(&client);
    get.args(["127.0.0.1", &port, "get", "small.txt"]);
    quiet(&mut get)?;
    let mut version = Command::new(&client);
    version.arg("--version");
    quiet(&mut version)?;
    let mut true_ = Command::new("true");
    quiet(&mut true_)?;
    let rtt = |addr, request: &str| -> anyhow::Result<Duration> {
        let mut buf = Vec::new();
        let t0 = Instant::now();
        load::exchange(addr, request.as_bytes(), &mut buf)?;
        Ok(t0.elapsed())
    };
    let get_small = "RP2P/1 GET small.txt\n";
    // Check the command works before timing it.
    procs::timed(&mut get, "peer-client get small.txt", LIMIT)?;

    eprintln!("small file: {runs} runs");
    let mut t: [Vec<Duration>; 6] = Default::default();
    for _ in 0..runs {
        t[0].push(procs::timed(&mut get, "peer-client get small.txt", LIMIT)?);
        t[1].push(procs::timed(&mut version, "peer-client --version", LIMIT)?);
        t[2].push(procs::timed(&mut true_, "true", LIMIT)?);
        t[3].push(rtt(setup.relay.addr, "RP2P/1 PEERS\n")?);
        t[4].push(rtt(setup.peer.addr, get_small)?);
        t[5].push(rtt(trivial.addr, get_small)?);
    }
    let [whole, start, true_start, relay, peer, base] = t.map(|v| median(&secs(&v)));
    let floor = start + relay + peer;
    let d = Duration::from_secs_f64;
    Ok(vec![
        Row::new(
            "small file, whole `peer-client get` process (median)",
            ms(d(whole)),
        )
        .baseline("sum of the three parts below", ms(d(floor)))
        .ratio(whole / floor)
        .target("< 5 ms", whole < 0.005),
        Row::new("  process start (`peer-client --version`)", ms(d(start)))
            .baseline("`true`", ms(d(true_start)))
            .ratio(start / true_start),
        Row::new("  relay round trip (connect, PEERS, close)", ms(d(relay)))
            .baseline("trivial one-line server", ms(d(base)))
            .ratio(relay / base),
        Row::new(
            "  peer round trip (connect, GET small.txt, close)",
            ms(d(peer)),
        )
        .baseline("trivial one-line server", ms(d(base)))
        .ratio(peer / base),
    ])
}
