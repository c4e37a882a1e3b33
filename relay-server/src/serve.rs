//! The accept loop and the handling of one connection: one request, one reply.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use log::{debug, info, warn};
use protocol::{
    describe_io,
    relay::{Request, Response},
    ErrorCode, ErrorReply, PeerAddr, MAX_LINE,
};

use crate::{
    registry::{Registered, Registry},
    shutdown::Shutdown,
};

pub struct Config {
    pub bind: SocketAddr,
    pub ttl: Duration,
    pub max_registered: usize,
    pub max_peers_returned: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub grace: Duration,
}

/// Everything a connection handler needs, shared by all of them.
struct Relay {
    registry: Registry,
    max_peers_returned: usize,
    idle_timeout: Duration,
    started: Instant,
    open: AtomicUsize,
    /// Connection threads waiting for work that no connection is promised to.
    idle: AtomicUsize,
    stats: Stats,
}

/// How long a connection thread waits for the next connection before it exits.
const KEEP_IDLE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Stats {
    registrations: AtomicU64,
    unregistrations: AtomicU64,
    lookups: AtomicU64,
    expired: AtomicU64,
    bad_requests: AtomicU64,
    busy_rejections: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Binds, prints the bound address as the first line of stdout, and serves
/// until Ctrl-C or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    let listener = listen(config.bind).with_context(|| format!("cannot bind {}", config.bind))?;
    let local = listener
        .local_addr()
        .context("cannot read the bound address")?;
    crate::announce_address(local)?;
    info!("relay listening on {local} (ttl {}s)", config.ttl.as_secs());

    let shutdown = Shutdown::install(local)?;
    let relay = Arc::new(Relay::new(&config));
    // Connection threads are reused: starting and ending a thread per
    // connection cost more than the lookup itself (stack mappings, and TLB
    // shootdowns across cores when a finished thread's stack is released).
    let (queue, waiting) = mpsc::channel::<TcpStream>();
    let waiting = Arc::new(Mutex::new(waiting));
    let sweeper = {
        let (relay, shutdown) = (Arc::clone(&relay), Arc::clone(&shutdown));
        thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || sweep(&relay, &shutdown))
            .context("cannot start the expiry thread")?
    };

    for stream in listener.incoming() {
        if shutdown.is_triggered() {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!("cannot accept a connection: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if relay.open.fetch_add(1, Ordering::SeqCst) >= config.max_connections {
            relay.open.fetch_sub(1, Ordering::SeqCst);
            bump(&relay.stats.busy_rejections);
            reject_busy(stream, config.max_connections);
            continue;
        }
        let claimed = relay
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            // The receiving end lives as long as the claimed thread.
            let _ = queue.send(stream);
            continue;
        }
        // Every thread is busy: start one more. A thread starts only when
        // none is idle, so there are never more than `max_connections`.
        let (handler, waiting) = (Arc::clone(&relay), Arc::clone(&waiting));
        let spawned = thread::Builder::new()
            .name("conn".into())
            .spawn(move || work(&handler, &waiting, stream));
        if let Err(e) = spawned {
            relay.open.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a connection thread: {e}");
        }
    }
    drop(queue);

    // Refuse new connections at once rather than let them wait in the backlog.
    drop(listener);
    info!("shutting down");
    let deadline = Instant::now() + config.grace;
    while relay.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let _ = sweeper.join();
    info!("stopped");
    Ok(())
}

/// Handshakes the kernel may queue before `accept`. std's fixed 128
/// overflowed when 10,000 peers registered at once: tens of thousands of
/// handshakes dropped, and some peers left waiting out their timeout. The
/// kernel caps this at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// `TcpListener::bind` with a longer accept queue.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does on Unix, so that a restarted relay can bind at once.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A connection thread: serves `first`, then whatever the accept loop hands
/// it, until no connection came for `KEEP_IDLE` or the server stops.
fn work(relay: &Relay, waiting: &Mutex<mpsc::Receiver<TcpStream>>, first: TcpStream) {
    let mut next = Some(first);
    while let Some(stream) = next.take() {
        handle(relay, stream);
        relay.open.fetch_sub(1, Ordering::SeqCst);
        relay.idle.fetch_add(1, Ordering::SeqCst);
        // Each idle thread has its own deadline (threads queued on the lock
        // check theirs when they get it), so a burst's threads all leave
        // KEEP_IDLE after it, even while traffic trickles on. A thread
        // whose slot the accept loop already claimed waits for the
        // connection that is on its way; one always is (idle threads =
        // `idle` + connections sent but not yet received).
        let until = Instant::now() + KEEP_IDLE;
        let mut promised = false;
        while next.is_none() {
            let receiver = waiting.lock().unwrap_or_else(|p| p.into_inner());
            let got = if promised {
                receiver
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            } else {
                receiver.recv_timeout(until.saturating_duration_since(Instant::now()))
            };
            match got {
                Ok(stream) => next = Some(stream),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let unclaimed = relay
                        .idle
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if unclaimed {
                        return;
                    }
                    promised = true;
                }
            }
        }
    }
}

/// Expires silent peers about once a second.
fn sweep(relay: &Relay, shutdown: &Shutdown) {
    while !shutdown.sleep(Duration::from_secs(1)) {
        for peer in relay.registry.expire(Instant::now()) {
            bump(&relay.stats.expired);
            info!(
                "expired {peer} (silent for more than {}s)",
                relay.registry.ttl().as_secs()
            );
        }
    }
}

/// Over the connection cap: say so, rather than leave the caller hanging.
fn reject_busy(mut stream: TcpStream, max: usize) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let reply = ErrorReply::new(
        ErrorCode::Busy,
        format!("too many connections (limit {max})"),
    );
    let _ = Response::Error(reply).write_to(&mut stream);
    close_gently(&stream, Duration::ZERO);
    warn!("busy: rejected a connection (limit {max})");
}

/// Ends a connection without a reset. Closing a socket with unread input
/// makes the kernel send RST, which can destroy the reply before the
/// caller has read it; so stop writing, and read (a bounded amount) until
/// the caller closes too: for up to `wait`, or only what has already
/// arrived when `wait` is zero (the accept loop must not stall).
fn close_gently(stream: &TcpStream, wait: Duration) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let waiting = if wait.is_zero() {
        stream.set_nonblocking(true)
    } else {
        stream.set_read_timeout(Some(wait))
    };
    if waiting.is_err() {
        return;
    }
    let mut buf = [0; MAX_LINE];
    for _ in 0..16 {
        match (&mut &*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn handle(relay: &Relay, stream: TcpStream) {
    let started = Instant::now();
    let remote = match stream.peer_addr() {
        Ok(addr) => addr,
        Err(e) => return debug!("connection gone before it was served: {e}"),
    };
    if let Err(e) = stream.set_write_timeout(Some(relay.idle_timeout)) {
        return warn!("{remote}: cannot set timeouts: {e}");
    }
    let mut input =
        BufReader::with_capacity(MAX_LINE, Deadline::after(&stream, relay.idle_timeout));
    let Some((summary, response)) = relay.respond(&mut input, remote.ip()) else {
        return debug!("{remote}: closed without a request");
    };
    // Built in memory (at most 1000 short lines) so that its size can be logged.
    let mut reply = Vec::new();
    let sent = response
        .write_to(&mut reply)
        .and_then(|()| (&stream).write_all(&reply));
    let (elapsed, bytes) = (started.elapsed(), reply.len());
    if matches!(response, Response::Error(_)) {
        // A refused request may have left input unread.
        close_gently(&stream, Duration::from_millis(200));
    }
    match sent {
        Ok(()) => info!("{remote} {summary}: {bytes} bytes ({elapsed:.1?})"),
        Err(e) => info!(
            "{remote} {summary}, reply not delivered: {} ({elapsed:.1?})",
            describe_io(&e)
        ),
    }
}

/// Reads from a socket until a deadline. A read timeout alone is per read,
/// so a caller trickling one byte every few seconds would never time out.
struct Deadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Deadline<'a> {
    fn after(stream: &'a TcpStream, limit: Duration) -> Self {
        Deadline {
            stream,
            deadline: Instant::now() + limit,
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Relay {
    fn new(config: &Config) -> Self {
        Relay {
            registry: Registry::new(config.ttl, config.max_registered),
            max_peers_returned: config.max_peers_returned,
            idle_timeout: config.idle_timeout,
            started: Instant::now(),
            open: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            stats: Stats::default(),
        }
    }

    /// Reads one request and carries it out; returns a log summary and the
    /// reply, or `None` if the caller closed without asking anything.
    fn respond(&self, input: &mut impl BufRead, from: IpAddr) -> Option<(String, Response)> {
        match Request::read_from(input) {
            Ok(Some(request)) => Some(self.answer(request, from)),
            Ok(None) => None,
            Err(e) => {
                bump(&self.stats.bad_requests);
                Some((format!("bad request: {e}"), Response::Error((&e).into())))
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
                bump(&self.stats.registrations);
                match self.registry.register(peer, now) {
                    Registered::Full => {
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
            ("connections_open", self.open.load(Ordering::Relaxed) as u64),
            ("registrations", get(&s.registrations)),
            ("unregistrations", get(&s.unregistrations)),
            ("lookups", get(&s.lookups)),
            ("expired", get(&s.expired)),
            ("bad_requests", get(&s.bad_requests)),
            ("busy_rejections", get(&s.busy_rejections)),
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

    fn relay() -> Relay {
        Relay::new(&Config {
            bind: ([127, 0, 0, 1], 0).into(),
            ttl: Duration::from_secs(90),
            max_registered: 3,
            max_peers_returned: 2,
            max_connections: 10,
            idle_timeout: Duration::from_secs(5),
            grace: Duration::ZERO,
        })
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 9));

    fn ask(relay: &Relay, line: &str) -> Response {
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
