//! A peer's upload cap, and downloads that survive the client's end and
//! continue where they stopped.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::harness::{
    bin, client, eventually, folder_with, live_peers, stderr, stdout, wait_output, Server, STEP,
};

/// Content that differs at every offset, so a piece in the wrong place shows.
fn big_content(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

/// A relay and one peer process serving `dir` with `extra` options, once
/// the relay's index names `name`.
fn network(dir: &std::path::Path, extra: &[&str], name: &str) -> (Server, Server) {
    let relay = Server::relay(&[]);
    let peer = Server::peer(relay.addr, dir, extra);
    eventually("the peer is registered", || {
        live_peers(relay.addr).len() == 1
    });
    eventually("the index has the file", || {
        stdout(&client(relay.addr, &["ls"], "")).contains(name)
    });
    (relay, peer)
}

/// The burst a capped peer may send at once: 256 KiB for caps under 2.5 MiB/s.
const BURST: f64 = (256 << 10) as f64;

/// The cap holds: the time to get the bytes has a lower bound, (bytes -
/// burst) / rate, alone and for two clients at once (one cap for all,
/// not one each). A lower bound on time, not a speed target.
#[test]
fn a_capped_peer_sends_no_faster_than_its_cap_to_all_clients_together() {
    // Small enough to keep the test short, big enough that the cap, not
    // the burst, decides: 1 s alone, 2.25 s for two clients at least.
    let content = big_content(1280 << 10);
    let dir = folder_with(&[("big.bin", &content)]);
    let (relay, _peer) = network(dir.path(), &["--rate-limit", "1M"], "big.bin");
    let rate = (1 << 20) as f64;
    let out_dir = tempfile::tempdir().unwrap();
    let dest = |name: &str| out_dir.path().join(name);
    let get = |name: &str| {
        Command::new(bin("peer-client"))
            .args(["127.0.0.1", &relay.port(), "get", "big.bin", "-o"])
            .arg(dest(name))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let started = Instant::now();
    let out = wait_output(get("alone"));
    let took = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fs::read(dest("alone")).unwrap() == content);
    let least = (content.len() as f64 - BURST) / rate;
    assert!(
        took >= least * 0.95,
        "{took:.2} s, under the {least:.2} s the cap allows"
    );

    let started = Instant::now();
    let (a, b) = (get("a"), get("b"));
    for out in [wait_output(a), wait_output(b)] {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let took = started.elapsed().as_secs_f64();
    for name in ["a", "b"] {
        assert!(fs::read(dest(name)).unwrap() == content, "{name}");
    }
    // Each with a cap of its own, both would be done in `least`.
    let least = (2.0 * content.len() as f64 - BURST) / rate;
    assert!(
        took >= least * 0.95,
        "{took:.2} s, under the {least:.2} s the cap allows"
    );
}

/// A peer that stops while a capped transfer is waiting for its share
/// ends that transfer once the grace period is over, instead of trickling
/// it out at the capped rate after it has stopped.
#[test]
fn a_stopping_peer_ends_capped_transfers_after_its_grace() {
    let content = big_content(4 << 20);
    let dir = folder_with(&[("big.bin", &content)]);
    let relay = Server::relay_here(|_| {});
    let mut peer = Server::peer_here(relay.addr, dir.path(), |config| {
        config.rate_limit = Some(100 << 10);
        config.grace = Duration::from_millis(200);
    });
    let (started_tx, started) = mpsc::channel();
    let addr = peer.addr;
    let reader = thread::spawn(move || {
        let mut stream = TcpStream::connect_timeout(&addr, STEP).unwrap();
        stream.set_read_timeout(Some(STEP)).unwrap();
        stream.write_all(b"RP2P/1 GET big.bin\n").unwrap();
        let mut stream = BufReader::new(stream);
        let mut header = String::new();
        stream.read_line(&mut header).unwrap();
        let mut buf = vec![0; 64 << 10];
        let mut got = stream.read(&mut buf).unwrap();
        started_tx.send(()).unwrap();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break (got, Instant::now()),
                Ok(n) => got += n,
            }
        }
    });
    started.recv_timeout(STEP).expect("the transfer started");
    peer.stop_here();
    let stopped = Instant::now();
    let (got, ended) = reader.join().unwrap();
    assert!(
        got < content.len(),
        "all {got} bytes came: the cap did not hold"
    );
    let after = ended.saturating_duration_since(stopped);
    assert!(
        after < Duration::from_secs(2),
        "the transfer went on for {after:?}"
    );
}

/// Verified bytes in a `.part.ranges` record (0 while there is none).
fn recorded(record: &std::path::Path) -> u64 {
    let Ok(text) = fs::read_to_string(record) else {
        return 0;
    };
    let Some((_, ranges)) = text.split_once("\nranges ") else {
        return 0;
    };
    ranges
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(' '))
        .map(|(start, end)| end.parse::<u64>().unwrap() - start.parse::<u64>().unwrap())
        .sum()
}

/// Bytes of content a peer's log says it sent in full replies to RANGE.
fn ranges_sent(log: &str) -> u64 {
    log.lines()
        .filter(|line| line.contains(" RANGE "))
        .filter_map(|line| line.split(": sent ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A client killed outright (no chance to clean up) mid-transfer: the
/// same command continues from what the record says was verified, and
/// the peer sends only the rest.
#[test]
fn a_download_killed_mid_transfer_continues_where_it_stopped() {
    let content = big_content(6 << 20);
    let size = content.len() as u64;
    let dir = folder_with(&[("big.bin", &content)]);
    // Capped, so that the transfer lasts long enough to be cut.
    let (relay, peer) = network(dir.path(), &["--rate-limit", "2M"], "big.bin");
    let out_dir = tempfile::tempdir().unwrap();
    let dest = out_dir.path().join("big.bin");
    let part = out_dir.path().join("big.bin.part");
    let record = out_dir.path().join("big.bin.part.ranges");
    let mut child = Command::new(bin("peer-client"))
        .args(["127.0.0.1", &relay.port(), "get", "big.bin", "-o"])
        .arg(&dest)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("verified bytes are recorded", || recorded(&record) > 0);
    child.kill().unwrap();
    child.wait().unwrap();
    let had = recorded(&record);
    assert!(had < size, "the whole file was there before the kill");
    assert!(!dest.exists() && part.exists());

    let before = peer.log().len();
    let out = client(
        relay.addr,
        &["get", "big.bin", "-o", dest.to_str().unwrap()],
        "",
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(fs::read(&dest).unwrap() == content, "the result differs");
    let resuming = format!(
        "resuming from {}: {had} of {size} bytes verified by an earlier run",
        part.display()
    );
    assert!(err.contains(&resuming), "{err}");
    assert!(
        err.contains(&format!("{had} bytes verified by an earlier run)")),
        "{err}"
    );
    eventually("the peer logged the second run", || {
        ranges_sent(&peer.log()[before..]) > 0
    });
    let sent = ranges_sent(&peer.log()[before..]);
    assert!(sent <= size - had, "sent {sent} of {size} bytes again");
    assert!(!part.exists() && !record.exists(), "partial files left");
}

/// A `.part` with a record that cannot be trusted (garbage, another
/// version, a length that does not match) is not used: the download
/// starts over, says why, and ends byte-exact.
#[test]
fn a_corrupt_or_foreign_partial_download_is_started_over() {
    let content = big_content(100_000);
    let dir = folder_with(&[("f.bin", &content)]);
    let net = crate::harness::Network::start(&[dir.path()]);
    eventually("the index has the file", || {
        stdout(&net.client(&["ls"])).contains("f.bin")
    });
    let other = blake3::hash(b"another version");
    let foreign = format!("relay-p2p partial 1\nsize 100000\nhash {other}\nranges 1\n0 65536\n");
    let mine = foreign.replace(&other.to_string(), &blake3::hash(&content).to_string());
    for (part_len, record, why) in [
        (
            100_000,
            "not a record\n".to_string(),
            "its record cannot be used",
        ),
        (100_000, foreign, "it holds part of other content"),
        (50_000, mine, "its length does not match its record"),
        (100_000, String::new(), "it has no record of verified bytes"),
    ] {
        let out_dir = tempfile::tempdir().unwrap();
        let dest = out_dir.path().join("f.bin");
        let part = out_dir.path().join("f.bin.part");
        fs::write(&part, vec![0xAA; part_len]).unwrap();
        if !record.is_empty() {
            fs::write(out_dir.path().join("f.bin.part.ranges"), &record).unwrap();
        }
        let out = net.client(&["get", "f.bin", "-o", dest.to_str().unwrap()]);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(
            fs::read(&dest).unwrap() == content,
            "{why}: the result differs"
        );
        let told = format!("not resuming from {}: {why}", part.display());
        assert!(
            err.contains(&told) && err.contains("starting over"),
            "{err}"
        );
        assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 1, "{why}");
    }
}
