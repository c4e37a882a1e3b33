//! The blocking client side of one conversation: connect, send one request,
//! read the reply, each step bounded, and errors that say which step failed.

use std::{
    fmt,
    io::{self, BufRead, BufReader, Write},
    net::{TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

use protocol::{ErrorReply, ProtocolError};

use crate::{describe_io, is_timeout, Deadline};

/// Reply bytes buffered at a time: big enough that content is read and
/// hashed in large slices.
const BUFFER: usize = 256 << 10;

/// A step of a conversation, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Resolving the name and opening the connection.
    Connect,
    /// Sending the request.
    Send,
    /// Waiting for and reading the reply's header and lines.
    Receive,
    /// Reading content that follows a header.
    Content,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting",
            Phase::Send => "sending the request",
            Phase::Receive => "waiting for the reply",
            Phase::Content => "reading content",
        })
    }
}

/// Why a conversation failed. The message leaves out whom it was with:
/// callers say "peer X: ..." or "relay X: ...".
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The host name did not resolve, or to nothing.
    #[error("cannot resolve: {0}")]
    Resolve(#[source] io::Error),
    /// The network failed or a limit passed during `phase`.
    #[error("{}", describe(*.phase, .source))]
    Io {
        /// The step that failed.
        phase: Phase,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The reply broke the protocol.
    #[error("bad reply: {0}")]
    BadReply(#[source] ProtocolError),
    /// The server answered with an error.
    #[error("refused: {0}")]
    Refused(ErrorReply),
}

impl CallError {
    /// True when a limit passed: the other side may be alive but slow.
    pub fn is_timeout(&self) -> bool {
        matches!(self, CallError::Io { source, .. } if is_timeout(source))
    }

    /// A failure of `phase`, from a protocol error while reading.
    pub fn reading(phase: Phase, e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(source) => CallError::Io { phase, source },
            e => CallError::BadReply(e),
        }
    }
}

fn describe(phase: Phase, e: &io::Error) -> String {
    if is_timeout(e) {
        return format!("timed out {phase}");
    }
    match phase {
        // "connection refused" says it all.
        Phase::Connect => describe_io(e),
        _ => format!("{} while {phase}", describe_io(e)),
    }
}

/// One conversation on one connection.
pub struct Call {
    reader: BufReader<Deadline<TcpStream>>,
    timeout: Duration,
}

impl Call {
    /// Connects to the first address of `target` that answers within
    /// `timeout`. Every later step is bounded by `timeout` too.
    pub fn connect(target: impl ToSocketAddrs, timeout: Duration) -> Result<Call, CallError> {
        let addrs = target.to_socket_addrs().map_err(CallError::Resolve)?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => return Call::on(stream, timeout),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(source) => CallError::Io {
                phase: Phase::Connect,
                source,
            },
            None => CallError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "host has no address",
            )),
        })
    }

    fn on(stream: TcpStream, timeout: Duration) -> Result<Call, CallError> {
        let setup = |stream: &TcpStream| {
            stream.set_write_timeout(Some(timeout))?;
            // Requests are one small line: send it now, not after 40 ms.
            stream.set_nodelay(true)
        };
        setup(&stream).map_err(|source| CallError::Io {
            phase: Phase::Connect,
            source,
        })?;
        let deadline = Deadline::after(stream, timeout);
        Ok(Call {
            reader: BufReader::with_capacity(BUFFER, deadline),
            timeout,
        })
    }

    /// Sends one request, encoded by `write`, in a single write.
    pub fn send(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    ) -> Result<(), CallError> {
        let mut request = Vec::with_capacity(128);
        write(&mut request)
            .and_then(|()| self.stream().write_all(&request))
            .map_err(|source| CallError::Io {
                phase: Phase::Send,
                source,
            })
    }

    /// Reads a reply (a header, or a header and its lines) with `read`. The
    /// whole of it must arrive within the timeout: a server trickling a
    /// byte at a time cannot hold the caller longer.
    pub fn receive<T>(
        &mut self,
        read: impl FnOnce(&mut dyn BufRead) -> Result<T, ProtocolError>,
    ) -> Result<T, CallError> {
        let deadline = self.reader.get_mut();
        deadline.set_deadline(Some(Instant::now() + self.timeout));
        deadline.set_per_read(None);
        read(&mut self.reader).map_err(|e| CallError::reading(Phase::Receive, e))
    }

    /// The reader for content after a header: no overall deadline (a big
    /// file takes as long as it takes), but each read waits at most the
    /// timeout.
    pub fn content(&mut self) -> &mut BufReader<Deadline<TcpStream>> {
        let deadline = self.reader.get_mut();
        deadline.set_deadline(None);
        deadline.set_per_read(Some(self.timeout));
        &mut self.reader
    }

    /// The connection.
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref().get_ref()
    }
}

/// One whole conversation: connect to `target`, send what `write` encodes,
/// and read the reply with `read`.
pub fn call<T>(
    target: impl ToSocketAddrs,
    timeout: Duration,
    write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    read: impl FnOnce(&mut dyn BufRead) -> Result<T, ProtocolError>,
) -> Result<T, CallError> {
    let mut call = Call::connect(target, timeout)?;
    call.send(write)?;
    call.receive(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, thread};

    fn read_line(r: &mut dyn BufRead) -> Result<String, ProtocolError> {
        protocol::read_line(r, 100)?.ok_or(ProtocolError::Closed)
    }

    #[test]
    fn a_refused_connection_names_no_phase_but_says_refused() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = call(addr, Duration::from_secs(1), |_| Ok(()), read_line).unwrap_err();
        assert_eq!(e.to_string(), "connection refused");
        assert!(!e.is_timeout());
    }

    #[test]
    fn a_reply_header_trickled_byte_by_byte_times_out_as_a_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // One byte every 100 ms: each read is quick, the line never ends in time.
            for _ in 0..30 {
                if stream.write_all(b"x").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let e = call(addr, Duration::from_millis(500), |_| Ok(()), read_line).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(e.is_timeout(), "{e}");
        assert_eq!(e.to_string(), "timed out waiting for the reply");
        server.join().unwrap();
    }

    #[test]
    fn a_reply_is_read_and_a_broken_one_is_a_bad_reply() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            for reply in [&b"hello\n"[..], b"cut"] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                assert_eq!(line, "ask\n");
                stream.write_all(reply).unwrap();
            }
        });
        let ask = |w: &mut Vec<u8>| w.write_all(b"ask\n");
        assert_eq!(
            call(addr, Duration::from_secs(5), ask, read_line).unwrap(),
            "hello"
        );
        let e = call(addr, Duration::from_secs(5), ask, read_line).unwrap_err();
        assert!(
            matches!(e, CallError::BadReply(ProtocolError::TruncatedLine)),
            "{e:?}"
        );
        server.join().unwrap();
    }
}
