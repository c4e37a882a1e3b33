//! Strangers sending garbage, huge lines, or nothing at all: each gets an
//! error or a closed connection, and everyone else is still served.

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use protocol::MAX_LINE;

use crate::harness::{client, live_peers, stderr, stdout, Network, Server, STEP};

/// Sends `request` (ignoring a reset: a server may close early on junk) and
/// returns what came back.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, STEP).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let _ = stream.write_all(request);
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

fn network_with_a_file() -> (tempfile::TempDir, Network) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "still here\n").unwrap();
    let net = Network::start(&[dir.path()]);
    (dir, net)
}

/// The same, as processes, for tests that read the servers' logs.
fn logging_network_with_a_file() -> (tempfile::TempDir, Network) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "still here\n").unwrap();
    let net = Network::start_processes(&[dir.path()]);
    (dir, net)
}

fn assert_still_serving(net: &Network) {
    let out = net.client(&["get", "a.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "still here\n");
}

#[test]
fn garbage_gets_one_error_line_and_the_servers_go_on() {
    let (_dir, net) = logging_network_with_a_file();
    let noise: Vec<u8> = (0..2000u32).map(|i| (i * 7919 % 251) as u8).collect();
    for server in [net.relay.addr, net.peers[0].addr] {
        for (request, expect) in [
            (&b"\n"[..], "ERR bad-request empty request"),
            (b"RP2P/1 FLY\n", "ERR bad-request unknown command \"FLY\""),
            (b"RP2P/2 PEERS\n", "ERR version "),
            (
                b"RP2P/1 PEERS",
                "ERR bad-request connection closed in the middle of a line",
            ),
            (
                b"\x00\x01\x02\xff\n",
                "ERR bad-request line is not valid UTF-8",
            ),
            (&noise, "ERR "),
        ] {
            let reply = exchange(server, request);
            assert!(reply.starts_with(expect), "{server} {request:?}: {reply:?}");
            assert_eq!(reply.lines().count(), 1, "{reply:?}");
        }
    }
    let reply = exchange(net.relay.addr, b"RP2P/1 REGISTER\n");
    assert!(
        reply.starts_with("ERR bad-request missing port"),
        "{reply:?}"
    );
    let reply = exchange(net.peers[0].addr, b"RP2P/1 GET\n");
    assert!(
        reply.starts_with("ERR bad-request missing file name"),
        "{reply:?}"
    );
    assert_still_serving(&net);
    assert!(net.relay.log().contains("bad request"), "each is logged");
}

#[test]
fn a_request_line_is_bounded_exactly() {
    let (_dir, net) = network_with_a_file();
    // "RP2P/1 PEERS", padded with spaces to exactly MAX_LINE bytes with the newline.
    let mut at_limit = b"RP2P/1 PEERS".to_vec();
    at_limit.resize(MAX_LINE - 1, b' ');
    at_limit.push(b'\n');
    assert!(exchange(net.relay.addr, &at_limit).starts_with("PEERS 1\n"));
    let mut over = at_limit.clone();
    over.insert(0, b' ');
    assert!(exchange(net.relay.addr, &over).starts_with("ERR too-long line longer than 4096 bytes"));
    // Megabytes without a newline are cut off, not buffered.
    let huge = vec![b'a'; 8 << 20];
    for server in [net.relay.addr, net.peers[0].addr] {
        let reply = exchange(server, &huge);
        assert!(
            reply.is_empty() || reply.starts_with("ERR too-long"),
            "{reply:?}"
        );
    }
    assert_still_serving(&net);
}

/// Sends `line` a byte every 200 ms, watching for a reply in between;
/// returns the reply and when it came.
fn trickle(addr: SocketAddr, line: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0; 256];
    for byte in line.iter() {
        let _ = stream.write_all(&[*byte]);
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                reply.extend_from_slice(&buf[..n]);
                break;
            }
            _ => {}
        }
    }
    stream.set_read_timeout(Some(STEP)).unwrap();
    let _ = stream.read_to_end(&mut reply);
    (
        String::from_utf8_lossy(&reply).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_silent_or_trickling_connection_is_closed() {
    let relay = Server::relay_here(|c| c.idle_timeout = Duration::from_secs(1));
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "a\n").unwrap();
    let peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.timeout = Duration::from_secs(1)
    });
    for (addr, line) in [
        (relay.addr, &b"RP2P/1 PEERS\n"[..]),
        (peer.addr, b"RP2P/1 GET a.txt\n"),
    ] {
        // Silent.
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).unwrap();
        silent.set_read_timeout(Some(STEP)).unwrap();
        let mut reply = String::new();
        let _ = silent.read_to_string(&mut reply);
        assert!(reply.starts_with("ERR timeout "), "{reply:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
        // Trickling one byte at a time, each well within a per-read
        // timeout: the whole line takes 3 s, and the deadline of 1 s is
        // for the whole line.
        let (reply, took) = trickle(addr, line);
        assert!(reply.starts_with("ERR timeout "), "{addr}: {reply:?}");
        assert!(took < Duration::from_millis(2500), "{addr}: {took:?}");
    }
}

#[test]
fn hundreds_of_idle_connections_do_not_starve_a_real_client() {
    let (_dir, net) = network_with_a_file();
    let mut idle = Vec::new();
    for server in [net.relay.addr, net.peers[0].addr] {
        for _ in 0..300 {
            idle.push(TcpStream::connect_timeout(&server, STEP).unwrap());
        }
    }
    let started = Instant::now();
    assert_still_serving(&net);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
}

#[test]
fn over_the_connection_limit_the_answer_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "a").unwrap();
    let relay = Server::relay(&["--max-connections", "2"]);
    let peer = Server::peer(relay.addr, dir.path(), &["--max-connections", "2"]);
    // The peer's registration must not take one of the relay's two slots below.
    crate::harness::eventually("the peer is registered", || {
        live_peers(relay.addr).len() == 1
    });
    for server in [relay.addr, peer.addr] {
        // Fill both slots. A slot can still be taken for a moment by the
        // connection before (its thread ends after its reply), so a held
        // connection that was answered `busy` is opened again.
        let mut held = Vec::new();
        for _ in 0..50 {
            if held.len() == 2 {
                break;
            }
            let stream = TcpStream::connect(server).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            if (&stream).read(&mut [0; 64]).is_err() {
                held.push(stream); // nothing said: it holds a slot
            }
        }
        assert_eq!(held.len(), 2);
        let reply = exchange(server, b"RP2P/1 LIST\n");
        assert!(
            reply.starts_with("ERR busy too many connections (limit 2)"),
            "{reply:?}"
        );
        drop(held);
    }
    crate::harness::eventually("served again", || {
        exchange(peer.addr, b"RP2P/1 LIST\n").starts_with("FILES 1")
    });
    assert!(relay.log().contains("busy"));
}

#[test]
fn a_hundred_lookups_and_twenty_downloads_at_once() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let content: Vec<u8> = (0..(2 << 20) as u32).map(|i| (i % 253) as u8).collect();
    for (i, dir) in dirs.iter().enumerate() {
        for j in 0..10 {
            let mut file = content.clone();
            file[0] = (i * 10 + j) as u8;
            fs::write(dir.path().join(format!("f{}.bin", i * 10 + j)), file).unwrap();
        }
    }
    let net = Network::start(&dirs.iter().map(|d| d.path()).collect::<Vec<_>>());
    let relay = net.relay.addr;
    let lookups: Vec<_> = (0..100)
        .map(|_| thread::spawn(move || live_peers(relay).len()))
        .collect();
    let downloads: Vec<_> = (0..20)
        .map(|n| thread::spawn(move || (n, client(relay, &["get", &format!("f{n}.bin")], ""))))
        .collect();
    for lookup in lookups {
        assert_eq!(lookup.join().unwrap(), 2);
    }
    for download in downloads {
        let (n, out) = download.join().unwrap();
        assert!(out.status.success(), "f{n}: {}", stderr(&out));
        assert_eq!(out.stdout.len(), content.len());
        assert_eq!(out.stdout[0], n as u8);
        assert!(out.stdout[1..] == content[1..], "f{n} differs");
    }
}

/// A client that reads steadily but slowly (100 KB/s, with a small
/// receive buffer) is not cut off although single writes to it block for
/// longer than the peer's `--timeout`: the peer gives up only on a client
/// that stops reading.
#[test]
fn a_slow_but_steady_reader_is_not_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    // More than the send buffer that loopback autotunes to, so that the
    // peer's writes block.
    let content: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(dir.path().join("big.bin"), &content).unwrap();
    let relay = Server::relay(&[]);
    let peer = Server::peer(relay.addr, dir.path(), &["--timeout", "2"]);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&peer.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(b"RP2P/1 GET big.bin\n").unwrap();
    // Three times the timeout at 20 KB every 200 ms.
    let until = Instant::now() + Duration::from_secs(6);
    let mut got = 0;
    let mut buf = [0; 20 << 10];
    while Instant::now() < until {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
        thread::sleep(Duration::from_millis(200));
    }
    let log = peer.log();
    assert!(!log.contains("transfer broke"), "{log}");
    assert!(got > 100 << 10, "{got}");
}
