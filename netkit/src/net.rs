//! Reading with a deadline, and closing without a reset.

use std::{
    borrow::Borrow,
    io::{self, Read},
    net::TcpStream,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Reads from a socket until a deadline. A read timeout alone is per read,
/// so a sender trickling one byte every few seconds would never time out;
/// this reader fails with `TimedOut` once the deadline has passed, whatever
/// arrived before. Without a deadline it applies only the per-read timeout.
pub struct Deadline<S> {
    stream: S,
    until: Clock,
    per_read: Option<Duration>,
    /// The read timeout last set on the socket, to skip needless syscalls.
    set: Option<Duration>,
}

/// The deadline of a [`Deadline`] reader, which whoever holds a clone can
/// move while the reader is borrowed elsewhere (by a parser reading a
/// long message in parts, say).
#[derive(Clone, Debug, Default)]
pub struct Clock(Arc<Mutex<Option<Instant>>>);

impl Clock {
    /// Sets (or, with `None`, lifts) the deadline.
    pub fn set(&self, until: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: Borrow<TcpStream>> Deadline<S> {
    /// A reader that fails once `limit` has passed from now.
    pub fn after(stream: S, limit: Duration) -> Self {
        let until = Clock::default();
        until.set(Some(Instant::now() + limit));
        Deadline {
            stream,
            until,
            per_read: None,
            set: None,
        }
    }

    /// Sets (or, with `None`, lifts) the deadline over everything read from now on.
    pub fn set_deadline(&mut self, until: Option<Instant>) {
        self.until.set(until);
    }

    /// A handle on the deadline, to move it from outside.
    pub fn clock(&self) -> Clock {
        self.until.clone()
    }

    /// Sets the longest any one read may wait (`None`: only the deadline counts).
    pub fn set_per_read(&mut self, limit: Option<Duration>) {
        self.per_read = limit;
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        self.stream.borrow()
    }
}

impl<S: Borrow<TcpStream>> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = match self.until.get() {
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(self.per_read.map_or(left, |p| p.min(left)))
            }
            None => self.per_read,
        };
        // Rounded up to whole milliseconds so that a deadline does not
        // cost a `setsockopt` per read when reads come quickly.
        let wait = left.map(|d| Duration::from_millis(d.as_millis().max(1) as u64));
        if wait != self.set {
            self.stream.borrow().set_read_timeout(wait)?;
            self.set = wait;
        }
        (&mut self.stream.borrow()).read(buf)
    }
}

/// Ends a connection without a reset. Closing a socket with unread input
/// makes the kernel send RST, which can destroy the reply before the other
/// side has read it; so stop writing, and read (a bounded amount) until the
/// other side closes too: for up to `wait`, or only what has already
/// arrived when `wait` is zero (an accept loop must not stall).
pub fn close_gently(stream: &TcpStream, wait: Duration) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let waiting = if wait.is_zero() {
        stream.set_nonblocking(true)
    } else {
        stream.set_read_timeout(Some(wait))
    };
    if waiting.is_err() {
        return;
    }
    let mut buf = [0; 4096];
    for _ in 0..16 {
        match (&mut &*stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::Write, net::TcpListener, thread};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_trickling_sender_is_cut_off_at_the_deadline_not_per_read() {
        let (mut client, server) = pair();
        let trickle = thread::spawn(move || {
            // A byte every 50 ms: each read returns well within any
            // per-read timeout, but the whole line never arrives in time.
            for _ in 0..40 {
                if client.write_all(b"x").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut reader = Deadline::after(&server, Duration::from_millis(300));
        let mut buf = [0; 1];
        // Bounded: the trickle sends 40 bytes at most.
        let error = (0..100)
            .find_map(|_| match reader.read(&mut buf) {
                Ok(n) => {
                    assert_eq!(n, 1);
                    None
                }
                Err(e) => Some(e),
            })
            .expect("the reads never timed out");
        assert!(crate::is_timeout(&error), "{error}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn what_has_arrived_is_read_before_the_deadline() {
        let (mut client, server) = pair();
        client.write_all(b"ab").unwrap();
        let mut reader = Deadline::after(&server, Duration::from_secs(10));
        let mut buf = [0; 2];
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        assert_eq!(&buf, b"ab");
    }

    #[test]
    fn without_a_deadline_only_the_per_read_timeout_counts() {
        let (mut client, server) = pair();
        // A slower timeout already on the socket, which the reader must
        // replace: were it left, the read below would end after 2 s, not 100 ms.
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut reader = Deadline::after(&server, Duration::ZERO);
        reader.set_deadline(None);
        reader.set_per_read(Some(Duration::from_millis(100)));
        client.write_all(b"ab").unwrap();
        let mut buf = [0; 2];
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        let started = Instant::now();
        let e = reader.read(&mut buf).unwrap_err();
        assert!(crate::is_timeout(&e), "{e}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn a_gentle_close_with_unread_input_is_not_a_reset() {
        let (mut client, mut server) = pair();
        // The request, and more the server never reads: closing with it
        // unread would make the kernel answer with a reset.
        client.write_all(b"ask\nand more").unwrap();
        let closer = thread::spawn(move || {
            let mut request = [0; 4];
            server.read_exact(&mut request).unwrap();
            server.write_all(b"reply\n").unwrap();
            close_gently(&server, Duration::from_secs(10));
        });
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"reply\n");
        drop(client);
        closer.join().unwrap();
    }
}
