//! Relays that keep their state on a real redis-server (started by each
//! test on a free port, stopped afterwards): several relays serve one
//! network, a relay restarted or killed loses nothing, and Redis going
//! away and coming back is survived by relays and peers alike.

use std::{net::SocketAddr, time::Duration};

use relay_server::{testing::RedisServer, RedisTarget, StoreConfig};

use crate::harness::*;

/// A relay in this process on the test's Redis.
fn relay_on(redis: &RedisServer) -> Server {
    Server::relay_here(|c| c.store = store(redis))
}

fn store(redis: &RedisServer) -> StoreConfig {
    let mut target = RedisTarget::parse(&redis.url()).expect("redis url");
    target.timeout = Duration::from_millis(500);
    StoreConfig::Redis(target)
}

fn folder_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write file");
    }
    dir
}

/// What `get NAME` through `relay` prints, with the exit code.
fn get(relay: SocketAddr, name: &str) -> (Option<i32>, String) {
    let out = client(relay, &["get", name], "");
    (out.status.code(), stdout(&out))
}

#[test]
fn two_relays_on_one_redis_serve_one_network() {
    let Some(redis) = RedisServer::start("two_relays_on_one_redis_serve_one_network") else {
        return;
    };
    let (mut a, b) = (relay_on(&redis), relay_on(&redis));
    let dir = folder_with(&[("song.txt", "la la la\n")]);
    // The peer knows relay A only.
    let peer = Server::peer_here(a.addr, dir.path(), |_| {});
    eventually("the peer's file is indexed", || {
        stat(b.addr, "holdings") == 1
    });
    assert_eq!(live_peers(b.addr), vec![peer_addr(&peer)]);
    assert_eq!(get(b.addr, "song.txt"), (Some(0), "la la la\n".into()));
    let listing = stdout(&client(b.addr, &["ls"], ""));
    assert!(listing.contains("song.txt"), "{listing}");
    // A gone: B still knows everything A was told.
    a.stop_here();
    assert_eq!(live_peers(b.addr), vec![peer_addr(&peer)]);
    assert_eq!(get(b.addr, "song.txt"), (Some(0), "la la la\n".into()));
    // The network's counters: A's registrations are counted on B.
    assert!(stat(b.addr, "registrations") >= 1);
}

#[test]
fn a_relay_killed_and_started_again_has_lost_nothing() {
    let Some(redis) = RedisServer::start("a_relay_killed_and_started_again_has_lost_nothing")
    else {
        return;
    };
    let url = redis.url();
    let mut relay = Server::relay(&["--store", &url]);
    let dir = folder_with(&[("kept.txt", "still here\n")]);
    // A peer that will not speak again during the test: what the relay
    // knows after its restart can only come from Redis.
    let peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_secs(3600);
    });
    eventually("the peer's file is indexed", || {
        stat(relay.addr, "holdings") == 1
    });
    relay.signal("KILL");
    relay.wait_exit();
    let again = Server::relay(&["--store", &url]);
    assert_eq!(live_peers(again.addr), vec![peer_addr(&peer)]);
    assert_eq!(
        get(again.addr, "kept.txt"),
        (Some(0), "still here\n".into())
    );
}

#[test]
fn redis_stopped_and_started_while_peers_heartbeat() {
    let Some(mut redis) = RedisServer::start("redis_stopped_and_started_while_peers_heartbeat")
    else {
        return;
    };
    let relay = Server::relay(&["--store", &redis.url()]);
    let dir = folder_with(&[("a.txt", "aaa\n")]);
    let peer = Server::peer_here(relay.addr, dir.path(), |c| {
        c.heartbeat = Duration::from_millis(300);
    });
    eventually("the peer's file is indexed", || {
        stat(relay.addr, "holdings") == 1
    });
    redis.stop();
    // The relay says what is wrong, in one line, and asks to retry.
    let reply = String::from_utf8_lossy(&raw_exchange(relay.addr, b"RP2P/1 PEERS\n")).to_string();
    assert!(
        reply.starts_with("ERR busy retry-after 1 the relay's store is unavailable ("),
        "{reply}"
    );
    assert_eq!(reply.lines().count(), 1, "{reply}");
    let out = client(relay.addr, &["get", "a.txt"], "");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("store is unavailable"),
        "{}",
        stderr(&out)
    );
    eventually("the relay logs the outage", || {
        relay.log().contains("is unavailable")
    });
    redis.restart();
    eventually("the relay answers again with the peer", || {
        live_peers(relay.addr) == vec![peer_addr(&peer)]
    });
    assert_eq!(get(relay.addr, "a.txt"), (Some(0), "aaa\n".into()));
    assert!(relay.log().contains("answers again"), "{}", relay.log());
    // The outage is counted.
    assert!(stat(relay.addr, "store_unavailable") >= 1);
}

#[test]
fn a_frozen_redis_costs_a_request_one_store_timeout() {
    let Some(redis) = RedisServer::start("a_frozen_redis_costs_a_request_one_store_timeout") else {
        return;
    };
    // The store's timeout is half a second here (`store` above).
    let relay = relay_on(&redis);
    // Answered from Redis once: the pool holds a connection to it.
    assert!(raw_exchange(relay.addr, b"RP2P/1 PEERS\n").starts_with(b"PEERS 0\n"));
    redis.freeze();
    let started = std::time::Instant::now();
    let reply = String::from_utf8_lossy(&raw_exchange(relay.addr, b"RP2P/1 PEERS\n")).to_string();
    let waited = started.elapsed();
    assert!(reply.starts_with("ERR busy retry-after 1 "), "{reply}");
    assert!(reply.contains("timed out"), "{reply}");
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    // While the backoff runs, requests are answered at once, without
    // trying Redis (a slow machine may miss the first window: a few tries).
    let quick = (0..5).find_map(|_| {
        let started = std::time::Instant::now();
        let reply = raw_exchange(relay.addr, b"RP2P/1 PEERS\n");
        let reply = String::from_utf8_lossy(&reply).to_string();
        assert!(reply.starts_with("ERR busy retry-after 1 "), "{reply}");
        reply.contains("next try in").then(|| started.elapsed())
    });
    let quick = quick.expect("no request was answered from the backoff");
    assert!(quick < Duration::from_millis(300), "took {quick:?}");
    redis.thaw();
    eventually("the relay answers again", || {
        raw_exchange(relay.addr, b"RP2P/1 PEERS\n").starts_with(b"PEERS 0")
    });
}

/// The address a peer in this process is listed at.
fn peer_addr(peer: &Server) -> protocol::PeerAddr {
    peer.addr.to_string().parse().expect("a peer address")
}
