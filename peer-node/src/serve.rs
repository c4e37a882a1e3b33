//! The accept loop and the handling of one connection: one request, then a
//! file streamed by the kernel, or the folder's listing, or an error.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use log::{debug, info, warn};
use protocol::{
    describe_io,
    peer::{FileHeader, Request, Response, MAX_FILES},
    ErrorCode, ErrorReply, FileName, MAX_LINE,
};

use crate::{
    announce::Announcer,
    files::Library,
    shutdown::Shutdown,
    stall::{self, Outlet},
};

pub struct Config {
    pub bind: SocketAddr,
    pub max_connections: usize,
    /// How long a connection may take to send its request.
    pub idle_timeout: Duration,
    /// How long one write may block on a client that does not read.
    pub write_timeout: Duration,
    /// How long transfers in flight may go on after a stop signal.
    pub grace: Duration,
}

struct Peer {
    library: Library,
    idle_timeout: Duration,
    write_timeout: Duration,
    open: AtomicUsize,
    /// Connection threads waiting for work that no connection is promised to.
    idle: AtomicUsize,
}

/// How long a connection thread waits for the next connection before it exits.
const KEEP_IDLE: Duration = Duration::from_secs(10);

/// Binds, prints the bound address as the first line of stdout, registers
/// with the relay, and serves until Ctrl-C or SIGTERM.
pub fn run(
    config: Config,
    library: Library,
    announcer: impl FnOnce(u16) -> Announcer,
) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(config.bind).with_context(|| format!("cannot bind {}", config.bind))?;
    let local = listener
        .local_addr()
        .context("cannot read the bound address")?;
    crate::announce_address(local)?;
    info!("serving {} on {local}", library.root().display());

    let shutdown = Shutdown::install(local)?;
    let announcer = Arc::new(announcer(local.port()));
    let heartbeat = {
        let (announcer, shutdown) = (Arc::clone(&announcer), Arc::clone(&shutdown));
        thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || announcer.run(&shutdown))
            .context("cannot start the heartbeat thread")?
    };
    let peer = Arc::new(Peer {
        library,
        idle_timeout: config.idle_timeout,
        write_timeout: config.write_timeout,
        open: AtomicUsize::new(0),
        idle: AtomicUsize::new(0),
    });
    {
        // Hash what is already there, so that the first request for a big
        // file does not keep its client waiting (and timing out) for it.
        let peer = Arc::clone(&peer);
        thread::Builder::new()
            .name("warm-up".into())
            .spawn(move || peer.library.warm_up())
            .context("cannot start the hashing thread")?;
    }
    // Connection threads are reused, as in the relay: starting and ending a
    // thread per connection costs more than serving a small file.
    let (queue, waiting) = mpsc::channel::<TcpStream>();
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
        if peer.open.fetch_add(1, Ordering::SeqCst) >= config.max_connections {
            peer.open.fetch_sub(1, Ordering::SeqCst);
            reject_busy(stream, config.max_connections);
            continue;
        }
        let claimed = peer
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
        let (handler, waiting) = (Arc::clone(&peer), Arc::clone(&waiting));
        let spawned = thread::Builder::new()
            .name("conn".into())
            .spawn(move || work(&handler, &waiting, stream));
        if let Err(e) = spawned {
            peer.open.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a connection thread: {e}");
        }
    }
    drop(queue);

    // Refuse new connections at once rather than let them wait in the
    // backlog; leave the list so that clients stop coming; then let
    // transfers finish. The heartbeat thread is not waited for: it stops
    // at its next check of the flag.
    drop(listener);
    info!("shutting down");
    announcer.unregister();
    drop(heartbeat);
    let deadline = Instant::now() + config.grace;
    while peer.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let left = peer.open.load(Ordering::SeqCst);
    if left > 0 {
        warn!("{left} transfers still running after the grace period; stopping anyway");
    }
    info!("stopped");
    Ok(())
}

/// A connection thread: serves `first`, then whatever the accept loop hands
/// it, until no connection came for `KEEP_IDLE` or the server stops.
fn work(peer: &Peer, waiting: &Mutex<mpsc::Receiver<TcpStream>>, first: TcpStream) {
    let mut next = Some(first);
    while let Some(stream) = next.take() {
        handle(peer, stream);
        peer.open.fetch_sub(1, Ordering::SeqCst);
        peer.idle.fetch_add(1, Ordering::SeqCst);
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
                    let unclaimed = peer
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

fn handle(peer: &Peer, stream: TcpStream) {
    let started = Instant::now();
    let remote = match stream.peer_addr() {
        Ok(addr) => addr,
        Err(e) => return debug!("connection gone before it was served: {e}"),
    };
    if let Err(e) = stream.set_write_timeout(Some(peer.write_timeout)) {
        return warn!("{remote}: cannot set timeouts: {e}");
    }
    let mut input = BufReader::with_capacity(MAX_LINE, Deadline::after(&stream, peer.idle_timeout));
    let Some((summary, result)) = respond(peer, &mut input, &mut &stream) else {
        return debug!("{remote}: closed without a request");
    };
    close_gently(&stream, Duration::from_millis(200));
    let elapsed = started.elapsed();
    match result {
        Ok(outcome) => info!("{remote} {summary}: {outcome} ({elapsed:.1?})"),
        Err(e) => info!("{remote} {summary}: failed: {e:#} ({elapsed:.1?})"),
    }
}

/// Reads one request and answers it on `out`; returns a log summary and
/// the outcome, or `None` if the caller closed without asking anything.
fn respond<W: Outlet>(
    peer: &Peer,
    input: &mut impl BufRead,
    out: &mut W,
) -> Option<(String, anyhow::Result<String>)> {
    let request = match Request::read_from(input) {
        Ok(Some(request)) => request,
        Ok(None) => return None,
        Err(e) => {
            let sent = Response::Error((&e).into()).write_to(out);
            return Some((
                format!("bad request: {e}"),
                sent.map(|()| "refused".into()).map_err(Into::into),
            ));
        }
    };
    Some(match request {
        Request::Get { name, offset } => (
            format!("GET {name:?} from {offset}"),
            send_file(peer, out, &name, offset),
        ),
        Request::List => ("LIST".to_string(), send_list(peer, out)),
    })
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

/// Sends the header and the file from `offset`; returns a log summary.
fn send_file<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
    offset: u64,
) -> anyhow::Result<String> {
    let served = match peer.library.open_file(name) {
        Ok(served) => served,
        Err(refusal) => {
            let summary = format!("refused: {refusal}");
            Response::Error((&refusal).into()).write_to(out)?;
            return Ok(summary);
        }
    };
    if offset > served.size {
        let reply = ErrorReply::new(
            ErrorCode::BadRequest,
            format!(
                "offset {offset} is past the end of {name:?} ({} bytes)",
                served.size
            ),
        );
        Response::Error(reply).write_to(out)?;
        return Ok("refused: offset past the end".into());
    }
    let mut file = served.file;
    Response::File(FileHeader {
        size: served.size,
        hash: served.hash,
    })
    .write_to(out)?;
    // File to socket by sendfile; a slow client is given up on only once
    // it has taken nothing for the write timeout.
    let want = served.size - offset;
    debug!("sending {want} bytes of {name:?} from {offset}");
    let sent = stall::send(&mut file, offset, want, out, peer.write_timeout)
        .map_err(|e| anyhow::anyhow!("transfer broke: {}", describe_io(&e)))?;
    if sent < want {
        anyhow::bail!("file shrank while being sent: {sent} of {want} bytes");
    }
    Ok(format!("sent {sent} bytes"))
}

fn send_list<W: Write>(peer: &Peer, out: &mut W) -> anyhow::Result<String> {
    let response = match peer.library.list(MAX_FILES) {
        Ok(listing) => Response::Files {
            entries: listing.entries,
            truncated: listing.truncated,
        },
        Err(e) => Response::Error(ErrorReply::new(
            ErrorCode::Internal,
            format!("cannot list the folder: {e}"),
        )),
    };
    response.write_to(out)?;
    Ok(match response {
        Response::Files { entries, truncated } => {
            format!(
                "{} files{}",
                entries.len(),
                if truncated { ", truncated" } else { "" }
            )
        }
        _ => "cannot list the folder".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn peer(dir: &std::path::Path) -> Peer {
        Peer {
            library: Library::open(dir).unwrap(),
            idle_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            open: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
        }
    }

    fn ask(peer: &Peer, request: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (_, outcome) =
            respond(peer, &mut Cursor::new(request), &mut out).expect("a request was sent");
        outcome.expect("reply written");
        out
    }

    #[test]
    fn get_sends_the_rest_of_the_file_from_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello world").unwrap();
        let peer = peer(dir.path());
        let hash = blake3::hash(b"hello world");
        assert_eq!(
            ask(&peer, b"RP2P/1 GET a.txt\n"),
            format!("FILE 11 {hash}\nhello world").into_bytes()
        );
        assert_eq!(
            ask(&peer, b"RP2P/1 GET a.txt 6\n"),
            format!("FILE 11 {hash}\nworld").into_bytes()
        );
        assert_eq!(
            ask(&peer, b"RP2P/1 GET a.txt 11\n"),
            format!("FILE 11 {hash}\n").into_bytes()
        );
        assert!(ask(&peer, b"RP2P/1 GET a.txt 12\n")
            .starts_with(b"ERR bad-request offset 12 is past the end"));
        assert!(ask(&peer, b"RP2P/1 GET b.txt\n").starts_with(b"ERR not-found"));
    }

    #[test]
    fn list_names_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a b.txt"), "x").unwrap();
        assert_eq!(
            ask(&peer(dir.path()), b"RP2P/1 LIST\n"),
            b"FILES 1\n1 a%20b.txt\n"
        );
    }

    #[test]
    fn bad_requests_get_an_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let peer = peer(dir.path());
        for (request, code) in [
            (&b"RP2P/1 GET ../etc/passwd\n"[..], "forbidden"),
            (b"RP2P/1 PUT x\n", "bad-request"),
            (b"HELLO\n", "version"),
            (b"\xff\xfe\n", "bad-request"),
            (b"RP2P/1 GET x", "bad-request"),
        ] {
            let reply = String::from_utf8(ask(&peer, request)).unwrap();
            assert!(
                reply.starts_with(&format!("ERR {code} ")),
                "{request:?}: {reply}"
            );
            assert!(
                reply.ends_with('\n') && reply.lines().count() == 1,
                "{reply}"
            );
        }
        let long = format!("RP2P/1 GET {}\n", "a".repeat(MAX_LINE));
        assert!(ask(&peer, long.as_bytes()).starts_with(b"ERR too-long "));
        assert!(respond(&peer, &mut Cursor::new(b""), &mut Vec::new()).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("a"), "content").unwrap();
            let _ = respond(&peer(dir.path()), &mut Cursor::new(bytes), &mut Vec::new());
        }

        #[test]
        fn arbitrary_gets_never_panic(line in "RP2P/1 (GET|LIST|get)( [a-z./%0-9]{0,12}){0,3}\n") {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("a"), "content").unwrap();
            let _ = respond(&peer(dir.path()), &mut Cursor::new(line), &mut Vec::new());
        }
    }
}
