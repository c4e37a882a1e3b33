//! The three phases end to end: register, discover, fetch.

use std::fs;

use crate::harness::{client, eventually, live_peers, stderr, stdout, Network, Server};

/// Three folders with distinct files, like the demo's `files/`.
fn three_folders() -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (1..=3)
        .map(|i| root.path().join(format!("peer{i}")))
        .collect();
    for (i, dir) in dirs.iter().enumerate() {
        fs::create_dir(dir).unwrap();
        fs::write(
            dir.join(format!("file{}.txt", i + 1)),
            format!("content of file {}\n", i + 1),
        )
        .unwrap();
    }
    (root, dirs)
}

#[test]
fn peers_register_and_the_client_lists_them() {
    let (_root, dirs) = three_folders();
    let net = Network::start(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    let out = net.client(&["peers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut listed: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    listed.sort();
    let mut expected: Vec<String> = net.peers.iter().map(|p| p.addr.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected);
}

#[test]
fn every_file_is_fetched_from_whichever_peer_has_it() {
    let (_root, dirs) = three_folders();
    let net = Network::start(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    for i in 1..=3 {
        let out = net.client(&["get", &format!("file{i}.txt")]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("content of file {i}\n"));
    }
}

#[test]
fn a_missing_file_is_reported_with_exit_code_1() {
    let (_root, dirs) = three_folders();
    let net = Network::start(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    let out = net.client(&["get", "nowhere.txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("\"nowhere.txt\" not found: no live holder in the relay's index"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_interactive_client_fetches_name_after_name() {
    let (_root, dirs) = three_folders();
    let net = Network::start(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>());
    let out = client(
        net.relay.addr,
        &[],
        "file2.txt\nnowhere.txt\n\nfile3.txt\nquit\nfile1.txt\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Content on stdout only, in order; `quit` ends before file1.
    assert_eq!(stdout(&out), "content of file 2\ncontent of file 3\n");
    let err = stderr(&out);
    assert!(err.contains("3 live peers"), "{err}");
    assert!(
        err.contains("\"nowhere.txt\" not found: no live holder in the relay's index"),
        "{err}"
    );
}

#[test]
fn the_interactive_client_ends_at_end_of_input() {
    let (_root, dirs) = three_folders();
    let net = Network::start(&[dirs[0].as_path()]);
    let out = client(net.relay.addr, &[], "file1.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "content of file 1\n");
}

#[test]
fn binary_empty_and_oddly_named_files_arrive_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    // Every byte value, zeros included, over several read buffers.
    let binary: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("blob.bin", binary),
        ("empty", Vec::new()),
        ("with space.txt", b"spaced\n".to_vec()),
        ("ünïcödé – 日本.txt", "non-ascii\n".as_bytes().to_vec()),
        ("100% sure.txt", b"percent\n".to_vec()),
        ("sub/dir/nested.txt", b"nested\n".to_vec()),
    ];
    for (name, content) in &files {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }
    let net = Network::start(&[dir.path()]);
    let out_dir = tempfile::tempdir().unwrap();
    for (name, content) in &files {
        let out = net.client(&["get", name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(out.stdout == *content, "{name}: stdout differs");

        let saved = out_dir.path().join("saved");
        let out = net.client(&["get", name, "-o", saved.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(
            fs::read(&saved).unwrap() == *content,
            "{name}: saved file differs"
        );
    }
    // Nothing but the saved file is left in the folder.
    assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 1);
}

#[test]
fn output_into_a_folder_keeps_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("docs")).unwrap();
    fs::write(dir.path().join("docs/guide.txt"), "guide\n").unwrap();
    let net = Network::start(&[dir.path()]);
    let out_dir = tempfile::tempdir().unwrap();
    let out = net.client(&[
        "get",
        "docs/guide.txt",
        "-o",
        out_dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(out_dir.path().join("guide.txt")).unwrap(),
        "guide\n"
    );
}

#[test]
fn a_peer_that_registers_again_is_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Server::relay(&[]);
    let _peer = Server::peer(relay.addr, dir.path(), &["--heartbeat", "1"]);
    eventually("the peer has sent a few heartbeats", || {
        relay.log().matches("refreshed").count() >= 2
    });
    assert_eq!(live_peers(relay.addr).len(), 1);
}

#[test]
fn with_no_peers_a_fetch_says_so() {
    let relay = Server::relay(&[]);
    let out = client(relay.addr, &["get", "x.txt"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("\"x.txt\" not found: no live holder"),
        "{}",
        stderr(&out)
    );
    let out = client(relay.addr, &["peers"], "");
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn an_advertised_address_is_listed_once_the_peer_there_proves_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Server::relay(&[]);
    let port = relay.port();
    let path = dir.path().to_str().unwrap();
    // Serves on 127.0.0.5, talks to the relay from 127.0.0.1.
    let peer = Server::start(
        "peer-node",
        &[
            "127.0.0.1",
            &port,
            "--dir",
            path,
            "--bind",
            "127.0.0.5",
            "--advertise",
            "127.0.0.5",
        ],
    );
    eventually("the peer is listed", || !live_peers(relay.addr).is_empty());
    assert_eq!(
        live_peers(relay.addr)[0].to_string(),
        format!("127.0.0.5:{}", peer.addr.port())
    );
    // One that names an address where it is not is never listed: nobody
    // can make the relay send clients to a third party.
    let liar = Server::peer(relay.addr, dir.path(), &["--advertise", "127.0.0.6"]);
    eventually("the relay has refused it", || {
        liar.log().contains("did not prove to hold this key")
    });
    assert_eq!(live_peers(relay.addr).len(), 1);
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("big.bin"), vec![7u8; 16 << 20]).unwrap();
    let net = Network::start(&[dir.path()]);
    // Like `peer-client ... get big.bin | head -c 10`.
    let mut child = std::process::Command::new(crate::harness::bin("peer-client"))
        .args(["127.0.0.1", &net.relay.port(), "get", "big.bin"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = crate::harness::wait_output(child);
    assert_eq!(head, [7u8; 10]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn an_unusable_output_path_fails_before_the_download() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "a\n").unwrap();
    let net = Network::start(&[dir.path()]);
    let out_dir = tempfile::tempdir().unwrap();
    let missing = format!("{}/", out_dir.path().join("no-such-folder").display());
    fs::create_dir(out_dir.path().join("a.txt")).unwrap();
    for (dest, message) in [
        (missing.as_str(), "no such folder"),
        (out_dir.path().to_str().unwrap(), "it is a folder"),
    ] {
        let out = net.client(&["get", "a.txt", "-o", dest]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(stderr(&out).contains(message), "{}", stderr(&out));
    }
    assert!(!net.peers[0].log().contains("GET"), "nothing was fetched");
}
