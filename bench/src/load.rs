//! Load generators (many short connections from threads) and the trivial
//! one-line-reply server that the relay is compared with.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Context;

/// Connect, read and write timeout of every harness connection.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply read; relay replies are a few KiB at most.
const MAX_REPLY: u64 = 1 << 20;

/// One conversation the way clients hold it: connect, send one line, read
/// the reply until the server closes. The reply lands in `buf`.
pub fn exchange(addr: SocketAddr, request: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    talk(TcpStream::connect_timeout(&addr, TIMEOUT)?, request, buf)
}

/// `exchange` from the local address `src` (port chosen by the kernel):
/// the relay keys a peer by the address its connection comes from, and
/// spreading clients over 127.0.0.0/8 spreads them over more port ranges.
pub fn exchange_from(
    src: IpAddr,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    socket.connect_timeout(&addr.into(), TIMEOUT)?;
    talk(socket.into(), request, buf)
}

fn talk(mut stream: TcpStream, request: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    stream.write_all(request)?;
    buf.clear();
    (&mut stream).take(MAX_REPLY).read_to_end(buf)?;
    Ok(())
}

/// What a load run did.
#[derive(Default)]
pub struct Load {
    pub ok: u64,
    /// Replies that did not start as expected (`ERR busy`, ...).
    pub refused: u64,
    /// Connections that failed (refused, reset, timed out, no free port).
    pub failed: u64,
    pub first_refusal: Option<String>,
    pub first_failure: Option<String>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn merge(&mut self, other: Load) {
        self.ok += other.ok;
        self.refused += other.refused;
        self.failed += other.failed;
        self.first_refusal = self.first_refusal.take().or(other.first_refusal);
        self.first_failure = self.first_failure.take().or(other.first_failure);
        self.latencies.extend(other.latencies);
    }

    pub fn record(&mut self, started: Instant, result: io::Result<()>, reply: &[u8], expect: &str) {
        match result {
            Ok(()) if reply.starts_with(expect.as_bytes()) => {
                self.ok += 1;
                self.latencies.push(started.elapsed());
            }
            Ok(()) => {
                self.refused += 1;
                let text = String::from_utf8_lossy(reply);
                self.first_refusal
                    .get_or_insert_with(|| format!("{:?}", text.trim_end()));
            }
            Err(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// `threads` clients each repeating one conversation with `addr` until
/// `duration` is over or `max_total` conversations were started.
pub fn hammer(
    addr: SocketAddr,
    request: &str,
    expect: &str,
    threads: usize,
    duration: Duration,
    max_total: u64,
) -> Load {
    let started = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (started, request, expect) = (
                Arc::clone(&started),
                request.to_string(),
                expect.to_string(),
            );
            thread::spawn(move || {
                let mut load = Load::default();
                let mut buf = Vec::with_capacity(4096);
                while Instant::now() < deadline
                    && started.fetch_add(1, Ordering::Relaxed) < max_total
                {
                    let begin = Instant::now();
                    let result = exchange(addr, request.as_bytes(), &mut buf);
                    load.record(begin, result, &buf, &expect);
                }
                load
            })
        })
        .collect();
    let mut total = Load::default();
    for worker in workers {
        if let Ok(load) = worker.join() {
            total.merge(load);
        }
    }
    total.elapsed = t0.elapsed();
    total
}

/// Simulated peers, one thread each, all starting at the same instant:
/// peer `i` connects from `source(i)` and sends `lines[i][0]`, then the
/// next of its lines (a heartbeat) every `interval`. Latencies count from
/// when each round was due, so a herd that queues shows up in them.
pub fn herd(
    addr: SocketAddr,
    lines: Vec<Vec<Vec<u8>>>,
    source: fn(usize) -> IpAddr,
    interval: Duration,
    expect: &str,
) -> anyhow::Result<Load> {
    let peers = lines.len();
    // A common start time rather than a barrier: time enough to start every
    // thread, and nothing to untangle if starting one fails.
    let t0 = Instant::now() + Duration::from_secs(2);
    let mut workers = Vec::with_capacity(peers);
    for (i, rounds) in lines.into_iter().enumerate() {
        let expect = expect.to_string();
        let worker = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut load = Load::default();
                let mut buf = Vec::new();
                for (round, line) in (0..).zip(&rounds) {
                    let due = t0 + interval * round;
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    let result = exchange_from(source(i), addr, line, &mut buf);
                    load.record(due, result, &buf, &expect);
                }
                load
            })
            .context("cannot start a load thread (raise ulimit -u?)")?;
        workers.push(worker);
    }
    anyhow::ensure!(
        Instant::now() < t0,
        "starting {peers} threads took more than 2 s: the herd was not released at once"
    );
    let mut total = Load::default();
    for worker in workers {
        if let Ok(load) = worker.join() {
            total.merge(load);
        }
    }
    total.elapsed = t0.elapsed();
    Ok(total)
}

/// A listener with the relay's accept queue (4096; std's is 128), so that
/// a herd measures the servers, not their queues.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The baseline server: answers every connection with one fixed line, on a
/// few threads that accept and answer inline, no parsing, no logging.
pub struct Trivial {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Trivial {
    pub fn start(ip: IpAddr, reply: &'static str, threads: usize) -> anyhow::Result<Trivial> {
        let listener = listen(SocketAddr::new(ip, 0)).context("cannot bind the trivial server")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..threads {
            let listener = listener.try_clone()?;
            let stop = Arc::clone(&stop);
            workers.push(thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = answer(&stream, reply);
                    }
                }
            }));
        }
        Ok(Trivial {
            addr,
            stop,
            workers,
        })
    }
}

fn answer(mut stream: &TcpStream, reply: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(4096)
        .read_until(b'\n', &mut line)?;
    stream.write_all(reply.as_bytes())
}

impl Drop for Trivial {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Each blocked accept needs a connection to notice the flag.
        for _ in &self.workers {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
