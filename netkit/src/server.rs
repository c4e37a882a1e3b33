//! A blocking TCP server: an accept loop that hands each connection to a
//! capped pool of reused threads, answers `ERR busy` past the cap (and
//! past a cap per source address), and stops on its [`Shutdown`], letting
//! connections in flight finish.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::warn;
use protocol::{ErrorCode, ErrorReply, ProtocolError};

use crate::{close_gently, describe_io, is_timeout, Shutdown};

/// How a server listens and how many connections it serves at once.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Handshakes the kernel may queue before `accept`. std's fixed 128
    /// overflowed when 10,000 peers registered at once. The kernel caps
    /// this at `net.core.somaxconn`.
    pub backlog: i32,
    /// Connections served at once; more are answered `ERR busy`.
    pub max_connections: usize,
    /// Connections served at once from one source (see [`source_key`]);
    /// more are answered `ERR busy retry-after 1`, so that one host
    /// reconnecting in a loop cannot hold every slot. 0: no such cap.
    pub max_per_ip: usize,
    /// Loopback sources are not held to `max_per_ip`: one machine may run
    /// a whole test network.
    pub exempt_loopback: bool,
    /// How long an idle connection thread waits for the next connection
    /// before it exits.
    pub keep_idle: Duration,
    /// Stack of each connection thread. Handlers keep their buffers on the
    /// heap, so a small stack serves; it bounds the memory a flood of idle
    /// connections can pin.
    pub stack_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            backlog: 4096,
            max_connections: 512,
            max_per_ip: 0,
            exempt_loopback: true,
            keep_idle: Duration::from_secs(10),
            stack_size: 256 << 10,
        }
    }
}

/// A running server built on [`Server`]: the relay and the peer. Gives
/// both the same handle: where it listens, its stop signal, and a graceful
/// stop.
pub trait Running: Sized {
    /// The server underneath.
    fn server(&self) -> &Server;

    /// Stops gracefully: stops accepting, finishes what is in flight (each
    /// server says how long it waits), ends its threads.
    fn stop(self);

    /// The address it listens on.
    fn local_addr(&self) -> SocketAddr {
        self.server().local_addr()
    }

    /// Its stop signal: trigger it (from a signal handler, say) to make
    /// [`Running::wait`] return.
    fn shutdown(&self) -> Arc<Shutdown> {
        Arc::clone(self.server().shutdown())
    }

    /// Serves until the stop signal, then stops gracefully.
    fn wait(self) {
        self.server().shutdown().wait();
        self.stop();
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound (in use, not ours, no permission).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// What the system said.
        source: io::Error,
    },
}

/// Binds `addr` with `backlog`; returns the listener and the address it got.
pub fn bind(addr: SocketAddr, backlog: i32) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind { addr, source };
    let listener = listen(addr, backlog).map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// The source that limits per address count under: an IPv4 address (also
/// one mapped into IPv6) as it is, an IPv6 address by its /64, the block
/// one host or one site is usually given; counting single IPv6 addresses
/// would give such a host 2^64 shares.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Whether limits per source leave `ip` alone: a loopback address, when
/// loopback is exempt.
pub fn is_exempt(ip: IpAddr, exempt_loopback: bool) -> bool {
    exempt_loopback && ip.to_canonical().is_loopback()
}

/// Starts a named thread of a server (`what` names it in errors).
pub fn spawn_thread<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, StartError> {
    thread::Builder::new()
        .name(what.into())
        .spawn(f)
        .map_err(|source| StartError::Thread { what, source })
}

/// `TcpListener::bind` with a chosen accept queue.
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does on Unix, so that a restarted server can bind at once.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Serves one connection; the pool closes it when this returns.
pub type Handler = dyn Fn(TcpStream) + Send + Sync;

/// A running server: its accept loop and its connection threads.
pub struct Server {
    local_addr: SocketAddr,
    shutdown: Arc<Shutdown>,
    pool: Arc<Connections>,
    accept: Option<JoinHandle<()>>,
}

/// The connections of one server: how many are open, how many were
/// turned away. Made before the server so that its handler can report them.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    /// Connection threads waiting for work that no connection is promised to.
    idle: AtomicUsize,
    busy_rejections: AtomicU64,
    /// Open connections per source held to a cap. A source is here only
    /// while it has one open, so this holds at most `max_connections`.
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_source_rejections: AtomicU64,
}

/// One connection's place under the caps, given back when dropped, also
/// when the handler panics.
struct Slot {
    pool: Arc<Connections>,
    /// The source whose count this connection is in, if it is held to one.
    source: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(source) = self.source {
            let mut per_source = self.pool.lock_per_source();
            if let Some(n) = per_source.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    per_source.remove(&source);
                }
            }
        }
        self.pool.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which cap a connection is over.
enum Over {
    All,
    Source(IpAddr),
}

impl Connections {
    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections answered `ERR busy` since start, over either cap.
    pub fn busy_rejections(&self) -> u64 {
        self.busy_rejections.load(Ordering::Relaxed)
    }

    /// Connections answered `ERR busy` because their source had as many
    /// open as it may.
    pub fn per_source_rejections(&self) -> u64 {
        self.per_source_rejections.load(Ordering::Relaxed)
    }

    fn lock_per_source(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.per_source.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `from` under both caps.
    fn try_slot(self: &Arc<Self>, limits: &Limits, from: IpAddr) -> Result<Slot, Over> {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limits.max_connections).then_some(n + 1)
            })
            .map_err(|_| Over::All)?;
        // From here on, dropping `slot` gives the place back.
        let mut slot = Slot {
            pool: Arc::clone(self),
            source: None,
        };
        if limits.max_per_ip > 0 && !is_exempt(from, limits.exempt_loopback) {
            let source = source_key(from);
            let mut per_source = self.lock_per_source();
            let n = per_source.get(&source).copied().unwrap_or(0);
            if n >= limits.max_per_ip {
                return Err(Over::Source(source));
            }
            per_source.insert(source, n + 1);
            slot.source = Some(source);
        }
        Ok(slot)
    }

    /// Takes one idle thread's promise to serve the next connection sent.
    fn claim_idle(&self) -> bool {
        self.idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

type Job = (TcpStream, Slot);

impl Server {
    /// Starts the accept loop on `listener`, serving each connection with
    /// `handler` on a pool capped by `limits`, until `shutdown` triggers.
    pub fn spawn(
        listener: TcpListener,
        limits: Limits,
        shutdown: Arc<Shutdown>,
        pool: Arc<Connections>,
        handler: Arc<Handler>,
    ) -> Result<Server, StartError> {
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        let accept = {
            let (pool, shutdown) = (Arc::clone(&pool), Arc::clone(&shutdown));
            spawn_thread("accept", move || {
                accept_loop(listener, &limits, &shutdown, &pool, handler)
            })?
        };
        Ok(Server {
            local_addr,
            shutdown,
            pool,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's stop signal.
    pub fn shutdown(&self) -> &Arc<Shutdown> {
        &self.shutdown
    }

    /// Its connections.
    pub fn connections(&self) -> &Connections {
        &self.pool
    }

    /// Stops accepting (the listener is closed, so new connections are
    /// refused at once), then waits up to `grace` for the connections in
    /// flight; returns how many were still open when it gave up.
    pub fn stop(&mut self, grace: Duration) -> usize {
        self.stop_accepting();
        self.drain(grace)
    }

    /// Triggers the stop signal if nobody has, and closes the listener.
    pub fn stop_accepting(&mut self) {
        if !self.shutdown.is_triggered() {
            self.shutdown.trigger();
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }

    /// Waits up to `grace` for the connections in flight; returns how many
    /// were still open when it gave up.
    pub fn drain(&self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        while self.pool.open() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.pool.open()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

fn accept_loop(
    listener: TcpListener,
    limits: &Limits,
    shutdown: &Shutdown,
    pool: &Arc<Connections>,
    handler: Arc<Handler>,
) {
    // Connection threads are reused: starting and ending a thread per
    // connection cost more than a lookup (stack mappings, and TLB
    // shootdowns across cores when a finished thread's stack is released).
    let (queue, waiting) = mpsc::channel::<Job>();
    let waiting = Arc::new(Mutex::new(waiting));
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
        let from = match stream.peer_addr() {
            Ok(addr) => addr.ip(),
            // Gone before it was served.
            Err(_) => continue,
        };
        let slot = match pool.try_slot(limits, from) {
            Ok(slot) => slot,
            Err(over) => {
                pool.busy_rejections.fetch_add(1, Ordering::Relaxed);
                let (reply, why) = match over {
                    Over::All => {
                        let max = limits.max_connections;
                        (
                            ErrorReply::new(
                                ErrorCode::Busy,
                                format!("too many connections (limit {max})"),
                            ),
                            format!("limit {max}"),
                        )
                    }
                    Over::Source(source) => {
                        pool.per_source_rejections.fetch_add(1, Ordering::Relaxed);
                        let max = limits.max_per_ip;
                        // A slot from this source comes free as soon as
                        // one of its requests is answered: a second is plenty.
                        (
                            ErrorReply::busy_retry_after(
                                Duration::from_secs(1),
                                format!("too many connections from your address (limit {max})"),
                            ),
                            format!("limit {max} from {source}"),
                        )
                    }
                };
                reject_busy(stream, &reply, &why);
                continue;
            }
        };
        if pool.claim_idle() {
            // The receiving end lives as long as the claimed thread.
            let _ = queue.send((stream, slot));
            continue;
        }
        // Every thread is busy: start one more. A thread starts only when
        // none is idle, so there are never more than `max_connections`.
        let (pool, waiting, handler) =
            (Arc::clone(pool), Arc::clone(&waiting), Arc::clone(&handler));
        let keep_idle = limits.keep_idle;
        let spawned = thread::Builder::new()
            .name("conn".into())
            .stack_size(limits.stack_size)
            .spawn(move || work(&pool, &waiting, &*handler, keep_idle, (stream, slot)));
        if let Err(e) = spawned {
            // The job, and with it the slot, went down with the closure.
            warn!("cannot start a connection thread: {e}");
        }
    }
    // Dropping the queue ends the idle threads; dropping the listener
    // refuses new connections at once rather than leaving them in the backlog.
}

/// A connection thread: serves `first`, then whatever the accept loop hands
/// it, until no connection came for `keep_idle` or the server stops.
fn work(
    pool: &Connections,
    waiting: &Mutex<mpsc::Receiver<Job>>,
    handler: &Handler,
    keep_idle: Duration,
    first: Job,
) {
    let mut next = Some(first);
    while let Some((stream, slot)) = next.take() {
        handler(stream);
        drop(slot);
        pool.idle.fetch_add(1, Ordering::SeqCst);
        // Each idle thread has its own deadline (threads queued on the lock
        // check theirs when they get it), so a burst's threads all leave
        // `keep_idle` after it, even while traffic trickles on. A thread
        // whose promise the accept loop already claimed waits for the
        // connection that is on its way; one always is (idle threads =
        // `idle` + connections sent but not yet received).
        let until = Instant::now() + keep_idle;
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
                Ok(job) => next = Some(job),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if pool.claim_idle() {
                        return;
                    }
                    promised = true;
                }
            }
        }
    }
}

/// The `ERR` reply to a request that could not be read: a timeout says
/// so in words (not "resource temporarily unavailable"), and no system
/// error text goes over the network.
pub fn refusal(e: &ProtocolError) -> ErrorReply {
    match e {
        ProtocolError::Io(io) if is_timeout(io) => {
            ErrorReply::new(ErrorCode::Timeout, "no complete request line in time")
        }
        ProtocolError::Io(_) => ErrorReply::new(ErrorCode::Internal, "cannot read the request"),
        e => e.into(),
    }
}

/// What a log line says of a request that could not be read.
pub fn describe_refusal(e: &ProtocolError) -> String {
    match e {
        ProtocolError::Io(io) if is_timeout(io) => "timed out: no complete request line".into(),
        ProtocolError::Io(io) => format!("cannot read the request: {}", describe_io(io)),
        e => format!("bad request: {e}"),
    }
}

/// Over a connection cap: say so at once, rather than leave the caller
/// hanging; never waits on the caller (the accept loop must not stall).
fn reject_busy(stream: TcpStream, reply: &ErrorReply, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = reply.write_to(&mut &stream);
    close_gently(&stream, Duration::ZERO);
    warn!("busy: rejected a connection ({why})");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader, Write},
        sync::mpsc::{channel, Sender},
    };

    /// A server whose handler reports each connection that says `wait`,
    /// then waits for a word on `release` before answering `done`.
    fn server(max: usize) -> (Server, mpsc::Receiver<()>, Sender<()>) {
        server_with(Limits {
            max_connections: max,
            ..Limits::default()
        })
    }

    fn server_with(limits: Limits) -> (Server, mpsc::Receiver<()>, Sender<()>) {
        let (seen_tx, seen) = channel();
        let (release, release_rx) = channel::<()>();
        let (seen_tx, release_rx) = (Mutex::new(seen_tx), Mutex::new(release_rx));
        let listener = listen(([127, 0, 0, 1], 0).into(), 128).unwrap();
        let shutdown = Arc::new(Shutdown::new(listener.local_addr().unwrap()));
        let limits = Limits {
            keep_idle: Duration::from_millis(200),
            ..limits
        };
        let handler: Arc<Handler> = Arc::new(move |mut stream: TcpStream| {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            if line != "wait\n" {
                return;
            }
            let _ = seen_tx.lock().unwrap().send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            let _ = stream.write_all(b"done\n");
        });
        let server = Server::spawn(listener, limits, shutdown, Arc::default(), handler).unwrap();
        (server, seen, release)
    }

    fn waiting(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"wait\n").unwrap();
        stream
    }

    /// A connection to `addr` from the loopback address `from`, as if
    /// from another host.
    fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        socket.connect(&addr.into()).unwrap();
        socket.into()
    }

    fn waiting_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let mut stream = connect_from(from, addr);
        stream.write_all(b"wait\n").unwrap();
        stream
    }

    fn first_line(stream: &TcpStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn past_the_cap_connections_get_busy_and_are_counted() {
        let (server, seen, release) = server(2);
        let held: Vec<_> = (0..2)
            .map(|_| {
                let c = waiting(server.local_addr());
                seen.recv_timeout(Duration::from_secs(10)).unwrap();
                c
            })
            .collect();
        assert_eq!(server.connections().open(), 2);
        for rejected in 1..=2 {
            let extra = TcpStream::connect(server.local_addr()).unwrap();
            assert_eq!(
                first_line(&extra),
                "ERR busy too many connections (limit 2)\n"
            );
            assert_eq!(server.connections().busy_rejections(), rejected);
        }
        release.send(()).unwrap();
        release.send(()).unwrap();
        for c in &held {
            assert_eq!(first_line(c), "done\n");
        }
        // Slots come back (just after the handlers have answered): a new
        // connection is served, by a reused thread.
        until("the slots are back", || server.connections().open() == 0);
        let again = waiting(server.local_addr());
        seen.recv_timeout(Duration::from_secs(10)).unwrap();
        release.send(()).unwrap();
        assert_eq!(first_line(&again), "done\n");
    }

    /// Waits, a bounded while, until `done` holds.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never: {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_idle_thread_serves_the_next_connection() {
        let listener = listen(([127, 0, 0, 1], 0).into(), 128).unwrap();
        let shutdown = Arc::new(Shutdown::new(listener.local_addr().unwrap()));
        let limits = Limits {
            keep_idle: Duration::from_secs(10),
            ..Limits::default()
        };
        let handler: Arc<Handler> = Arc::new(|mut stream: TcpStream| {
            let me = format!("{:?}\n", thread::current().id());
            let _ = stream.write_all(me.as_bytes());
        });
        let server = Server::spawn(listener, limits, shutdown, Arc::default(), handler).unwrap();
        let first = first_line(&TcpStream::connect(server.local_addr()).unwrap());
        // The thread is idle once it has counted itself so.
        until("the thread is idle", || {
            server.pool.idle.load(Ordering::SeqCst) == 1
        });
        let second = first_line(&TcpStream::connect(server.local_addr()).unwrap());
        assert_eq!(first, second, "a new thread for each connection");
    }

    #[test]
    fn stop_gives_up_on_connections_at_the_end_of_the_grace_and_not_before() {
        let (mut server, seen, release) = server(4);
        let held = waiting(server.local_addr());
        seen.recv_timeout(Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        assert_eq!(server.stop(Duration::from_millis(100)), 1);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        release.send(()).unwrap();
        assert_eq!(first_line(&held), "done\n");
        // Nothing in flight: a long grace costs nothing.
        until("the connection is closed", || {
            server.connections().open() == 0
        });
        let started = Instant::now();
        assert_eq!(server.drain(Duration::from_secs(10)), 0);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn dropping_the_server_stops_it() {
        let (server, _seen, _release) = server(4);
        let addr = server.local_addr();
        drop(server);
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn refusals_say_what_went_wrong_and_no_more() {
        let timeout = ProtocolError::Io(io::ErrorKind::WouldBlock.into());
        assert_eq!(
            refusal(&timeout),
            ErrorReply::new(ErrorCode::Timeout, "no complete request line in time")
        );
        assert_eq!(
            describe_refusal(&timeout),
            "timed out: no complete request line"
        );
        let reset = ProtocolError::Io(io::ErrorKind::ConnectionReset.into());
        assert_eq!(
            refusal(&reset),
            ErrorReply::new(ErrorCode::Internal, "cannot read the request")
        );
        assert_eq!(
            describe_refusal(&reset),
            "cannot read the request: connection reset"
        );
        let long = ProtocolError::LineTooLong { limit: 10 };
        assert_eq!(
            refusal(&long),
            ErrorReply::new(ErrorCode::TooLong, "line longer than 10 bytes")
        );
        assert_eq!(
            describe_refusal(&long),
            "bad request: line longer than 10 bytes"
        );
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let (server, seen, release) = server_with(Limits {
            max_connections: 10,
            max_per_ip: 2,
            exempt_loopback: false,
            ..Limits::default()
        });
        let addr = server.local_addr();
        let held: Vec<_> = (0..2)
            .map(|_| {
                let c = waiting_from([127, 0, 0, 2], addr);
                seen.recv_timeout(Duration::from_secs(10)).unwrap();
                c
            })
            .collect();
        let extra = connect_from([127, 0, 0, 2], addr);
        assert_eq!(
            first_line(&extra),
            "ERR busy retry-after 1 too many connections from your address (limit 2)\n"
        );
        assert_eq!(server.connections().busy_rejections(), 1);
        assert_eq!(server.connections().per_source_rejections(), 1);
        // Another host is served meanwhile.
        let other = waiting_from([127, 0, 0, 3], addr);
        seen.recv_timeout(Duration::from_secs(10)).unwrap();
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        for c in held.iter().chain([&other]) {
            assert_eq!(first_line(c), "done\n");
        }
        // The source's count comes back with its slots.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.connections().open() > 0 {
            assert!(Instant::now() < deadline, "slots never came back");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(server.connections().lock_per_source().is_empty());
        let again = waiting_from([127, 0, 0, 2], addr);
        seen.recv_timeout(Duration::from_secs(10)).unwrap();
        release.send(()).unwrap();
        assert_eq!(first_line(&again), "done\n");
    }

    #[test]
    fn loopback_is_exempt_from_the_cap_per_source_unless_told() {
        let (server, seen, release) = server_with(Limits {
            max_connections: 10,
            max_per_ip: 1,
            ..Limits::default()
        });
        let held: Vec<_> = (0..3)
            .map(|_| {
                let c = waiting_from([127, 0, 0, 2], server.local_addr());
                seen.recv_timeout(Duration::from_secs(10)).unwrap();
                c
            })
            .collect();
        assert_eq!(server.connections().per_source_rejections(), 0);
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        for c in &held {
            assert_eq!(first_line(c), "done\n");
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert!(is_exempt("::1".parse().unwrap(), true));
        assert!(is_exempt("::ffff:127.0.0.5".parse().unwrap(), true));
        assert!(!is_exempt("127.0.0.1".parse().unwrap(), false));
        assert!(!is_exempt("192.0.2.7".parse().unwrap(), true));
    }

    #[test]
    fn a_panicking_handler_gives_its_slot_back() {
        let listener = listen(([127, 0, 0, 1], 0).into(), 128).unwrap();
        let shutdown = Arc::new(Shutdown::new(listener.local_addr().unwrap()));
        let limits = Limits {
            max_connections: 1,
            max_per_ip: 1,
            exempt_loopback: false,
            ..Limits::default()
        };
        let handler: Arc<Handler> = Arc::new(|stream: TcpStream| {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            if line == "panic\n" {
                panic!("handler panicked on purpose");
            }
            let _ = (&stream).write_all(b"fine\n");
        });
        let server = Server::spawn(listener, limits, shutdown, Arc::default(), handler).unwrap();
        let mut c = TcpStream::connect(server.local_addr()).unwrap();
        c.write_all(b"panic\n").unwrap();
        let mut rest = String::new();
        let _ = BufReader::new(&c).read_line(&mut rest);
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.connections().open() > 0 {
            assert!(Instant::now() < deadline, "slot never came back");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(server.connections().lock_per_source().is_empty());
        let mut c = TcpStream::connect(server.local_addr()).unwrap();
        c.write_all(b"hello\n").unwrap();
        assert_eq!(first_line(&c), "fine\n");
    }

    #[test]
    fn stop_refuses_new_connections_and_waits_for_those_in_flight() {
        let (mut server, seen, release) = server(4);
        let addr = server.local_addr();
        let inflight = waiting(addr);
        seen.recv_timeout(Duration::from_secs(10)).unwrap();
        let stopper = thread::spawn(move || {
            let left = server.stop(Duration::from_secs(10));
            (left, server)
        });
        // The listener closes before the grace period starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_ok() {
            assert!(Instant::now() < deadline, "still accepting");
            thread::sleep(Duration::from_millis(5));
        }
        release.send(()).unwrap();
        assert_eq!(first_line(&inflight), "done\n");
        let (left, _server) = stopper.join().unwrap();
        assert_eq!(left, 0);
    }
}
