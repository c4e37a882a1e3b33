//! Sending a file to a client that may read slowly, giving up only on one
//! that stops.
//!
//! A socket's write timeout bounds each blocking write, and Linux wakes a
//! writer blocked on a full send buffer only once a good part of it (a
//! third) is free again. A client that reads a few KB/s therefore leaves
//! a write blocked for longer than the timeout although it reads all the
//! time. So a write that times out is not the end: the peer looks at how
//! many bytes the kernel still holds for the client, and goes on while
//! that number goes down. It gives up when nothing moved for `patience`.
//!
//! A peer with an upload cap shares one [`Throttle`] over all its
//! connections: each sendfile call is asked to move no more than the
//! tokens at hand, and waits for more when there are none.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

/// The smallest burst of a throttle: small caps still send in chunks big
/// enough that a sendfile call is worth making.
const MIN_BURST: u64 = 256 << 10;

/// The longest one wait for tokens lasts before the throttle looks again
/// whether it was closed.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// A token bucket: at most `rate` bytes a second on average, over every
/// connection that shares it, with bursts of a tenth of a second's worth
/// (at least 256 KiB).
pub struct Throttle {
    rate: u64,
    burst: u64,
    /// Tokens at hand, as of the instant.
    bucket: Mutex<(f64, Instant)>,
    /// Set once a stopping peer's grace is over: waiting transfers end.
    closed: AtomicBool,
}

impl Throttle {
    /// A throttle of `rate` bytes a second (at least 1), full at the start.
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        let burst = (rate / 10).max(MIN_BURST);
        Throttle {
            rate,
            burst,
            bucket: Mutex::new((burst as f64, Instant::now())),
            closed: AtomicBool::new(false),
        }
    }

    /// Ends every wait for tokens, now and later, with an error.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Waits until a useful amount may go (an eighth of the burst, or all
    /// of `want` if less) and takes up to `want` bytes' worth; returns how
    /// many, and how long it waited. Fails once the throttle is closed.
    pub fn take(&self, want: u64) -> io::Result<(u64, Duration)> {
        let started = Instant::now();
        let least = want.min(self.burst / 8).max(1) as f64;
        // Bounded: each round waits at most MAX_WAIT, and the tokens
        // needed arrive within least / rate seconds.
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(io::Error::other("the peer is stopping"));
            }
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let (tokens, then) = *bucket;
            let tokens = (tokens + now.duration_since(then).as_secs_f64() * self.rate as f64)
                .min(self.burst as f64);
            if tokens >= least {
                let granted = (tokens.floor() as u64).min(want);
                *bucket = (tokens - granted as f64, now);
                return Ok((granted, started.elapsed()));
            }
            *bucket = (tokens, now);
            drop(bucket);
            let missing = Duration::from_secs_f64((least - tokens) / self.rate as f64);
            std::thread::sleep(missing.clamp(Duration::from_millis(1), MAX_WAIT));
        }
    }

    /// Gives back tokens taken but not used (the socket took less).
    pub fn give_back(&self, unused: u64) {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket.0 = (bucket.0 + unused as f64).min(self.burst as f64);
    }
}

/// Where a file goes: a client's socket, or (in tests) memory.
pub trait Outlet: Write {
    /// The socket under this writer, for sendfile and progress checks.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Outlet for &TcpStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Outlet for Vec<u8> {}

/// The most one sendfile call is asked to move; it returns sooner anyway.
const MAX_CHUNK: u64 = 1 << 30;

/// The most bytes of a file the kernel holds for a client before it sends
/// them (`TCP_NOTSENT_LOWAT`). Bytes in flight are not counted, so the
/// congestion window is left alone. Without it the send buffer autotunes
/// to megabytes of queued pages: on a 1 GiB loopback transfer the peer
/// then spent 0.26-0.37 s of CPU, most of it in softirq work, in freeing
/// sent buffers that had left the cache and in waits for the socket's
/// lock, and kept ksoftirqd busy; with 64 KiB it spends 0.15-0.17 s and
/// the client's `get -o` finishes sooner (BENCHMARKS.md, "The peer's
/// send queue").
#[cfg(target_os = "linux")]
const NOTSENT_LOWAT: u32 = 64 << 10;

/// Sends `len` bytes of `file` from `offset`; returns how many went out
/// (fewer when the file shrank). Gives up with `TimedOut` when the client
/// took nothing for `patience`. A socket is sent to no faster than
/// `throttle` allows.
pub fn send<W: Outlet>(
    file: &mut File,
    offset: u64,
    len: u64,
    out: &mut W,
    patience: Duration,
    throttle: Option<&Throttle>,
) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    if let Some(socket) = out.socket() {
        // Each write waits at most a quarter of the patience, so that
        // progress is looked at often enough to give up on time.
        let step = (patience / 4).max(Duration::from_millis(50));
        let watch = Watch {
            patience,
            step,
            queued,
        };
        return send_watching(file, offset, len, socket, &watch, throttle);
    }
    let _ = (patience, throttle);
    file.seek(SeekFrom::Start(offset))?;
    io::copy(&mut file.take(len), out)
}

/// The sendfile loop (what `io::copy` does for a file and a socket), with
/// a timed-out write judged by the client's progress. `queued` tells how
/// many bytes the kernel holds for the client, sent or not.
#[cfg(target_os = "linux")]
struct Watch {
    patience: Duration,
    /// The write timeout: how often progress is looked at.
    step: Duration,
    queued: fn(&TcpStream) -> io::Result<u64>,
}

#[cfg(target_os = "linux")]
fn send_watching(
    file: &File,
    mut offset: u64,
    len: u64,
    socket: &TcpStream,
    watch: &Watch,
    throttle: Option<&Throttle>,
) -> io::Result<u64> {
    use rustix::io::Errno;
    let Watch {
        patience,
        step,
        queued,
    } = *watch;
    socket.set_write_timeout(Some(step))?;
    // Only a speed-up: a kernel without the option sends all the same.
    if let Err(e) = socket2::SockRef::from(socket).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        log::debug!("cannot limit the unsent bytes of a transfer: {e}");
    }
    let mut sent = 0;
    let mut moved = Instant::now();
    let mut last_queued = None;
    while sent < len {
        let mut want = (len - sent).min(MAX_CHUNK);
        if let Some(throttle) = throttle {
            let (granted, waited) = throttle.take(want)?;
            want = granted;
            // Time spent waiting for tokens is not the client's slowness.
            moved += waited;
        }
        let result = rustix::fs::sendfile(socket, file, Some(&mut offset), want as usize);
        if let Some(throttle) = throttle {
            let used = *result.as_ref().unwrap_or(&0) as u64;
            throttle.give_back(want - used.min(want));
        }
        match result {
            Ok(0) => break,
            // Room in the send buffer: the client took some.
            Ok(n) => {
                sent += n as u64;
                moved = Instant::now();
            }
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                // Unknown (no /proc) counts as no progress: as before.
                let now = queued(socket).ok();
                if now.is_some() && last_queued.is_some_and(|last| now < Some(last)) {
                    moved = Instant::now();
                }
                last_queued = now;
                if moved.elapsed() >= patience {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sent)
}

/// Bytes written to `socket` and not yet acknowledged by the client
/// (sent or not): the `tx_queue` of its line in /proc/net/tcp, found by
/// the socket's inode. SIOCOUTQ and TCP_INFO tell the same, but no safe
/// API for them was at hand.
#[cfg(target_os = "linux")]
fn queued(socket: &TcpStream) -> io::Result<u64> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))?.ino();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(queue) = tx_queue(&text, inode) {
            return Ok(queue);
        }
    }
    Err(io::Error::other("socket not found in /proc/net/tcp"))
}

/// The `tx_queue` of the socket with `inode` in a /proc/net/tcp table:
/// `sl local remote st tx_queue:rx_queue tr:when retrnsmt uid timeout inode ...`.
fn tx_queue(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        if fields.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        let (tx, _rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(tx, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write, net::TcpListener, thread};

    #[test]
    fn the_queue_of_a_socket_is_read_from_its_line() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 0001A2B0:00000000 01:00000014 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(tx_queue(table, 222), Some(0x1a2b0));
        assert_eq!(tx_queue(table, 111), Some(0));
        assert_eq!(tx_queue(table, 333), None);
        assert_eq!(tx_queue("header only\n", 222), None);
    }

    #[test]
    fn a_real_socket_has_its_queue_found() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(queued(&server).unwrap(), 0);
        drop(client);
    }

    fn pair(receive_buffer: usize) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // A small receive buffer keeps what is in flight small, so that the
        // sender's queue shows the reader's pace.
        client.set_recv_buffer_size(receive_buffer).unwrap();
        client
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        // A fixed send buffer (autotuned, it grows to megabytes on
        // loopback and swallows the whole file): blocked writes are woken
        // once a third of it is free, 170 KB, which this reader takes in
        // most of a second.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(256 << 10)
            .unwrap();
        (server, client.into())
    }

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&content).unwrap();
        (file, content)
    }

    /// Reads 4 KB every 20 ms (200 KB/s) until the end or an error;
    /// returns what came.
    fn slow_reader(mut client: TcpStream) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0; 4096];
            loop {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    }

    const LEN: usize = 512 << 10;
    const PATIENCE: Duration = Duration::from_millis(200);

    /// A client that reads steadily (about 200 KB/s), but too slowly for
    /// the kernel to wake a blocked writer within the patience: it gets
    /// everything.
    #[test]
    fn a_slow_but_steady_reader_gets_everything() {
        let (file, content) = file_of(LEN);
        let (server, client) = pair(4096);
        let reader = slow_reader(client);
        let source = file.reopen().unwrap();
        let watch = Watch {
            patience: PATIENCE,
            step: PATIENCE / 4,
            queued,
        };
        let sent = send_watching(&source, 0, LEN as u64, &server, &watch, None)
            .expect("a reading client is not given up on");
        assert_eq!(sent, LEN as u64);
        drop(server);
        assert!(reader.join().unwrap() == content);
    }

    #[test]
    fn a_client_that_stops_reading_is_given_up_on_in_time() {
        let (file, content) = file_of(16 << 20);
        let (server, client) = pair(4096);
        let mut source = file.reopen().unwrap();
        let started = Instant::now();
        let patience = Duration::from_millis(500);
        let err = send(
            &mut source,
            0,
            content.len() as u64,
            &mut &server,
            patience,
            None,
        )
        .expect_err("nobody reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= patience && took < patience * 4, "{took:?}");
        drop(client);
    }

    #[test]
    fn a_transfer_keeps_few_bytes_unsent() {
        let (file, content) = file_of(LEN);
        let (server, mut client) = pair(64 << 10);
        let reader = thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).map(|_| got)
        });
        let mut source = file.reopen().unwrap();
        let sent = send(&mut source, 0, LEN as u64, &mut &server, PATIENCE, None).unwrap();
        assert_eq!(sent, LEN as u64);
        let lowat = socket2::SockRef::from(&server).tcp_notsent_lowat().unwrap();
        assert_eq!(lowat, NOTSENT_LOWAT);
        drop(server);
        assert!(reader.join().unwrap().unwrap() == content);
    }

    #[test]
    fn memory_gets_the_part_asked_for() {
        let (file, content) = file_of(1000);
        let mut out = Vec::new();
        let mut source = file.reopen().unwrap();
        assert_eq!(
            send(&mut source, 10, 100, &mut out, Duration::from_secs(1), None).unwrap(),
            100
        );
        assert_eq!(out, &content[10..110]);
    }

    /// Takes `total` bytes' worth in requests of `each`; returns the time.
    fn drain(throttle: &Throttle, total: u64, each: u64) -> Duration {
        let started = Instant::now();
        let mut taken = 0;
        while taken < total {
            let (granted, _) = throttle.take(each.min(total - taken)).unwrap();
            assert!(granted > 0 && granted <= each);
            taken += granted;
        }
        started.elapsed()
    }

    #[test]
    fn a_throttle_lets_a_burst_through_then_holds_to_its_rate() {
        // 2 MiB/s: a burst of 256 KiB, then 1 MiB takes half a second.
        let throttle = Throttle::new(2 << 20);
        assert!(drain(&throttle, 256 << 10, 64 << 10) < Duration::from_millis(100));
        let took = drain(&throttle, 1 << 20, 64 << 10);
        assert!(took >= Duration::from_millis(450), "{took:?}");
        // Given back, tokens can be taken again at once.
        throttle.give_back(128 << 10);
        assert!(drain(&throttle, 128 << 10, 128 << 10) < Duration::from_millis(50));
    }

    #[test]
    fn a_throttle_is_shared_by_everyone_who_takes_from_it() {
        let throttle = Throttle::new(2 << 20);
        drain(&throttle, 256 << 10, 256 << 10);
        let started = Instant::now();
        thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| drain(&throttle, 512 << 10, 64 << 10));
            }
        });
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }

    #[test]
    fn a_closed_throttle_ends_a_wait_at_once() {
        let throttle = Throttle::new(1);
        throttle.take(MIN_BURST).unwrap();
        let started = Instant::now();
        thread::scope(|s| {
            let waiter = s.spawn(|| throttle.take(1000));
            thread::sleep(Duration::from_millis(50));
            throttle.close();
            assert!(waiter.join().unwrap().is_err());
        });
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
