//! Nobody speaks for another peer: keys that survive restarts, signed
//! requests, private networks.

use std::{fs, os::unix::fs::PermissionsExt};

use crate::harness::{client, eventually, live_peers, raw_exchange, stderr, stdout, Server};

/// The id a peer logged at start.
fn logged_id(peer: &Server) -> String {
    let log = peer.log();
    let line = log
        .lines()
        .find(|l| l.contains("peer id "))
        .unwrap_or_else(|| panic!("no peer id in the log:\n{log}"));
    line.split("peer id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an id")
        .to_string()
}

#[test]
fn a_peer_keeps_its_key_across_restarts_and_shows_it() {
    let relay = Server::relay(&[]);
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("peer.key");
    let key_arg = key.to_str().unwrap();
    let first = Server::peer(relay.addr, dir.path(), &["--key", key_arg]);
    eventually("the peer logs its id", || first.log().contains("peer id "));
    let id = logged_id(&first);
    assert_eq!(id.len(), 12);
    let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    eventually("it is listed", || live_peers(relay.addr).len() == 1);
    let out = client(relay.addr, &["peers", "--long"], "");
    assert_eq!(stdout(&out), format!("{} {id}\n", first.addr));
    let out = client(relay.addr, &["peers", "--json"], "");
    assert!(
        stdout(&out).contains(&format!("\"key\":\"{id}")),
        "{}",
        stdout(&out)
    );
    drop(first);
    let again = Server::peer(relay.addr, dir.path(), &["--key", key_arg]);
    eventually("the peer logs its id", || again.log().contains("peer id "));
    assert_eq!(logged_id(&again), id);
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let relay = Server::relay(&[]);
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("peer.key");
    fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(crate::harness::bin("peer-node"))
        .args(["127.0.0.1", &relay.port(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir.path())
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("can be read by others (mode 644)"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_stranger_cannot_unregister_or_take_over_a_peer() {
    let relay = Server::relay(&[]);
    let dir = tempfile::tempdir().unwrap();
    let peer = Server::peer(relay.addr, dir.path(), &[]);
    eventually("it is listed", || live_peers(relay.addr).len() == 1);
    let port = peer.addr.port();
    // Unsigned, as the seed's protocol allowed.
    let reply = raw_exchange(relay.addr, format!("RP2P/1 UNREGISTER {port}\n").as_bytes());
    assert!(
        reply.starts_with(b"ERR forbidden"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // Signed, by another key.
    for request in [
        protocol::relay::Request::Unregister { port, host: None },
        protocol::relay::Request::Register { port, host: None },
    ] {
        let mut bytes = Vec::new();
        request
            .write_signed_to(&crate::harness::sign(1, &request), &mut bytes)
            .unwrap();
        let reply = raw_exchange(relay.addr, &bytes);
        assert!(
            reply.starts_with(b"ERR forbidden"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    assert_eq!(live_peers(relay.addr).len(), 1);
    let out = client(relay.addr, &["stats"], "");
    assert!(stdout(&out).contains("forbidden 3"), "{}", stdout(&out));
}

#[test]
fn a_private_relay_lists_only_the_keys_it_allows_and_rereads_them_on_sighup() {
    let keys = tempfile::tempdir().unwrap();
    let (a_key, b_key) = (keys.path().join("a.key"), keys.path().join("b.key"));
    let allowed = keys.path().join("allowed");
    fs::write(&allowed, "# nobody yet\n").unwrap();
    let relay = Server::relay(&["--allow-keys", allowed.to_str().unwrap()]);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A short heartbeat keeps their retries after a refusal short too.
    let first = Server::peer(
        relay.addr,
        a.path(),
        &["--key", a_key.to_str().unwrap(), "--heartbeat", "1"],
    );
    let second = Server::peer(
        relay.addr,
        b.path(),
        &["--key", b_key.to_str().unwrap(), "--heartbeat", "1"],
    );
    eventually("both are refused", || {
        first.log().contains("is not allowed on this relay")
            && second.log().contains("is not allowed on this relay")
    });
    assert!(live_peers(relay.addr).is_empty());
    // Allow the first one's key and tell the relay.
    let full_key = |peer: &Server| {
        let log = peer.log();
        log.split("(key ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .expect("the full key in the log")
            .to_string()
    };
    fs::write(
        &allowed,
        format!("{}  # the first peer\n", full_key(&first)),
    )
    .unwrap();
    relay.signal("HUP");
    eventually("the relay reloaded", || {
        relay.log().contains("allowed keys reloaded: 1")
    });
    eventually("the allowed one is listed", || {
        live_peers(relay.addr).len() == 1
    });
    assert_eq!(live_peers(relay.addr)[0].port(), first.addr.port());
}

#[test]
fn a_relay_with_a_network_secret_answers_only_clients_that_know_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    fs::write(&secret, format!("{}\n", "5a".repeat(32))).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let secret_arg = secret.to_str().unwrap();
    let relay = Server::relay(&["--network-secret", secret_arg]);
    let files = tempfile::tempdir().unwrap();
    fs::write(files.path().join("team.txt"), "for the team\n").unwrap();
    let _peer = Server::peer(relay.addr, files.path(), &[]);
    let insider = |args: &[&str]| {
        let mut all = vec!["--network-secret", secret_arg];
        all.extend_from_slice(args);
        client(relay.addr, &all, "")
    };
    eventually("the file is indexed", || {
        stdout(&insider(&["ls"])).contains("team.txt")
    });
    let out = insider(&["get", "team.txt"]);
    assert_eq!(stdout(&out), "for the team\n", "{}", stderr(&out));
    for args in [&["ls"][..], &["get", "team.txt"], &["peers"], &["stats"]] {
        let out = client(relay.addr, args, "");
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("serves its own network only"),
            "{}",
            stderr(&out)
        );
    }
    // The wrong secret is no better than none.
    let wrong = dir.path().join("wrong");
    fs::write(&wrong, format!("{}\n", "a5".repeat(32))).unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let out = client(
        relay.addr,
        &["--network-secret", wrong.to_str().unwrap(), "ls"],
        "",
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}
