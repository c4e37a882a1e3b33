//! Command lines: help, version, and one clear line for each mistake.

use std::process::Command;

use crate::harness::{bin, client, stderr, wait_output, Server};

fn run(name: &str, args: &[&str]) -> std::process::Output {
    let child = Command::new(bin(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child)
}

fn assert_clean_failure(out: &std::process::Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn every_binary_has_help_and_version() {
    for name in ["relay-server", "peer-node", "peer-client"] {
        let help = run(name, &["--help"]);
        assert!(help.status.success(), "{name} --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Usage:"),
            "{name}"
        );
        let version = run(name, &["--version"]);
        assert!(version.status.success(), "{name} --version");
        assert!(
            String::from_utf8_lossy(&version.stdout).starts_with(name),
            "{name}"
        );
    }
}

#[test]
fn bad_arguments_are_usage_errors() {
    assert_clean_failure(&run("relay-server", &["not-a-port"]), 2, "invalid value");
    assert_clean_failure(&run("relay-server", &["8888", "--ttl", "0"]), 2, "--ttl");
    assert_clean_failure(&run("peer-node", &["127.0.0.1", "8888"]), 2, "--dir");
    assert_clean_failure(
        &run("peer-client", &["127.0.0.1", "99999"]),
        2,
        "invalid value",
    );
    assert_clean_failure(
        &run("peer-client", &["127.0.0.1", "8888", "fly"]),
        2,
        "unexpected argument 'fly'",
    );
}

#[test]
fn a_missing_or_bad_relay_list_is_a_usage_error() {
    let many: Vec<String> = (1..=17).map(|port| format!("127.0.0.1:{port}")).collect();
    let many = many.join(",");
    for name in ["peer-node", "peer-client"] {
        // The peer's other required option, so that only the relays are wrong.
        let with_dir = |args: &[&str]| -> Vec<String> {
            let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            if name == "peer-node" {
                all.extend(["--dir".to_string(), ".".to_string()]);
            }
            all
        };
        for (args, says) in [
            (with_dir(&[]), "no relay given"),
            (
                with_dir(&["127.0.0.1"]),
                "relay host 127.0.0.1 given without its port",
            ),
            (
                with_dir(&["--relay", "127.0.0.1"]),
                "\"127.0.0.1\" is not HOST:PORT",
            ),
            (
                with_dir(&["--relay", "::1:8888"]),
                "an IPv6 address goes in brackets",
            ),
            (with_dir(&["--relay", &many]), "17 relays given; at most 16"),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_clean_failure(&run(name, &args), 2, says);
        }
    }
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let relay = Server::relay(&[]);
    let out = run("relay-server", &[&relay.port(), "--bind", "127.0.0.1"]);
    assert_clean_failure(&out, 1, &format!("cannot bind 127.0.0.1:{}", relay.port()));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    let dir = tempfile::tempdir().unwrap();
    let out = run(
        "peer-node",
        &[
            "127.0.0.1",
            &relay.port(),
            "--dir",
            dir.path().to_str().unwrap(),
            "--bind",
            "127.0.0.1",
            "--port",
            &relay.port(),
        ],
    );
    assert_clean_failure(&out, 1, "cannot bind");
}

#[test]
fn a_missing_folder_is_one_clear_line() {
    let out = run(
        "peer-node",
        &["127.0.0.1", "8888", "--dir", "/no/such/folder"],
    );
    assert_clean_failure(&out, 1, "cannot use folder /no/such/folder");
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = run(
        "peer-node",
        &["127.0.0.1", "8888", "--dir", file.path().to_str().unwrap()],
    );
    assert_clean_failure(&out, 1, "not a directory");
}

#[test]
fn an_unreachable_relay_is_a_network_error() {
    let held = crate::harness::dead_port();
    let free = held.addr;
    for args in [&["peers"][..], &["get", "x.txt"], &["stats"], &[]] {
        let out = client(free, args, "");
        assert_clean_failure(
            &out,
            3,
            &format!("cannot reach relay 127.0.0.1:{}", free.port()),
        );
    }
    let out = run("peer-node", &["no-such-host.invalid", "8888", "--dir", "."]);
    assert_clean_failure(&out, 1, "cannot resolve relay no-such-host.invalid:8888");
}
