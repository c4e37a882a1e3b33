//! What users and scripts see: `ls`, `--json`, exit codes, configuration
//! from the environment, clean stops, and the progress bar on a terminal.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::{
    bin, client, eventually, live_peers, raw_exchange, stderr, stdout, wait_output, Network, Server,
};

/// Runs `peer-client` with `args` and extra environment, stdin empty.
fn client_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new(bin("peer-client"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peer-client");
    wait_output(child)
}

/// Runs a shell command line; `sh` and `script` are there on any Linux.
fn shell(line: &str, env: &[(&str, &str)]) -> Output {
    let child = Command::new("sh")
        .args(["-c", line])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sh");
    wait_output(child)
}

fn json_lines(out: &Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
        })
        .collect()
}

fn write(dir: &Path, name: &str, content: &[u8]) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

/// Two peers: one file each, one file on both, one in a subfolder.
fn two_peers() -> (tempfile::TempDir, tempfile::TempDir, Network) {
    two_peers_with(Network::start)
}

fn two_peers_with(
    start: fn(&[&Path]) -> Network,
) -> (tempfile::TempDir, tempfile::TempDir, Network) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), "alpha.txt", b"alpha\n");
    write(a.path(), "docs/guide.txt", b"guide\n");
    write(a.path(), "shared.txt", b"same on both\n");
    write(b.path(), "beta.txt", b"beta!\n");
    write(b.path(), "shared.txt", b"same on both\n");
    let net = start(&[a.path(), b.path()]);
    (a, b, net)
}

#[test]
fn ls_lists_the_network_and_filters_by_glob() {
    let (_a, _b, net) = two_peers();
    let out = net.client(&["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Vec<String>> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let expected = [
        ["6", "1", "alpha.txt"],
        ["6", "1", "beta.txt"],
        ["6", "1", "docs/guide.txt"],
        ["13", "2", "shared.txt"],
    ];
    assert_eq!(
        rows,
        expected.map(|r| r.map(str::to_string).to_vec()).to_vec()
    );

    let out = net.client(&["ls", "*ta.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert!(stdout(&out).ends_with(" beta.txt\n"), "{}", stdout(&out));
    // `*` stays within a folder, `**` crosses folders.
    let out = net.client(&["ls", "*.txt"]);
    assert_eq!(stdout(&out).lines().count(), 3, "{}", stdout(&out));
    let out = net.client(&["ls", "**/*.txt"]);
    assert_eq!(stdout(&out).lines().count(), 4, "{}", stdout(&out));
    let out = net.client(&["ls", "docs/**"]);
    assert!(
        stdout(&out).ends_with(" docs/guide.txt\n"),
        "{}",
        stdout(&out)
    );
    let out = net.client(&["ls", "nothing-matches"]);
    assert!(out.status.success() && out.stdout.is_empty());
    // --long adds the hash.
    let out = net.client(&["ls", "--long", "shared.txt"]);
    let hash = blake3::hash(b"same on both\n").to_hex().to_string();
    assert_eq!(
        stdout(&out),
        format!("          13   2 {hash} shared.txt\n")
    );
    let out = net.client(&["ls", "[unclosed"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn json_lines_have_the_documented_shapes() {
    let (_a, _b, net) = two_peers();

    let out = net.client(&["ls", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let files = json_lines(&out);
    assert_eq!(files.len(), 4);
    for file in &files {
        let object = file.as_object().expect("an object per line");
        assert_eq!(
            object.keys().collect::<BTreeSet<_>>(),
            BTreeSet::from([
                &"name".into(),
                &"peers".into(),
                &"size".into(),
                &"hash".into()
            ])
        );
    }
    assert_eq!(
        files[3],
        serde_json::json!({
            "name": "shared.txt",
            "size": 13,
            "peers": 2,
            "hash": blake3::hash(b"same on both\n").to_hex().to_string(),
        })
    );

    let out = net.client(&["peers", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: BTreeSet<String> = json_lines(&out)
        .iter()
        .map(|peer| {
            let addr = peer["addr"].as_str().expect("addr is a string");
            let (ip, port) = (
                peer["ip"].as_str().expect("ip"),
                peer["port"].as_u64().expect("port"),
            );
            assert_eq!(addr, format!("{ip}:{port}"));
            addr.to_string()
        })
        .collect();
    let expected: BTreeSet<String> = net.peers.iter().map(|p| p.addr.to_string()).collect();
    assert_eq!(listed, expected);

    let out = net.client(&["stats", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats = json_lines(&out);
    assert_eq!(stats.len(), 1, "one object");
    assert_eq!(stats[0]["peers_live"], 2);
    for counter in ["uptime_secs", "registrations", "lookups", "expired"] {
        assert!(stats[0][counter].is_u64(), "{counter} in {}", stats[0]);
    }
}

#[test]
fn exit_codes_follow_the_documented_scheme() {
    // As processes: the test reads their logs.
    let (_a, _b, net) = two_peers_with(Network::start_processes);
    assert_eq!(net.client(&["get", "alpha.txt"]).status.code(), Some(0));
    // One log line per request: who, what, outcome, bytes, how long.
    let logged = |server: &Server, needle: &str| {
        server.log().lines().any(|l| {
            l.contains("INFO")
                && l.contains("127.0.0.1:")
                && l.contains(needle)
                && l.contains(" bytes (")
                && l.ends_with("s)")
        })
    };
    eventually("the relay logs the lookup", || {
        logged(&net.relay, "PEERS -> 2: ")
    });
    eventually("a peer logs the transfer", || {
        net.peers
            .iter()
            .any(|p| logged(p, "RANGE \"alpha.txt\" 0-6: sent 6 bytes"))
    });
    assert_eq!(net.client(&["get", "nowhere.txt"]).status.code(), Some(1));
    assert_eq!(net.client(&["ls", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(net.client(&["get", "../escape"]).status.code(), Some(2));
    let out_dir = tempfile::tempdir().unwrap();
    let unwritable = out_dir.path().join("no/such/folder/x");
    let out = net.client(&["get", "alpha.txt", "-o", unwritable.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    drop(net);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(client(free, &["ls"], "").status.code(), Some(3));
}

#[test]
fn settings_come_from_the_environment() {
    // Relay: every setting from the environment, none on the command line.
    let relay = Server::start_with_env(
        "relay-server",
        &[],
        &[
            ("RELAY_PORT", "0"),
            ("RELAY_BIND", "127.0.0.1"),
            ("RELAY_TTL", "1"),
        ],
    );
    eventually("the relay logs its ttl", || relay.log().contains("ttl 1s"));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(a.path(), "a.txt", b"a\n");
    write(b.path(), "b.txt", b"b\n");
    let port = relay.port();
    let env = [
        ("PEER_RELAY_HOST", "127.0.0.1"),
        ("PEER_RELAY_PORT", port.as_str()),
        ("PEER_DIR", a.path().to_str().unwrap()),
        ("PEER_BIND", "127.0.0.1"),
        ("PEER_HEARTBEAT", "60"),
    ];
    let _quiet_peer = Server::start_with_env("peer-node", &[], &env);
    eventually("the peer registers", || live_peers(relay.addr).len() == 1);
    // It heartbeats every 60 s, the relay forgets after 1 s.
    eventually("the relay expires the silent peer", || {
        live_peers(relay.addr).is_empty()
    });
    eventually("the relay logs the expiry", || {
        relay.log().contains("expired")
    });

    // Client: relay address and timeout from the environment. A stopped
    // peer is given up on after PEER_CLIENT_TIMEOUT, not the default 10 s.
    let net = Network::start_processes(&[a.path(), b.path()]);
    let stopped = &net.peers[1];
    let port = net.relay.port();
    let env = [
        ("PEER_CLIENT_RELAY_HOST", "127.0.0.1"),
        ("PEER_CLIENT_RELAY_PORT", port.as_str()),
        ("PEER_CLIENT_TIMEOUT", "1"),
    ];
    eventually("b.txt is indexed", || {
        stdout(&client_with_env(&["ls"], &env)).contains("b.txt")
    });
    stopped.signal("STOP");
    let started = Instant::now();
    let out = client_with_env(&["get", "b.txt"], &env);
    let took = started.elapsed();
    stopped.signal("CONT");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // The peer that fails is reported on stderr.
    assert!(
        stderr(&out).contains(&format!("peer {}: timed out", stopped.addr)),
        "{}",
        stderr(&out)
    );
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}: the timeout was not 1 s"
    );
}

#[test]
fn sigterm_stops_the_servers_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Network::start_processes(&[dir.path(), dir.path()]);
    let mut leaving = net.peers.remove(0);
    let leaving_addr = leaving.addr.to_string();
    leaving.signal("TERM");
    assert_eq!(leaving.wait_exit(), Some(0), "{}", leaving.log());
    // It unregistered on the way out: gone at once, not after the TTL.
    let listed: Vec<String> = live_peers(net.relay.addr)
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(listed, [net.peers[0].addr.to_string()]);
    assert_ne!(leaving_addr, listed[0]);
    let log = leaving.log();
    assert!(
        log.contains("shutting down") && log.contains("unregistered from relay"),
        "{log}"
    );

    net.relay.signal("TERM");
    assert_eq!(net.relay.wait_exit(), Some(0), "{}", net.relay.log());
    assert!(
        net.relay.log().contains("shutting down"),
        "{}",
        net.relay.log()
    );
}

/// A peer with a file big enough to take a while when read slowly.
fn big_file_network() -> (tempfile::TempDir, Network) {
    let dir = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..16_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    write(dir.path(), "big.bin", &content);
    let net = Network::start_processes(&[dir.path()]);
    (dir, net)
}

/// Downloads big.bin into a pipe whose reader waits 2 s first, so the
/// download lasts longer than the moment after which a bar appears.
fn slow_download(net: &Network) -> String {
    format!(
        "'{}' 127.0.0.1 {} get big.bin | (sleep 2; cat > /dev/null)",
        bin("peer-client").display(),
        net.relay.port()
    )
}

#[test]
fn a_terminal_sees_a_progress_bar() {
    let (_dir, net) = big_file_network();
    // script(1) runs the command on a pseudo-terminal and copies what it shows.
    let command = format!(
        "script -qec \"{}\" /dev/null",
        slow_download(&net).replace('"', "\\\"")
    );
    let out = shell(&command, &[("TERM", "xterm")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let screen = stdout(&out);
    assert!(
        screen.contains("/15.26 MiB") && screen.contains("/s, ETA"),
        "no progress bar in {screen:?}"
    );
}

#[test]
fn a_pipe_sees_no_progress_bar() {
    let (_dir, net) = big_file_network();
    let out = shell(&slow_download(&net), &[("TERM", "xterm")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stderr.is_empty(),
        "stderr is not clean: {:?}",
        stderr(&out)
    );
}

#[test]
fn the_line_editor_completes_names_and_keeps_stdout_for_content() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "only-file.txt", b"the content\n");
    let net = Network::start(&[dir.path()]);
    let saved = tempfile::tempdir().unwrap();
    let content = saved.path().join("stdout");
    // `ls` fills the completion list; Tab then completes "only" to the name.
    let keys =
        "sleep 1; printf 'ls\\n'; sleep 1; printf 'only\\t\\n'; sleep 1; printf 'quit\\n'; sleep 1";
    let command = format!(
        "({keys}) | script -qec \"'{}' 127.0.0.1 {} > '{}'\" /dev/null",
        bin("peer-client").display(),
        net.relay.port(),
        content.display()
    );
    let out = shell(&command, &[("TERM", "xterm")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let screen = stdout(&out);
    assert!(
        screen.contains("> only-file.txt"),
        "no completion in {screen:?}"
    );
    // The listing and the file are content; prompts and echo stay on the terminal.
    let written = fs::read_to_string(&content).unwrap();
    assert_eq!(written.lines().last(), Some("the content"), "{written:?}");
    assert!(!written.contains("> "), "prompt on stdout: {written:?}");
}

#[test]
fn completions_and_man_pages_need_no_other_arguments() {
    for name in ["relay-server", "peer-node", "peer-client"] {
        let run = |args: &[&str]| {
            // Settings in the environment must not get in the way.
            let env = [
                ("RELAY_PORT", "1"),
                ("PEER_DIR", "/"),
                ("PEER_CLIENT_RELAY_HOST", "x"),
            ];
            shell(
                &format!("'{}' {}", bin(name).display(), args.join(" ")),
                &env,
            )
        };
        let out = run(&["--completions", "bash"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("complete -F _{}", name.replace('-', "__"))),
            "{name}"
        );
        let out = run(&["--man"]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(stdout(&out).contains(&format!(".TH {name} 1")), "{name}");
        let out = run(&["--completions", "nushell"]);
        assert_eq!(out.status.code(), Some(2), "{name}");
    }
}

#[test]
fn verbosity_from_the_environment_does_not_clash_with_the_command_line() {
    // No RUST_LOG here: it would override both flags.
    let relay = Server::start_with_env(
        "relay-server",
        &["0", "--bind", "127.0.0.1", "-q"],
        &[("RELAY_VERBOSE", "0"), ("RUST_LOG", "")],
    );
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.txt", b"a\n");
    let port = relay.port();
    let peer_args = |flag: &'static str| {
        let mut args = vec![
            "127.0.0.1".to_string(),
            port.clone(),
            "--dir".into(),
            dir.path().to_str().unwrap().into(),
            "--bind".into(),
            "127.0.0.1".into(),
        ];
        args.extend(Some(flag.to_string()).filter(|f| !f.is_empty()));
        args
    };
    let verbose_args = peer_args("-v");
    let verbose = Server::start_with_env(
        "peer-node",
        &verbose_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("PEER_QUIET", "1"), ("RUST_LOG", "")],
    );
    let quiet_args = peer_args("");
    let quiet = Server::start_with_env(
        "peer-node",
        &quiet_args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[("PEER_QUIET", "1"), ("RUST_LOG", "")],
    );
    eventually("both peers are registered", || {
        live_peers(relay.addr).len() == 2
    });
    for peer in [&verbose, &quiet] {
        assert!(raw_exchange(peer.addr, b"RP2P/1 GET a.txt\n").ends_with(b"a\n"));
    }
    // -v on the command line wins over PEER_QUIET: debug lines.
    eventually("the verbose peer logs debug lines", || {
        verbose.log().contains(" DEBUG ")
    });
    // PEER_QUIET alone, and -q over RELAY_VERBOSE=0: no info lines, although
    // each served requests that are logged at info.
    let (quiet_log, relay_log) = (quiet.log(), relay.log());
    assert!(!quiet_log.contains(" INFO "), "{quiet_log}");
    assert!(!relay_log.contains(" INFO "), "{relay_log}");
}

/// `-o` behaves like curl's: a symlink is written through and stays a
/// link, a FIFO is fed, a device (here a copy of /dev/null, so that a
/// failure cannot replace the real one) stays a device.
#[test]
fn get_o_writes_through_links_and_into_fifos_and_devices() {
    use std::os::unix::fs::{symlink, FileTypeExt};
    let (_a, _b, net) = two_peers();
    let out_dir = tempfile::tempdir().unwrap();
    let at = |name: &str| out_dir.path().join(name);

    fs::write(at("target.txt"), "old").unwrap();
    symlink("target.txt", at("link")).unwrap();
    let out = net.client(&["get", "alpha.txt", "-o", at("link").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fs::symlink_metadata(at("link")).unwrap().is_symlink());
    assert_eq!(fs::read_to_string(at("target.txt")).unwrap(), "alpha\n");

    let made = Command::new("mkfifo").arg(at("fifo")).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = at("fifo");
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let out = net.client(&["get", "beta.txt", "-o", at("fifo").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(reader.join().unwrap(), b"beta!\n");
    assert!(fs::symlink_metadata(at("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());

    let null = at("null");
    let made = Command::new("mknod")
        .arg(&null)
        .args(["c", "1", "3"])
        .status();
    if made.is_ok_and(|s| s.success()) {
        let out = net.client(&["get", "shared.txt", "-o", null.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(fs::symlink_metadata(&null)
            .unwrap()
            .file_type()
            .is_char_device());
    } else {
        eprintln!("device part skipped: cannot make a device node here");
    }
    let left: Vec<_> = fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
