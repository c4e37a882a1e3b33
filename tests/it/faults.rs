//! Peers that die, freeze or lie, a relay that restarts, transfers cut off
//! half way: the client gets its file or a clear error, never a hang.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::harness::{
    bin, client, eventually, folder_with, live_peers, raw_exchange, stderr, stdout, wait_output,
    Network, Server,
};

/// Content that differs at every offset, so a resume at the wrong byte shows.
fn big_content(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

#[test]
fn a_killed_peer_is_skipped_with_a_reason() {
    let a = folder_with(&[("a.txt", b"from a\n")]);
    let b = folder_with(&[("a.txt", b"from a\n"), ("b-only.txt", b"b\n")]);
    let mut net = Network::start_processes(&[a.path(), b.path()]);
    eventually("both are indexed", || {
        stdout(&net.client(&["ls"])).contains("b-only.txt")
    });
    let dead = net.peers[1].addr;
    net.peers[1].signal("KILL");
    net.peers[1].wait_exit();

    // Whatever order the index gives the holders, the file arrives.
    let out = net.client(&["get", "a.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from a\n");
    // The only holder is dead (and listed until its TTL): skipped, with
    // the reason, and a network failure, worth a retry, not "not found".
    let out = net.client(&["get", "b-only.txt"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("peer {dead}: connection refused")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "no peer could serve it ({dead}: connection refused)"
        )),
        "{err}"
    );
}

#[test]
fn a_frozen_peer_is_skipped_after_the_timeout() {
    let a = folder_with(&[("a.txt", b"from a\n")]);
    let b = folder_with(&[("a.txt", b"from a\n"), ("b-only.txt", b"b\n")]);
    let net = Network::start_processes(&[a.path(), b.path()]);
    eventually("both are indexed", || {
        stdout(&net.client(&["ls"])).contains("b-only.txt")
    });
    let frozen = net.peers[1].addr;
    net.peers[1].signal("STOP");

    let started = Instant::now();
    let out = net.client(&["--timeout", "1", "get", "b-only.txt"]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("peer {frozen}: timed out")),
        "{}",
        stderr(&out)
    );

    let out = net.client(&["--timeout", "1", "get", "a.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from a\n");
}

#[test]
fn a_silent_peer_expires_after_the_ttl() {
    let dir = folder_with(&[]);
    let relay = Server::relay(&["--ttl", "1"]);
    let peer = Server::peer(relay.addr, dir.path(), &["--heartbeat", "60"]);
    eventually("the peer is listed", || live_peers(relay.addr).len() == 1);
    eventually("the peer has expired", || live_peers(relay.addr).is_empty());
    eventually("the relay logged it", || {
        relay.log().contains(&format!("expired {}", peer.addr))
    });
    assert!(
        peer.log()
            .contains("heartbeat of 60s is not shorter than the relay's ttl of 1s"),
        "{}",
        peer.log()
    );
}

#[test]
fn heartbeats_keep_a_peer_listed_past_the_ttl() {
    let dir = folder_with(&[]);
    let relay = Server::relay(&["--ttl", "2"]);
    let _peer = Server::peer(relay.addr, dir.path(), &["--heartbeat", "1"]);
    eventually("the peer is listed", || live_peers(relay.addr).len() == 1);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(live_peers(relay.addr).len(), 1);
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn sigterm_unregisters_the_peer_at_once() {
    let dir = folder_with(&[]);
    let mut net = Network::start_processes(&[dir.path()]);
    let peer = &mut net.peers[0];
    peer.signal("TERM");
    assert_eq!(peer.wait_exit(), Some(0), "{}", peer.log());
    assert!(
        peer.log().contains("unregistered from relay"),
        "{}",
        peer.log()
    );
    // The TTL is 90 s: only the unregistration can have removed it.
    assert!(live_peers(net.relay.addr).is_empty());
}

#[test]
fn a_frozen_relay_does_not_hold_up_a_peer_shutdown() {
    let dir = folder_with(&[]);
    let mut net = Network::start_processes(&[dir.path()]);
    net.relay.signal("STOP");
    let started = Instant::now();
    let peer = &mut net.peers[0];
    peer.signal("TERM");
    assert_eq!(peer.wait_exit(), Some(0), "{}", peer.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        peer.log().contains("cannot unregister from relay"),
        "{}",
        peer.log()
    );
}

#[test]
fn peers_come_back_after_a_relay_restart() {
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let relay = Server::relay(&[]);
    let port = relay.port();
    let peer = Server::peer(relay.addr, dir.path(), &["--heartbeat", "1"]);
    eventually("the peer is listed", || live_peers(relay.addr).len() == 1);
    drop(relay);
    eventually("the peer notices", || {
        peer.log().contains("cannot register with relay")
    });

    let restarted = Instant::now();
    let relay = Server::start("relay-server", &[&port, "--bind", "127.0.0.1"]);
    eventually("the peer is back", || {
        live_peers(relay.addr)
            == vec![protocol::PeerAddr::new(peer.addr.ip(), peer.addr.port()).unwrap()]
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "took {:?}",
        restarted.elapsed()
    );
    // Its list follows its ANNOUNCE at once (the new relay asked for it).
    eventually("the peer's files are indexed again", || {
        stdout(&client(relay.addr, &["ls"], "")).contains("a.txt")
    });
    let out = client(relay.addr, &["get", "a.txt"], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
}

#[test]
fn a_peer_restarted_on_the_same_address_is_listed_once() {
    let dir = folder_with(&[]);
    let relay = Server::relay(&[]);
    let first = Server::peer(relay.addr, dir.path(), &[]);
    let port = first.port();
    eventually("the peer is listed", || live_peers(relay.addr).len() == 1);
    first.signal("KILL");
    drop(first);
    let second = Server::peer(relay.addr, dir.path(), &["--port", &port]);
    let announced = format!("ANNOUNCE 127.0.0.1:{port} ");
    eventually("the new peer registered", || {
        relay.log().matches(&announced).count() >= 2
    });
    assert_eq!(live_peers(relay.addr).len(), 1);
    assert_eq!(live_peers(relay.addr)[0].port(), second.addr.port());
}

#[test]
fn a_transfer_cut_off_half_way_resumes_from_another_peer() {
    let content = big_content(48 << 20);
    let a = folder_with(&[("big.bin", &content)]);
    let b = folder_with(&[("big.bin", &content)]);
    let net = Network::start_processes(&[a.path(), b.path()]);

    // Nobody reads the client's stdout yet, so it stalls and so does the
    // peer sending to it, half way through.
    let mut child = Command::new(bin("peer-client"))
        .args(["127.0.0.1", &net.relay.port(), "get", "big.bin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sending = None;
    eventually("a peer is sending", || {
        sending = net.peers.iter().position(|p| p.log().contains("sending"));
        sending.is_some()
    });
    let victim = &net.peers[sending.unwrap()];
    victim.signal("KILL");
    let survivor = &net.peers[1 - sending.unwrap()];

    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let output = wait_output(child);
    let err = stderr(&output);
    assert!(output.status.success(), "{err}");
    assert!(
        out == content,
        "content differs after resume ({} of {} bytes)",
        out.len(),
        content.len()
    );
    assert!(err.contains(&format!("peer {}:", victim.addr)), "{err}");
    // The survivor took over the victim's ranges.
    assert!(survivor.log().contains("RANGE \"big.bin\""));
}

/// What a peer holding `content` answers to `line` (HEAD or RANGE), with
/// the content of a range passed through `alter` (a liar's, a stalling
/// peer's).
fn range_reply(content: &[u8], line: &str, alter: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    use protocol::peer::proof;
    let (size, hash) = (content.len() as u64, blake3::hash(content));
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.get(1) != Some(&"RANGE") {
        return format!("FILE {size} {hash}\n").into_bytes();
    }
    let start: u64 = words[4].parse().unwrap();
    let end: u64 = words[5].parse().unwrap();
    let outboard = proof::outboard(content, size).unwrap();
    let mut reply = format!(
        "RANGE {size} {hash} {}\n",
        proof::proof_len(size, start, end)
    )
    .into_bytes();
    proof::encode_proof(&outboard, start, end, &mut reply).unwrap();
    let mut bytes = content[start as usize..end as usize].to_vec();
    alter(&mut bytes);
    reply.extend_from_slice(&bytes);
    reply
}

/// A fake peer that answers each request line with `answer`, registered with `relay`.
fn answering(relay: SocketAddr, answer: impl Fn(&str) -> Vec<u8> + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let reply = crate::harness::vouch(addr.port(), &line, answer(&line));
            let _ = stream.write_all(&reply);
        }
    });
    let register = protocol::relay::Request::Register {
        port: addr.port(),
        host: None,
    };
    let mut request = Vec::new();
    register
        .write_signed_to(&crate::harness::sign(addr.port(), &register), &mut request)
        .unwrap();
    let reply = raw_exchange(relay, &request);
    assert!(
        reply.starts_with(b"REGISTERED"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    addr
}

/// A fake peer that answers every request with `reply`, and tells `relay`
/// it holds `names` with the size and hash of that reply's header.
fn liar(relay: SocketAddr, reply: Vec<u8>, names: &[&str]) -> SocketAddr {
    let (size, hash) = header_of(&reply);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let reply = crate::harness::vouch(addr.port(), &line, reply.clone());
            let _ = stream.write_all(&reply);
        }
    });
    offer(relay, addr.port(), names, size, hash);
    addr
}

/// Tells `relay` that the peer at `port` holds `names`, each of `size`
/// bytes with `hash`, as a peer's announcement does.
fn offer(relay: SocketAddr, port: u16, names: &[&str], size: u64, hash: blake3::Hash) {
    use protocol::index::{write_offer_body, Holding, ListDigest};
    let mut files: Vec<Holding> = names
        .iter()
        .map(|name| Holding {
            name: protocol::FileName::new(name).unwrap(),
            size,
            hash,
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let offer = protocol::relay::Request::Offer {
        port,
        digest: ListDigest::of(&files),
        host: None,
    };
    let mut request = Vec::new();
    offer
        .write_signed_to(&crate::harness::sign(port, &offer), &mut request)
        .unwrap();
    write_offer_body(&mut request, &files).unwrap();
    let reply = raw_exchange(relay, &request);
    assert!(
        reply.starts_with(b"INDEXED"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
}

/// The size and hash a fake peer's `FILE` header announces.
fn header_of(reply: &[u8]) -> (u64, blake3::Hash) {
    let line = String::from_utf8_lossy(reply.split(|&b| b == b'\n').next().unwrap()).into_owned();
    let words: Vec<&str> = line.split(' ').collect();
    (
        words[1].parse().unwrap(),
        blake3::Hash::from_hex(words[2]).unwrap(),
    )
}

/// A relay of the test's own that keeps no index, as one older than the
/// index: it lists `peers` and refuses every other request as unknown.
fn old_relay(peers: Vec<SocketAddr>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let verb = line.split(' ').nth(1).unwrap_or("").trim_end().to_string();
            let reply = if verb == "PEERS" {
                let mut reply = format!("PEERS {}\n", peers.len());
                for peer in &peers {
                    reply.push_str(&format!("{peer}\n"));
                }
                reply
            } else {
                format!("ERR bad-request unknown command \"{verb}\"\n")
            };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    addr
}

/// A relay of the test's own that names `holders` (address, size, hash)
/// as the holders of whatever name it is asked for, in this order, every
/// time, with the keys `real` (a relay) knows them by, or those of fake
/// peers.
fn relay_listing(real: SocketAddr, holders: Vec<(SocketAddr, u64, blake3::Hash)>) -> SocketAddr {
    let keys = crate::harness::keys(real);
    let holders = holders
        .into_iter()
        .map(|(peer, size, hash)| {
            let key = keys
                .get(&peer)
                .copied()
                .unwrap_or_else(|| crate::harness::identity(peer.port()).key());
            (peer, key, size, hash)
        })
        .collect();
    relay_naming(holders)
}

/// `relay_listing`, with the key it names each holder by given.
fn relay_naming(
    holders: Vec<(SocketAddr, protocol::identity::PeerKey, u64, blake3::Hash)>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let name = line.trim_end().rsplit(' ').next().unwrap_or("").to_string();
            let mut reply = format!("HOLDERS {}\n", holders.len());
            for (peer, key, size, hash) in &holders {
                reply.push_str(&format!(
                    "{peer} {key} {size} {hash} {} {name}\n",
                    holders.len()
                ));
            }
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    addr
}

#[test]
fn corrupt_content_is_discarded_and_fetched_again_elsewhere() {
    let content = b"the real content\n";
    let net = Network::start(&[]);
    // Both sources start at once and one piece covers the file: the honest
    // one holds its bytes back until the liar has been asked, so the liar
    // is asked on every run, however the threads are scheduled.
    let (asked, liar_asked) = std::sync::mpsc::channel();
    let liar = answering(net.relay.addr, move |line| {
        let reply = range_reply(content, line, |bytes| bytes[4..8].copy_from_slice(b"FAKE"));
        if line.contains(" RANGE ") {
            let _ = asked.send(());
        }
        reply
    });
    let honest = answering(net.relay.addr, move |line| {
        if line.contains(" RANGE ") {
            let _ = liar_asked.recv_timeout(Duration::from_secs(10));
        }
        range_reply(content, line, |_| {})
    });
    let (size, hash) = (content.len() as u64, blake3::hash(content));
    let relay = relay_listing(
        net.relay.addr,
        vec![(liar, size, hash), (honest, size, hash)],
    );

    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("f.txt");
    let out = client(relay, &["get", "f.txt", "-o", dest.to_str().unwrap()], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read(&dest).unwrap(), content);
    assert!(
        stderr(&out).contains(&format!(
            "peer {liar}: sent bytes 0-17 that fail verification; dropped"
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fs::read_dir(dest_dir.path()).unwrap().count(),
        1,
        "temporary files left behind"
    );
}

#[test]
fn a_failed_fetch_leaves_an_existing_file_alone() {
    let net = Network::start(&[]);
    let size = 1000;
    let mut lie = format!("FILE {size} {}\n", blake3::hash(b"x")).into_bytes();
    lie.extend_from_slice(&[b'x'; 300]);
    liar(net.relay.addr, lie, &["cut.bin", "nowhere.txt"]);

    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("keep.txt");
    fs::write(&dest, "precious").unwrap();
    for name in ["cut.bin", "nowhere.txt"] {
        let out = net.client(&["--timeout", "2", "get", name, "-o", dest.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(stderr(&out).contains("cannot fetch"), "{}", stderr(&out));
    }
    assert_eq!(fs::read_to_string(&dest).unwrap(), "precious");
    assert_eq!(
        fs::read_dir(dest_dir.path()).unwrap().count(),
        1,
        "temporary files left behind"
    );
}

#[test]
fn frozen_peers_cost_ls_one_timeout_in_all_without_an_index() {
    let dirs: Vec<_> = (0..4).map(|_| folder_with(&[("x.txt", b"x")])).collect();
    let net = Network::start_processes(&dirs.iter().map(|d| d.path()).collect::<Vec<_>>());
    for peer in &net.peers[1..] {
        peer.signal("STOP");
    }
    // With the index, ls asks no peer: complete, and at once.
    let out = net.client(&["--timeout", "1", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("   4 x.txt"), "{}", stdout(&out));
    // A relay without one makes the client ask the peers themselves.
    let relay = old_relay(net.peers.iter().map(|p| p.addr).collect());
    let started = Instant::now();
    let out = client(relay, &["--timeout", "1", "ls"], "");
    // One at a time, three frozen peers would take three seconds.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("x.txt"), "{}", stdout(&out));
    assert_eq!(
        stderr(&out).matches("timed out").count(),
        3,
        "{}",
        stderr(&out)
    );
}

/// A relay of the test's own that answers each request in a thread of its
/// own, holding the reply to the second REGISTER back for a while, and
/// records each request when it has carried it out.
fn recording_relay() -> (
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<()>,
) {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done, carried_out) = mpsc::channel();
    let (held_tx, held) = mpsc::channel();
    let registers = Arc::new(AtomicUsize::new(0));
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let (done, held_tx, registers) =
                (done.clone(), held_tx.clone(), Arc::clone(&registers));
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                // An ANNOUNCE is this peer's heartbeat; "REGISTERED" says
                // the relay holds its list already.
                let verb = match line.split(' ').nth(1).unwrap_or("") {
                    "ANNOUNCE" => "REGISTER".to_string(),
                    other => other.to_string(),
                };
                let reply = if verb == "REGISTER" {
                    if registers.fetch_add(1, Ordering::SeqCst) == 1 {
                        let _ = held_tx.send(());
                        thread::sleep(Duration::from_millis(500));
                    }
                    "REGISTERED 90\n"
                } else {
                    "UNREGISTERED\n"
                };
                let _ = done.send(verb);
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    (addr, carried_out, held)
}

#[test]
fn unregister_is_the_last_thing_the_relay_carries_out() {
    let dir = folder_with(&[]);
    let (relay, carried_out, held) = recording_relay();
    let mut peer = Server::peer_here(relay, dir.path(), |c| {
        c.heartbeat = Duration::from_millis(100);
    });
    // Stop while the relay is still working on a heartbeat.
    held.recv_timeout(Duration::from_secs(20)).unwrap();
    let started = Instant::now();
    peer.stop_here();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let order: Vec<String> = carried_out.try_iter().collect();
    assert_eq!(order, ["REGISTER", "REGISTER", "UNREGISTER"]);
}

/// A fake peer that sends the header and `sent` bytes of a bigger file,
/// then holds the connection open without sending more.
fn stalling_peer(relay: SocketAddr, size: usize, sent: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                let content = vec![b'x'; size];
                let mut reply = range_reply(&content, &line, |_| {});
                if line.contains("RANGE") {
                    // Header, proof and `sent` bytes of content.
                    reply.truncate(reply.len() - (size - sent));
                }
                let reply = crate::harness::vouch(addr.port(), &line, reply);
                let _ = stream.write_all(&reply);
                thread::sleep(Duration::from_secs(20));
            });
        }
    });
    offer(
        relay,
        addr.port(),
        &["f.bin"],
        size as u64,
        blake3::hash(&vec![b'x'; size]),
    );
    addr
}

/// Ctrl-C or SIGTERM during a download to a file: exit code 128 + the
/// signal, and what was verified is kept in `PATH.part` (with its record)
/// for the same command to continue, and the user is told so; a download
/// that had nothing verified yet leaves nothing.
#[test]
fn an_interrupted_download_exits_128_plus_the_signal_and_keeps_what_it_verified() {
    let size = 1 << 20;
    // Verified groups are handed on in batches of 512 KiB: 600,000 bytes
    // sent make one batch verified and delivered before the peer stalls.
    for (signal, code, sent) in [
        ("TERM", 143, 600_000),
        ("INT", 130, 600_000),
        ("INT", 130, 1000),
    ] {
        let relay = Server::relay_here(|_| {});
        stalling_peer(relay.addr, size, sent);
        let dest_dir = tempfile::tempdir().unwrap();
        let dest = dest_dir.path().join("f.bin");
        let part = dest_dir.path().join("f.bin.part");
        let record = dest_dir.path().join("f.bin.part.ranges");
        let child = Command::new(bin("peer-client"))
            .args(["127.0.0.1", &relay.port(), "get", "f.bin", "-o"])
            .arg(&dest)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first verified bytes are recorded at once; with none, the
        // download has started once its partial file is there.
        let verified = sent > 16384;
        if verified {
            eventually("the first verified bytes are recorded", || record.exists());
        } else {
            eventually("the download has started", || part.exists());
        }
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = wait_output(child);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{signal}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(!dest.exists(), "a partial file under the final name");
        if verified {
            let kept = format!(
                "partial download kept in {}; run the same command again to continue",
                part.display()
            );
            assert!(err.contains(&kept), "{err}");
            let text = fs::read_to_string(&record).unwrap();
            let end: usize = text
                .strip_suffix('\n')
                .and_then(|t| t.rsplit_once("\nranges 1\n0 "))
                .and_then(|(_, end)| end.parse().ok())
                .unwrap_or_else(|| panic!("not one range from 0: {text}"));
            assert!(
                end > 0 && end.is_multiple_of(16384) && end <= sent,
                "{text}"
            );
            assert!(
                fs::read(&part).unwrap()[..end] == vec![b'x'; end][..],
                "the verified bytes are in the partial file"
            );
        } else {
            assert!(!err.contains("partial download kept"), "{err}");
            assert_eq!(
                fs::read_dir(dest_dir.path()).unwrap().count(),
                0,
                "a partial file with nothing verified was left behind"
            );
        }
    }
}

/// A download that fails (its only holder stalls) keeps what it verified
/// for the next run, and says so; the final name is never written.
#[test]
fn a_failed_download_keeps_what_it_verified() {
    let relay = Server::relay_here(|_| {});
    stalling_peer(relay.addr, 1 << 20, 600_000);
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("f.bin");
    let out = client(
        relay.addr,
        &[
            "--timeout",
            "1",
            "get",
            "f.bin",
            "-o",
            dest.to_str().unwrap(),
        ],
        "",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let part = dest_dir.path().join("f.bin.part");
    let kept = format!(
        "partial download kept in {}; run the same command again to continue",
        part.display()
    );
    assert!(err.contains(&kept), "{err}");
    assert!(!dest.exists());
    let record = fs::read_to_string(dest_dir.path().join("f.bin.part.ranges")).unwrap();
    // Every group that checked out, also those after the last full batch.
    assert!(record.ends_with("ranges 1\n0 589824\n"), "{record}");
}

#[test]
fn a_peer_announcing_more_than_the_disk_holds_writes_nothing() {
    let relay = Server::relay_here(|_| {});
    let mut lie = format!("FILE {} {}\n", 1u64 << 62, blake3::hash(b"x")).into_bytes();
    lie.extend(std::iter::repeat_n(b'x', 1 << 16));
    liar(relay.addr, lie, &["huge.bin"]);
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("huge.bin");
    let out = client(
        relay.addr,
        &["get", "huge.bin", "-o", dest.to_str().unwrap()],
        "",
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bytes free where it would be saved"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_dir(dest_dir.path()).unwrap().count(), 0);
    // --max-size says no before the disk is asked.
    let out = client(
        relay.addr,
        &[
            "--max-size",
            "1M",
            "get",
            "huge.bin",
            "-o",
            dest.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over --max-size 1048576"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_holder_that_deleted_the_file_since_is_skipped() {
    let content = b"still on b\n";
    let a = folder_with(&[("f.txt", content)]);
    let b = folder_with(&[("f.txt", content)]);
    let net = Network::start(&[a.path(), b.path()]);
    fs::remove_file(a.path().join("f.txt")).unwrap();
    // The index may still name a; a relay that names it first, always.
    let (size, hash) = (content.len() as u64, blake3::hash(content));
    let relay = relay_listing(
        net.relay.addr,
        vec![
            (net.peers[0].addr, size, hash),
            (net.peers[1].addr, size, hash),
        ],
    );
    let out = client(relay, &["get", "f.txt"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, content);
}

/// A file rewritten in place on the peer while it is being sent: the
/// client notices at the first group of new bytes (or at the peer's
/// refusal of the new version) and never writes a byte of the new content
/// after the old.
#[test]
fn a_file_changed_on_a_peer_during_a_transfer_is_detected_never_mixed() {
    let old = big_content(24 << 20);
    let dir = folder_with(&[("big.bin", &old)]);
    let net = Network::start_processes(&[dir.path()]);
    // Nobody reads the client's stdout yet: the transfer stalls early.
    let mut child = Command::new(bin("peer-client"))
        .args(["127.0.0.1", &net.relay.port(), "get", "big.bin"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the peer is sending", || {
        net.peers[0].log().contains("sending")
    });
    let new: Vec<u8> = old.iter().map(|b| b ^ 0xff).collect();
    fs::write(dir.path().join("big.bin"), &new).unwrap();
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let output = wait_output(child);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{err}");
    assert!(
        out.len() < old.len() && old.starts_with(&out),
        "{} bytes out, not a prefix of the old content",
        out.len()
    );
    assert!(
        ["fail verification", "its file changed", "connection closed"]
            .iter()
            .any(|why| err.contains(why)),
        "{err}"
    );
    // Once the index has the new version (the peer announces it when it
    // has hashed it), the peer serves it whole.
    let new_hash = blake3::hash(&new).to_hex().to_string();
    eventually("the index has the new version", || {
        stdout(&net.client(&["ls", "--long"])).contains(&new_hash)
    });
    let out = net.client(&["get", "big.bin"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == new);
}

#[test]
fn a_peer_that_cannot_prove_the_key_the_relay_names_is_skipped() {
    let content: &'static [u8] = b"the right bytes, from the wrong peer\n";
    let (size, hash) = (content.len() as u64, blake3::hash(content));
    let relay = Server::relay_here(|_| {});
    // Serves the very content asked for, but signs with its own key,
    // while the relay names another; and one that does not sign at all.
    let impostor = answering(relay.addr, move |line| range_reply(content, line, |_| {}));
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let unsigned = silent.local_addr().unwrap();
    thread::spawn(move || {
        for stream in silent.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = stream.write_all(&range_reply(content, &line, |_| {}));
        }
    });
    let named = crate::harness::identity(1).key();
    let fake = relay_naming(vec![
        (impostor, named, size, hash),
        (unsigned, named, size, hash),
    ]);
    let out = client(fake, &["get", "f.txt"], "");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("peer {impostor}: is not the peer the relay names")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "peer {unsigned}: did not prove it is the peer the relay names"
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
