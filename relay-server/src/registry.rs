//! The set of live peers: soft state that expires unless refreshed.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use protocol::PeerAddr;

/// Live peers with the time each was last heard from.
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
    slots: Vec<(PeerAddr, Instant)>,
    index: HashMap<PeerAddr, usize>,
}

/// What a registration did.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    New,
    Refreshed,
    /// The registry holds `capacity` peers already.
    Full,
}

impl Registry {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Registry {
            ttl,
            capacity,
            inner: Mutex::default(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Adds `peer` or refreshes its last-seen time; a peer is never listed twice.
    pub fn register(&self, peer: PeerAddr, now: Instant) -> Registered {
        let mut inner = self.lock();
        if let Some(&slot) = inner.index.get(&peer) {
            inner.slots[slot].1 = now;
            return Registered::Refreshed;
        }
        if inner.slots.len() >= self.capacity {
            return Registered::Full;
        }
        let slot = inner.slots.len();
        inner.slots.push((peer, now));
        inner.index.insert(peer, slot);
        Registered::New
    }

    /// Forgets `peer`; returns whether it was listed.
    pub fn unregister(&self, peer: &PeerAddr) -> bool {
        let mut inner = self.lock();
        match inner.index.get(peer) {
            Some(&slot) => {
                inner.remove_slot(slot);
                true
            }
            None => false,
        }
    }

    /// Removes every peer not heard from within the TTL and returns them.
    pub fn expire(&self, now: Instant) -> Vec<PeerAddr> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let mut slot = 0;
        while slot < inner.slots.len() {
            let (peer, seen) = inner.slots[slot];
            if self.is_expired(seen, now) {
                inner.remove_slot(slot);
                expired.push(peer);
            } else {
                slot += 1;
            }
        }
        expired
    }

    /// Up to `max` live peers, a random sample when there are more, in random order.
    pub fn sample(&self, max: usize, now: Instant) -> Vec<PeerAddr> {
        let inner = self.lock();
        let n = inner.slots.len();
        let live =
            |&(peer, seen): &(PeerAddr, Instant)| (!self.is_expired(seen, now)).then_some(peer);
        if n <= max.saturating_mul(2) {
            // Small registry: shuffle everything.
            let mut peers: Vec<PeerAddr> = inner.slots.iter().filter_map(live).collect();
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
    fn remove_slot(&mut self, slot: usize) {
        let (peer, _) = self.slots.swap_remove(slot);
        self.index.remove(&peer);
        if let Some(&(moved, _)) = self.slots.get(slot) {
            self.index.insert(moved, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> PeerAddr {
        PeerAddr::new([127, 0, 0, 1].into(), port).unwrap()
    }

    const TTL: Duration = Duration::from_secs(90);

    #[test]
    fn a_peer_is_listed_once() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        assert_eq!(reg.register(peer(1), now), Registered::New);
        assert_eq!(reg.register(peer(1), now), Registered::Refreshed);
        assert_eq!(reg.sample(50, now), vec![peer(1)]);
    }

    #[test]
    fn expired_peers_are_never_listed_and_are_swept() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), t0);
        reg.register(peer(2), t0 + Duration::from_secs(60));
        let later = t0 + Duration::from_secs(91);
        assert_eq!(reg.sample(50, later), vec![peer(2)]);
        assert_eq!(reg.expire(later), vec![peer(1)]);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn a_peer_is_live_for_exactly_the_ttl() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), t0);
        assert_eq!(reg.sample(50, t0 + TTL), vec![peer(1)]);
        assert!(reg.expire(t0 + TTL).is_empty());
        let past = t0 + TTL + Duration::from_millis(1);
        assert!(reg.sample(50, past).is_empty());
        assert_eq!(reg.expire(past), vec![peer(1)]);
    }

    #[test]
    fn a_heartbeat_keeps_a_peer_alive() {
        let reg = Registry::new(TTL, 10);
        let t0 = Instant::now();
        reg.register(peer(1), t0);
        reg.register(peer(1), t0 + Duration::from_secs(80));
        assert!(reg.expire(t0 + Duration::from_secs(160)).is_empty());
    }

    #[test]
    fn unregister_keeps_the_index_consistent() {
        let reg = Registry::new(TTL, 10);
        let now = Instant::now();
        for port in 1..=5 {
            reg.register(peer(port), now);
        }
        assert!(reg.unregister(&peer(1)));
        assert!(!reg.unregister(&peer(1)));
        // The peer that moved into slot 0 can still be refreshed and removed.
        for port in 2..=5 {
            assert_eq!(reg.register(peer(port), now), Registered::Refreshed);
            assert!(reg.unregister(&peer(port)));
        }
        assert_eq!(reg.len(), 0);
    }

    #[test]
    fn capacity_is_enforced() {
        let reg = Registry::new(TTL, 2);
        let now = Instant::now();
        reg.register(peer(1), now);
        reg.register(peer(2), now);
        assert_eq!(reg.register(peer(3), now), Registered::Full);
        assert_eq!(reg.register(peer(2), now), Registered::Refreshed);
    }

    #[test]
    fn samples_are_capped_distinct_and_live() {
        let reg = Registry::new(TTL, 100_000);
        let now = Instant::now();
        for port in 1..=10_000 {
            reg.register(peer(port), now);
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
        for port in 1..=10_000 {
            reg.register(peer(port), if port % 2 == 0 { t0 } else { t1 });
        }
        // Past the TTL of the even ports only: every other draw is wasted,
        // and the attempts must still be enough to find 50 live peers
        // (they fall short with odds below 1e-40).
        let sample = reg.sample(50, t0 + Duration::from_secs(91));
        assert_eq!(sample.len(), 50);
        assert!(sample.iter().all(|p| p.port() % 2 == 1), "{sample:?}");
    }
}
