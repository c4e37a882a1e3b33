//! Several relays: a peer registers and announces with each on its own, so
//! that one down or frozen costs the others nothing; a client asks the
//! relay that answered last and moves to the next when one is down, slow
//! or in trouble, but not on an answer about its request.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::harness::{
    bin, client, client_with, dead_port, eventually, folder_with, live_peers, stat, stderr, stdout,
    wait_output, Server, STEP,
};

/// A relay that is there but never answers: its port takes connections
/// (the kernel's accept queue) and nothing ever reads or replies.
fn frozen_relay() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A peer in this process serving `dir`, registered with each of `relays`.
fn peer_of(
    relays: &[SocketAddr],
    dir: &std::path::Path,
    configure: impl FnOnce(&mut peer_node::Config),
) -> Server {
    Server::peer_here(relays[0], dir, |c| {
        c.relays = relays.iter().map(ToString::to_string).collect();
        configure(c);
    })
}

/// `--relay A --relay B ...` for the client.
fn relay_flags(relays: &[SocketAddr]) -> Vec<String> {
    relays
        .iter()
        .flat_map(|r| ["--relay".to_string(), r.to_string()])
        .collect()
}

fn get(relays: &[SocketAddr], extra: &[&str], name: &str) -> std::process::Output {
    let flags = relay_flags(relays);
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    args.extend_from_slice(&["get", name]);
    client_with(&args, &[], "")
}

#[test]
fn a_peer_given_two_relays_is_found_through_each_and_leaves_both() {
    let a = Server::relay_here(|_| {});
    let b = Server::relay_here(|_| {});
    let dir = folder_with(&[("a.txt", b"from the peer\n")]);
    // The heartbeat is an hour away: only the folder's watcher can bring
    // the new file below to each relay.
    let mut peer = peer_of(&[a.addr, b.addr], dir.path(), |c| {
        c.heartbeat = Duration::from_secs(3600)
    });
    for relay in [a.addr, b.addr] {
        eventually("the peer's file is indexed by each relay", || {
            stat(relay, "holdings") == 1
        });
        let out = get(&[relay], &[], "a.txt");
        assert_eq!(stdout(&out), "from the peer\n", "{}", stderr(&out));
    }
    std::fs::write(dir.path().join("new.txt"), "new\n").unwrap();
    for relay in [a.addr, b.addr] {
        eventually("each relay hears of the change", || {
            stat(relay, "holdings") == 2
        });
    }
    // UNREGISTER is the last word of each announcer: both forget it at
    // once, not at the end of their TTL.
    peer.stop_here();
    assert!(live_peers(a.addr).is_empty());
    assert!(live_peers(b.addr).is_empty());
}

#[test]
fn a_peer_heartbeats_to_one_relay_while_another_is_down_and_registers_again_when_it_is_back() {
    let mut a = Server::relay_here(|_| {});
    let b = Server::relay_here(|_| {});
    let a_addr = a.addr;
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let _peer = peer_of(&[a.addr, b.addr], dir.path(), |c| {
        c.heartbeat = Duration::from_secs(1)
    });
    for relay in [a.addr, b.addr] {
        eventually("listed by each", || live_peers(relay).len() == 1);
    }
    a.stop_here();
    assert!(TcpStream::connect(a_addr).is_err(), "relay A is down");
    let before = stat(b.addr, "registrations");
    eventually("three more heartbeats reach B while A is down", || {
        stat(b.addr, "registrations") >= before + 3
    });
    let a = Server::relay_here(|c| c.bind = a_addr);
    eventually("the peer is back on A, its file too", || {
        live_peers(a.addr).len() == 1 && stat(a.addr, "holdings") == 1
    });
}

#[test]
fn a_frozen_relay_does_not_delay_heartbeats_to_the_others() {
    let frozen = frozen_relay();
    let b = Server::relay_here(|_| {});
    let dir = folder_with(&[]);
    // Each call to the frozen relay takes the whole 5 s timeout; the
    // heartbeat is 1 s.
    let _peer = peer_of(&[frozen.local_addr().unwrap(), b.addr], dir.path(), |c| {
        c.heartbeat = Duration::from_secs(1);
        c.timeout = Duration::from_secs(5);
    });
    eventually("listed by B", || live_peers(b.addr).len() == 1);
    let before = stat(b.addr, "registrations");
    let started = Instant::now();
    eventually("three more heartbeats reach B", || {
        stat(b.addr, "registrations") >= before + 3
    });
    // About 3 s; a peer that told its relays one after the other would
    // wait out the frozen one's timeout between two heartbeats (15 s).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

/// A relay in this process, and a peer holding `a.txt` ("a\n") indexed there.
fn one_relay_with_a_file() -> (Server, tempfile::TempDir, Server) {
    let relay = Server::relay_here(|_| {});
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let peer = peer_of(&[relay.addr], dir.path(), |_| {});
    eventually("indexed", || stat(relay.addr, "holdings") == 1);
    (relay, dir, peer)
}

#[test]
fn a_client_whose_first_relay_is_dead_gets_its_answer_from_the_next() {
    let (relay, _dir, _peer) = one_relay_with_a_file();
    let held = dead_port();
    let dead = held.addr;
    let out = get(&[dead, relay.addr], &[], "a.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "a\n");
    assert!(
        stderr(&out).contains(&format!(
            "cannot reach relay {dead}: connection refused; asking relay {}",
            relay.addr
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_client_whose_first_relay_is_frozen_gets_its_answer_from_the_next_within_one_timeout() {
    let (relay, _dir, _peer) = one_relay_with_a_file();
    let frozen = frozen_relay();
    let frozen_addr = frozen.local_addr().unwrap();
    let started = Instant::now();
    let out = get(&[frozen_addr, relay.addr], &["--timeout", "4"], "a.txt");
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "a\n");
    // One timeout (4 s), and room for a busy machine; two would not fit.
    assert!(took < Duration::from_secs(7), "took {took:?}");
    assert!(
        stderr(&out).contains(&format!(
            "cannot reach relay {frozen_addr}: timed out waiting for the reply"
        )),
        "{}",
        stderr(&out)
    );
}

/// The interactive client: its relay freezes between two files. The next
/// file costs one timeout, and the client then sticks to the relay that
/// answered: the files after it cost none.
#[test]
fn an_interactive_client_pays_one_timeout_when_its_relay_freezes_then_sticks_to_the_next() {
    let a = Server::relay(&[]);
    let b = Server::relay(&[]);
    let files: Vec<(String, Vec<u8>)> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| (format!("{n}.txt"), format!("file {n}\n").into_bytes()))
        .collect();
    let listed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_slice()))
        .collect();
    let dir = folder_with(&listed);
    let _peer = peer_of(&[a.addr, b.addr], dir.path(), |_| {});
    for relay in [a.addr, b.addr] {
        eventually("indexed by each", || stat(relay, "holdings") == 5);
    }
    let mut child = Command::new(bin("peer-client"))
        .args(relay_flags(&[a.addr, b.addr]))
        .args(["--timeout", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let output = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Asks for NAME.txt and waits for its content, one line.
    let fetch = |input: &mut std::process::ChildStdin, name: &str| {
        writeln!(input, "{name}.txt").unwrap();
        let expected = format!("file {name}");
        let line = lines.recv_timeout(STEP).expect("the file's content");
        assert_eq!(line, expected);
    };
    fetch(&mut input, "a");
    a.signal("STOP");
    let started = Instant::now();
    for name in ["b", "c", "d", "e"] {
        fetch(&mut input, name);
    }
    let took = started.elapsed();
    drop(input);
    let out = wait_output(child);
    reader.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // One timeout (2 s), and room for a busy machine; asking A first for
    // each of the four would take 8 s.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let warned = format!(
        "cannot reach relay {}: timed out waiting for the reply; asking relay {}",
        a.addr, b.addr
    );
    assert_eq!(stderr(&out).matches(&warned).count(), 1, "{}", stderr(&out));
}

/// A relay of the test's own: runs `handle` on each connection, each in a
/// thread of its own, until dropped.
struct FakeRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRelay {
    fn new(handle: impl Fn(TcpStream) + Send + Sync + 'static) -> FakeRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let handle = Arc::new(handle);
        let thread = thread::spawn(move || {
            let mut handlers = Vec::new();
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let handle = Arc::clone(&handle);
                handlers.push(thread::spawn(move || handle(stream)));
            }
            for handler in handlers {
                let _ = handler.join();
            }
        });
        FakeRelay {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Answers every request with `reply`.
    fn canned(reply: &'static str) -> FakeRelay {
        FakeRelay::new(move |mut stream| {
            let _ = request_line(&stream);
            let _ = stream.write_all(reply.as_bytes());
        })
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn request_line(stream: &TcpStream) -> String {
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    line
}

#[test]
fn a_relay_in_trouble_is_passed_over_but_an_answer_about_the_request_is_taken() {
    let (relay, _dir, _peer) = one_relay_with_a_file();
    for trouble in [
        "ERR busy too many connections\n",
        "ERR internal the disk is on fire\n",
        "ERR timeout the store did not answer\n",
        "ERR some-new-code whatever it is\n",
        "NONSENSE\n",
    ] {
        let first = FakeRelay::canned(trouble);
        let out = get(&[first.addr, relay.addr], &[], "a.txt");
        assert!(out.status.success(), "{trouble}: {}", stderr(&out));
        assert_eq!(stdout(&out), "a\n", "{trouble}");
    }
    for (answer, code, says) in [
        ("ERR forbidden not for you\n", 3, "forbidden"),
        ("ERR not-found no such thing\n", 3, "not-found"),
        ("ERR bad-request what is that\n", 3, "bad-request"),
        ("HOLDERS 0\n", 1, "not found"),
    ] {
        let first = FakeRelay::canned(answer);
        let lookups = stat(relay.addr, "index_lookups");
        let out = get(&[first.addr, relay.addr], &[], "a.txt");
        assert_eq!(out.status.code(), Some(code), "{answer}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{answer}: {}", stderr(&out));
        assert_eq!(
            stat(relay.addr, "index_lookups"),
            lookups,
            "{answer}: the next relay was asked"
        );
    }
}

#[test]
fn when_every_relay_fails_the_error_names_each_and_it_is_a_network_error() {
    let (held, frozen) = (dead_port(), frozen_relay());
    let dead = held.addr;
    let frozen_addr = frozen.local_addr().unwrap();
    let flags = relay_flags(&[dead, frozen_addr]);
    for command in [&["peers"][..], &["get", "x.txt"], &["ls"], &["stats"], &[]] {
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend_from_slice(&["--timeout", "1"]);
        args.extend_from_slice(command);
        let out = client_with(&args, &[], "");
        assert_eq!(out.status.code(), Some(3), "{command:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "peer-client: no relay answered: cannot reach relay {dead}: connection refused; \
                 cannot reach relay {frozen_addr}: timed out waiting for the reply"
            )),
            "{command:?}: {err}"
        );
    }
}

#[test]
fn relays_can_come_from_the_environment() {
    let a = Server::relay_here(|_| {});
    let b = Server::relay_here(|_| {});
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let dir_arg = dir.path().to_str().unwrap();
    let both = format!("{},{}", a.addr, b.addr);
    let peer = Server::start_with_env(
        "peer-node",
        &["--dir", dir_arg, "--bind", "127.0.0.1"],
        &[("PEER_RELAYS", &both)],
    );
    for relay in [a.addr, b.addr] {
        eventually("indexed by each", || stat(relay, "holdings") == 1);
    }
    let held = dead_port();
    let list = format!("{},{}", held.addr, b.addr);
    let out = client_with(&["get", "a.txt"], &[("PEER_CLIENT_RELAYS", &list)], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    // A flag on the command line wins over the variable.
    let out = client_with(
        &["--relay", &a.addr.to_string(), "get", "a.txt"],
        &[("PEER_CLIENT_RELAYS", "127.0.0.1:1")],
        "",
    );
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    drop(peer);
}

/// The real binaries: a peer given the positional relay and one more with
/// `--relay`, a client given both with `--relay` twice; the first relay
/// killed, the client still gets its file.
#[test]
fn the_binaries_take_relay_flags_and_fail_over() {
    let mut a = Server::relay(&[]);
    let b = Server::relay(&[]);
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let b_arg = b.addr.to_string();
    let _peer = Server::peer(b.addr, dir.path(), &["--relay", &a.addr.to_string()]);
    for relay in [a.addr, b.addr] {
        eventually("indexed by each", || stat(relay, "holdings") == 1);
    }
    let a_arg = a.addr.to_string();
    let args = ["--relay", &a_arg, "--relay", &b_arg, "get", "a.txt"];
    let out = client_with(&args, &[], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    a.signal("KILL");
    a.wait_exit();
    let out = client_with(&args, &[], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("cannot reach relay {a_arg}: connection refused")),
        "{}",
        stderr(&out)
    );
    // The positional form alone still works.
    let out = client(b.addr, &["get", "a.txt"], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
}

/// A relay of the test's own that answers a peer's ANNOUNCE (as a relay
/// that holds its list) and UNREGISTER, and tells `done` "NAME VERB" when
/// it has carried each out; with `hold`, it holds the reply to the second
/// ANNOUNCE back for that long, after saying so on `held`.
fn recording(
    name: &'static str,
    done: mpsc::Sender<String>,
    hold: Option<(Duration, mpsc::Sender<()>)>,
) -> FakeRelay {
    let announces = AtomicUsize::new(0);
    let (done, hold) = (std::sync::Mutex::new(done), std::sync::Mutex::new(hold));
    FakeRelay::new(move |mut stream| {
        let line = request_line(&stream);
        let verb = line.split(' ').nth(1).unwrap_or("").to_string();
        let reply = if verb == "ANNOUNCE" {
            if announces.fetch_add(1, Ordering::SeqCst) == 1 {
                if let Some((pause, held)) = &*hold.lock().unwrap() {
                    let _ = held.send(());
                    thread::sleep(*pause);
                }
            }
            "REGISTERED 90\n"
        } else {
            "UNREGISTERED\n"
        };
        let _ = done.lock().unwrap().send(format!("{name} {verb}"));
        let _ = stream.write_all(reply.as_bytes());
    })
}

/// Relays may share their state (one store): the peer's UNREGISTER to one
/// must not be overtaken by an announcement still on its way to another,
/// which would list the stopped peer again.
#[test]
fn no_relay_carries_out_an_announcement_after_an_unregister() {
    let (done, carried_out) = mpsc::channel();
    let (held_tx, held) = mpsc::channel();
    let quick = recording("A", done.clone(), None);
    let slow = recording("B", done, Some((Duration::from_millis(500), held_tx)));
    let dir = folder_with(&[]);
    let mut peer = peer_of(&[quick.addr, slow.addr], dir.path(), |c| {
        c.heartbeat = Duration::from_millis(100)
    });
    // Stop while B is still working on an announcement.
    held.recv_timeout(STEP).unwrap();
    peer.stop_here();
    let order: Vec<String> = carried_out.try_iter().collect();
    let unregisters: Vec<usize> = (0..order.len())
        .filter(|&i| order[i].ends_with(" UNREGISTER"))
        .collect();
    assert_eq!(unregisters.len(), 2, "one from each relay: {order:?}");
    let last_announce = order.iter().rposition(|e| e.ends_with(" ANNOUNCE"));
    assert!(last_announce < Some(unregisters[0]), "{order:?}");
}

/// What relays on one store answer when two of the peer's requests, sent
/// at once to two of them, reach it in the other order: the refused one is
/// sent again at once, with a new time, not after a backoff; and again if
/// it crosses another one a second time.
#[test]
fn a_request_taken_for_a_replay_is_sent_again_at_once_with_a_new_time() {
    let (tx, seen) = mpsc::channel();
    let (tx, refusals) = (std::sync::Mutex::new(tx), AtomicUsize::new(2));
    let relay = FakeRelay::new(move |mut stream| {
        let line = request_line(&stream);
        let words: Vec<&str> = line.split_whitespace().collect();
        let ts = words
            .iter()
            .position(|w| *w == "TS")
            .and_then(|i| words.get(i + 1)?.parse::<u64>().ok());
        let _ = tx.lock().unwrap().send((Instant::now(), ts));
        let refuse = refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let reply = if refuse {
            "ERR forbidden not newer than a request already accepted from this key (a replay?)\n"
        } else if words.get(1) == Some(&"ANNOUNCE") {
            "REGISTERED 90\n"
        } else {
            "UNREGISTERED\n"
        };
        let _ = stream.write_all(reply.as_bytes());
    });
    let dir = folder_with(&[]);
    let _peer = peer_of(&[relay.addr], dir.path(), |c| {
        c.heartbeat = Duration::from_secs(3600)
    });
    let (refused_at, refused_ts) = seen.recv_timeout(STEP).unwrap();
    let (_, refused_again_ts) = seen.recv_timeout(STEP).unwrap();
    let (again_at, again_ts) = seen.recv_timeout(STEP).unwrap();
    assert!(
        refused_ts < refused_again_ts && refused_again_ts < again_ts,
        "{refused_ts:?}, {refused_again_ts:?}, {again_ts:?}"
    );
    // A backoff would be a second.
    assert!(
        again_at - refused_at < Duration::from_millis(500),
        "{:?}",
        again_at - refused_at
    );
}

/// Two relays on one Redis, the peer and the client given both (the real
/// binaries): the relay the client uses frozen, then killed, costs the
/// client one timeout and loses no registration; the peer's requests to
/// both relays, which meet in one store, are all taken.
#[test]
fn relays_on_one_store_fail_over_for_peers_and_clients() {
    let Some(redis) = relay_server::testing::RedisServer::start(
        "relays_on_one_store_fail_over_for_peers_and_clients",
    ) else {
        return;
    };
    let url = redis.url();
    let mut a = Server::relay(&["--store", &url]);
    let b = Server::relay(&["--store", &url]);
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let (a_arg, b_arg) = (a.addr.to_string(), b.addr.to_string());
    let mut peer = Server::peer(a.addr, dir.path(), &["--relay", &b_arg, "--heartbeat", "1"]);
    eventually("the peer's file is indexed", || {
        stat(b.addr, "holdings") == 1
    });
    let args = [
        "--relay",
        &a_arg,
        "--relay",
        &b_arg,
        "--timeout",
        "2",
        "get",
        "a.txt",
    ];
    let out = client_with(&args, &[], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    a.signal("STOP");
    let started = Instant::now();
    let out = client_with(&args, &[], "");
    assert_eq!(stdout(&out), "a\n", "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    a.signal("KILL");
    a.wait_exit();
    // A few heartbeats to both, then to B alone.
    let before = stat(b.addr, "registrations");
    eventually("heartbeats go on through B", || {
        stat(b.addr, "registrations") >= before + 3
    });
    assert_eq!(live_peers(b.addr).len(), 1);
    assert!(!peer.log().contains("a replay?"), "{}", peer.log());
    peer.signal("TERM");
    assert_eq!(peer.wait_exit(), Some(0), "{}", peer.log());
    assert!(live_peers(b.addr).is_empty());
}
