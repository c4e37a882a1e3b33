//! Where the relay keeps its state: the live peers, what they hold, and the
//! counters. One small interface, [`Store`], with two implementations: in
//! memory (the default: one relay, as fast as a lock) and on Redis (several
//! relays share one network, and a relay that restarts or crashes loses
//! nothing).
//!
//! A store keeps its halves consistent itself: removing a peer, however
//! it goes (expiry, unregistration, a key that moved), removes what it
//! holds from the index in the same step.

mod index;
mod memory;
mod redis;
mod registry;
#[cfg(test)]
mod tests;

use std::{fmt, time::Duration};

use globset::GlobMatcher;
use protocol::{
    identity::PeerKey,
    index::{Holder, Holding, ListDigest, Listed},
    ContentHash, FileName, PeerAddr,
};

pub use self::redis::{RedisStore, RedisUrlError};
pub use memory::MemoryStore;

/// The most versions of one name a `WHO` reply describes.
const MAX_VERSIONS: usize = 16;
/// The most names one `LS` page looks at, matching or not, so that a
/// pattern that matches little cannot make one request walk everything.
const SCAN_BUDGET: usize = 100_000;

/// What a registration did.
#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    New,
    Refreshed,
    /// The key was listed at another address, which it leaves (with what
    /// it held there).
    Moved {
        from: PeerAddr,
    },
    /// The registry holds its capacity of peers already.
    Full,
    /// Another key's live entry holds the address.
    Taken,
    /// The request is not newer than one already accepted from this key.
    Replayed,
}

/// Why an unregistration was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Taken,
    Replayed,
}

/// Why a list was not indexed.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The index is at its cap on holdings.
    Full { max: usize },
    /// The peer's entry changed while its list was read (another relay
    /// moved or expired it): it should offer again.
    Gone,
}

/// A page of the listing.
pub struct Page {
    pub entries: Vec<Listed>,
    pub next: Option<FileName>,
}

/// The store could not be reached or did not answer: the relay says so and
/// tries again later; nothing it had accepted is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the relay's store is unavailable ({0})")]
pub struct Unavailable(pub String);

/// Every operation's result: the store's answer, or why there was none.
pub type Stored<T> = Result<T, Unavailable>;

/// The relay's state. Times are the store's own: the memory store reads
/// the monotonic clock, the Redis store the Redis server's, so that
/// relays on one Redis agree on who has expired.
pub trait Store: Send + Sync {
    /// Lists `peer` for `key`, or refreshes it; `ts` is the time in the
    /// key's signed request, which must be newer than any accepted before.
    fn register(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Registered>;
    /// Forgets `peer` and what it holds, when `key` owns it; returns
    /// whether it was listed.
    fn unregister(&self, peer: PeerAddr, key: PeerKey, ts: u64) -> Stored<Result<bool, Refusal>>;
    /// Removes the peers not heard from within the TTL, with what they
    /// hold; returns them.
    fn expire(&self) -> Stored<Vec<PeerAddr>>;
    /// Up to `max` live peers with their keys, a random sample when there
    /// are more.
    fn sample(&self, max: usize) -> Stored<Vec<(PeerAddr, PeerKey)>>;
    /// How many peers are listed.
    fn peers(&self) -> Stored<usize>;
    /// The digest of the list indexed for `peer`, if any.
    fn digest(&self, peer: PeerAddr) -> Stored<Option<ListDigest>>;
    /// Replaces what `peer` (owned by `key`) holds with `files`; returns
    /// how many it holds now.
    fn replace(
        &self,
        peer: PeerAddr,
        key: PeerKey,
        digest: ListDigest,
        files: &[Holding],
    ) -> Stored<Result<usize, Refused>>;
    /// Holders of the versions of `name`, most held first: a random sample
    /// of at most `per_version` of each.
    fn who(&self, name: &FileName, per_version: usize) -> Stored<Vec<Holder>>;
    /// Holders of the content `hash`, under whatever name.
    fn who_has(&self, hash: &ContentHash, per_version: usize) -> Stored<Vec<Holder>>;
    /// The versions of the names matching `pattern`, in name order, from
    /// after `after`: at most `MAX_REPLY_LINES` lines, a name's versions
    /// never split over two pages.
    fn list(&self, pattern: &GlobMatcher, after: Option<&FileName>) -> Stored<Page>;
    /// Holdings in the index, and distinct names.
    fn counts(&self) -> Stored<(usize, usize)>;
    /// Adds to the network's counters (a relay's counts since it last
    /// did). What a store cannot add now it keeps, and adds later, once.
    fn add_counters(&self, counts: &[(&'static str, u64)]);
    /// The network's counters (every relay's counts on this store) with
    /// this relay's not added yet; those alone while the store cannot be
    /// reached.
    fn counters(&self) -> Vec<(String, u64)>;
    /// Whether the store answers now (checked while it is unavailable).
    fn ping(&self) -> Stored<()>;
}

/// How long a key that left (unregistered or expired) is remembered, so
/// that its old signed requests fall outside the clock window before they
/// could be replayed.
const RETENTION: Duration = crate::trust::MAX_SKEW.saturating_mul(2);

/// The store `config` names, with its limits.
pub fn open(config: &crate::Config) -> Result<Box<dyn Store>, RedisUrlError> {
    Ok(match &config.store {
        StoreConfig::Memory => Box::new(MemoryStore::new(
            config.ttl,
            config.max_registered,
            config.max_holdings,
            RETENTION,
        )),
        StoreConfig::Redis(target) => {
            let store = RedisStore::new(
                target,
                config.ttl,
                config.max_registered,
                config.max_holdings,
                RETENTION,
            )?;
            // Logs a warning now if Redis is down; the relay serves anyway
            // (answering `ERR busy` until it is up).
            let _ = store.ping();
            Box::new(store)
        }
    })
}

/// Which store a relay keeps its state in.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process: lost when it stops.
    #[default]
    Memory,
    /// A Redis server, which several relays may share.
    Redis(RedisTarget),
}

/// A Redis server to keep the state in: `redis://HOST:PORT/DB`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    url: String,
    /// How long to wait for a connection, a reply, or a free pooled connection.
    pub timeout: Duration,
}

impl RedisTarget {
    /// Checks `url` (`redis://HOST[:PORT][/DB]`, or `rediss://` is refused
    /// as TLS is not built in).
    pub fn parse(url: &str) -> Result<Self, RedisUrlError> {
        self::redis::check_url(url)?;
        Ok(RedisTarget {
            url: url.to_string(),
            timeout: Duration::from_secs(2),
        })
    }

    /// The URL, without its password.
    pub fn display(&self) -> String {
        self::redis::without_password(&self.url)
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("memory"),
            StoreConfig::Redis(target) => write!(f, "{}", target.display()),
        }
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}
