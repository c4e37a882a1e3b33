//! Fair limits: one host cannot take the relay or a peer for itself.
//! Several loopback source addresses (127.0.0.2, 127.0.0.3, ...) act as
//! different hosts, with loopback's exemption from the limits turned off.

use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::Instant,
};

use protocol::relay::Request;
use relay_server::SourceLimits;

use crate::harness::{client, eventually, sign, stderr, stdout, Server, STEP};

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
const OTHER: [u8; 4] = [127, 0, 0, 3];
/// Asks for the counters, from an address of its own.
const OBSERVER: [u8; 4] = [127, 0, 0, 4];

/// A connection to `addr` from the loopback address `from`.
fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect_timeout(&addr.into(), STEP).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream
}

fn read_all(mut stream: TcpStream) -> String {
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

/// Sends one request line from `from` and returns the whole reply.
fn ask_from(from: [u8; 4], addr: SocketAddr, line: &str) -> String {
    let mut stream = connect_from(from, addr);
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    read_all(stream)
}

/// The relay's counters, asked from `OBSERVER`.
fn stats(relay: SocketAddr) -> HashMap<String, u64> {
    let reply = ask_from(OBSERVER, relay, "RP2P/1 STATS");
    assert!(reply.starts_with("STATS "), "{reply:?}");
    reply
        .lines()
        .skip(1)
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sends `lines` from `from`, four connections at a time, as fast as
/// the relay answers; returns the first line of each reply.
fn flood(from: [u8; 4], addr: SocketAddr, lines: Vec<String>) -> Vec<String> {
    let chunks: Vec<Vec<String>> = lines
        .chunks(lines.len().div_ceil(4))
        .map(<[_]>::to_vec)
        .collect();
    thread::scope(|s| {
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|line| {
                            let reply = ask_from(from, addr, line);
                            reply.lines().next().unwrap_or_default().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn count(replies: &[String], prefix: &str) -> usize {
    replies.iter().filter(|r| r.starts_with(prefix)).count()
}

/// `REGISTER <port>`, signed by a key of its own, as a real peer sends it.
fn register(port: u16) -> String {
    let request = Request::Register { port, host: None };
    format!("{} {}", request.canonical(), sign(port, &request))
}

/// Fake peers, each with a key of its own (keys cost nothing), as a flood
/// sends them.
fn fake_registrations(n: u16) -> Vec<String> {
    (0..n).map(|i| register(1000 + i)).collect()
}

/// Each distinct reply and how often it came, for failure messages.
fn summary(replies: &[String]) -> std::collections::BTreeMap<&str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.as_str()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn one_host_registering_fake_peers_cannot_crowd_out_another() {
    // No rates: only the cap on peers per address stands in the way.
    let relay = Server::relay_here(|c| {
        c.max_registered = 100;
        c.limits = SourceLimits {
            exempt_loopback: false,
            write_rate: 0.0,
            max_peers_per_ip: 40,
            ..SourceLimits::default()
        };
    });
    let replies = flood(ATTACKER, relay.addr, fake_registrations(300));
    assert_eq!(count(&replies, "REGISTERED"), 40, "{:?}", summary(&replies));
    let refused = "ERR busy retry-after 90 too many peers registered from your address (limit 40)";
    assert_eq!(count(&replies, refused), 260, "{:?}", summary(&replies));
    // Another host's peers all get in, and its lookups are answered.
    for port in 7000..7030 {
        let reply = ask_from(OTHER, relay.addr, &register(port));
        assert!(reply.starts_with("REGISTERED"), "{port}: {reply:?}");
    }
    assert!(ask_from(OTHER, relay.addr, "RP2P/1 PEERS").starts_with("PEERS 50\n"));
    let stats = stats(relay.addr);
    assert_eq!(stats["peers_live"], 70);
    assert_eq!(stats["limited_peers_per_ip"], 260);
    assert_eq!(stats["limited_writes"], 0);
}

#[test]
fn one_host_asking_fast_gets_its_share_and_no_more() {
    // No cap on peers: only the rates stand in the way.
    let (rate, burst) = (2.0, 20);
    let relay = Server::relay_here(|c| {
        c.max_registered = 100;
        c.limits = SourceLimits {
            exempt_loopback: false,
            write_rate: rate,
            write_burst: burst,
            read_rate: rate,
            read_burst: burst,
            max_peers_per_ip: 0,
            ..SourceLimits::default()
        };
    });
    let started = Instant::now();
    let writes = flood(ATTACKER, relay.addr, fake_registrations(300));
    let reads = flood(ATTACKER, relay.addr, vec!["RP2P/1 PEERS".to_string(); 300]);
    // The burst, and what the rate brought back meanwhile.
    let share = burst as usize + (started.elapsed().as_secs_f64() * rate).ceil() as usize;
    let (registered, peers) = (count(&writes, "REGISTERED"), count(&reads, "PEERS"));
    assert!(
        (burst as usize..=share).contains(&registered),
        "{registered} of {:?}",
        summary(&writes)
    );
    assert!(
        (burst as usize..=share).contains(&peers),
        "{peers} of {:?}",
        summary(&reads)
    );
    let limited_writes = count(
        &writes,
        "ERR busy retry-after 1 too many registrations from your address",
    );
    let limited_reads = count(
        &reads,
        "ERR busy retry-after 1 too many lookups from your address",
    );
    assert_eq!(limited_writes + registered, 300, "{:?}", summary(&writes));
    assert_eq!(limited_reads + peers, 300, "{:?}", summary(&reads));
    // Another host is served in full.
    for port in 7000..7020 {
        let reply = ask_from(OTHER, relay.addr, &register(port));
        assert!(reply.starts_with("REGISTERED"), "{port}: {reply:?}");
    }
    for _ in 0..10 {
        let reply = ask_from(OTHER, relay.addr, "RP2P/1 PEERS");
        assert!(reply.starts_with("PEERS "), "{reply:?}");
    }
    let stats = stats(relay.addr);
    assert_eq!(stats["limited_writes"], limited_writes as u64);
    assert_eq!(stats["limited_reads"], limited_reads as u64);
    assert_eq!(
        stats["busy_rejections"],
        (limited_writes + limited_reads) as u64
    );
}

/// Opens `n` connections from `ATTACKER` that send nothing, and returns
/// them (the server holds those it took until its timeout, 30 s here).
fn hold_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| connect_from(ATTACKER, addr)).collect()
}

/// The connections past the cap are answered at once; those before it hang on.
fn assert_refused_past(held: Vec<TcpStream>, cap: usize) {
    let line =
        format!("ERR busy retry-after 1 too many connections from your address (limit {cap})\n");
    for stream in held.into_iter().skip(cap) {
        assert_eq!(read_all(stream), line);
    }
}

#[test]
fn one_host_holding_connections_cannot_take_every_slot_of_the_relay() {
    let relay = Server::relay_here(|c| {
        c.max_connections = 20;
        c.idle_timeout = std::time::Duration::from_secs(30);
        c.limits = SourceLimits {
            exempt_loopback: false,
            max_connections_per_ip: 5,
            ..SourceLimits::default()
        };
    });
    // Accepted in order: these are all placed or refused before the next
    // host's connection comes up.
    let held = hold_connections(relay.addr, 30);
    let reply = ask_from(OTHER, relay.addr, "RP2P/1 PEERS");
    assert_eq!(reply, "PEERS 0\n");
    let counts = stats(relay.addr);
    assert_eq!(counts["limited_connections_per_ip"], 25);
    assert_eq!(counts["busy_rejections"], 25);
    // The five held, and the one asking (once the last one's is given back).
    eventually("five connections are held", || {
        stats(relay.addr)["connections_open"] == 6
    });
    assert_refused_past(held, 5);
}

#[test]
fn one_host_holding_connections_cannot_take_every_slot_of_a_peer() {
    let relay = Server::relay_here(|_| {});
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "served\n").unwrap();
    let peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.max_connections = 10;
        c.max_connections_per_ip = 3;
        c.limit_loopback = true;
        c.timeout = std::time::Duration::from_secs(30);
    });
    let held = hold_connections(peer.addr, 12);
    let reply = ask_from(OTHER, peer.addr, "RP2P/1 GET a.txt");
    assert!(reply.starts_with("FILE 7 "), "{reply:?}");
    assert!(reply.ends_with("\nserved\n"), "{reply:?}");
    assert_refused_past(held, 3);
}

#[test]
fn loopback_is_exempt_by_default() {
    let relay = Server::relay_here(|c| {
        c.limits = SourceLimits {
            write_rate: 0.001,
            write_burst: 1,
            read_rate: 0.001,
            read_burst: 1,
            max_peers_per_ip: 1,
            max_connections_per_ip: 1,
            ..SourceLimits::default()
        };
    });
    let held = hold_connections(relay.addr, 3);
    for port in 7000..7005 {
        let reply = ask_from(ATTACKER, relay.addr, &register(port));
        assert!(reply.starts_with("REGISTERED"), "{reply:?}");
        let reply = ask_from(ATTACKER, relay.addr, "RP2P/1 PEERS");
        assert!(reply.starts_with("PEERS"), "{reply:?}");
    }
    let stats = stats(relay.addr);
    assert_eq!(stats["peers_live"], 5);
    for key in [
        "limited_writes",
        "limited_reads",
        "limited_peers_per_ip",
        "limited_connections_per_ip",
        "busy_rejections",
    ] {
        assert_eq!(stats[key], 0, "{key}");
    }
    drop(held);
}

#[test]
fn the_client_waits_out_a_retry_after_within_its_timeout_and_says_when_not() {
    // One lookup every 2 s, as the command line sets it.
    let relay = Server::relay(&[
        "--limit-loopback",
        "--read-rate",
        "0.5",
        "--read-burst",
        "1",
    ]);
    let first = client(relay.addr, &["peers"], "");
    assert!(first.status.success(), "{}", stderr(&first));
    let second = client(relay.addr, &["peers"], "");
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&second), "");
    let said = stderr(&second);
    assert!(
        said.contains("is busy: too many lookups from your address (limit 0.5/s, burst 1); asking again in 2s"),
        "{said}"
    );
    // One lookup every 20 s: past the 10 s timeout, it fails, saying when to retry.
    let slow = Server::relay(&[
        "--limit-loopback",
        "--read-rate",
        "0.05",
        "--read-burst",
        "1",
    ]);
    let first = client(slow.addr, &["peers"], "");
    assert!(first.status.success(), "{}", stderr(&first));
    let refused = client(slow.addr, &["peers"], "");
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    let said = stderr(&refused);
    assert!(
        said.contains(&format!(
            "relay 127.0.0.1:{} is busy: too many lookups",
            slow.port()
        )),
        "{said}"
    );
    assert!(said.contains("; try again in 20s"), "{said}");
}

#[test]
fn a_peer_waits_out_a_retry_after_even_when_its_folder_changes() {
    // The start (ANNOUNCE and OFFER) takes the burst; the heartbeat a
    // second later finds half a token, and is told to wait 3 s for two.
    let relay = Server::relay_here(|c| {
        c.limits = SourceLimits {
            exempt_loopback: false,
            write_rate: 0.5,
            write_burst: 2,
            ..SourceLimits::default()
        };
    });
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "a\n").unwrap();
    let peer = Server::peer(relay.addr, dir.path(), &["--heartbeat", "1"]);
    let refused = "cannot register";
    eventually("the relay refuses a heartbeat", || {
        peer.log().contains(refused)
    });
    // A change while it waits does not make it ask sooner.
    fs::write(dir.path().join("b.txt"), "b\n").unwrap();
    let registered = "registered with relay";
    eventually("the peer registers again", || {
        peer.log().matches(registered).count() >= 2
    });
    let log = peer.log();
    let until_back: Vec<&str> = log
        .lines()
        .skip_while(|line| !line.contains(registered))
        .skip(1)
        .take_while(|line| !line.contains(registered))
        .filter(|line| line.contains(refused))
        .collect();
    // Asked again once, when the relay said.
    assert_eq!(until_back.len(), 1, "{log}");
    assert!(
        until_back[0].contains("retry-after 3 too many registrations"),
        "{log}"
    );
    assert!(until_back[0].ends_with("retrying in 3s"), "{log}");
    assert!(log.contains("indexed 2 files"), "{log}");
}
