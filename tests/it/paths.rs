//! Names that would leave the served folder are refused, and the peer goes on.

use std::{fs, os::unix::fs::symlink};

use crate::harness::{raw_exchange, stderr, Network};

fn reply_line(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    text.lines().next().unwrap_or("").to_string()
}

#[test]
fn escaping_names_are_forbidden_and_the_peer_keeps_serving() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.txt"), "TOP-SECRET-CONTENT").unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("a")).unwrap();
    fs::write(dir.path().join("ok.txt"), "ok").unwrap();
    symlink(
        outside.path().join("secret.txt"),
        dir.path().join("link.txt"),
    )
    .unwrap();
    symlink(outside.path(), dir.path().join("linkdir")).unwrap();
    let net = Network::start(&[dir.path()]);
    let peer = net.peers[0].addr;

    let secret_rel = format!(
        "../{}/secret.txt",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    for name in [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "%2e%2e/x",
        "%2E%2E%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "..%2f..%2fetc%2fpasswd",
        &secret_rel,
        "link.txt",
        "linkdir/secret.txt",
    ] {
        let reply = raw_exchange(peer, format!("RP2P/1 GET {name}\n").as_bytes());
        let line = reply_line(&reply);
        assert!(line.starts_with("ERR forbidden "), "{name}: {line}");
        assert!(
            !String::from_utf8_lossy(&reply).contains("TOP-SECRET"),
            "{name} leaked"
        );
    }
    // Still serving.
    let reply = raw_exchange(peer, b"RP2P/1 GET ok.txt\n");
    assert!(
        reply.ends_with(b"\nok"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // The listing holds neither the escaping link nor the linked folder.
    let listing = String::from_utf8_lossy(&raw_exchange(peer, b"RP2P/1 LIST\n")).into_owned();
    assert_eq!(listing, "FILES 1\n2 ok.txt\n");
}

#[test]
fn the_client_refuses_escaping_names_before_asking() {
    let dir = tempfile::tempdir().unwrap();
    let net = Network::start(&[dir.path()]);
    for name in ["../x", "/etc/passwd", "a/../../x"] {
        let out = net.client(&["get", name]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(
            stderr(&out).contains("invalid file name"),
            "{}",
            stderr(&out)
        );
    }
    assert!(
        !net.peers[0].log().contains("GET"),
        "nothing reached the peer"
    );
}

/// Things in the folder that are not files to serve get the codes
/// PROTOCOL.md gives them, and no reply carries the operating system's
/// own error text.
#[test]
fn odd_files_get_the_codes_the_spec_gives_and_no_os_error_text() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ok.txt"), "ok").unwrap();
    symlink("loop", dir.path().join("loop")).unwrap();
    symlink("ping", dir.path().join("pong")).unwrap();
    symlink("pong", dir.path().join("ping")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("socket")).unwrap();
    let net = Network::start(&[dir.path()]);
    let peer = net.peers[0].addr;
    let long = "a".repeat(256);
    let longer = format!("{long}/b");
    for (name, code) in [
        ("loop", "forbidden"),
        ("ping", "forbidden"),
        ("loop/x", "forbidden"),
        ("socket", "not-found"),
        (long.as_str(), "not-found"),
        (longer.as_str(), "not-found"),
    ] {
        let reply = raw_exchange(peer, format!("RP2P/1 GET {name}\n").as_bytes());
        let line = reply_line(&reply);
        assert!(line.starts_with(&format!("ERR {code} ")), "{name}: {line}");
        assert!(!line.contains("os error"), "{name}: {line}");
    }
    let listing = String::from_utf8_lossy(&raw_exchange(peer, b"RP2P/1 LIST\n")).into_owned();
    assert_eq!(listing, "FILES 1\n2 ok.txt\n");
}

/// A hard link gives no hint of where its other names are, so a file with
/// more than one is neither listed nor served unless the peer is told to.
#[test]
fn hard_links_are_neither_listed_nor_served_unless_allowed() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.txt"), "TOP-SECRET-CONTENT").unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ok.txt"), "ok").unwrap();
    if fs::hard_link(
        outside.path().join("secret.txt"),
        dir.path().join("linked.txt"),
    )
    .is_err()
    {
        eprintln!("skipped: the two temporary folders are on different file systems");
        return;
    }
    let net = Network::start(&[dir.path()]);
    let reply = raw_exchange(net.peers[0].addr, b"RP2P/1 GET linked.txt\n");
    let line = reply_line(&reply);
    assert!(line.starts_with("ERR forbidden "), "{line}");
    assert!(line.contains("--allow-hardlinks"), "{line}");
    assert!(!String::from_utf8_lossy(&reply).contains("TOP-SECRET"));
    let listing =
        String::from_utf8_lossy(&raw_exchange(net.peers[0].addr, b"RP2P/1 LIST\n")).into_owned();
    assert_eq!(listing, "FILES 1\n2 ok.txt\n");

    let allowed = crate::harness::Server::peer(net.relay.addr, dir.path(), &["--allow-hardlinks"]);
    let reply = raw_exchange(allowed.addr, b"RP2P/1 GET linked.txt\n");
    assert!(
        reply.ends_with(b"\nTOP-SECRET-CONTENT"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let listing =
        String::from_utf8_lossy(&raw_exchange(allowed.addr, b"RP2P/1 LIST\n")).into_owned();
    assert_eq!(listing, "FILES 2\n18 linked.txt\n2 ok.txt\n");
}
