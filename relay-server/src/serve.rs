//! One connection: one request, one reply; and the expiry of silent peers.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use netkit::{close_gently, describe_io, server::Connections, Deadline, Shutdown};
use protocol::{
    identity::Auth,
    index::{read_offer_body, ListDigest, Pattern},
    relay::{Credential, Request, Response},
    ErrorCode, ErrorReply, FileName, PeerAddr, ProtocolError, MAX_LINE,
};

use crate::{
    limits::Limiter,
    store::{Refusal, Refused, Registered, Store, Unavailable},
    trust::Trust,
    Config,
};

/// Everything a connection handler needs, shared by all of them.
pub(crate) struct State {
    store: Box<dyn Store>,
    ttl: Duration,
    max_registered: usize,
    max_files_per_peer: usize,
    pub(crate) trust: Trust,
    max_peers_returned: usize,
    idle_timeout: Duration,
    /// How often the sweeper expires silent peers: a second in service,
    /// shorter in tests so that they need not wait.
    sweep_every: Duration,
    started: Instant,
    connections: Arc<Connections>,
    stats: Stats,
    /// Held while counts move from `stats` to the store, and while STATS
    /// reads both.
    counting: std::sync::Mutex<()>,
    limits: Limiter,
}

/// This relay's counts since it last added them to the store's.
#[derive(Default)]
struct Stats {
    registrations: AtomicU64,
    unregistrations: AtomicU64,
    lookups: AtomicU64,
    expired: AtomicU64,
    bad_requests: AtomicU64,
    timeouts: AtomicU64,
    offers: AtomicU64,
    /// Requests refused as `forbidden`: unsigned, badly signed, replayed,
    /// for another key's entry, or for an address that was not proven.
    forbidden: AtomicU64,
    index_lookups: AtomicU64,
    /// Registrations refused because the registry was full; connections
    /// refused over the cap are counted by `connections`.
    registry_full: AtomicU64,
    /// Requests answered `busy` because the store was unavailable.
    store_unavailable: AtomicU64,
}

impl Stats {
    /// Each counter with its name in STATS.
    fn named(&self) -> [(&'static str, &AtomicU64); 11] {
        [
            ("registrations", &self.registrations),
            ("unregistrations", &self.unregistrations),
            ("lookups", &self.lookups),
            ("expired", &self.expired),
            ("bad_requests", &self.bad_requests),
            ("request_timeouts", &self.timeouts),
            ("offers", &self.offers),
            ("forbidden", &self.forbidden),
            ("index_lookups", &self.index_lookups),
            ("registry_full", &self.registry_full),
            ("store_unavailable", &self.store_unavailable),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl State {
    pub(crate) fn new(
        config: &Config,
        store: Box<dyn Store>,
        connections: Arc<Connections>,
        trust: Trust,
    ) -> Self {
        State {
            trust,
            store,
            ttl: config.ttl,
            max_registered: config.max_registered,
            max_files_per_peer: config.max_files_per_peer,
            max_peers_returned: config.max_peers_returned,
            idle_timeout: config.idle_timeout,
            sweep_every: Duration::from_secs(1),
            started: Instant::now(),
            connections,
            stats: Stats::default(),
            counting: std::sync::Mutex::default(),
            limits: Limiter::new(config.limits.clone(), config.ttl, config.max_registered),
        }
    }

    /// Expires silent peers and adds this relay's counts to the store's
    /// about once a second, until shutdown. On a store that is unavailable
    /// this is also what tries it again.
    pub(crate) fn sweep(&self, shutdown: &Shutdown) {
        while !shutdown.sleep(self.sweep_every) {
            self.sweep_once();
        }
        self.flush_counters();
    }

    fn sweep_once(&self) {
        self.limits.expire(Instant::now());
        match self.store.expire() {
            Ok(expired) => {
                for peer in expired {
                    bump(&self.stats.expired);
                    info!(
                        "expired {peer} (silent for more than {}s)",
                        self.ttl.as_secs()
                    );
                }
            }
            Err(e) => debug!("sweep skipped: {e}"),
        }
        self.flush_counters();
    }

    /// Moves this relay's counts into the store (which keeps them while
    /// it cannot add them).
    fn flush_counters(&self) {
        let _counting = self.counting.lock().unwrap_or_else(|p| p.into_inner());
        let taken: Vec<(&'static str, u64)> = self
            .stats
            .named()
            .iter()
            .map(|(name, c)| (*name, c.swap(0, Ordering::Relaxed)))
            .collect();
        self.store.add_counters(&taken);
    }

    /// The reply when the store did not answer.
    fn unavailable(&self, verb: &str, e: Unavailable) -> (String, Response) {
        bump(&self.stats.store_unavailable);
        let reply = ErrorReply::new(ErrorCode::Busy, format!("retry-after 1 {e}"));
        (format!("{verb} failed: {e}"), reply.into())
    }

    /// Serves one connection: reads one request line (all of it within the
    /// idle timeout), answers it, logs one line.
    pub(crate) fn handle(&self, stream: TcpStream) {
        let started = Instant::now();
        let remote = match stream.peer_addr() {
            Ok(addr) => addr,
            Err(e) => return debug!("connection gone before it was served: {e}"),
        };
        if let Err(e) = stream.set_write_timeout(Some(self.idle_timeout)) {
            return warn!("{remote}: cannot set timeouts: {e}");
        }
        let mut input =
            BufReader::with_capacity(MAX_LINE, Deadline::after(&stream, self.idle_timeout));
        // Each batch of an OFFER has the idle timeout to arrive, as a request line has.
        let clock = input.get_ref().clock();
        let idle = self.idle_timeout;
        let extend = move || clock.set(Some(Instant::now() + idle));
        let Some((summary, response)) = self.respond(&mut input, remote.ip(), &extend) else {
            return debug!("{remote}: closed without a request");
        };
        // Built in memory (at most 1000 short lines) so that its size can be logged.
        let mut reply = Vec::new();
        let sent = response
            .write_to(&mut reply)
            .and_then(|()| (&stream).write_all(&reply));
        let (elapsed, bytes) = (started.elapsed(), reply.len());
        // Every reply ends without a reset, so that the caller reads it
        // even when it sent more than one line.
        close_gently(&stream, Duration::from_millis(200));
        match sent {
            Ok(()) => info!("{remote} {summary}: {bytes} bytes ({elapsed:.1?})"),
            Err(e) => info!(
                "{remote} {summary}, reply not delivered: {} ({elapsed:.1?})",
                describe_io(&e)
            ),
        }
    }

    /// Reads one request and carries it out; returns a log summary and the
    /// reply, or `None` if the caller closed without asking anything.
    fn respond(
        &self,
        input: &mut dyn BufRead,
        from: IpAddr,
        extend: &dyn Fn(),
    ) -> Option<(String, Response)> {
        match Request::read_signed_from(input) {
            // The fair limits come first: a refused request costs no more,
            // not even the check of its signature.
            Ok(Some((request, credential))) => {
                Some(match self.limits.check(from, &request, Instant::now()) {
                    Ok(()) => self.answer(request, credential, from, input, extend),
                    Err(refused) => (refused.summary, refused.reply.into()),
                })
            }
            Ok(None) => None,
            Err(e) => Some(self.refuse(&e)),
        }
    }

    /// The reply to a request that could not be read, counted as what it is.
    fn refuse(&self, e: &ProtocolError) -> (String, Response) {
        let timed_out = matches!(e, ProtocolError::Io(io) if netkit::is_timeout(io));
        bump(if timed_out {
            &self.stats.timeouts
        } else {
            &self.stats.bad_requests
        });
        let reply = netkit::server::refusal(e);
        (netkit::server::describe_refusal(e), Response::Error(reply))
    }

    /// Who speaks, for a request that changes the registry: its signature
    /// checked, and the address to list for it.
    fn speaker(
        &self,
        request: &Request,
        auth: Option<Auth>,
        from: IpAddr,
        port: u16,
        host: Option<IpAddr>,
    ) -> Result<(PeerAddr, Auth), (String, Response)> {
        let verb = verb(request);
        let trusted = self
            .trust
            .check(request, auth)
            .and_then(|auth| Ok((self.trust.listed_addr(from, port, host, &auth.key)?, auth)));
        trusted.map_err(|why| {
            bump(&self.stats.forbidden);
            let reply = ErrorReply::new(ErrorCode::Forbidden, &why);
            (format!("{verb} refused: {why}"), reply.into())
        })
    }

    /// Lists `peer` for its key, or refreshes it: what REGISTER, ANNOUNCE
    /// and OFFER share. On success, the log's word for it; otherwise the reply.
    fn register(
        &self,
        verb: &str,
        peer: PeerAddr,
        auth: &Auth,
    ) -> Result<String, (String, Response)> {
        let refuse = |code, message: String, stat: &AtomicU64| {
            bump(stat);
            let reply = ErrorReply::new(code, &message);
            Err((format!("{verb} {peer} refused: {message}"), reply.into()))
        };
        let registered = self
            .store
            .register(peer, auth.key, auth.ts)
            .map_err(|e| self.unavailable(verb, e))?;
        match registered {
            Registered::Full => refuse(
                ErrorCode::Busy,
                format!("the registry is full ({} peers)", self.max_registered),
                &self.stats.registry_full,
            ),
            Registered::Taken => refuse(
                ErrorCode::Forbidden,
                format!("{peer} is listed for another key until it expires"),
                &self.stats.forbidden,
            ),
            Registered::Replayed => refuse(
                ErrorCode::Forbidden,
                "not newer than a request already accepted from this key (a replay?)".into(),
                &self.stats.forbidden,
            ),
            Registered::New => {
                bump(&self.stats.registrations);
                Ok(format!("new, key {}", auth.key.short()))
            }
            Registered::Refreshed => {
                bump(&self.stats.registrations);
                Ok("refreshed".into())
            }
            Registered::Moved { from } => {
                bump(&self.stats.registrations);
                Ok(format!("moved from {from}, key {}", auth.key.short()))
            }
        }
    }

    /// Carries out one request; returns a log summary and the reply.
    /// `input` holds what follows the request line (an OFFER's body).
    fn answer(
        &self,
        request: Request,
        credential: Option<Credential>,
        from: IpAddr,
        input: &mut dyn BufRead,
        extend: &dyn Fn(),
    ) -> (String, Response) {
        let ttl_secs = self.ttl.as_secs();
        let auth = match credential {
            Some(Credential::Signed(auth)) => Some(auth),
            _ => None,
        };
        if !request.changes_registry() {
            if let Err(why) = self.trust.check_lookup(&request, credential) {
                bump(&self.stats.forbidden);
                let reply = ErrorReply::new(ErrorCode::Forbidden, &why);
                return (format!("{} refused: {why}", verb(&request)), reply.into());
            }
        }
        match request {
            Request::Register { port, host } => {
                let (peer, auth) = match self.speaker(&request, auth, from, port, host) {
                    Ok(speaker) => speaker,
                    Err(refused) => return refused,
                };
                match self.register("REGISTER", peer, &auth) {
                    Ok(what) => (
                        format!("REGISTER {peer} {what}"),
                        Response::Registered { ttl_secs },
                    ),
                    Err(refused) => refused,
                }
            }
            Request::Announce { port, digest, host } => {
                let (peer, auth) = match self.speaker(&request, auth, from, port, host) {
                    Ok(speaker) => speaker,
                    Err(refused) => return refused,
                };
                let what = match self.register("ANNOUNCE", peer, &auth) {
                    Ok(what) => what,
                    Err(refused) => return refused,
                };
                let known = match self.store.digest(peer) {
                    Ok(known) => known,
                    Err(e) => return self.unavailable("ANNOUNCE", e),
                };
                if known == Some(digest) {
                    (
                        format!("ANNOUNCE {peer} {what}, list unchanged"),
                        Response::Registered { ttl_secs },
                    )
                } else {
                    (
                        format!("ANNOUNCE {peer} {what}, list {digest} wanted"),
                        Response::SendList {
                            ttl_secs,
                            max_files: self.max_files_per_peer,
                        },
                    )
                }
            }
            Request::Offer { port, digest, host } => {
                let speaker = self.speaker(&request, auth, from, port, host);
                self.offer(speaker, digest, input, extend)
            }
            Request::Who { name } => {
                bump(&self.stats.index_lookups);
                let holders = match self.store.who(&name, self.max_peers_returned) {
                    Ok(holders) => holders,
                    Err(e) => return self.unavailable("WHO", e),
                };
                (
                    format!("WHO {name:?} -> {}", holders.len()),
                    Response::Holders(holders),
                )
            }
            Request::WhoHas { hash } => {
                bump(&self.stats.index_lookups);
                let holders = match self.store.who_has(&hash, self.max_peers_returned) {
                    Ok(holders) => holders,
                    Err(e) => return self.unavailable("WHOHAS", e),
                };
                (
                    format!("WHOHAS {hash} -> {}", holders.len()),
                    Response::Holders(holders),
                )
            }
            Request::Ls { pattern, after } => self.list(&pattern, after.as_ref()),
            Request::Unregister { port, host } => {
                let (peer, auth) = match self.speaker(&request, auth, from, port, host) {
                    Ok(speaker) => speaker,
                    Err(refused) => return refused,
                };
                let was = match self.store.unregister(peer, auth.key, auth.ts) {
                    Ok(Ok(true)) => "removed",
                    Ok(Ok(false)) => "was not listed",
                    Err(e) => return self.unavailable("UNREGISTER", e),
                    Ok(Err(refusal)) => {
                        bump(&self.stats.forbidden);
                        let why = match refusal {
                            Refusal::Taken => format!("{peer} is listed for another key"),
                            Refusal::Replayed => {
                                "not newer than a request already accepted from this key (a replay?)"
                                    .to_string()
                            }
                        };
                        let reply = ErrorReply::new(ErrorCode::Forbidden, &why);
                        return (format!("UNREGISTER {peer} refused: {why}"), reply.into());
                    }
                };
                bump(&self.stats.unregistrations);
                (format!("UNREGISTER {peer} {was}"), Response::Unregistered)
            }
            Request::Peers => {
                bump(&self.stats.lookups);
                let peers: Vec<PeerAddr> = match self.store.sample(self.max_peers_returned) {
                    Ok(peers) => peers.into_iter().map(|(addr, _)| addr).collect(),
                    Err(e) => return self.unavailable("PEERS", e),
                };
                (format!("PEERS -> {}", peers.len()), Response::Peers(peers))
            }
            Request::PeersLong => {
                bump(&self.stats.lookups);
                let peers = match self.store.sample(self.max_peers_returned) {
                    Ok(peers) => peers,
                    Err(e) => return self.unavailable("PEERS", e),
                };
                (
                    format!("PEERS LONG -> {}", peers.len()),
                    Response::PeersLong(peers),
                )
            }
            Request::Stats => ("STATS".to_string(), Response::Stats(self.stats())),
        }
    }

    /// OFFER: registers the peer, reads its list (each batch within the
    /// idle timeout) and indexes it.
    fn offer(
        &self,
        speaker: Result<(PeerAddr, Auth), (String, Response)>,
        digest: ListDigest,
        input: &mut dyn BufRead,
        extend: &dyn Fn(),
    ) -> (String, Response) {
        // Refused before its body is read: nothing of it is kept.
        let (peer, auth) = match speaker {
            Ok(speaker) => speaker,
            Err(refused) => return refused,
        };
        let max = self.max_files_per_peer;
        let mut before_batch = || extend();
        let files = match read_offer_body(input, max, digest, &mut before_batch) {
            Ok(files) => files,
            Err(e) => {
                let (summary, reply) = self.refuse(&e);
                return (format!("OFFER {peer} refused: {summary}"), reply);
            }
        };
        if let Err(refused) = self.register("OFFER", peer, &auth) {
            return refused;
        }
        bump(&self.stats.offers);
        match self.store.replace(peer, auth.key, digest, &files) {
            Err(e) => self.unavailable("OFFER", e),
            Ok(Err(Refused::Gone)) => {
                let reply = ErrorReply::new(
                    ErrorCode::Busy,
                    "retry-after 1 the entry changed while the list was read: offer again",
                );
                (format!("OFFER {peer} refused: entry changed"), reply.into())
            }
            Ok(Ok(count)) => (
                format!("OFFER {peer}: {count} files indexed"),
                Response::Indexed { files: count },
            ),
            Ok(Err(Refused::Full { max })) => {
                bump(&self.stats.registry_full);
                let reply = ErrorReply::new(
                    ErrorCode::Busy,
                    format!("the index is full ({max} holdings)"),
                );
                (format!("OFFER {peer} refused: index full"), reply.into())
            }
        }
    }

    /// LS: one page of the listing of the names matching `pattern`.
    fn list(&self, pattern: &Pattern, after: Option<&FileName>) -> (String, Response) {
        bump(&self.stats.index_lookups);
        // `*` stays within a folder, `**` crosses them, as in a shell.
        let glob = globset::GlobBuilder::new(pattern.as_str())
            .literal_separator(true)
            .build();
        let matcher = match glob {
            Ok(glob) => glob.compile_matcher(),
            Err(e) => {
                bump(&self.stats.bad_requests);
                let reply = ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("invalid pattern {:?}: {}", pattern.as_str(), e.kind()),
                );
                return (format!("LS refused: {}", reply.message), reply.into());
            }
        };
        let page = match self.store.list(&matcher, after) {
            Ok(page) => page,
            Err(e) => return self.unavailable("LS", e),
        };
        (
            format!("LS {:?} -> {}", pattern.as_str(), page.entries.len()),
            Response::Listing {
                entries: page.entries,
                next: page.next,
            },
        )
    }

    /// The counters: the network's (every relay's on a shared store) with
    /// this relay's counts not yet added to them; this relay's alone while
    /// the store is unavailable, without the store's sizes.
    fn stats(&self) -> Vec<(String, u64)> {
        // Not while counts are on their way to the store (in neither place).
        let counting = self.counting.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: HashMap<String, u64> = self.store.counters().into_iter().collect();
        for (name, counter) in self.stats.named() {
            *counts.entry(name.to_string()).or_default() += counter.load(Ordering::Relaxed);
        }
        drop(counting);
        let get = |name: &str| counts.get(name).copied().unwrap_or(0);
        let limited = self.limits.counters();
        let limited_total: u64 = limited.iter().map(|(_, n)| n).sum();
        let per_ip = self.connections.per_source_rejections();
        let sizes = match (self.store.peers(), self.store.counts()) {
            (Ok(peers), Ok((holdings, names))) => vec![
                ("peers_live", peers as u64),
                ("holdings", holdings as u64),
                ("names_indexed", names as u64),
            ],
            _ => vec![],
        };
        let counted = [
            ("uptime_secs", self.started.elapsed().as_secs()),
            ("connections_open", self.connections.open() as u64),
            ("registrations", get("registrations")),
            ("unregistrations", get("unregistrations")),
            ("lookups", get("lookups")),
            ("expired", get("expired")),
            ("bad_requests", get("bad_requests")),
            (
                "busy_rejections",
                self.connections.busy_rejections() + get("registry_full") + limited_total,
            ),
            ("request_timeouts", get("request_timeouts")),
            ("forbidden", get("forbidden")),
            ("offers", get("offers")),
            ("index_lookups", get("index_lookups")),
            ("store_unavailable", get("store_unavailable")),
        ];
        sizes
            .into_iter()
            .chain(counted)
            .chain(limited)
            .chain([("limited_connections_per_ip", per_ip)])
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// A request's verb, for log lines.
fn verb(request: &Request) -> &'static str {
    match request {
        Request::Register { .. } => "REGISTER",
        Request::Unregister { .. } => "UNREGISTER",
        Request::Announce { .. } => "ANNOUNCE",
        Request::Offer { .. } => "OFFER",
        Request::Peers | Request::PeersLong => "PEERS",
        Request::Stats => "STATS",
        Request::Who { .. } => "WHO",
        Request::WhoHas { .. } => "WHOHAS",
        Request::Ls { .. } => "LS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn relay() -> State {
        state(Config {
            max_registered: 3,
            max_peers_returned: 2,
            ..Config::default()
        })
    }

    /// A relay on loopback, as the tests' requests come from loopback.
    fn state(config: Config) -> State {
        let trust = Trust::new(true, None, None, config.ttl, 100).unwrap();
        let store = crate::store::open(&config).unwrap();
        State::new(&config, store, Arc::default(), trust)
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9));

    /// The peer serving on `port` has a key of its own.
    fn identity(port: u16) -> protocol::identity::Identity {
        protocol::identity::Identity::from_seed(*blake3::hash(&port.to_le_bytes()).as_bytes())
    }

    /// Now, and later at every call, so that no request looks like a replay.
    fn next_ts() -> u64 {
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        LAST.fetch_max(now, Ordering::SeqCst);
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// `line` signed by the key of the peer it speaks for, when it is a
    /// request that must be signed and is not yet; otherwise as it is.
    fn signed(line: &str) -> String {
        let Ok((request, None)) = Request::parse_signed(line) else {
            return line.to_string();
        };
        let port = match &request {
            Request::Register { port, .. }
            | Request::Unregister { port, .. }
            | Request::Announce { port, .. }
            | Request::Offer { port, .. } => *port,
            _ => return line.to_string(),
        };
        let auth = identity(port).authorize(&request.canonical(), next_ts());
        format!("{} {auth}", request.canonical())
    }

    fn ask(relay: &State, line: &str) -> Response {
        let (_, response) = relay
            .respond(
                &mut Cursor::new(format!("{}\n", signed(line))),
                FROM,
                &|| {},
            )
            .unwrap();
        response
    }

    #[test]
    fn registered_peers_are_listed_at_the_address_they_came_from() {
        let relay = relay();
        assert_eq!(
            ask(&relay, "RP2P/1 REGISTER 7000"),
            Response::Registered { ttl_secs: 90 }
        );
        assert_eq!(
            ask(&relay, "RP2P/1 PEERS"),
            Response::Peers(vec!["127.0.0.9:7000".parse().unwrap()])
        );
        assert_eq!(
            ask(&relay, "RP2P/1 UNREGISTER 7000"),
            Response::Unregistered
        );
        assert_eq!(ask(&relay, "RP2P/1 PEERS"), Response::Peers(vec![]));
    }

    #[test]
    fn the_log_says_whether_a_registration_is_new() {
        let relay = relay();
        let summary = |line: &str| {
            relay
                .respond(
                    &mut Cursor::new(format!("{}\n", signed(line))),
                    FROM,
                    &|| {},
                )
                .unwrap()
                .0
        };
        let key = identity(7000).key().short();
        assert_eq!(
            summary("RP2P/1 REGISTER 7000"),
            format!("REGISTER 127.0.0.9:7000 new, key {key}")
        );
        assert_eq!(
            summary("RP2P/1 REGISTER 7000"),
            "REGISTER 127.0.0.9:7000 refreshed"
        );
    }

    #[test]
    fn a_connection_is_answered_and_closed() {
        use std::{io::Read, net::TcpListener};
        let relay = relay();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client
            .write_all(format!("{}\n", signed("RP2P/1 REGISTER 7000")).as_bytes())
            .unwrap();
        // Done sending: the handler's gentle close need not wait for us.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // The handler returns once it has answered: then the reply is all
        // there, followed by the end of the stream.
        relay.handle(server);
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "REGISTERED 90\n");
        // Registered at the address the connection came from.
        assert_eq!(
            relay.store.sample(10).unwrap(),
            vec![("127.0.0.1:7000".parse().unwrap(), identity(7000).key())]
        );
    }

    #[test]
    fn the_sweeper_expires_silent_peers_until_shutdown() {
        let config = Config {
            ttl: Duration::ZERO,
            ..Config::default()
        };
        let mut relay = state(config);
        relay.sweep_every = Duration::from_millis(10);
        let relay = Arc::new(relay);
        relay
            .store
            .register("127.0.0.1:7000".parse().unwrap(), identity(7000).key(), 1)
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let shutdown = Arc::new(Shutdown::new(listener.local_addr().unwrap()));
        let sweeper = {
            let (relay, shutdown) = (Arc::clone(&relay), Arc::clone(&shutdown));
            std::thread::spawn(move || relay.sweep(&shutdown))
        };
        // Until the expiry is counted, which follows the removal (a peer
        // gone is not yet counted: waiting on that raced the count).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !relay.stats().contains(&("expired".to_string(), 1)) {
            assert!(Instant::now() < deadline, "never swept");
            assert!(!sweeper.is_finished(), "the sweeper stopped early");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(relay.store.peers().unwrap(), 0);
        shutdown.trigger();
        sweeper.join().unwrap();
    }

    #[test]
    fn an_advertised_address_is_listed_only_once_proven() {
        use protocol::peer::{Request as PeerRequest, Response as PeerResponse};
        use std::{io::BufRead as _, net::TcpListener};
        let relay = relay();
        // A peer at 127.0.0.2 that answers one PROVE, signing with its own
        // port's key, or with the key of `impostor` when given.
        let prover = |impostor: Option<u16>| {
            let listener = TcpListener::bind("127.0.0.2:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let signer = identity(impostor.unwrap_or(port));
            std::thread::spawn(move || {
                if let Some(Ok(stream)) = listener.incoming().next() {
                    let mut line = String::new();
                    let _ = std::io::BufReader::new(&stream).read_line(&mut line);
                    if let Ok(PeerRequest::Prove { nonce, addr }) =
                        PeerRequest::parse(line.trim_end())
                    {
                        let message =
                            protocol::identity::address_message(&nonce, &addr.to_string());
                        let reply = PeerResponse::Proof {
                            key: signer.key(),
                            sig: signer.sign(&message),
                        };
                        let _ = reply.write_to(&mut &stream);
                    }
                }
            });
            port
        };
        let honest = prover(None);
        assert_eq!(
            ask(&relay, &format!("RP2P/1 REGISTER {honest} 127.0.0.2")),
            Response::Registered { ttl_secs: 90 }
        );
        let impostor = prover(Some(1));
        assert!(matches!(
            ask(&relay, &format!("RP2P/1 REGISTER {impostor} 127.0.0.2")),
            Response::Error(e) if e.code == ErrorCode::Forbidden && e.message.contains("another key answered")
        ));
        // Nothing listens at 127.0.0.3: no proof, not listed.
        assert!(matches!(
            ask(&relay, "RP2P/1 REGISTER 7000 127.0.0.3"),
            Response::Error(e) if e.code == ErrorCode::Forbidden
        ));
        assert_eq!(
            ask(&relay, "RP2P/1 PEERS"),
            Response::Peers(vec![format!("127.0.0.2:{honest}").parse().unwrap()])
        );
    }

    #[test]
    fn nobody_speaks_for_another_key() {
        let relay = relay();
        assert_eq!(
            ask(&relay, "RP2P/1 REGISTER 7000"),
            Response::Registered { ttl_secs: 90 }
        );
        let stranger = identity(1);
        for line in ["RP2P/1 UNREGISTER 7000", "RP2P/1 REGISTER 7000"] {
            let request = Request::parse(line).unwrap();
            let auth = stranger.authorize(&request.canonical(), next_ts());
            let forged = format!("{} {auth}", request.canonical());
            assert!(
                matches!(ask(&relay, &forged), Response::Error(e) if e.code == ErrorCode::Forbidden),
                "{line}"
            );
        }
        // Unsigned, or signed over something else, or replayed: refused too.
        let (summary, unsigned) = relay
            .respond(&mut Cursor::new("RP2P/1 UNREGISTER 7000\n"), FROM, &|| {})
            .unwrap();
        assert!(matches!(unsigned, Response::Error(e) if e.code == ErrorCode::Forbidden));
        assert!(summary.starts_with("UNREGISTER refused: "), "{summary}");
        let me = identity(7000);
        let auth = me.authorize("RP2P/1 REGISTER 7001", next_ts());
        let moved_signature = format!("RP2P/1 UNREGISTER 7000 {auth}");
        assert!(
            matches!(ask(&relay, &moved_signature), Response::Error(e) if e.code == ErrorCode::Forbidden)
        );
        let register = signed("RP2P/1 REGISTER 7000");
        assert_eq!(
            ask(&relay, &register),
            Response::Registered { ttl_secs: 90 }
        );
        assert!(
            matches!(ask(&relay, &register), Response::Error(e) if e.message.contains("replay"))
        );
        let old = Request::parse("RP2P/1 REGISTER 7000").unwrap();
        let stale = me.authorize(&old.canonical(), 1_000);
        assert!(matches!(
            ask(&relay, &format!("{} {stale}", old.canonical())),
            Response::Error(e) if e.message.contains("clock")
        ));
        // Still listed, by its own key only.
        assert_eq!(
            ask(&relay, "RP2P/1 PEERS"),
            Response::Peers(vec!["127.0.0.9:7000".parse().unwrap()])
        );
    }

    #[test]
    fn garbage_never_reaches_the_list() {
        let relay = relay();
        for line in [
            "RP2P/1 REGISTER 0",
            "RP2P/1 REGISTER 70000",
            "RP2P/1 REGISTER 80 0.0.0.0",
            "RP2P/1 REGISTER 80 224.0.0.1",
            "RP2P/1 REGISTER 80 example.com",
            "RP2P/1 REGISTER -1",
            "REGISTER 80",
        ] {
            assert!(matches!(ask(&relay, line), Response::Error(_)), "{line}");
        }
        assert_eq!(relay.store.peers().unwrap(), 0);
    }

    #[test]
    fn lists_are_capped_and_a_full_registry_says_busy() {
        let relay = relay();
        for port in 1..=3 {
            ask(&relay, &format!("RP2P/1 REGISTER {port}"));
        }
        match ask(&relay, "RP2P/1 PEERS") {
            Response::Peers(peers) => assert_eq!(peers.len(), 2),
            other => panic!("{other:?}"),
        }
        match ask(&relay, "RP2P/1 REGISTER 4") {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::Busy),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stats_count_what_happened() {
        let relay = relay();
        ask(&relay, "RP2P/1 REGISTER 1");
        ask(&relay, "RP2P/1 PEERS");
        ask(&relay, "nonsense");
        let Response::Stats(stats) = ask(&relay, "RP2P/1 STATS") else {
            panic!("no stats")
        };
        let get = |k: &str| stats.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        assert_eq!(get("peers_live"), Some(1));
        assert_eq!(get("registrations"), Some(1));
        assert_eq!(get("lookups"), Some(1));
        assert_eq!(get("bad_requests"), Some(1));
    }

    #[test]
    fn stats_count_each_refusal_of_the_fair_limits() {
        let relay = state(Config {
            limits: crate::SourceLimits {
                exempt_loopback: false,
                // Slow enough that no token comes back during the test.
                write_rate: 0.001,
                write_burst: 3,
                read_rate: 0.001,
                read_burst: 1,
                max_peers_per_ip: 1,
                ..crate::SourceLimits::default()
            },
            ..Config::default()
        });
        assert_eq!(
            ask(&relay, "RP2P/1 REGISTER 1"),
            Response::Registered { ttl_secs: 90 }
        );
        let Response::Error(over) = ask(&relay, "RP2P/1 REGISTER 2") else {
            panic!("a second peer from one address was let in")
        };
        assert_eq!(over.retry_after(), Some(Duration::from_secs(90)));
        assert_eq!(relay.store.peers().unwrap(), 1);
        ask(&relay, "RP2P/1 REGISTER 1");
        let Response::Error(writes) = ask(&relay, "RP2P/1 REGISTER 1") else {
            panic!("past the write burst")
        };
        assert!(
            writes.detail().starts_with("too many registrations"),
            "{writes:?}"
        );
        ask(&relay, "RP2P/1 PEERS");
        let Response::Error(reads) = ask(&relay, "RP2P/1 PEERS") else {
            panic!("past the read burst")
        };
        assert!(reads.retry_after().is_some(), "{reads:?}");
        // STATS is a lookup too, and the bucket is empty: ask past the limits.
        let Response::Stats(stats) = relay
            .answer(
                Request::Stats,
                None,
                FROM,
                &mut Cursor::new(Vec::new()),
                &|| {},
            )
            .1
        else {
            panic!("no stats")
        };
        let get = |k: &str| stats.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        assert_eq!(get("limited_peers_per_ip"), Some(1));
        assert_eq!(get("limited_writes"), Some(1));
        assert_eq!(get("limited_reads"), Some(1));
        assert_eq!(get("limited_connections_per_ip"), Some(0));
        assert_eq!(get("busy_rejections"), Some(3));
        assert_eq!(get("registrations"), Some(2));
    }

    fn holding(name: &str, content: &str) -> protocol::index::Holding {
        protocol::index::Holding {
            name: FileName::new(name).unwrap(),
            size: content.len() as u64,
            hash: blake3::hash(content.as_bytes()),
        }
    }

    /// An OFFER from port 7000 with `files`, as a peer sends it.
    fn offer_text(files: &[protocol::index::Holding], digest: ListDigest) -> String {
        let mut body = Vec::new();
        protocol::index::write_offer_body(&mut body, files).unwrap();
        format!(
            "RP2P/1 OFFER 7000 {digest}\n{}",
            String::from_utf8(body).unwrap()
        )
    }

    /// A request line (signed as `ask` signs it) and what follows it.
    fn raw(relay: &State, text: &str) -> Response {
        let (line, rest) = text.split_once('\n').unwrap_or((text, ""));
        let text = format!("{}\n{rest}", signed(line));
        relay
            .respond(&mut Cursor::new(text), FROM, &|| {})
            .unwrap()
            .1
    }

    #[test]
    fn an_announced_list_is_asked_for_once_then_found() {
        let relay = relay();
        let files = [holding("a.txt", "a"), holding("docs/b.txt", "b")];
        let digest = ListDigest::of(&files);
        let announce = format!("RP2P/1 ANNOUNCE 7000 {digest}");
        assert_eq!(
            ask(&relay, &announce),
            Response::SendList {
                ttl_secs: 90,
                max_files: 10_000
            }
        );
        assert_eq!(
            raw(&relay, &offer_text(&files, digest)),
            Response::Indexed { files: 2 }
        );
        // Unchanged: one line.
        assert_eq!(
            ask(&relay, &announce),
            Response::Registered { ttl_secs: 90 }
        );
        let Response::Holders(holders) = ask(&relay, "RP2P/1 WHO docs/b.txt") else {
            panic!("no holders")
        };
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].addr, "127.0.0.9:7000".parse().unwrap());
        assert_eq!(holders[0].hash, blake3::hash(b"b"));
        let Response::Holders(by_hash) =
            ask(&relay, &format!("RP2P/1 WHOHAS {}", blake3::hash(b"a")))
        else {
            panic!("no holders")
        };
        assert_eq!(by_hash[0].name.as_str(), "a.txt");
        let Response::Listing { entries, next } = ask(&relay, "RP2P/1 LS *.txt") else {
            panic!("no listing")
        };
        assert_eq!(entries.len(), 1, "* stays within a folder");
        assert_eq!(next, None);
        // Leaving takes its files along.
        ask(&relay, "RP2P/1 UNREGISTER 7000");
        assert_eq!(ask(&relay, "RP2P/1 WHO a.txt"), Response::Holders(vec![]));
        assert_eq!(
            ask(&relay, &announce),
            Response::SendList {
                ttl_secs: 90,
                max_files: 10_000
            }
        );
    }

    #[test]
    fn hostile_offers_are_refused_and_index_nothing() {
        let relay = relay();
        let files = [holding("a", "a"), holding("b", "b")];
        let digest = ListDigest::of(&files);
        let wrong = ListDigest::of(&files[..1]);
        let unsorted = [holding("b", "b"), holding("a", "a")];
        let doubled = [holding("a", "a"), holding("a", "a")];
        for text in [
            offer_text(&files, wrong),
            offer_text(&unsorted, ListDigest::of(&unsorted)),
            offer_text(&doubled, ListDigest::of(&doubled)),
            format!(
                "RP2P/1 OFFER 7000 {digest}\nBATCH 1\n1 {} ../etc/passwd\nEND\n",
                blake3::hash(b"")
            ),
            format!("RP2P/1 OFFER 7000 {digest}\nBATCH 5000\n"),
            format!("RP2P/1 OFFER 7000 {digest}\nBATCH 2\n1 zz a\n"),
            format!("RP2P/1 OFFER 7000 {digest}\n"),
            "RP2P/1 LS [unclosed".to_string(),
        ] {
            assert!(matches!(raw(&relay, &text), Response::Error(_)), "{text}");
        }
        let Response::Stats(stats) = ask(&relay, "RP2P/1 STATS") else {
            panic!()
        };
        assert!(stats.contains(&("holdings".to_string(), 0)));
        // Over the per-peer cap.
        let small = state(Config {
            max_files_per_peer: 1,
            ..Config::default()
        });
        assert!(matches!(
            raw(&small, &offer_text(&files, digest)),
            Response::Error(e) if e.code == ErrorCode::BadRequest
        ));
        // And the relay goes on.
        assert_eq!(
            raw(&relay, &offer_text(&files, digest)),
            Response::Indexed { files: 2 }
        );
    }

    #[test]
    fn an_offer_longer_than_one_read_is_read_to_its_end() {
        use std::{io::Read, net::TcpListener};
        let relay = relay();
        let files: Vec<_> = (0..200)
            .map(|i| holding(&format!("file-{i:04}.txt"), &i.to_string()))
            .collect();
        let text = offer_text(&files, ListDigest::of(&files));
        let (line, body) = text.split_once('\n').unwrap();
        let request = format!("{}\n{body}", signed(line));
        // Read in several reads: the batch's deadline is counted from
        // when it starts, not before.
        assert!(request.len() > 3 * MAX_LINE);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // A thread of its own: more than the socket buffers hold, maybe.
        let writer = std::thread::spawn(move || {
            client.write_all(request.as_bytes()).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).unwrap();
            reply
        });
        relay.handle(server);
        assert_eq!(writer.join().unwrap(), "INDEXED 200\n");
    }

    /// A memory store that a test switches off, as a Redis that stopped
    /// answering.
    struct Switched {
        store: crate::store::MemoryStore,
        down: Arc<std::sync::atomic::AtomicBool>,
        kept: std::sync::Mutex<Vec<(&'static str, u64)>>,
    }

    impl Switched {
        fn up(&self) -> crate::store::Stored<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(Unavailable("switched off".into()))
            } else {
                Ok(())
            }
        }
    }

    impl Store for Switched {
        fn register(
            &self,
            peer: PeerAddr,
            key: protocol::identity::PeerKey,
            ts: u64,
        ) -> crate::store::Stored<Registered> {
            self.up()?;
            self.store.register(peer, key, ts)
        }
        fn unregister(
            &self,
            peer: PeerAddr,
            key: protocol::identity::PeerKey,
            ts: u64,
        ) -> crate::store::Stored<Result<bool, Refusal>> {
            self.up()?;
            self.store.unregister(peer, key, ts)
        }
        fn expire(&self) -> crate::store::Stored<Vec<PeerAddr>> {
            self.up()?;
            self.store.expire()
        }
        fn sample(
            &self,
            max: usize,
        ) -> crate::store::Stored<Vec<(PeerAddr, protocol::identity::PeerKey)>> {
            self.up()?;
            self.store.sample(max)
        }
        fn peers(&self) -> crate::store::Stored<usize> {
            self.up()?;
            self.store.peers()
        }
        fn digest(&self, peer: PeerAddr) -> crate::store::Stored<Option<ListDigest>> {
            self.up()?;
            self.store.digest(peer)
        }
        fn replace(
            &self,
            peer: PeerAddr,
            key: protocol::identity::PeerKey,
            digest: ListDigest,
            files: &[protocol::index::Holding],
        ) -> crate::store::Stored<Result<usize, Refused>> {
            self.up()?;
            self.store.replace(peer, key, digest, files)
        }
        fn who(
            &self,
            name: &FileName,
            per_version: usize,
        ) -> crate::store::Stored<Vec<protocol::index::Holder>> {
            self.up()?;
            self.store.who(name, per_version)
        }
        fn who_has(
            &self,
            hash: &protocol::ContentHash,
            per_version: usize,
        ) -> crate::store::Stored<Vec<protocol::index::Holder>> {
            self.up()?;
            self.store.who_has(hash, per_version)
        }
        fn list(
            &self,
            pattern: &globset::GlobMatcher,
            after: Option<&FileName>,
        ) -> crate::store::Stored<crate::store::Page> {
            self.up()?;
            self.store.list(pattern, after)
        }
        fn counts(&self) -> crate::store::Stored<(usize, usize)> {
            self.up()?;
            self.store.counts()
        }
        // Kept while switched off, as a store that cannot reach its
        // backend keeps them.
        fn add_counters(&self, counts: &[(&'static str, u64)]) {
            let mut kept = self.kept.lock().unwrap();
            kept.extend_from_slice(counts);
            if self.up().is_ok() {
                self.store.add_counters(&kept);
                kept.clear();
            }
        }
        fn counters(&self) -> Vec<(String, u64)> {
            let kept = self.kept.lock().unwrap();
            let kept = kept.iter().map(|(k, v)| (k.to_string(), *v));
            match self.up() {
                Ok(()) => self.store.counters().into_iter().chain(kept).collect(),
                Err(_) => kept.collect(),
            }
        }
        fn ping(&self) -> crate::store::Stored<()> {
            self.up()
        }
    }

    #[test]
    fn an_unavailable_store_means_busy_and_the_counts_wait_for_it() {
        let config = Config {
            max_registered: 3,
            max_peers_returned: 2,
            ..Config::default()
        };
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = Switched {
            store: crate::store::MemoryStore::new(config.ttl, 3, 100, Duration::from_secs(60)),
            down: Arc::clone(&down),
            kept: std::sync::Mutex::default(),
        };
        let trust = Trust::new(true, None, None, config.ttl, 100).unwrap();
        let relay = State::new(&config, Box::new(store), Arc::default(), trust);
        let stat = |name: &str| {
            let Response::Stats(stats) = ask(&relay, "RP2P/1 STATS") else {
                panic!("no stats")
            };
            stats.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
        };
        let stored = |name: &str| {
            let counters = relay.store.counters();
            counters
                .into_iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v)
        };
        assert_eq!(
            ask(&relay, "RP2P/1 REGISTER 7000"),
            Response::Registered { ttl_secs: 90 }
        );
        // A sweep moves this relay's counts to the store: counted once.
        relay.sweep_once();
        assert_eq!(stored("registrations"), Some(1));
        assert_eq!(stat("registrations"), Some(1));

        down.store(true, Ordering::SeqCst);
        let (summary, reply) = relay
            .respond(&mut Cursor::new("RP2P/1 PEERS\n"), FROM, &|| {})
            .unwrap();
        let Response::Error(busy) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(busy.code, ErrorCode::Busy);
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(1)));
        assert!(busy.message.contains("switched off"), "{busy:?}");
        assert!(
            summary.starts_with("PEERS failed: ") && summary.contains("switched off"),
            "{summary}"
        );
        assert!(matches!(
            ask(&relay, "RP2P/1 REGISTER 7001"),
            Response::Error(e) if e.code == ErrorCode::Busy
        ));
        // This relay's counts alone, and no sizes it cannot know.
        assert_eq!(stat("store_unavailable"), Some(2));
        assert_eq!(stat("lookups"), Some(1));
        assert_eq!(stat("peers_live"), None);
        // A sweep while the store is down keeps the counts for the next.
        relay.sweep_once();
        assert_eq!(stat("store_unavailable"), Some(2));

        down.store(false, Ordering::SeqCst);
        relay.sweep_once();
        assert_eq!(stored("store_unavailable"), Some(2));
        assert_eq!(stored("lookups"), Some(1));
        assert_eq!(stored("registrations"), Some(1));
        assert_eq!(stat("store_unavailable"), Some(2));
        assert_eq!(stat("peers_live"), Some(1));
    }

    #[test]
    fn with_a_network_secret_lookups_need_it_and_registrations_do_not() {
        let config = Config::default();
        let trust = Trust::new(true, None, Some([7; 32]), config.ttl, 100).unwrap();
        let store = crate::store::open(&config).unwrap();
        let relay = State::new(&config, store, Arc::default(), trust);
        assert_eq!(
            ask(&relay, "RP2P/1 REGISTER 7000"),
            Response::Registered { ttl_secs: 90 }
        );
        assert!(matches!(
            ask(&relay, "RP2P/1 PEERS"),
            Response::Error(e) if e.code == ErrorCode::Forbidden
        ));
    }

    /// A reader whose every read times out, as a socket past its deadline.
    struct Silent;
    impl std::io::Read for Silent {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn refusals_are_counted_as_what_they_are() {
        let relay = relay();
        for port in 1..=5 {
            ask(&relay, &format!("RP2P/1 REGISTER {port}"));
        }
        let (summary, response) = relay
            .respond(&mut BufReader::new(Silent), FROM, &|| {})
            .unwrap();
        assert_eq!(summary, "timed out: no complete request line");
        assert_eq!(
            response,
            Response::Error(ErrorReply::new(
                ErrorCode::Timeout,
                "no complete request line in time"
            ))
        );
        let Response::Stats(stats) = ask(&relay, "RP2P/1 STATS") else {
            panic!("no stats")
        };
        let get = |k: &str| stats.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
        // Three accepted, two refused as busy: only accepted ones count as registrations.
        assert_eq!(get("registrations"), Some(3));
        assert_eq!(get("busy_rejections"), Some(2));
        assert_eq!(get("request_timeouts"), Some(1));
        assert_eq!(get("bad_requests"), Some(0));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let relay = relay();
            if let Some((_, response)) = relay.respond(&mut Cursor::new(bytes), FROM, &|| {}) {
                let mut out = Vec::new();
                prop_assert!(response.write_to(&mut out).is_ok());
            }
            prop_assert!(relay.store.peers().unwrap() <= 1);
        }

        #[test]
        fn arbitrary_registrations_never_panic(line in "RP2P/1 (UN)?REGISTER [0-9]{0,6}( [0-9a-f.:]{0,20})?") {
            let _ = relay().respond(&mut Cursor::new(format!("{line}\n")), FROM, &|| {});
        }
    }
}
