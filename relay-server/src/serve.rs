//! One connection: one request, one reply; and the expiry of silent peers.

use std::{
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
    relay::{Request, Response},
    ErrorCode, ErrorReply, PeerAddr, ProtocolError, MAX_LINE,
};

use crate::{
    registry::{Registered, Registry},
    Config,
};

/// Everything a connection handler needs, shared by all of them.
pub(crate) struct State {
    registry: Registry,
    max_peers_returned: usize,
    idle_timeout: Duration,
    /// How often the sweeper expires silent peers: a second in service,
    /// shorter in tests so that they need not wait.
    sweep_every: Duration,
    started: Instant,
    connections: Arc<Connections>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    registrations: AtomicU64,
    unregistrations: AtomicU64,
    lookups: AtomicU64,
    expired: AtomicU64,
    bad_requests: AtomicU64,
    timeouts: AtomicU64,
    /// Registrations refused because the registry was full; connections
    /// refused over the cap are counted by `connections`.
    registry_full: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl State {
    pub(crate) fn new(config: &Config, connections: Arc<Connections>) -> Self {
        State {
            registry: Registry::new(config.ttl, config.max_registered),
            max_peers_returned: config.max_peers_returned,
            idle_timeout: config.idle_timeout,
            sweep_every: Duration::from_secs(1),
            started: Instant::now(),
            connections,
            stats: Stats::default(),
        }
    }

    /// Expires silent peers about once a second, until shutdown.
    pub(crate) fn sweep(&self, shutdown: &Shutdown) {
        while !shutdown.sleep(self.sweep_every) {
            for peer in self.registry.expire(Instant::now()) {
                bump(&self.stats.expired);
                info!(
                    "expired {peer} (silent for more than {}s)",
                    self.registry.ttl().as_secs()
                );
            }
        }
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
        let Some((summary, response)) = self.respond(&mut input, remote.ip()) else {
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
    fn respond(&self, input: &mut impl BufRead, from: IpAddr) -> Option<(String, Response)> {
        match Request::read_from(input) {
            Ok(Some(request)) => Some(self.answer(request, from)),
            Ok(None) => None,
            Err(e) => {
                let timed_out = matches!(&e, ProtocolError::Io(io) if netkit::is_timeout(io));
                bump(if timed_out {
                    &self.stats.timeouts
                } else {
                    &self.stats.bad_requests
                });
                let reply = netkit::server::refusal(&e);
                Some((netkit::server::describe_refusal(&e), Response::Error(reply)))
            }
        }
    }

    /// Carries out one request; returns a log summary and the reply.
    fn answer(&self, request: Request, from: IpAddr) -> (String, Response) {
        let now = Instant::now();
        match request {
            Request::Register { port, host } => {
                let peer = match self.peer_addr(from, port, host) {
                    Ok(peer) => peer,
                    Err(reply) => {
                        return (format!("REGISTER refused: {}", reply.message), reply.into())
                    }
                };
                match self.registry.register(peer, now) {
                    Registered::Full => {
                        bump(&self.stats.registry_full);
                        let reply = ErrorReply::new(
                            ErrorCode::Busy,
                            format!("the registry is full ({} peers)", self.registry.len()),
                        );
                        (
                            format!("REGISTER {peer} refused: registry full"),
                            reply.into(),
                        )
                    }
                    outcome => {
                        bump(&self.stats.registrations);
                        let what = if outcome == Registered::New {
                            "new"
                        } else {
                            "refreshed"
                        };
                        let ttl_secs = self.registry.ttl().as_secs();
                        (
                            format!("REGISTER {peer} {what}"),
                            Response::Registered { ttl_secs },
                        )
                    }
                }
            }
            Request::Unregister { port, host } => {
                let peer = match self.peer_addr(from, port, host) {
                    Ok(peer) => peer,
                    Err(reply) => {
                        return (
                            format!("UNREGISTER refused: {}", reply.message),
                            reply.into(),
                        )
                    }
                };
                bump(&self.stats.unregistrations);
                let was = if self.registry.unregister(&peer) {
                    "removed"
                } else {
                    "was not listed"
                };
                (format!("UNREGISTER {peer} {was}"), Response::Unregistered)
            }
            Request::Peers => {
                bump(&self.stats.lookups);
                let peers = self.registry.sample(self.max_peers_returned, now);
                (format!("PEERS -> {}", peers.len()), Response::Peers(peers))
            }
            Request::Stats => ("STATS".to_string(), Response::Stats(self.stats(now))),
        }
    }

    /// The address a peer is stored under: the one its connection came
    /// from, unless it names another (`--advertise`, for NAT).
    fn peer_addr(
        &self,
        from: IpAddr,
        port: u16,
        host: Option<IpAddr>,
    ) -> Result<PeerAddr, ErrorReply> {
        let ip = host.unwrap_or(from.to_canonical());
        PeerAddr::new(ip, port).map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e))
    }

    fn stats(&self, now: Instant) -> Vec<(String, u64)> {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("peers_live", self.registry.len() as u64),
            ("uptime_secs", now.duration_since(self.started).as_secs()),
            ("connections_open", self.connections.open() as u64),
            ("registrations", get(&s.registrations)),
            ("unregistrations", get(&s.unregistrations)),
            ("lookups", get(&s.lookups)),
            ("expired", get(&s.expired)),
            ("bad_requests", get(&s.bad_requests)),
            (
                "busy_rejections",
                self.connections.busy_rejections() + get(&s.registry_full),
            ),
            ("request_timeouts", get(&s.timeouts)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn relay() -> State {
        let config = Config {
            max_registered: 3,
            max_peers_returned: 2,
            ..Config::default()
        };
        State::new(&config, Arc::default())
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9));

    fn ask(relay: &State, line: &str) -> Response {
        let (_, response) = relay
            .respond(&mut Cursor::new(format!("{line}\n")), FROM)
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
                .respond(&mut Cursor::new(format!("{line}\n")), FROM)
                .unwrap()
                .0
        };
        assert_eq!(
            summary("RP2P/1 REGISTER 7000"),
            "REGISTER 127.0.0.9:7000 new"
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
        client.write_all(b"RP2P/1 REGISTER 7000\n").unwrap();
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
            relay.registry.sample(10, Instant::now()),
            vec!["127.0.0.1:7000".parse().unwrap()]
        );
    }

    #[test]
    fn the_sweeper_expires_silent_peers_until_shutdown() {
        let config = Config {
            ttl: Duration::ZERO,
            ..Config::default()
        };
        let mut relay = State::new(&config, Arc::default());
        relay.sweep_every = Duration::from_millis(10);
        let relay = Arc::new(relay);
        relay
            .registry
            .register("127.0.0.1:7000".parse().unwrap(), relay.started);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let shutdown = Arc::new(Shutdown::new(listener.local_addr().unwrap()));
        let sweeper = {
            let (relay, shutdown) = (Arc::clone(&relay), Arc::clone(&shutdown));
            std::thread::spawn(move || relay.sweep(&shutdown))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.stats.expired.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "never swept");
            assert!(!sweeper.is_finished(), "the sweeper stopped early");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(relay.registry.len(), 0);
        shutdown.trigger();
        sweeper.join().unwrap();
    }

    #[test]
    fn an_advertised_host_replaces_the_source_address() {
        let relay = relay();
        ask(&relay, "RP2P/1 REGISTER 7000 10.1.2.3");
        assert_eq!(
            ask(&relay, "RP2P/1 PEERS"),
            Response::Peers(vec!["10.1.2.3:7000".parse().unwrap()])
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
        assert_eq!(relay.registry.len(), 0);
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
        let (summary, response) = relay.respond(&mut BufReader::new(Silent), FROM).unwrap();
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
            if let Some((_, response)) = relay.respond(&mut Cursor::new(bytes), FROM) {
                let mut out = Vec::new();
                prop_assert!(response.write_to(&mut out).is_ok());
            }
            prop_assert!(relay.registry.len() <= 1);
        }

        #[test]
        fn arbitrary_registrations_never_panic(line in "RP2P/1 (UN)?REGISTER [0-9]{0,6}( [0-9a-f.:]{0,20})?") {
            let _ = relay().respond(&mut Cursor::new(format!("{line}\n")), FROM);
        }
    }
}
