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
    bin, client, eventually, live_peers, stderr, stdout, wait_output, Server, STEP,
};

fn folder_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

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
    let content = big_content(800 << 10);
    let dir = folder_with(&[("big.bin", &content)]);
    let (relay, _peer) = network(dir.path(), &["--rate-limit", "200K"], "big.bin");
    let rate = (200 << 10) as f64;
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
