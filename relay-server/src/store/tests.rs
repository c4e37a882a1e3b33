//! The same cases against both stores: what the relay relies on holds in
//! memory and on a real Redis alike. Then what only Redis does: relays
//! sharing it, and surviving it going away.

use std::time::{Duration, Instant};

use globset::GlobMatcher;
use protocol::{
    identity::{Identity, PeerKey},
    index::{Holding, ListDigest},
    FileName, PeerAddr,
};

use super::*;
use crate::testing::RedisServer;

/// Opens a store with a TTL, a capacity of peers and of holdings.
type Open<'a> = &'a dyn Fn(Duration, usize, usize) -> Box<dyn Store>;

const LONG: Duration = Duration::from_secs(60);

fn addr(port: u16) -> PeerAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn key(n: u8) -> PeerKey {
    Identity::from_seed([n; 32]).key()
}

fn holding(name: &str, content: &str) -> Holding {
    Holding {
        name: FileName::new(name).unwrap(),
        size: content.len() as u64,
        hash: blake3::hash(content.as_bytes()),
    }
}

fn offer(store: &dyn Store, port: u16, k: u8, files: &[Holding]) -> Result<usize, Refused> {
    store
        .replace(addr(port), key(k), ListDigest::of(files), files)
        .unwrap()
}

fn glob(pattern: &str) -> GlobMatcher {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .unwrap()
        .compile_matcher()
}

/// The ports of `holders`, sorted.
pub(super) fn ports(holders: &[protocol::index::Holder]) -> Vec<u16> {
    let mut ports: Vec<u16> = holders.iter().map(|h| h.addr.port()).collect();
    ports.sort();
    ports
}

fn registration_follows_the_key(open: Open) {
    let store = open(LONG, 3, 1000);
    assert_eq!(store.register(addr(1), key(1), 10), Ok(Registered::New));
    assert_eq!(
        store.register(addr(1), key(1), 11),
        Ok(Registered::Refreshed)
    );
    // Not newer than what was accepted: a replay.
    assert_eq!(
        store.register(addr(1), key(1), 11),
        Ok(Registered::Replayed)
    );
    // Another key cannot take a live entry.
    assert_eq!(store.register(addr(1), key(2), 1), Ok(Registered::Taken));
    // The key moves, and leaves its old address with what it held there.
    offer(&*store, 1, 1, &[holding("a", "x")]).unwrap();
    assert_eq!(
        store.register(addr(2), key(1), 12),
        Ok(Registered::Moved { from: addr(1) })
    );
    assert!(store
        .who(&FileName::new("a").unwrap(), 10)
        .unwrap()
        .is_empty());
    assert_eq!(store.sample(10).unwrap(), vec![(addr(2), key(1))]);
    assert_eq!(store.peers(), Ok(1));
    // Full at three peers, but a listed key may still move.
    store.register(addr(3), key(3), 1).unwrap();
    store.register(addr(4), key(4), 1).unwrap();
    assert_eq!(store.register(addr(5), key(5), 1), Ok(Registered::Full));
    assert_eq!(
        store.register(addr(5), key(4), 2),
        Ok(Registered::Moved { from: addr(4) })
    );
}

fn unregistration_is_the_owners_and_takes_the_index_along(open: Open) {
    let store = open(LONG, 10, 1000);
    store.register(addr(1), key(1), 10).unwrap();
    offer(&*store, 1, 1, &[holding("a", "x")]).unwrap();
    assert_eq!(
        store.unregister(addr(1), key(2), 10),
        Ok(Err(Refusal::Taken))
    );
    assert_eq!(
        store.unregister(addr(1), key(1), 10),
        Ok(Err(Refusal::Replayed))
    );
    assert_eq!(store.unregister(addr(1), key(1), 11), Ok(Ok(true)));
    assert_eq!(store.unregister(addr(1), key(1), 12), Ok(Ok(false)));
    assert_eq!(store.peers(), Ok(0));
    assert_eq!(store.counts(), Ok((0, 0)));
    assert_eq!(store.digest(addr(1)), Ok(None));
    // The key is remembered: its old requests stay refused.
    assert_eq!(
        store.register(addr(1), key(1), 11),
        Ok(Registered::Replayed)
    );
    assert_eq!(store.register(addr(1), key(1), 13), Ok(Registered::New));
}

fn silent_peers_expire_with_what_they_hold(open: Open) {
    // Long enough for the first steps on a loaded machine.
    let store = open(Duration::from_millis(1500), 10, 1000);
    store.register(addr(1), key(1), 10).unwrap();
    offer(&*store, 1, 1, &[holding("a", "x"), holding("b", "y")]).unwrap();
    assert_eq!(store.expire(), Ok(vec![]), "expired before its time");
    let deadline = Instant::now() + Duration::from_secs(10);
    let expired = loop {
        let expired = store.expire().unwrap();
        if !expired.is_empty() || Instant::now() > deadline {
            break expired;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(expired, vec![addr(1)]);
    assert_eq!(store.peers(), Ok(0));
    assert_eq!(store.counts(), Ok((0, 0)));
    assert!(store.list(&glob("**"), None).unwrap().entries.is_empty());
    assert_eq!(store.sample(10), Ok(vec![]));
    // Its key is remembered after it left.
    assert_eq!(
        store.register(addr(1), key(1), 10),
        Ok(Registered::Replayed)
    );
    // An expired entry is another key's to take.
    store.register(addr(2), key(2), 1).unwrap();
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(store.register(addr(2), key(3), 1), Ok(Registered::New));
}

fn the_index_answers_by_name_by_hash_and_by_pattern(open: Open) {
    let store = open(LONG, 10, 1000);
    for (port, k) in [(1, 1), (2, 2), (3, 3)] {
        store.register(addr(port), key(k), 1).unwrap();
    }
    offer(&*store, 1, 1, &[holding("a", "old"), holding("dir/b", "b")]).unwrap();
    offer(
        &*store,
        2,
        2,
        &[holding("a", "new"), holding("copy", "old")],
    )
    .unwrap();
    assert_eq!(offer(&*store, 3, 3, &[holding("a", "new")]), Ok(1));
    let a = FileName::new("a").unwrap();
    let holders = store.who(&a, 50).unwrap();
    assert_eq!(ports(&holders), [1, 2, 3]);
    // Most held version first, each line with its version's count.
    assert_eq!(holders[0].hash, blake3::hash(b"new"));
    assert_eq!(holders[0].holders, 2);
    assert_eq!(holders[2].hash, blake3::hash(b"old"));
    assert!(holders.iter().all(|h| h.key == key(h.addr.port() as u8)));
    // A sample of each version.
    assert_eq!(store.who(&a, 1).unwrap().len(), 2);
    let old = store.who_has(&blake3::hash(b"old"), 50).unwrap();
    assert_eq!(ports(&old), [1, 2]);
    assert!(old.iter().any(|h| h.name.as_str() == "copy"));
    assert_eq!(store.counts(), Ok((5, 3)));
    let listed = store.list(&glob("*"), None).unwrap();
    let names: Vec<&str> = listed.entries.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a", "a", "copy"], "`*` stays out of folders");
    assert_eq!(listed.entries[0].holders, 2);
    assert!(listed.next.is_none());
    assert_eq!(
        store.digest(addr(3)),
        Ok(Some(ListDigest::of(&[holding("a", "new")])))
    );
    // A new list replaces the old one.
    offer(&*store, 1, 1, &[holding("c", "c")]).unwrap();
    assert_eq!(ports(&store.who(&a, 50).unwrap()), [2, 3]);
    assert_eq!(store.counts(), Ok((4, 3)));
}

fn a_long_listing_comes_in_pages(open: Open) {
    let store = open(LONG, 10, 10_000);
    store.register(addr(1), key(1), 1).unwrap();
    let mut files: Vec<Holding> = (0..2500)
        .map(|i| holding(&format!("f{i:05}"), &i.to_string()))
        .collect();
    files.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    offer(&*store, 1, 1, &files).unwrap();
    let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = store.list(&glob("**"), after.as_ref()).unwrap();
        assert!(page.entries.len() <= protocol::index::MAX_REPLY_LINES);
        if page.next.is_some() {
            // As full as a reply may be: a page is never cut short.
            assert_eq!(page.entries.len(), protocol::index::MAX_REPLY_LINES);
        }
        seen.extend(page.entries.iter().map(|l| l.name.as_str().to_string()));
        pages += 1;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 10, "pages never end");
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = files.iter().map(|f| f.name.as_str().to_string()).collect();
    assert_eq!(seen, want);
}

fn a_listing_that_matches_little_stops_at_its_budget(open: Open) {
    let store = open(LONG, 100, SCAN_BUDGET + 10);
    let files: Vec<Holding> = (0..SCAN_BUDGET + 10)
        .map(|i| holding(&format!("f{i:06}"), &i.to_string()))
        .collect();
    // From 100 peers: one list this long would take Redis longer than the
    // tests' timeout.
    for (n, files) in (1..=100u8).zip(files.chunks(files.len().div_ceil(100))) {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
        offer(&*store, u16::from(n), n, files).unwrap();
    }
    // Only the last ten match: the first page has looked at as many names
    // as one request may, found none, and says where to go on.
    let pattern = glob("f1000*");
    let first = store.list(&pattern, None).unwrap();
    assert!(first.entries.is_empty());
    let next = first.next.expect("a page cut at the budget says so");
    assert_eq!(next.as_str(), format!("f{:06}", SCAN_BUDGET - 1));
    let second = store.list(&pattern, Some(&next)).unwrap();
    assert_eq!(second.entries.len(), 10);
    assert!(second.next.is_none());
}

fn a_reply_holds_at_most_max_reply_lines_holders(open: Open) {
    let store = open(LONG, 100, 2000);
    // 70 peers hold one content under 16 names: 1120 holdings of it.
    let files: Vec<Holding> = (0..16)
        .map(|i| holding(&format!("copy{i:02}"), "same"))
        .collect();
    for n in 1..=70u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
        offer(&*store, u16::from(n), n, &files).unwrap();
    }
    let holders = store.who_has(&blake3::hash(b"same"), 70).unwrap();
    assert_eq!(holders.len(), protocol::index::MAX_REPLY_LINES);
}

fn a_full_index_refuses_more(open: Open) {
    let store = open(LONG, 10, 3);
    store.register(addr(1), key(1), 1).unwrap();
    store.register(addr(2), key(2), 1).unwrap();
    offer(&*store, 1, 1, &[holding("a", "a"), holding("b", "b")]).unwrap();
    assert_eq!(
        offer(&*store, 2, 2, &[holding("c", "c"), holding("d", "d")]),
        Err(Refused::Full { max: 3 })
    );
    // Replacing its own list counts what it gives up.
    assert_eq!(
        offer(
            &*store,
            1,
            1,
            &[holding("a", "a"), holding("e", "e"), holding("f", "f")]
        ),
        Ok(3)
    );
}

fn a_changed_list_changes_what_changed(open: Open) {
    let store = open(LONG, 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    store.register(addr(2), key(2), 1).unwrap();
    let (a, b, c, d) = (
        holding("a", "a"),
        holding("b", "b"),
        holding("c", "c"),
        holding("d", "d"),
    );
    offer(&*store, 1, 1, &[a.clone(), b.clone(), c.clone()]).unwrap();
    offer(&*store, 2, 2, std::slice::from_ref(&b)).unwrap();
    // The same list again changes nothing.
    assert_eq!(
        offer(&*store, 1, 1, &[a.clone(), b.clone(), c.clone()]),
        Ok(3)
    );
    assert_eq!(store.counts(), Ok((4, 3)));
    offer(&*store, 1, 1, &[b.clone(), c.clone(), d.clone()]).unwrap();
    let who = |n: &str| ports(&store.who(&FileName::new(n).unwrap(), 10).unwrap());
    assert!(who("a").is_empty());
    assert_eq!(who("b"), [1, 2]);
    assert_eq!(who("c"), [1]);
    assert_eq!(who("d"), [1]);
    assert_eq!(store.counts(), Ok((4, 3)));
    // A version changed under the same name.
    offer(&*store, 1, 1, &[holding("b", "b2"), c, d]).unwrap();
    let b_versions = store.who(&FileName::new("b").unwrap(), 10).unwrap();
    assert_eq!(b_versions.len(), 2);
    assert!(b_versions.iter().all(|h| h.holders == 1));
    assert_eq!(store.counts(), Ok((4, 3)));
    assert_eq!(store.unregister(addr(1), key(1), 2), Ok(Ok(true)));
    assert_eq!(store.counts(), Ok((1, 1)));
    assert_eq!(who("b"), [2]);
}

fn a_new_key_at_an_address_starts_with_no_files(open: Open) {
    let store = open(Duration::from_millis(300), 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    offer(&*store, 1, 1, &[holding("a", "a")]).unwrap();
    // Only the owner's list is taken.
    assert_eq!(
        offer(&*store, 1, 2, &[holding("b", "b")]),
        Err(Refused::Gone)
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(store.register(addr(1), key(2), 1), Ok(Registered::New));
    assert!(store
        .who(&FileName::new("a").unwrap(), 10)
        .unwrap()
        .is_empty());
    assert_eq!(store.digest(addr(1)), Ok(None));
    assert_eq!(store.counts(), Ok((0, 0)));
}

fn counters_add_up(open: Open) {
    let store = open(LONG, 10, 10);
    store.add_counters(&[("lookups", 2), ("offers", 0)]);
    store.add_counters(&[("lookups", 3)]);
    let counters = store.counters();
    assert!(
        counters.contains(&("lookups".to_string(), 5)),
        "{counters:?}"
    );
}

fn samples_are_distinct_live_and_reach_everyone(open: Open) {
    let store = open(LONG, 100, 10);
    // Fewer than twice the sample, then many more.
    for (peers, tries) in [(9, 100), (40, 300)] {
        for n in 1..=peers {
            store.register(addr(u16::from(n)), key(n), 1).unwrap();
        }
        // What a sweep does each second.
        store.expire().unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..tries {
            let sample = store.sample(5).unwrap();
            assert_eq!(sample.len(), 5, "{sample:?}");
            let distinct: std::collections::HashSet<_> = sample.iter().collect();
            assert_eq!(distinct.len(), 5);
            for (a, k) in sample {
                assert_eq!(k, key(a.port() as u8));
                seen.insert(a);
            }
        }
        assert_eq!(
            seen.len(),
            usize::from(peers),
            "some peers are never sampled"
        );
    }
}

fn samples_are_full_when_enough_are_live(open: Open) {
    let store = open(LONG, 200, 10);
    for n in 1..=110u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    for _ in 0..200 {
        assert_eq!(store.sample(50).unwrap().len(), 50);
    }
}

fn samples_leave_out_the_expired_before_any_sweep(open: Open) {
    // Long enough for the fresh peers to outlive the samples when loaded.
    let store = open(Duration::from_millis(1500), 100, 10);
    for n in 1..=30u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1700));
    for n in 31..=40u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let sample = store.sample(5).unwrap();
        // The memory store's draws may hit expired slots and come short.
        assert!(!sample.is_empty());
        assert!(
            sample.iter().all(|(a, _)| a.port() > 30),
            "an expired peer was sampled: {sample:?}"
        );
        seen.extend(sample.into_iter().map(|(a, _)| a));
    }
    // The live ones right after the expired too.
    assert_eq!(seen.len(), 10, "some live peers are never sampled");
}

/// Each case as a test of each store; Redis tests skip (saying so) where
/// redis-server is not installed.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[test]
                fn $case() {
                    super::$case(&|ttl, capacity, max_holdings| {
                        Box::new(super::MemoryStore::new(ttl, capacity, max_holdings, super::LONG))
                    });
                }
            )*
        }
        mod redis_store {
            $(
                #[test]
                fn $case() {
                    let Some(redis) = super::RedisServer::start(stringify!($case)) else {
                        return;
                    };
                    super::$case(&|ttl, capacity, max_holdings| {
                        Box::new(super::on(&redis, ttl, capacity, max_holdings))
                    });
                }
            )*
        }
    };
}

on_both_stores!(
    registration_follows_the_key,
    unregistration_is_the_owners_and_takes_the_index_along,
    silent_peers_expire_with_what_they_hold,
    the_index_answers_by_name_by_hash_and_by_pattern,
    a_long_listing_comes_in_pages,
    a_listing_that_matches_little_stops_at_its_budget,
    a_reply_holds_at_most_max_reply_lines_holders,
    a_full_index_refuses_more,
    counters_add_up,
    a_new_key_at_an_address_starts_with_no_files,
    a_changed_list_changes_what_changed,
    samples_are_distinct_live_and_reach_everyone,
    samples_leave_out_the_expired_before_any_sweep,
    samples_are_full_when_enough_are_live,
);

fn target(url: &str) -> RedisTarget {
    let mut target = RedisTarget::parse(url).unwrap();
    target.timeout = Duration::from_millis(500);
    target
}

fn on(redis: &RedisServer, ttl: Duration, capacity: usize, max_holdings: usize) -> RedisStore {
    RedisStore::new(&target(&redis.url()), ttl, capacity, max_holdings, LONG).unwrap()
}

#[test]
fn two_relays_on_one_redis_share_peers_and_index() {
    let Some(redis) = RedisServer::start("two_relays_on_one_redis_share_peers_and_index") else {
        return;
    };
    let (a, b) = (on(&redis, LONG, 10, 100), on(&redis, LONG, 10, 100));
    a.register(addr(1), key(1), 1).unwrap();
    offer(&a, 1, 1, &[holding("a", "x")]).unwrap();
    assert_eq!(b.sample(10), Ok(vec![(addr(1), key(1))]));
    assert_eq!(
        ports(&b.who(&FileName::new("a").unwrap(), 10).unwrap()),
        [1]
    );
    // Replay protection is the network's: what A accepted, B refuses.
    assert_eq!(b.register(addr(1), key(1), 1), Ok(Registered::Replayed));
    assert_eq!(b.register(addr(1), key(1), 2), Ok(Registered::Refreshed));
    drop(a);
    assert_eq!(b.peers(), Ok(1), "a relay gone takes nothing with it");
}

#[test]
fn what_redis_accepted_survives_its_restart() {
    let Some(mut redis) = RedisServer::start("what_redis_accepted_survives_its_restart") else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    offer(&store, 1, 1, &[holding("a", "x")]).unwrap();
    // Connections in the pool, all dead once Redis is killed.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| (0..20).for_each(|_| drop(store.peers())));
        }
    });
    redis.kill();
    redis.restart();
    // Whatever the backoff left to wait, the store answers again soon.
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.ping().is_err() {
        assert!(Instant::now() < deadline, "the store never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Once it answers, no dead connection of before is used again.
    for _ in 0..20 {
        assert_eq!(store.sample(10), Ok(vec![(addr(1), key(1))]));
    }
    assert_eq!(store.counts(), Ok((1, 1)));
}

#[test]
fn an_unavailable_redis_fails_fast_then_recovers() {
    let Some(mut redis) = RedisServer::start("an_unavailable_redis_fails_fast_then_recovers")
    else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    redis.stop();
    let first = store.peers().unwrap_err();
    // Why, without where: the reply goes to anyone who asks.
    assert!(!first.0.contains(&redis.url()[8..]), "{first}");
    assert!(first.0.contains("connection"), "{first}");
    // While the backoff runs, no connection is tried: the answer is at
    // once (a slow machine may miss the first window: a few tries).
    let quick = (0..5).find_map(|_| {
        let started = Instant::now();
        let e = store.peers().unwrap_err();
        e.0.contains("next try in").then(|| started.elapsed())
    });
    let quick = quick.expect("no call was answered from the backoff");
    assert!(quick < Duration::from_millis(100), "took {quick:?}");
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.peers().is_err() {
        assert!(Instant::now() < deadline, "the store never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(store.peers(), Ok(1));
}

/// How many times Redis ran `command` (lowercase), from INFO commandstats.
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let info = redis.query(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

#[test]
fn an_idle_sweep_and_a_full_sample_cost_one_round_trip() {
    let Some(redis) = RedisServer::start("an_idle_sweep_and_a_full_sample_cost_one_round_trip")
    else {
        return;
    };
    let store = on(&redis, LONG, 100, 100);
    for n in 1..=20u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    // Scripts loaded, and the sample's counts learnt.
    store.expire().unwrap();
    store.sample(5).unwrap();
    let (sweeps, samples) = (calls(&redis, "evalsha"), calls(&redis, "zcard"));
    assert_eq!(store.expire(), Ok(vec![]));
    assert_eq!(
        calls(&redis, "evalsha"),
        sweeps + 1,
        "more than one sweep script"
    );
    assert_eq!(store.sample(5).unwrap().len(), 5);
    assert_eq!(
        calls(&redis, "zcard"),
        samples + 1,
        "the sample was drawn twice"
    );
    // Nothing to count: nothing sent.
    store.add_counters(&[("lookups", 0), ("offers", 0)]);
    assert_eq!(
        calls(&redis, "evalsha"),
        sweeps + 1,
        "counts of nothing sent"
    );
    assert!(store.counters().is_empty());
}

#[test]
fn a_listing_skips_what_another_program_wrote() {
    let Some(redis) = RedisServer::start("a_listing_skips_what_another_program_wrote") else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    offer(&store, 1, 1, &[holding("a", "a")]).unwrap();
    // A version nobody holds, and one that does not parse, last.
    let hash = blake3::hash(b"x").to_string();
    redis.query(&["SADD", "rp2p:n:x", &format!("1 {hash}")]);
    redis.query(&["SADD", "rp2p:n:y", "junk"]);
    redis.query(&["ZADD", "rp2p:names", "0", "x", "0", "y"]);
    let page = store.list(&glob("*"), None).unwrap();
    let names: Vec<&str> = page.entries.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a"]);
    assert!(page.next.is_none());
}

#[test]
fn peers_that_leave_leave_nothing_behind_but_their_keys_last_times() {
    let Some(redis) =
        RedisServer::start("peers_that_leave_leave_nothing_behind_but_their_keys_last_times")
    else {
        return;
    };
    let store = on(&redis, Duration::from_millis(300), 10, 100);
    store.register(addr(1), key(1), 1).unwrap();
    store.register(addr(2), key(2), 1).unwrap();
    let shared = holding("shared", "s");
    offer(&store, 1, 1, &[holding("copy", "s"), shared.clone()]).unwrap();
    offer(&store, 2, 2, &[holding("own", "o"), shared]).unwrap();
    // One unregisters, the other goes silent and expires; a third key,
    // never seen, unregisters an address nobody holds.
    assert_eq!(store.unregister(addr(1), key(1), 2), Ok(Ok(true)));
    assert_eq!(store.unregister(addr(3), key(3), 2), Ok(Ok(false)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.expire().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut con = ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let mut left: Vec<String> = ::redis::cmd("KEYS").arg("rp2p:*").query(&mut con).unwrap();
    left.sort();
    let k = |n: u8| format!("rp2p:k:{}", key(n));
    // No record of a key never seen: unsigned noise must not fill Redis.
    let mut want = vec!["rp2p:holdings".to_string(), k(1), k(2)];
    want.sort();
    assert_eq!(left, want);
    assert_eq!(redis.query(&["GET", "rp2p:holdings"]), "0");
    for n in [1, 2] {
        // The time of its last request, and no longer where it was...
        let fields: Vec<String> = ::redis::cmd("HKEYS").arg(k(n)).query(&mut con).unwrap();
        assert_eq!(fields, ["ts"], "{}", k(n));
        // ...for a while only.
        let ttl: i64 = redis.query(&["PTTL", &k(n)]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 60_300, "{}: {ttl}", k(n));
    }
}

#[test]
fn an_offer_for_an_entry_that_is_gone_is_refused() {
    let Some(redis) = RedisServer::start("an_offer_for_an_entry_that_is_gone_is_refused") else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    // Not listed (another relay expired it meanwhile, say).
    assert_eq!(
        offer(&store, 1, 1, &[holding("a", "a")]),
        Err(Refused::Gone)
    );
    // Listed for another key.
    store.register(addr(1), key(2), 1).unwrap();
    assert_eq!(
        offer(&store, 1, 1, &[holding("a", "a")]),
        Err(Refused::Gone)
    );
    assert_eq!(store.counts(), Ok((0, 0)));
}

#[test]
fn a_mass_expiry_is_swept_at_once_in_batches() {
    let Some(redis) = RedisServer::start("a_mass_expiry_is_swept_at_once_in_batches") else {
        return;
    };
    let store = on(&redis, Duration::from_millis(200), 1000, 100);
    // The script loaded.
    assert_eq!(store.expire(), Ok(vec![]));
    for n in 1..=250u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    // Until every one of them has expired (a sample leaves them out).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store.sample(10).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    let scripts = calls(&redis, "evalsha");
    let mut expired = store.expire().unwrap();
    expired.sort();
    expired.dedup();
    assert_eq!(expired.len(), 250, "not all expired peers were swept");
    assert_eq!(calls(&redis, "evalsha"), scripts + 3, "batches of 100");
    assert_eq!(store.peers(), Ok(0));
}

#[test]
fn an_unregistration_elsewhere_does_not_cut_a_listed_keys_memory() {
    let Some(redis) =
        RedisServer::start("an_unregistration_elsewhere_does_not_cut_a_listed_keys_memory")
    else {
        return;
    };
    // A retention much shorter than the TTL.
    let retention = Duration::from_millis(200);
    let store = RedisStore::new(&target(&redis.url()), LONG, 10, 100, retention).unwrap();
    store.register(addr(2), key(1), 1).unwrap();
    assert_eq!(store.unregister(addr(1), key(1), 2), Ok(Ok(false)));
    std::thread::sleep(retention * 2);
    // Still known to be listed at 2: a move, not a second listing.
    assert_eq!(
        store.register(addr(3), key(1), 3),
        Ok(Registered::Moved { from: addr(2) })
    );
    assert_eq!(store.peers(), Ok(1));
}

#[test]
fn after_a_backoff_one_call_tries_redis_and_the_others_do_not_wait() {
    let Some(mut redis) =
        RedisServer::start("after_a_backoff_one_call_tries_redis_and_the_others_do_not_wait")
    else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    store.peers().unwrap();
    redis.stop();
    assert!(store.peers().is_err());
    // The first backoff (250 ms) is over.
    std::thread::sleep(Duration::from_millis(400));
    let slow = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let started = Instant::now();
                assert!(store.peers().is_err());
                // The store's timeout is 500 ms here: a try waits it out.
                if started.elapsed() >= Duration::from_millis(450) {
                    slow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert!(
        slow.into_inner() <= 1,
        "more than one call waited for Redis"
    );
}

#[test]
fn counts_whose_reply_was_lost_are_added_once() {
    let Some(redis) = RedisServer::start("counts_whose_reply_was_lost_are_added_once") else {
        return;
    };
    let store = on(&redis, LONG, 10, 100);
    store.add_counters(&[("lookups", 1)]);
    redis.freeze();
    // Sent, and carried out once Redis goes on, but the reply is too late.
    store.add_counters(&[("lookups", 5)]);
    redis.thaw();
    store.add_counters(&[("lookups", 1)]);
    let lookups = |store: &RedisStore| -> Option<u64> {
        let counters = store.counters();
        Some(
            counters
                .iter()
                .filter(|(k, _)| k == "lookups")
                .map(|(_, v)| *v)
                .sum(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    // While the fate of the batch is unknown it shows twice; then once.
    while lookups(&store) != Some(7) {
        assert!(Instant::now() < deadline, "lookups: {:?}", lookups(&store));
        std::thread::sleep(Duration::from_millis(100));
        store.add_counters(&[]);
    }
    assert_eq!(redis.query(&["HGET", "rp2p:stats", "lookups"]), "7");
}

#[test]
fn urls_are_checked_and_passwords_kept_out_of_logs() {
    assert!(RedisTarget::parse("redis://127.0.0.1:6379/0").is_ok());
    assert!(RedisTarget::parse("http://127.0.0.1:6379").is_err());
    assert!(RedisTarget::parse("redis://127.0.0.1:notaport/0").is_err());
    let target = RedisTarget::parse("redis://user:secret@10.0.0.1:6379/2").unwrap();
    assert_eq!(target.display(), "redis://user:***@10.0.0.1:6379/2");
    let err = RedisTarget::parse("redis://:secret@host:bad/0").unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
    assert!(RedisTarget::parse("redis+unix:///run/redis/redis.sock").is_ok());
    let err = RedisTarget::parse("http://127.0.0.1:6379").unwrap_err();
    assert!(err.to_string().contains("expected redis://"), "{err}");
    // The configuration as logged: the store, never its password.
    assert_eq!(
        format!("{:?}", StoreConfig::Redis(target.clone())),
        "redis://user:***@10.0.0.1:6379/2"
    );
    assert_eq!(format!("{target:?}"), "redis://user:***@10.0.0.1:6379/2");
    assert_eq!(format!("{:?}", StoreConfig::Memory), "memory");
    // An @ in the password: the URL's rules, not the first @.
    let target = RedisTarget::parse("redis://u:p@ss@10.0.0.1:6379/0").unwrap();
    assert!(!target.display().contains("ss@"), "{}", target.display());
    let target = RedisTarget::parse("redis+unix:///tmp/r.sock?db=1&pass=topsecret").unwrap();
    assert!(
        !target.display().contains("topsecret"),
        "{}",
        target.display()
    );
}
