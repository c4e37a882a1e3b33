//! The relay's index of what each peer holds: found in one round trip at
//! any size, kept in step with the peers' folders, rebuilt after a relay
//! restart, and not fooled by hostile announcements.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::harness::{client, eventually, folder_with, stderr, stdout, Server, STEP};

/// What `ls` prints, names only.
fn listed(relay: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut all = vec!["ls"];
    all.extend_from_slice(args);
    let out = client(relay, &all, "");
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

#[test]
fn a_rare_file_among_150_peers_is_found_every_time() {
    const PEERS: usize = 150;
    let relay = Server::relay_here(|_| {});
    let dirs: Vec<tempfile::TempDir> = (0..PEERS)
        .map(|i| {
            let own = format!("peer-{i:03}.txt");
            let mut files: Vec<(&str, &[u8])> = vec![("common.txt", b"everyone has it\n")];
            let own_content = own.clone().into_bytes();
            files.push((&own, &own_content));
            if i == 117 {
                files.push(("rare.bin", b"\x00only one peer has this\xff"));
            }
            folder_with(&files)
        })
        .collect();
    // Real peer processes. Not watching their folders: 150 watchers would
    // take most of a user's inotify instances (128 by default), which the
    // tests running beside this one need.
    let peers: Vec<Server> = dirs
        .iter()
        .map(|dir| Server::peer(relay.addr, dir.path(), &["--no-watch"]))
        .collect();
    eventually("every peer's files are indexed", || {
        listed(relay.addr, &["peer-*.txt"]).len() == PEERS
    });
    for _ in 0..10 {
        let out = client(relay.addr, &["get", "rare.bin"], "");
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, b"\x00only one peer has this\xff");
    }
    // The whole network, in one listing: 150 own files, common, rare.
    let all = listed(relay.addr, &[]);
    assert_eq!(all.len(), PEERS + 2);
    assert_eq!(all[0], "common.txt");
    let out = client(relay.addr, &["ls", "common.txt"], "");
    assert!(
        stdout(&out).contains(&format!(" {PEERS} common.txt")),
        "{}",
        stdout(&out)
    );
    // A glob picks the part.
    assert_eq!(listed(relay.addr, &["peer-11?.txt"]).len(), 10);
    drop(peers);
}

#[test]
fn files_added_and_removed_on_a_running_peer_are_seen_at_once() {
    let relay = Server::relay_here(|_| {});
    let dir = folder_with(&[("a.txt", b"a\n")]);
    // The heartbeat is an hour away: only watching the folder can tell.
    let _peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_secs(3600)
    });
    eventually("a.txt is indexed", || listed(relay.addr, &[]) == ["a.txt"]);
    fs::write(dir.path().join("new.txt"), "new\n").unwrap();
    eventually("the new file is indexed", || {
        listed(relay.addr, &[]) == ["a.txt", "new.txt"]
    });
    let out = client(relay.addr, &["get", "new.txt"], "");
    assert_eq!(stdout(&out), "new\n");
    fs::remove_file(dir.path().join("a.txt")).unwrap();
    eventually("the deleted file is no longer offered", || {
        listed(relay.addr, &[]) == ["new.txt"]
    });
    let out = client(relay.addr, &["get", "a.txt"], "");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn without_watching_the_next_heartbeat_finds_changes() {
    let relay = Server::relay_here(|_| {});
    let dir = folder_with(&[("a.txt", b"a\n")]);
    let _peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_secs(1);
        c.watch = false;
    });
    eventually("a.txt is indexed", || listed(relay.addr, &[]) == ["a.txt"]);
    fs::remove_file(dir.path().join("a.txt")).unwrap();
    fs::write(dir.path().join("b.txt"), "b\n").unwrap();
    eventually("the rescan is indexed", || {
        listed(relay.addr, &[]) == ["b.txt"]
    });
}

#[test]
fn of_two_versions_the_one_most_peers_hold_is_taken() {
    let relay = Server::relay_here(|_| {});
    let dirs = [
        folder_with(&[("notes.txt", b"version one\n")]),
        folder_with(&[("notes.txt", b"version one\n")]),
        folder_with(&[("notes.txt", b"version two, newer\n")]),
    ];
    let _peers: Vec<Server> = dirs
        .iter()
        .map(|d| Server::peer_here(relay.addr, d.path(), |_| {}))
        .collect();
    // Both versions, and the first from both of its peers: a majority of
    // one to one would be a coin toss.
    eventually(
        "both versions are indexed, the first from two peers",
        || {
            let out = client(relay.addr, &["ls"], "");
            let text = stdout(&out);
            let lines: Vec<Vec<&str>> = text
                .lines()
                .map(|l| l.split_whitespace().collect())
                .collect();
            lines.len() == 2 && lines.iter().any(|w| w.len() > 2 && w[..2] == ["12", "2"])
        },
    );
    for _ in 0..5 {
        let out = client(relay.addr, &["get", "notes.txt"], "");
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "version one\n");
        assert!(
            stderr(&out).contains("2 versions; taking \"notes.txt\" 12 bytes"),
            "{}",
            stderr(&out)
        );
    }
    // The other one is still there by its hash.
    let newer = blake3::hash(b"version two, newer\n").to_hex().to_string();
    let out = client(relay.addr, &["get", "--hash", &newer], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "version two, newer\n");
}

#[test]
fn content_is_fetched_by_hash_under_any_name() {
    let relay = Server::relay_here(|_| {});
    let a = folder_with(&[("docs/report-final.pdf", b"%PDF the report")]);
    let _peer = Server::peer_here(relay.addr, a.path(), |_| {});
    let hash = blake3::hash(b"%PDF the report").to_hex().to_string();
    eventually("the file is indexed", || {
        !listed(relay.addr, &[]).is_empty()
    });
    let dest = tempfile::tempdir().unwrap();
    let out = client(
        relay.addr,
        &["get", "--hash", &hash, "-o", dest.path().to_str().unwrap()],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fs::read(dest.path().join("report-final.pdf")).unwrap(),
        b"%PDF the report"
    );
    let unknown = blake3::hash(b"nobody has this").to_hex().to_string();
    let out = client(relay.addr, &["get", "--hash", &unknown], "");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no live holder"), "{}", stderr(&out));
    let out = client(relay.addr, &["get", "--hash", "xyz"], "");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_restarted_relay_has_the_index_back_within_a_heartbeat() {
    let mut relay = Server::relay(&[]);
    let port = relay.port();
    let dir = folder_with(&[("kept.txt", b"kept\n")]);
    let _peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_secs(1)
    });
    eventually("indexed", || listed(relay.addr, &[]) == ["kept.txt"]);
    relay.signal("KILL");
    relay.wait_exit();
    let relay = Server::start("relay-server", &[&port, "--bind", "127.0.0.1"]);
    // The peer's next ANNOUNCE meets a relay without its list, which asks
    // for it.
    eventually("indexed again", || listed(relay.addr, &[]) == ["kept.txt"]);
    let out = client(relay.addr, &["get", "kept.txt"], "");
    assert_eq!(stdout(&out), "kept\n");
}

/// An OFFER's raw bytes, signed by the fake peer at `port`: header and body.
fn offer_bytes(port: u16, digest: &str, body: &str) -> Vec<u8> {
    let offer = protocol::relay::Request::Offer {
        port,
        digest: digest.parse().unwrap(),
        host: None,
    };
    let mut bytes = Vec::new();
    offer
        .write_signed_to(&crate::harness::sign(port, &offer), &mut bytes)
        .unwrap();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

#[test]
fn hostile_announcements_are_answered_and_survived() {
    let relay = Server::relay_here(|c| c.max_files_per_peer = 2);
    let dir = folder_with(&[("real.txt", b"real\n")]);
    let _peer = Server::peer_here(relay.addr, dir.path(), |_| {});
    eventually("the real peer is indexed", || {
        listed(relay.addr, &[]) == ["real.txt"]
    });
    let hash = blake3::hash(b"x");
    let line = |name: &str| format!("1 {hash} {name}\n");
    let digest_of = |names: &[&str]| {
        let files: Vec<protocol::index::Holding> = names
            .iter()
            .map(|n| protocol::index::Holding {
                name: protocol::FileName::new(n).unwrap(),
                size: 1,
                hash,
            })
            .collect();
        protocol::index::ListDigest::of(&files).to_string()
    };
    let good = digest_of(&["a", "b"]);
    for (what, request) in [
        ("garbage", b"RP2P/1 OFFER 7000 \xff\xfe\n".to_vec()),
        (
            "no signature",
            format!("RP2P/1 OFFER 7000 {good}\nBATCH 1\n{}END\n", line("a")).into_bytes(),
        ),
        (
            "a wrong digest",
            offer_bytes(
                7000,
                &digest_of(&["a"]),
                &format!("BATCH 2\n{}{}END\n", line("a"), line("b")),
            ),
        ),
        (
            "too many files",
            offer_bytes(
                7000,
                &digest_of(&["a", "b", "c"]),
                &format!("BATCH 3\n{}{}{}END\n", line("a"), line("b"), line("c")),
            ),
        ),
        (
            "an escaping name",
            offer_bytes(
                7000,
                &good,
                &format!("BATCH 1\n{}END\n", line("..%2Fetc%2Fpasswd")),
            ),
        ),
        (
            "a duplicate",
            offer_bytes(
                7000,
                &good,
                &format!("BATCH 2\n{}{}END\n", line("a"), line("a")),
            ),
        ),
        (
            "a cut body",
            offer_bytes(7000, &good, &format!("BATCH 2\n{}", line("a"))),
        ),
        ("a huge batch", offer_bytes(7000, &good, "BATCH 99999999\n")),
    ] {
        let reply = send_and_close(relay.addr, &request);
        assert!(reply.starts_with("ERR "), "{what}: {reply:?}");
        assert_eq!(reply.lines().count(), 1, "{what}: {reply:?}");
    }
    // Nothing of it reached the index, and everyone is still served.
    assert_eq!(listed(relay.addr, &[]), ["real.txt"]);
    let out = client(relay.addr, &["get", "real.txt"], "");
    assert_eq!(stdout(&out), "real\n");
    let out = client(relay.addr, &["stats"], "");
    assert!(stdout(&out).contains("bad_requests 7"), "{}", stdout(&out));
    assert!(stdout(&out).contains("forbidden 1"), "{}", stdout(&out));
}

/// Sends `request` whole, says it is done, and reads the answer.
fn send_and_close(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, STEP).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn a_big_file_is_announced_as_soon_as_it_is_hashed() {
    let relay = Server::relay_here(|_| {});
    // Over the size hashed while a request waits: hashed apart, after
    // the peer's first announcement has gone without it.
    let dir = folder_with(&[("small.txt", b"small\n")]);
    fs::write(dir.path().join("big.bin"), vec![3u8; 80 << 20]).unwrap();
    let _peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_secs(3600);
        c.watch = false;
    });
    // No heartbeat and no watching in the time allowed: only the end of
    // the hash can bring it to the relay.
    eventually("the big file is indexed", || {
        listed(relay.addr, &[]) == ["big.bin", "small.txt"]
    });
}
