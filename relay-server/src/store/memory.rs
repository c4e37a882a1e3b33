//! The store in this process: the registry and the index side by side,
//! kept in step here. Never unavailable; lost when the relay stops.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use globset::GlobMatcher;
use protocol::{
    identity::PeerKey,
    index::{Holder, Holding, ListDigest},
    ContentHash, FileName, PeerAddr,
};

use super::{index::Index, registry::Registry, Page, Refusal, Refused, Registered, Store, Stored};

/// The registry and the index of one relay.
pub struct MemoryStore {
    registry: Registry,
    index: Index,
    /// How long a key that left is remembered against replays.
    retention: Duration,
    counters: Mutex<BTreeMap<&'static str, u64>>,
}

impl MemoryStore {
    /// A store that forgets peers after `ttl`, holds at most `capacity`
    /// of them and `max_holdings` holdings, and remembers the last request
    /// time of keys that left for `retention`.
    pub fn new(ttl: Duration, capacity: usize, max_holdings: usize, retention: Duration) -> Self {
        MemoryStore {
            registry: Registry::new(ttl, capacity),
            index: Index::new(max_holdings),
            retention,
            counters: Mutex::default(),
        }
    }
}

impl Store for MemoryStore {
    fn register(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Registered> {
        let registered = self.registry.register(peer, key, ts, Instant::now());
        match registered {
            // A new entry starts with no files, even where another key's
            // expired entry was; a key that moves takes none along.
            Registered::New => self.index.remove(&peer),
            Registered::Moved { from } => {
                self.index.remove(&peer);
                self.index.remove(&from);
            }
            _ => {}
        }
        Ok(registered)
    }

    fn unregister(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Result<bool, Refusal>> {
        let removed = self.registry.unregister(&peer, key, ts, Instant::now());
        if removed.is_ok() {
            self.index.remove(&peer);
        }
        Ok(removed)
    }

    fn expire(&self) -> Stored<Vec<PeerAddr>> {
        let expired = self.registry.expire(Instant::now(), self.retention);
        for peer in &expired {
            self.index.remove(peer);
        }
        Ok(expired)
    }

    fn sample(&self, max: usize) -> Stored<Vec<(PeerAddr, PeerKey)>> {
        Ok(self.registry.sample(max, Instant::now()))
    }

    fn peers(&self) -> Stored<usize> {
        Ok(self.registry.len())
    }

    fn digest(&self, peer: PeerAddr) -> Stored<Option<ListDigest>> {
        Ok(self.index.digest(&peer))
    }

    fn replace(
        &self,
        peer: PeerAddr,
        key: PeerKey,
        digest: ListDigest,
        files: &[Holding],
    ) -> Stored<Result<usize, Refused>> {
        // Only for the key that owns the entry (it may have moved since).
        if self.registry.owner(&peer) != Some(key) {
            return Ok(Err(Refused::Gone));
        }
        Ok(self.index.replace(peer, key, digest, files))
    }

    fn who(&self, name: &FileName, per_version: usize) -> Stored<Vec<Holder>> {
        Ok(self.index.who(name, per_version))
    }

    fn who_has(&self, hash: &ContentHash, per_version: usize) -> Stored<Vec<Holder>> {
        Ok(self.index.who_has(hash, per_version))
    }

    fn list(&self, pattern: &GlobMatcher, after: Option<&FileName>) -> Stored<Page> {
        Ok(self.index.list(pattern, after))
    }

    fn counts(&self) -> Stored<(usize, usize)> {
        Ok(self.index.counts())
    }

    fn add_counters(&self, counts: &[(&'static str, u64)]) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        for &(name, n) in counts {
            *counters.entry(name).or_default() += n;
        }
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn ping(&self) -> Stored<()> {
        Ok(())
    }
}
