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

fn ports(holders: &[protocol::index::Holder]) -> Vec<u16> {
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
    let counters = store.counters().unwrap();
    assert!(
        counters.contains(&("lookups".to_string(), 5)),
        "{counters:?}"
    );
}

fn samples_are_distinct_live_and_reach_everyone(open: Open) {
    let store = open(LONG, 100, 10);
    for n in 1..=40u8 {
        store.register(addr(u16::from(n)), key(n), 1).unwrap();
    }
    // What a sweep does each second; the Redis store learns the size.
    store.expire().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let sample = store.sample(5).unwrap();
        assert_eq!(sample.len(), 5, "{sample:?}");
        let distinct: std::collections::HashSet<_> = sample.iter().collect();
        assert_eq!(distinct.len(), 5);
        for (a, k) in sample {
            assert_eq!(k, key(a.port() as u8));
            seen.insert(a);
        }
    }
    assert_eq!(seen.len(), 40, "some peers are never sampled");
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
    for _ in 0..50 {
        let sample = store.sample(5).unwrap();
        // The memory store's draws may hit expired slots and come short.
        assert!(!sample.is_empty());
        assert!(
            sample.iter().all(|(a, _)| a.port() > 30),
            "an expired peer was sampled: {sample:?}"
        );
    }
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
        let counters = store.counters().ok()?;
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
