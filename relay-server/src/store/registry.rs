//! The set of live peers: soft state that expires unless refreshed, each
//! entry owned by the key that made it.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use protocol::{identity::PeerKey, PeerAddr};

use super::{Refusal, Registered};

/// Live peers with the time each was last heard from and the key that owns
/// the entry.
///
/// Peers sit in a `Vec` for O(1) random picks and removal by swap, with a
/// map from address to slot for O(1) refresh. A lookup never walks the
/// whole registry, so it stays fast with hundreds of thousands of peers.
pub struct Registry {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: Vec<Entry>,
    index: HashMap<PeerAddr, usize>,
    by_key: HashMap<PeerKey, PeerAddr>,
    /// The last request time of keys no longer listed, kept for a while
    /// so that their old signed requests cannot be replayed either.
    retired: HashMap<PeerKey, (u64, Instant)>,
}

#[derive(Clone, Copy)]
struct Entry {
    addr: PeerAddr,
    seen: Instant,
    key: PeerKey,
    /// The time in the newest signed request accepted from `key`.
    last_ts: u64,
}

impl Registry {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Registry {
            ttl,
            capacity,
            inner: Mutex::default(),
        }
    }

    /// Lists `peer` for `key`, or refreshes it; `ts` is the time in the
    /// key's signed request, which must be newer than any accepted before.
    pub fn register(&self, peer: PeerAddr, key: PeerKey, ts: u64, now: Instant) -> Registered {
        let mut inner = self.lock();
        if inner.stale(&key, ts) {
            return Registered::Replayed;
        }
        if let Some(&slot) = inner.index.get(&peer) {
            let entry = &mut inner.slots[slot];
            if entry.key != key && !self.is_expired(entry.seen, now) {
                return Registered::Taken;
            }
            let old_key = entry.key;
            *entry = Entry {
                addr: peer,
                seen: now,
                key,
                last_ts: ts,
            };
            if old_key != key {
                inner.by_key.remove(&old_key);
                return inner
                    .claim(key, peer)
                    .map_or(Registered::New, |from| Registered::Moved { from });
            }
            return Registered::Refreshed;
        }
        let moved = inner.by_key.get(&key).copied();
        if moved.is_none() && inner.slots.len() >= self.capacity {
            return Registered::Full;
        }
        let slot = inner.slots.len();
        inner.slots.push(Entry {
            addr: peer,
            seen: now,
            key,
            last_ts: ts,
        });
        inner.index.insert(peer, slot);
        inner.retired.remove(&key);
        match inner.claim(key, peer) {
            Some(from) => Registered::Moved { from },
            None => Registered::New,
        }
    }

    /// The key that owns `peer`'s entry, if it has one.
    pub fn owner(&self, peer: &PeerAddr) -> Option<PeerKey> {
        let inner = self.lock();
        inner.index.get(peer).map(|&slot| inner.slots[slot].key)
    }

    /// Forgets `peer`, when `key` owns it; returns whether it was listed.
    pub fn unregister(
        &self,
        peer: &PeerAddr,
        key: PeerKey,
        ts: u64,
        now: Instant,
    ) -> Result<bool, Refusal> {
        let mut inner = self.lock();
        if inner.stale(&key, ts) {
            return Err(Refusal::Replayed);
        }
        match inner.index.get(peer) {
            Some(&slot) if inner.slots[slot].key != key => Err(Refusal::Taken),
            Some(&slot) => {
                inner.remove_slot(slot, now);
                inner.retired.insert(key, (ts, now));
                Ok(true)
            }
            None => {
                inner.retired.insert(key, (ts, now));
                Ok(false)
            }
        }
    }

    /// Removes every peer not heard from within the TTL and returns them;
    /// forgets retired keys after `retention`.
    pub fn expire(&self, now: Instant, retention: Duration) -> Vec<PeerAddr> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let mut slot = 0;
        while slot < inner.slots.len() {
            let entry = inner.slots[slot];
            if self.is_expired(entry.seen, now) {
                inner.remove_slot(slot, now);
                expired.push(entry.addr);
            } else {
                slot += 1;
            }
        }
        inner
            .retired
            .retain(|_, (_, when)| now.saturating_duration_since(*when) < retention);
        // Bounded even under a flood of short-lived keys.
        if inner.retired.len() > self.capacity {
            inner.retired.clear();
        }
        expired
    }

    /// Up to `max` live peers with their keys, a random sample when there
    /// are more, in random order.
    pub fn sample(&self, max: usize, now: Instant) -> Vec<(PeerAddr, PeerKey)> {
        let inner = self.lock();
        let n = inner.slots.len();
        let live = |e: &Entry| (!self.is_expired(e.seen, now)).then_some((e.addr, e.key));
        if n <= max.saturating_mul(2) {
            // Small registry: shuffle everything.
            let mut peers: Vec<(PeerAddr, PeerKey)> = inner.slots.iter().filter_map(live).collect();
            fastrand::shuffle(&mut peers);
            peers.truncate(max);
            return peers;
        }
        // Large registry: rejection-sample distinct slots. With n > 2 * max,
        // each draw is fresh with probability > 1/2, so this ends quickly;
        // the attempt bound only matters when most entries are expired.
        let mut picked = std::collections::HashSet::with_capacity(max);
        let mut peers = Vec::with_capacity(max);
        for _ in 0..max * 8 {
            if peers.len() == max {
                break;
            }
            let slot = fastrand::usize(..n);
            if picked.insert(slot) {
                peers.extend(live(&inner.slots[slot]));
            }
        }
        peers
    }

    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    fn is_expired(&self, seen: Instant, now: Instant) -> bool {
        now.saturating_duration_since(seen) > self.ttl
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The registry holds no invariant a panicking holder could break
        // half-way that is worse than losing the server, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// True when `ts` is not newer than the last request accepted from `key`.
    fn stale(&self, key: &PeerKey, ts: u64) -> bool {
        let listed = self
            .by_key
            .get(key)
            .and_then(|addr| self.index.get(addr))
            .map(|&slot| self.slots[slot].last_ts);
        let retired = self.retired.get(key).map(|&(ts, _)| ts);
        listed.or(retired).is_some_and(|last| ts <= last)
    }

    /// Records that `key` is at `peer`; returns the address it left.
    fn claim(&mut self, key: PeerKey, peer: PeerAddr) -> Option<PeerAddr> {
        let from = self.by_key.insert(key, peer).filter(|&from| from != peer)?;
        if let Some(&at) = self.index.get(&from) {
            let entry = self.slots.swap_remove(at);
            self.index.remove(&entry.addr);
            if let Some(moved) = self.slots.get(at) {
                self.index.insert(moved.addr, at);
            }
        }
        Some(from)
    }

    fn remove_slot(&mut self, slot: usize, now: Instant) {
        let entry = self.slots.swap_remove(slot);
        self.index.remove(&entry.addr);
        if self.by_key.get(&entry.key) == Some(&entry.addr) {
            self.by_key.remove(&entry.key);
        }
        self.retired.insert(entry.key, (entry.last_ts, now));
        if let Some(moved) = self.slots.get(slot) {
            self.index.insert(moved.addr, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::identity::Identity;

    fn peer(port: u16) -> PeerAddr {
        PeerAddr::new([127, 0, 0, 1].into(), port).unwrap()
    }

    fn key(n: u8) -> PeerKey {
        Identity::from_seed([n; 32]).key()
    }

    const TTL: Duration = Duration::from_secs(90);
    const KEEP: Duration = Duration::from_secs(600);

    #[test]
    fn a_peer_is_listed_once() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        assert_eq!(reg.register(peer(1), key(1), 1, now), Registered::New);
        assert_eq!(reg.register(peer(1), key(1), 2, now), Registered::Refreshed);
        assert_eq!(reg.sample(50, now), vec![(peer(1), key(1))]);
    }

    #[test]
    fn only_the_owning_key_refreshes_or_removes_an_entry() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        reg.register(peer(1), key(1), 1, now);
        assert_eq!(reg.register(peer(1), key(2), 1, now), Registered::Taken);
        assert_eq!(
            reg.unregister(&peer(1), key(2), 5, now),
            Err(Refusal::Taken)
        );
        assert_eq!(reg.sample(50, now), vec![(peer(1), key(1))]);
        // Once it has expired, the address is free for another key.
        let later = now + TTL * 2;
        assert_eq!(reg.register(peer(1), key(2), 2, later), Registered::New);
        assert_eq!(reg.unregister(&peer(1), key(2), 3, later), Ok(true));
        assert_eq!(reg.len(), 0);
    }

    #[test]
    fn old_requests_cannot_be_replayed_even_after_leaving() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        reg.register(peer(1), key(1), 10, now);
        assert_eq!(reg.register(peer(1), key(1), 10, now), Registered::Replayed);
        assert_eq!(reg.register(peer(1), key(1), 9, now), Registered::Replayed);
        assert_eq!(reg.unregister(&peer(1), key(1), 11, now), Ok(true));
        // The REGISTER at 10, captured, replayed after the UNREGISTER.
        assert_eq!(reg.register(peer(1), key(1), 10, now), Registered::Replayed);
        assert_eq!(reg.len(), 0);
        assert_eq!(reg.register(peer(1), key(1), 12, now), Registered::New);
    }

    #[test]
    fn a_retired_key_is_remembered_for_the_retention_then_forgotten() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), key(1), 10, t0);
        assert_eq!(reg.unregister(&peer(1), key(1), 11, t0), Ok(true));
        // Within the retention, its old times are still refused.
        reg.expire(t0 + KEEP - Duration::from_secs(1), KEEP);
        assert_eq!(reg.register(peer(1), key(1), 11, t0), Registered::Replayed);
        // After it (when such times are outside any clock window anyway),
        // the key is forgotten: the memory is bounded by time.
        reg.expire(t0 + KEEP + Duration::from_secs(1), KEEP);
        assert_eq!(reg.register(peer(1), key(1), 5, t0), Registered::New);
    }

    #[test]
    fn the_memory_of_retired_keys_is_bounded() {
        let reg = Registry::new(TTL, 2);
        let now = Instant::now();
        for n in 1..=3u8 {
            reg.register(peer(n as u16), key(n), 10, now);
            assert_eq!(reg.unregister(&peer(n as u16), key(n), 11, now), Ok(true));
        }
        // Three retired keys, room for two: the sweep starts over.
        reg.expire(now, KEEP);
        assert_eq!(reg.register(peer(1), key(1), 5, now), Registered::New);
    }

    #[test]
    fn a_key_that_moves_leaves_its_old_address() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        reg.register(peer(1), key(1), 1, now);
        reg.register(peer(2), key(2), 1, now);
        assert_eq!(
            reg.register(peer(3), key(1), 2, now),
            Registered::Moved { from: peer(1) }
        );
        let mut listed = reg.sample(50, now);
        listed.sort();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains(&(peer(3), key(1))));
        assert!(listed.contains(&(peer(2), key(2))));
        assert_eq!(reg.unregister(&peer(2), key(2), 2, now), Ok(true));
        assert_eq!(reg.unregister(&peer(3), key(1), 3, now), Ok(true));
        assert_eq!(reg.len(), 0);
    }

    #[test]
    fn expired_peers_are_never_listed_and_are_swept() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), key(1), 1, t0);
        reg.register(peer(2), key(2), 1, t0 + Duration::from_secs(60));
        let later = t0 + Duration::from_secs(91);
        assert_eq!(reg.sample(50, later), vec![(peer(2), key(2))]);
        assert_eq!(reg.expire(later, KEEP), vec![peer(1)]);
        assert_eq!(reg.len(), 1);
        // Its old request cannot bring it back.
        assert_eq!(
            reg.register(peer(1), key(1), 1, later),
            Registered::Replayed
        );
    }

    #[test]
    fn a_peer_is_live_for_exactly_the_ttl() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), key(1), 1, t0);
        assert_eq!(reg.sample(50, t0 + TTL), vec![(peer(1), key(1))]);
        assert!(reg.expire(t0 + TTL, KEEP).is_empty());
        let past = t0 + TTL + Duration::from_millis(1);
        assert!(reg.sample(50, past).is_empty());
        assert_eq!(reg.expire(past, KEEP), vec![peer(1)]);
    }

    #[test]
    fn a_heartbeat_keeps_a_peer_alive() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), key(1), 1, t0);
        reg.register(peer(1), key(1), 2, t0 + Duration::from_secs(80));
        assert!(reg.expire(t0 + Duration::from_secs(160), KEEP).is_empty());
    }

    #[test]
    fn unregister_keeps_the_index_consistent() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        for port in 1..=5 {
            reg.register(peer(port), key(port as u8), 1, now);
        }
        assert_eq!(reg.unregister(&peer(1), key(1), 2, now), Ok(true));
        assert_eq!(reg.unregister(&peer(1), key(1), 3, now), Ok(false));
        // The peer that moved into slot 0 can still be refreshed and removed.
        for port in 2..=5 {
            let k = key(port as u8);
            assert_eq!(reg.register(peer(port), k, 2, now), Registered::Refreshed);
            assert_eq!(reg.unregister(&peer(port), k, 3, now), Ok(true));
        }
        assert_eq!(reg.len(), 0);
    }

    #[test]
    fn capacity_is_enforced() {
        let reg = Registry::new(TTL, 2);
        let now = Instant::now();
        reg.register(peer(1), key(1), 1, now);
        reg.register(peer(2), key(2), 1, now);
        assert_eq!(reg.register(peer(3), key(3), 1, now), Registered::Full);
        assert_eq!(reg.register(peer(2), key(2), 2, now), Registered::Refreshed);
        // Moving does not need room.
        assert_eq!(
            reg.register(peer(4), key(2), 3, now),
            Registered::Moved { from: peer(2) }
        );
    }

    #[test]
    fn samples_are_capped_distinct_and_live() {
        let reg = Registry::new(TTL, 100_000);
        let now = Instant::now();
        for port in 1..=10_000u16 {
            let mut seed = [0; 32];
            seed[..2].copy_from_slice(&port.to_le_bytes());
            reg.register(peer(port), Identity::from_seed(seed).key(), 1, now);
        }
        let sample = reg.sample(50, now);
        assert_eq!(sample.len(), 50);
        let distinct: std::collections::HashSet<_> = sample.iter().collect();
        assert_eq!(distinct.len(), 50);
        assert!(reg.sample(50, now + TTL * 2).is_empty());
    }

    #[test]
    fn a_half_expired_registry_still_fills_a_sample() {
        let reg = Registry::new(TTL, 100_000);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(60);
        for port in 1..=10_000u16 {
            let mut seed = [0; 32];
            seed[..2].copy_from_slice(&port.to_le_bytes());
            let at = if port % 2 == 0 { t0 } else { t1 };
            reg.register(peer(port), Identity::from_seed(seed).key(), 1, at);
        }
        // Past the TTL of the even ports only: every other draw is wasted,
        // and the attempts must still be enough to find 50 live peers
        // (they fall short with odds below 1e-40).
        let sample = reg.sample(50, t0 + Duration::from_secs(91));
        assert_eq!(sample.len(), 50);
        assert!(sample.iter().all(|(p, _)| p.port() % 2 == 1), "{sample:?}");
    }
}
