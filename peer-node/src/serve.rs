//! The accept loop and the handling of one connection: one request, then a
//! file streamed by the kernel, or the folder's listing, or an error.

use std::{
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
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
    peer::{FileHeader, Request, Response, MAX_FILES},
    ErrorCode, ErrorReply, FileName, MAX_LINE,
};

use crate::{announce::Announcer, files::Library, shutdown::Shutdown};

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
        // Every thread is busy: start one more. Threads never outnumber the
        // open connections, so `max_connections` bounds them too.
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

    // Leave the list first so that clients stop coming, then let transfers finish.
    info!("shutting down");
    let _ = heartbeat.join();
    announcer.unregister();
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
        // Bounded: each turn either gets a connection or leaves, except when
        // the accept loop claimed this idle slot and its connection is on the way.
        while next.is_none() {
            let got = waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .recv_timeout(KEEP_IDLE);
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
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Read what already arrived so that closing does not reset the
    // connection and destroy the reply before the caller reads it.
    let _ = stream.set_nonblocking(true);
    let _ = stream.read(&mut [0; MAX_LINE]);
    warn!("busy: rejected a connection (limit {max})");
}

fn handle(peer: &Peer, stream: TcpStream) {
    let started = Instant::now();
    let remote = match stream.peer_addr() {
        Ok(addr) => addr,
        Err(e) => return debug!("connection gone before it was served: {e}"),
    };
    let timeouts = stream
        .set_read_timeout(Some(peer.idle_timeout))
        .and_then(|()| stream.set_write_timeout(Some(peer.write_timeout)));
    if let Err(e) = timeouts {
        return warn!("{remote}: cannot set timeouts: {e}");
    }
    let request = match Request::read_from(&mut BufReader::with_capacity(MAX_LINE, &stream)) {
        Ok(Some(request)) => request,
        Ok(None) => return debug!("{remote}: closed without a request"),
        Err(e) => {
            let _ = Response::Error((&e).into()).write_to(&mut &stream);
            return info!("{remote} bad request: {e} ({:.1?})", started.elapsed());
        }
    };
    let (summary, result) = match request {
        Request::Get { name, offset } => (
            format!("GET {name:?} from {offset}"),
            send_file(peer, &stream, &name, offset),
        ),
        Request::List => ("LIST".to_string(), send_list(peer, &stream)),
    };
    let elapsed = started.elapsed();
    match result {
        Ok(outcome) => info!("{remote} {summary}: {outcome} ({elapsed:.1?})"),
        Err(e) => info!("{remote} {summary}: failed: {e:#} ({elapsed:.1?})"),
    }
}

/// Sends the header and the file from `offset`; returns a log summary.
fn send_file(
    peer: &Peer,
    mut stream: &TcpStream,
    name: &FileName,
    offset: u64,
) -> anyhow::Result<String> {
    let served = match peer.library.open_file(name) {
        Ok(served) => served,
        Err(refusal) => {
            let summary = format!("refused: {refusal}");
            Response::Error(refusal).write_to(&mut stream)?;
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
        Response::Error(reply).write_to(&mut stream)?;
        return Ok("refused: offset past the end".into());
    }
    let mut file = served.file;
    file.seek(SeekFrom::Start(offset))?;
    Response::File(FileHeader {
        size: served.size,
        hash: served.hash,
    })
    .write_to(&mut stream)?;
    // File to socket: `io::copy` lets the kernel move the bytes (sendfile on Linux).
    let want = served.size - offset;
    let sent = io::copy(&mut file.take(want), &mut stream).context("transfer broke")?;
    if sent < want {
        anyhow::bail!("file shrank while being sent: {sent} of {want} bytes");
    }
    Ok(format!("sent {sent} bytes"))
}

fn send_list(peer: &Peer, stream: &TcpStream) -> anyhow::Result<String> {
    let mut out = BufWriter::new(stream);
    let response = match peer.library.list(MAX_FILES) {
        Ok(entries) => Response::Files(entries),
        Err(e) => Response::Error(ErrorReply::new(
            ErrorCode::Internal,
            format!("cannot list the folder: {e}"),
        )),
    };
    response.write_to(&mut out)?;
    out.flush()?;
    Ok(match response {
        Response::Files(entries) => format!("{} files", entries.len()),
        _ => "cannot list the folder".into(),
    })
}
