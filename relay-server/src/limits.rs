//! Fair limits per source address: no host may take the relay for itself.
//!
//! Each source ([`source_key`]: an IPv4 address, or an IPv6 /64) has two
//! token buckets, one for requests that change the registry (REGISTER,
//! ANNOUNCE, OFFER, UNREGISTER) and one for lookups (PEERS, PEERS LONG,
//! WHO, WHOHAS, LS, STATS), and may have at most so many peers registered. Without
//! them, one host registering fake peers at 6,500-10,000 a second filled
//! the 250,000-entry registry in half a minute. A refusal is
//! `ERR busy retry-after <secs> ...`, which the client and the peer honour.
//!
//! The count of peers per source is kept here, from the requests seen,
//! rather than in the registry: a source is charged for each distinct
//! peer address it has registered, announced or offered in the last TTL,
//! and given it back when it unregisters that address or stays silent
//! about it for the TTL, as the registry forgets peers.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use netkit::server::{is_exempt, source_key};
use protocol::{relay::Request, ErrorReply, PeerAddr};

/// Most sources whose buckets are kept. Past it the idle ones (full
/// buckets: no different from new ones) and then the least recently seen
/// are forgotten; a new source is never turned away for want of room.
const MAX_SOURCES: usize = 100_000;
/// Longest retry-after a rate gives (a tiny rate would ask for ages).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The limits each source address is held to. `0` turns a rate or a cap off.
#[derive(Clone, Debug)]
pub struct SourceLimits {
    /// Loopback sources are held to none of these (nor to the connection
    /// cap): one machine may run a whole test network.
    pub exempt_loopback: bool,
    /// Registrations, announcements, offers and unregistrations a second.
    pub write_rate: f64,
    /// How many of those may come at once after a quiet spell.
    pub write_burst: u32,
    /// Lookups (PEERS, PEERS LONG, WHO, WHOHAS, LS, STATS) a second.
    pub read_rate: f64,
    /// How many of those may come at once after a quiet spell.
    pub read_burst: u32,
    /// Most peers registered from one source.
    pub max_peers_per_ip: usize,
    /// Most connections open at once from one source.
    pub max_connections_per_ip: usize,
}

impl Default for SourceLimits {
    /// Room for an office of 100 peers behind one NAT: all starting at
    /// once (an ANNOUNCE and an OFFER each) fit in the write burst, their
    /// heartbeats (one every 30 s each) take a sixth of the write rate.
    fn default() -> Self {
        SourceLimits {
            exempt_loopback: true,
            write_rate: 20.0,
            write_burst: 200,
            read_rate: 100.0,
            read_burst: 400,
            max_peers_per_ip: 256,
            max_connections_per_ip: 64,
        }
    }
}

/// A request turned away, with its reply and its log summary.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) reply: ErrorReply,
    pub(crate) summary: String,
}

/// The limits and what they keep count of.
pub(crate) struct Limiter {
    limits: SourceLimits,
    /// How long a peer stays charged to its source without a word.
    ttl: Duration,
    max_sources: usize,
    /// Most (source, peer) pairs counted: as many peers as the registry
    /// holds. Past it new pairs pass uncounted, as the registry is then
    /// full anyway.
    max_claims: usize,
    inner: Mutex<Inner>,
    refused_writes: AtomicU64,
    refused_reads: AtomicU64,
    refused_peers: AtomicU64,
}

#[derive(Default)]
struct Inner {
    sources: HashMap<IpAddr, Buckets>,
    /// Each peer address a source has named, and when it last did.
    claims: HashMap<(IpAddr, PeerAddr), Instant>,
    /// The number of claims of each source that has any.
    peers: HashMap<IpAddr, usize>,
}

struct Buckets {
    writes: Bucket,
    reads: Bucket,
    used: Instant,
}

/// Tokens that come back at a steady rate up to a burst; a request takes one.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.at = self.at.max(now);
    }

    /// Takes a token, or says how long until there are `wanted` (at
    /// most the burst).
    fn take(&mut self, rate: f64, burst: u32, wanted: u32, now: Instant) -> Result<(), Duration> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = f64::from(wanted.min(burst)) - self.tokens;
            let wait = Duration::try_from_secs_f64(missing / rate);
            Err(wait.map_or(MAX_WAIT, |wait| wait.min(MAX_WAIT)))
        }
    }

    fn is_full(&self, rate: f64, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * rate >= f64::from(burst)
    }
}

/// Which bucket a request takes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
}

/// What a request is, for the limits. Every request is one or the other:
/// a new request must be placed here.
fn kind(request: &Request) -> (Kind, &'static str) {
    match request {
        Request::Register { .. } => (Kind::Write, "REGISTER"),
        Request::Announce { .. } => (Kind::Write, "ANNOUNCE"),
        Request::Offer { .. } => (Kind::Write, "OFFER"),
        Request::Unregister { .. } => (Kind::Write, "UNREGISTER"),
        Request::Peers => (Kind::Read, "PEERS"),
        Request::PeersLong => (Kind::Read, "PEERS LONG"),
        Request::Who { .. } => (Kind::Read, "WHO"),
        Request::WhoHas { .. } => (Kind::Read, "WHOHAS"),
        Request::Ls { .. } => (Kind::Read, "LS"),
        Request::Stats => (Kind::Read, "STATS"),
    }
}

/// The peer a registering request names, as `serve` stores it: at the
/// address given, or the one the request came from. `None` when that is
/// no peer address (the request is refused later).
fn named_peer(request: &Request, from: IpAddr) -> Option<PeerAddr> {
    let (port, host) = match request {
        Request::Register { port, host, .. }
        | Request::Announce { port, host, .. }
        | Request::Offer { port, host, .. }
        | Request::Unregister { port, host, .. } => (*port, *host),
        _ => return None,
    };
    PeerAddr::new(host.unwrap_or(from.to_canonical()), port).ok()
}

impl Limiter {
    /// Limits for a relay that forgets silent peers after `ttl` and holds
    /// at most `max_registered` of them.
    pub(crate) fn new(limits: SourceLimits, ttl: Duration, max_registered: usize) -> Self {
        Limiter::with_room(limits, ttl, max_registered, MAX_SOURCES)
    }

    fn with_room(
        limits: SourceLimits,
        ttl: Duration,
        max_claims: usize,
        max_sources: usize,
    ) -> Self {
        Limiter {
            limits,
            ttl,
            max_sources: max_sources.max(1),
            max_claims,
            inner: Mutex::default(),
            refused_writes: AtomicU64::new(0),
            refused_reads: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
        }
    }

    /// Lets `request` from `from` through, or says why not and when to
    /// ask again.
    pub(crate) fn check(
        &self,
        from: IpAddr,
        request: &Request,
        now: Instant,
    ) -> Result<(), Refusal> {
        if is_exempt(from, self.limits.exempt_loopback) {
            return Ok(());
        }
        let source = source_key(from);
        let (kind, verb) = kind(request);
        let mut inner = self.lock();
        if let Err(wait) = self.take(&mut inner, source, kind, now) {
            let (counter, what, rate, burst) = match kind {
                Kind::Write => (
                    &self.refused_writes,
                    "registrations",
                    self.limits.write_rate,
                    self.limits.write_burst,
                ),
                Kind::Read => (
                    &self.refused_reads,
                    "lookups",
                    self.limits.read_rate,
                    self.limits.read_burst,
                ),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let message =
                format!("too many {what} from your address (limit {rate}/s, burst {burst})");
            return Err(refusal(verb, wait, message));
        }
        let Some(peer) = named_peer(request, from) else {
            return Ok(());
        };
        if let Request::Unregister { .. } = request {
            inner.release(source, peer);
            return Ok(());
        }
        if self.claim(&mut inner, source, peer, now) {
            return Ok(());
        }
        self.refused_peers.fetch_add(1, Ordering::Relaxed);
        let max = self.limits.max_peers_per_ip;
        // A place comes free when one of the source's peers leaves or goes
        // silent: within a TTL at the latest.
        Err(refusal(
            verb,
            self.ttl,
            format!("too many peers registered from your address (limit {max})"),
        ))
    }

    /// Forgets the peers no source has named for the TTL; called with the
    /// registry's own expiry.
    pub(crate) fn expire(&self, now: Instant) {
        let ttl = self.ttl;
        let mut inner = self.lock();
        let Inner { claims, peers, .. } = &mut *inner;
        claims.retain(|(source, _), seen| {
            let live = now.saturating_duration_since(*seen) <= ttl;
            if !live {
                uncount(peers, *source);
            }
            live
        });
    }

    /// The refusals so far, under their STATS names.
    pub(crate) fn counters(&self) -> [(&'static str, u64); 3] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("limited_writes", get(&self.refused_writes)),
            ("limited_reads", get(&self.refused_reads)),
            ("limited_peers_per_ip", get(&self.refused_peers)),
        ]
    }

    /// Takes a token from `source`'s bucket of `kind`.
    fn take(
        &self,
        inner: &mut Inner,
        source: IpAddr,
        kind: Kind,
        now: Instant,
    ) -> Result<(), Duration> {
        let l = &self.limits;
        let (rate, burst) = match kind {
            Kind::Write => (l.write_rate, l.write_burst),
            Kind::Read => (l.read_rate, l.read_burst),
        };
        if rate <= 0.0 {
            return Ok(());
        }
        if !inner.sources.contains_key(&source) {
            self.make_room(&mut inner.sources, now);
        }
        let buckets = inner.sources.entry(source).or_insert_with(|| Buckets {
            writes: Bucket::full(l.write_burst, now),
            reads: Bucket::full(l.read_burst, now),
            used: now,
        });
        buckets.used = buckets.used.max(now);
        match kind {
            // A peer that waits for one token would spend it on its ANNOUNCE
            // and be refused the OFFER that asks for, again and again: a
            // writer is told to wait for two.
            Kind::Write => buckets.writes.take(rate, burst, 2, now),
            Kind::Read => buckets.reads.take(rate, burst, 1, now),
        }
    }

    /// Makes room for one more source when there is none: forgets the
    /// idle ones, then if need be the least recently seen, down to seven
    /// eighths, so that this pass over all of them is rare.
    fn make_room(&self, sources: &mut HashMap<IpAddr, Buckets>, now: Instant) {
        if sources.len() < self.max_sources {
            return;
        }
        let l = &self.limits;
        sources.retain(|_, b| {
            !(b.writes.is_full(l.write_rate, l.write_burst, now)
                && b.reads.is_full(l.read_rate, l.read_burst, now))
        });
        let keep = self.max_sources - (self.max_sources / 8).max(1);
        if sources.len() <= keep {
            return;
        }
        let mut by_use: Vec<(Instant, IpAddr)> =
            sources.iter().map(|(k, b)| (b.used, *k)).collect();
        let cut = by_use.len() - keep;
        by_use.select_nth_unstable(cut - 1);
        for (_, source) in &by_use[..cut] {
            sources.remove(source);
        }
    }

    /// Charges `peer` to `source` (or refreshes it); false when the source
    /// has as many peers as it may.
    fn claim(&self, inner: &mut Inner, source: IpAddr, peer: PeerAddr, now: Instant) -> bool {
        let max = self.limits.max_peers_per_ip;
        if max == 0 {
            return true;
        }
        if let Some(seen) = inner.claims.get_mut(&(source, peer)) {
            *seen = now;
            return true;
        }
        let count = inner.peers.get(&source).copied().unwrap_or(0);
        if count >= max {
            return false;
        }
        if inner.claims.len() < self.max_claims {
            inner.claims.insert((source, peer), now);
            inner.peers.insert(source, count + 1);
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under the lock leaves the maps consistent before
        // anything that could panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn release(&mut self, source: IpAddr, peer: PeerAddr) {
        if self.claims.remove(&(source, peer)).is_some() {
            uncount(&mut self.peers, source);
        }
    }
}

fn uncount(peers: &mut HashMap<IpAddr, usize>, source: IpAddr) {
    if let Some(n) = peers.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            peers.remove(&source);
        }
    }
}

fn refusal(verb: &str, wait: Duration, message: String) -> Refusal {
    let reply = ErrorReply::busy_retry_after(wait, &message);
    Refusal {
        summary: format!("{verb} refused: {message}"),
        reply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(90);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn request(line: &str) -> Request {
        Request::parse(line).unwrap()
    }

    /// Limits that apply to loopback too, with `change` made.
    fn limiter(change: impl FnOnce(&mut SourceLimits)) -> Limiter {
        let mut limits = SourceLimits {
            exempt_loopback: false,
            ..SourceLimits::default()
        };
        change(&mut limits);
        Limiter::new(limits, TTL, 1000)
    }

    fn retry_after(refusal: Refusal) -> Duration {
        refusal.reply.retry_after().expect("a retry-after")
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_its_rate() {
        let t0 = Instant::now();
        let limiter = limiter(|l| {
            l.read_rate = 2.0;
            l.read_burst = 3;
        });
        let peers = request("RP2P/1 PEERS");
        let from = ip("192.0.2.1");
        for _ in 0..3 {
            limiter.check(from, &peers, t0).unwrap();
        }
        let refused = limiter.check(from, &peers, t0).unwrap_err();
        assert_eq!(
            refused.reply.to_string(),
            "retry-after 1 too many lookups from your address (limit 2/s, burst 3) (busy)"
        );
        assert_eq!(
            refused.summary,
            "PEERS refused: too many lookups from your address (limit 2/s, burst 3)"
        );
        // Half a second brings one token back, not two.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check(from, &peers, t1).unwrap();
        assert!(limiter.check(from, &peers, t1).is_err());
        // A long quiet spell refills it to the burst, and no further.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.check(from, &peers, t2).unwrap();
        }
        assert!(limiter.check(from, &peers, t2).is_err());
        assert_eq!(limiter.counters()[1], ("limited_reads", 3));
    }

    #[test]
    fn the_wait_is_until_enough_tokens_are_back() {
        let t0 = Instant::now();
        let one = limiter(|l| {
            l.write_rate = 0.1;
            l.write_burst = 1;
        });
        let register = request("RP2P/1 REGISTER 7000");
        let from = ip("192.0.2.1");
        one.check(from, &register, t0).unwrap();
        let refused = one.check(from, &register, t0 + Duration::from_secs(4));
        // 10 s a token, 4 s gone (the refused request took nothing).
        assert_eq!(retry_after(refused.unwrap_err()), Duration::from_secs(6));
        assert_eq!(one.counters()[0], ("limited_writes", 1));
        // A writer is told to wait until an ANNOUNCE and its OFFER both pass,
        // when the burst allows it; a reader for one token.
        let two = limiter(|l| {
            l.write_rate = 0.1;
            l.write_burst = 2;
            l.read_rate = 0.1;
            l.read_burst = 2;
        });
        let peers = request("RP2P/1 PEERS");
        for _ in 0..2 {
            two.check(from, &register, t0).unwrap();
            two.check(from, &peers, t0).unwrap();
        }
        let later = t0 + Duration::from_secs(4);
        let refused = two.check(from, &register, later).unwrap_err();
        assert_eq!(retry_after(refused), Duration::from_secs(16));
        let refused = two.check(from, &peers, later).unwrap_err();
        assert_eq!(retry_after(refused), Duration::from_secs(6));
    }

    #[test]
    fn writes_and_reads_and_sources_each_have_their_own_bucket() {
        let t0 = Instant::now();
        let limiter = limiter(|l| {
            l.write_burst = 2;
            l.read_burst = 2;
        });
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let register = request("RP2P/1 REGISTER 7000");
        let who = request("RP2P/1 WHO x");
        for _ in 0..2 {
            limiter.check(a, &register, t0).unwrap();
        }
        assert!(limiter.check(a, &register, t0).is_err());
        assert!(limiter
            .check(a, &request("RP2P/1 UNREGISTER 7000"), t0)
            .is_err());
        // Lookups from the same source, and anything from another, pass.
        limiter.check(a, &who, t0).unwrap();
        limiter.check(b, &register, t0).unwrap();
        limiter.check(b, &who, t0).unwrap();
    }

    #[test]
    fn loopback_is_exempt_unless_told_and_zero_turns_a_limit_off() {
        let t0 = Instant::now();
        let peers = request("RP2P/1 PEERS");
        let tiny = |l: &mut SourceLimits| {
            l.read_rate = 1.0;
            l.read_burst = 1;
        };
        let exempt = limiter(|l| {
            tiny(l);
            l.exempt_loopback = true;
        });
        for from in ["127.0.0.2", "::1", "::ffff:127.0.0.3"] {
            for _ in 0..10 {
                exempt.check(ip(from), &peers, t0).unwrap();
            }
        }
        assert!(exempt.check(ip("192.0.2.1"), &peers, t0).is_ok());
        assert!(exempt.check(ip("192.0.2.1"), &peers, t0).is_err());
        let held = limiter(tiny);
        held.check(ip("127.0.0.2"), &peers, t0).unwrap();
        assert!(held.check(ip("127.0.0.2"), &peers, t0).is_err());
        let off = limiter(|l| {
            l.read_rate = 0.0;
            l.read_burst = 0;
        });
        for _ in 0..1000 {
            off.check(ip("192.0.2.1"), &peers, t0).unwrap();
        }
    }

    #[test]
    fn a_source_registers_at_most_so_many_peers_until_some_leave() {
        let t0 = Instant::now();
        let limiter = limiter(|l| l.max_peers_per_ip = 3);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let at =
            |n: u16, host: &str| request(&format!("RP2P/1 ANNOUNCE {n} {} {host}", "0".repeat(32)));
        // Advertised addresses count against the source they came from.
        for (n, host) in [(1, "10.0.0.1"), (2, "10.0.0.2"), (3, "192.0.2.1")] {
            limiter.check(a, &at(n, host), t0).unwrap();
        }
        let refused = limiter
            .check(a, &request("RP2P/1 REGISTER 4"), t0)
            .unwrap_err();
        assert_eq!(retry_after(refused), TTL);
        assert!(limiter.check(a, &at(5, "10.0.0.5"), t0).is_err());
        assert_eq!(limiter.counters()[2], ("limited_peers_per_ip", 2));
        // Its own peers still refresh, and another source is not affected.
        limiter.check(a, &request("RP2P/1 REGISTER 3"), t0).unwrap();
        limiter.check(a, &at(1, "10.0.0.1"), t0).unwrap();
        limiter.check(b, &request("RP2P/1 REGISTER 3"), t0).unwrap();
        // Leaving gives a place back.
        limiter
            .check(a, &request("RP2P/1 UNREGISTER 2 10.0.0.2"), t0)
            .unwrap();
        limiter.check(a, &request("RP2P/1 REGISTER 4"), t0).unwrap();
        assert!(limiter.check(a, &request("RP2P/1 REGISTER 5"), t0).is_err());
        // So does silence for longer than the TTL, as in the registry.
        limiter.expire(t0 + TTL);
        assert!(limiter
            .check(a, &request("RP2P/1 REGISTER 5"), t0 + TTL)
            .is_err());
        let later = t0 + TTL + Duration::from_secs(1);
        limiter.expire(later);
        for n in 5..8 {
            limiter
                .check(a, &request(&format!("RP2P/1 REGISTER {n}")), later)
                .unwrap();
        }
        assert!(limiter
            .check(a, &request("RP2P/1 REGISTER 8"), later)
            .is_err());
        assert!(limiter.lock().claims.len() <= 6);
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let t0 = Instant::now();
        let limiter = limiter(|l| l.max_peers_per_ip = 2);
        limiter
            .check(ip("2001:db8::1"), &request("RP2P/1 REGISTER 1"), t0)
            .unwrap();
        limiter
            .check(ip("2001:db8::2"), &request("RP2P/1 REGISTER 1"), t0)
            .unwrap();
        assert!(limiter
            .check(ip("2001:db8::3"), &request("RP2P/1 REGISTER 1"), t0)
            .is_err());
        limiter
            .check(ip("2001:db8:0:1::1"), &request("RP2P/1 REGISTER 1"), t0)
            .unwrap();
    }

    #[test]
    fn the_map_of_sources_stays_bounded_and_never_turns_a_newcomer_away() {
        let t0 = Instant::now();
        let limits = SourceLimits {
            exempt_loopback: false,
            read_rate: 1.0,
            read_burst: 2,
            ..SourceLimits::default()
        };
        let limiter = Limiter::with_room(limits, TTL, 1000, 16);
        let peers = request("RP2P/1 PEERS");
        // A busy source, then a thousand others, each with a bucket not full.
        let busy = ip("198.51.100.1");
        limiter.check(busy, &peers, t0).unwrap();
        limiter.check(busy, &peers, t0).unwrap();
        for n in 0..1000u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            let now = t0 + Duration::from_millis(u64::from(n));
            limiter.check(from, &peers, now).unwrap();
            // The busy source keeps being seen, so it is not the oldest.
            let _ = limiter.check(busy, &peers, now);
            assert!(limiter.lock().sources.len() <= 16);
        }
        // It was remembered throughout: still refused.
        assert!(limiter
            .check(busy, &peers, t0 + Duration::from_millis(999))
            .is_err());
        // Idle sources go first: with everyone refilled, one pass clears them.
        let later = t0 + Duration::from_secs(60);
        for n in 0..16u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + n));
            limiter.check(from, &peers, later).unwrap();
        }
        assert!(limiter.lock().sources.len() <= 16);
    }

    #[test]
    fn the_count_of_peers_stays_bounded() {
        let t0 = Instant::now();
        let limits = SourceLimits {
            exempt_loopback: false,
            write_rate: 0.0,
            max_peers_per_ip: 5,
            ..SourceLimits::default()
        };
        let limiter = Limiter::with_room(limits, TTL, 20, 100);
        for n in 0..100u32 {
            let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            for port in 1..=5 {
                limiter
                    .check(from, &request(&format!("RP2P/1 REGISTER {port}")), t0)
                    .unwrap();
            }
        }
        let inner = limiter.lock();
        assert_eq!(inner.claims.len(), 20);
        assert_eq!(inner.peers.values().sum::<usize>(), 20);
    }
}
