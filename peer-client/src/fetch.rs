//! Phase 3: ask the peers one at a time for a file until one delivers it
//! whole and verified. A transfer that breaks resumes from the next peer that
//! has the same content (same size and hash), at the byte where it stopped.

use std::{
    io::{self, Read},
    thread,
    time::{Duration, Instant},
};

use netkit::call::{Call, CallError, Phase};
use protocol::{
    peer::{FileHeader, Request, Response},
    ContentHash, ErrorCode, FileName, PeerAddr, ProtocolError,
};

/// Longest pause before asking busy peers again.
const MAX_PAUSE: Duration = Duration::from_secs(4);

/// Read buffer for content: big enough that hashing and writing work on
/// large slices, allocated once per fetch (the connection's own buffer is
/// bypassed for reads this big).
const CHUNK: usize = 1 << 20;

/// Where fetched bytes go.
pub trait Sink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Throws away everything written so far, so that the fetch can start
    /// over with other content; false where that is impossible (stdout).
    fn restart(&mut self) -> io::Result<bool>;
    /// Bytes that can still be written, where that is known (a file
    /// system's free space); `None` where it is not (a pipe, a device).
    fn room(&self) -> Option<u64> {
        None
    }
}

/// What a download may cost: how big a file is accepted, and how slow a
/// peer may be before the next holder is asked instead.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Files announced bigger than this are not fetched.
    pub max_size: Option<u64>,
    /// A peer sending fewer bytes a second than this, on average over
    /// `speed_time`, is dropped (the transfer resumes elsewhere); 0: never.
    pub speed_limit: u64,
    /// The window over which `speed_limit` is judged.
    pub speed_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: None,
            speed_limit: 1024,
            speed_time: Duration::from_secs(30),
        }
    }
}

/// Hooks for progress display; the default does nothing.
pub trait Progress {
    fn start(&mut self, _size: u64, _already: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}

impl Progress for () {}

/// A successful fetch.
#[derive(Debug)]
pub struct Fetched {
    pub peer: PeerAddr,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no live peers to ask for {0:?}")]
    NoPeers(String),
    #[error("{name:?} not found on any of {asked} peers")]
    NotFound { name: String, asked: usize },
    #[error("cannot fetch {name:?}: {reason}")]
    Failed { name: String, reason: String },
    #[error("cannot write {name:?}: {source}")]
    Output { name: String, source: io::Error },
    /// Every peer holding it announced a size over a limit of this side.
    #[error("cannot fetch {name:?}: {reason}")]
    TooBig { name: String, reason: String },
}

impl FetchError {
    /// True when the file simply is not there, as opposed to a failure.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FetchError::NotFound { .. } | FetchError::NoPeers(_))
    }
}

/// What has arrived so far, carried from one peer to the next.
struct Partial {
    size: u64,
    hash: ContentHash,
    received: u64,
    hasher: blake3::Hasher,
}

impl Partial {
    fn new(header: FileHeader) -> Self {
        Partial {
            size: header.size,
            hash: header.hash,
            received: 0,
            hasher: blake3::Hasher::new(),
        }
    }
}

/// How one attempt at one peer ended.
enum Attempt {
    Done(Fetched),
    /// The peer does not have the file.
    Missing,
    /// The peer could not be asked, or refused; the error says which.
    Skipped(CallError),
    /// The peer asks to be asked again later.
    Busy(String),
    /// The peer has the file but did not deliver all of it.
    Broke(String),
    /// The peer has other content under that name than what already arrived.
    OtherVersion,
    /// The peer announces a size over `--max-size` or the free space.
    TooBig(String),
}

pub struct Fetcher<'a> {
    pub timeout: Duration,
    pub limits: Limits,
    /// The content wanted, where the relay's index said which: a peer
    /// that has other content under the name now is passed over.
    pub expect: Option<ContentHash>,
    /// Called with one line for every peer skipped and why.
    pub note: &'a mut dyn FnMut(&str),
    pub progress: &'a mut dyn Progress,
}

impl Fetcher<'_> {
    pub fn fetch(
        &mut self,
        peers: &[PeerAddr],
        name: &FileName,
        sink: &mut dyn Sink,
    ) -> Result<Fetched, FetchError> {
        if peers.is_empty() {
            return Err(FetchError::NoPeers(name.to_string()));
        }
        let mut partial: Option<Partial> = None;
        let mut buf = vec![0; CHUNK];
        let (mut missing, mut skipped, mut offered, mut too_big) = (0, Vec::new(), false, 0);
        // Peers that answered `busy` are asked again after the others, with
        // growing pauses, for up to the timeout.
        let mut round = peers.to_vec();
        let (mut pause, mut give_up) = (Duration::from_millis(250), None);
        while !round.is_empty() {
            let mut busy = Vec::new();
            for peer in round {
                let mut retried = false;
                loop {
                    let attempt = self.attempt(peer, name, &mut partial, sink, &mut buf)?;
                    offered |= matches!(attempt, Attempt::Broke(_) | Attempt::OtherVersion);
                    match attempt {
                        Attempt::Done(fetched) => {
                            self.progress.finish();
                            return Ok(fetched);
                        }
                        Attempt::Missing => missing += 1,
                        Attempt::Busy(why) => busy.push((peer, why)),
                        Attempt::Skipped(why) => self.skip(&mut skipped, peer, &why),
                        Attempt::Broke(why) => self.skip(&mut skipped, peer, &why),
                        Attempt::TooBig(why) => {
                            too_big += 1;
                            self.skip(&mut skipped, peer, &why);
                        }
                        Attempt::OtherVersion if !retried && restart(sink, name)? => {
                            (self.note)(&format!(
                                "peer {peer}: has another version of {name:?}; starting over from it"
                            ));
                            partial = None;
                            retried = true;
                            continue;
                        }
                        Attempt::OtherVersion => {
                            (self.note)(&format!(
                                "peer {peer}: has another version of {name:?}; skipped"
                            ));
                            skipped.push(format!("{peer}: another version"));
                        }
                    }
                    break;
                }
            }
            let give_up = *give_up.get_or_insert_with(|| Instant::now() + self.timeout);
            if !busy.is_empty() && Instant::now() + pause > give_up {
                for (peer, why) in busy.drain(..) {
                    (self.note)(&format!("peer {peer}: {why}; giving up"));
                    skipped.push(format!("{peer}: {why}"));
                }
            }
            if !busy.is_empty() {
                let (first, why) = &busy[0];
                (self.note)(&format!(
                    "peer {first}: {why}; asking {} busy peer(s) again in {pause:.1?}",
                    busy.len()
                ));
                thread::sleep(pause);
                pause = (pause * 2).min(MAX_PAUSE);
            }
            round = busy.into_iter().map(|(peer, _)| peer).collect();
        }
        self.progress.finish();
        if !offered && too_big > 0 && too_big == skipped.len() {
            // Asking again will not help: this side's limit is the obstacle.
            return Err(FetchError::TooBig {
                name: name.to_string(),
                reason: skipped.join("; "),
            });
        }
        if !offered && skipped.is_empty() {
            // Every peer answered, and none has it.
            return Err(FetchError::NotFound {
                name: name.to_string(),
                asked: peers.len(),
            });
        }
        let reason = match &partial {
            // A peer that could not be asked may have it: worth a retry,
            // so not "not found".
            _ if !offered && missing > 0 => format!(
                "not found on {missing} of {} peers, and the others could not be asked ({})",
                peers.len(),
                skipped.join("; ")
            ),
            Some(p) if p.received > 0 => format!(
                "transfer stopped at {} of {} bytes and no other peer could finish it ({})",
                p.received,
                p.size,
                skipped.join("; ")
            ),
            _ => format!("no peer could serve it ({})", skipped.join("; ")),
        };
        Err(FetchError::Failed {
            name: name.to_string(),
            reason,
        })
    }

    /// Why a peer's announced size rules it out, if it does.
    fn too_big(
        &self,
        header: &FileHeader,
        partial: Option<&Partial>,
        sink: &dyn Sink,
    ) -> Option<String> {
        if let Some(max) = self.limits.max_size.filter(|&max| header.size > max) {
            return Some(format!(
                "announces {} bytes, over --max-size {max}",
                header.size
            ));
        }
        let already = partial
            .filter(|p| (p.size, p.hash) == (header.size, header.hash))
            .map_or(0, |p| p.received);
        let need = header.size - already;
        match sink.room() {
            Some(room) if need > room => Some(format!(
                "announces {} bytes, more than the {room} bytes free where it would be saved",
                header.size
            )),
            _ => None,
        }
    }

    /// Notes why `peer` was passed over.
    fn skip(&mut self, skipped: &mut Vec<String>, peer: PeerAddr, why: &dyn std::fmt::Display) {
        (self.note)(&format!("peer {peer}: {why}"));
        skipped.push(format!("{peer}: {why}"));
    }

    fn attempt(
        &mut self,
        peer: PeerAddr,
        name: &FileName,
        partial: &mut Option<Partial>,
        sink: &mut dyn Sink,
        buf: &mut [u8],
    ) -> Result<Attempt, FetchError> {
        let offset = partial.as_ref().map_or(0, |p| p.received);
        let request = Request::Get {
            name: name.clone(),
            offset,
        };
        // The header must arrive whole within the timeout: a peer dripping
        // it byte by byte cannot hold the client longer.
        let reply = Call::connect(peer.socket_addr(), self.timeout).and_then(|mut call| {
            call.send(|w| request.write_to(w))?;
            let header = call.receive(|r| Response::read_from(r))?;
            Ok((call, header))
        });
        let (mut call, header) = match reply {
            Ok((call, Response::File(header))) => (call, header),
            Ok((_, Response::Error(e))) if e.code == ErrorCode::NotFound => {
                return Ok(Attempt::Missing)
            }
            Ok((_, Response::Error(e))) if e.code == ErrorCode::Busy => {
                return Ok(Attempt::Busy(format!("busy: {}", e.message)))
            }
            // Asked to resume past the end of the peer's file: it has
            // another, shorter version.
            Ok((_, Response::Error(e))) if offset > 0 && e.code == ErrorCode::BadRequest => {
                return Ok(Attempt::OtherVersion)
            }
            Ok((_, Response::Error(e))) => return Ok(Attempt::Skipped(CallError::Refused(e))),
            Ok((_, other)) => {
                return Ok(Attempt::Skipped(CallError::BadReply(
                    ProtocolError::UnexpectedReply(format!("{other:?}")),
                )))
            }
            Err(e) => return Ok(Attempt::Skipped(e)),
        };
        if let Some(want) = self.expect.filter(|want| *want != header.hash) {
            return Ok(Attempt::Broke(format!(
                "has other content under that name now ({}, not {want})",
                header.hash
            )));
        }
        if let Some(why) = self.too_big(&header, partial.as_ref(), sink) {
            return Ok(Attempt::TooBig(why));
        }
        let reader = call.content();
        let p = match partial {
            Some(p) if (p.size, p.hash) != (header.size, header.hash) => {
                if p.received > 0 {
                    return Ok(Attempt::OtherVersion);
                }
                partial.insert(Partial::new(header))
            }
            Some(p) => p,
            None => partial.insert(Partial::new(header)),
        };
        self.progress.start(p.size, p.received);
        // Bytes received since `window` began, for the low-speed limit.
        let (mut window, mut in_window) = (Instant::now(), 0u64);
        while p.received < p.size {
            let want = (p.size - p.received).min(buf.len() as u64) as usize;
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Ok(Attempt::Broke(format!(
                        "connection closed at {} of {} bytes",
                        p.received, p.size
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Ok(Attempt::Broke(format!(
                        "transfer broke at {} of {} bytes: {}",
                        p.received,
                        p.size,
                        CallError::Io {
                            phase: Phase::Content,
                            source
                        }
                    )))
                }
            };
            p.hasher.update(&buf[..n]);
            sink.write_all(&buf[..n])
                .map_err(|source| FetchError::Output {
                    name: name.to_string(),
                    source,
                })?;
            p.received += n as u64;
            self.progress.advance(n as u64);
            in_window += n as u64;
            let spent = window.elapsed();
            if self.limits.speed_limit > 0 && spent >= self.limits.speed_time {
                let rate = in_window as f64 / spent.as_secs_f64();
                if rate < self.limits.speed_limit as f64 {
                    return Ok(Attempt::Broke(format!(
                        "slower than {} bytes/s for {}s ({rate:.0} bytes/s) at {} of {} bytes",
                        self.limits.speed_limit,
                        self.limits.speed_time.as_secs(),
                        p.received,
                        p.size
                    )));
                }
                (window, in_window) = (Instant::now(), 0);
            }
        }
        if p.hasher.finalize() != p.hash {
            // Which part was bad cannot be known: start over, or give up.
            *partial = None;
            let why = "content does not match its hash";
            if restart(sink, name)? {
                return Ok(Attempt::Broke(format!("{why}; discarded")));
            }
            return Err(FetchError::Failed {
                name: name.to_string(),
                reason: format!("{why} (peer {peer})"),
            });
        }
        Ok(Attempt::Done(Fetched { peer, size: p.size }))
    }
}

fn restart(sink: &mut dyn Sink, name: &FileName) -> Result<bool, FetchError> {
    sink.restart().map_err(|source| FetchError::Output {
        name: name.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader, Write},
        net::{TcpListener, TcpStream},
        sync::mpsc,
        thread,
    };

    /// A fake peer answering each request line with what `answer` returns.
    /// The request lines it saw arrive on the returned channel.
    fn fake_peer(
        answer: impl Fn(&str) -> Vec<u8> + Send + 'static,
    ) -> (PeerAddr, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming().take(8) {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                let _ = stream.write_all(&answer(line.trim_end()));
                let _ = tx.send(line.trim_end().to_string());
            }
        });
        (addr, rx)
    }

    /// A well-behaved peer holding `content`, honouring offsets.
    fn honest(content: &'static [u8]) -> impl Fn(&str) -> Vec<u8> {
        move |line| {
            let offset: usize = line.split(' ').nth(3).map_or(0, |o| o.parse().unwrap());
            let mut reply =
                format!("FILE {} {}\n", content.len(), blake3::hash(content)).into_bytes();
            reply.extend_from_slice(&content[offset..]);
            reply
        }
    }

    /// A peer that has `content` but breaks off after `cut` bytes.
    fn cut_off(content: &'static [u8], cut: usize) -> impl Fn(&str) -> Vec<u8> {
        move |_| {
            let mut reply =
                format!("FILE {} {}\n", content.len(), blake3::hash(content)).into_bytes();
            reply.extend_from_slice(&content[..cut]);
            reply
        }
    }

    fn missing(_: &str) -> Vec<u8> {
        b"ERR not-found no file\n".to_vec()
    }

    /// A fake peer that answers with `answer`, which writes on the stream
    /// as it likes (slowly, in pieces).
    fn streaming_peer(answer: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static) -> PeerAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string().parse().unwrap();
        let answer = std::sync::Arc::new(answer);
        thread::spawn(move || {
            for stream in listener.incoming().take(8) {
                let Ok(mut stream) = stream else { continue };
                let answer = std::sync::Arc::clone(&answer);
                thread::spawn(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    answer(line.trim_end(), &mut stream);
                });
            }
        });
        addr
    }

    struct Memory {
        data: Vec<u8>,
        restartable: bool,
        room: Option<u64>,
    }

    impl Sink for Memory {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.data.extend_from_slice(buf);
            Ok(())
        }
        fn restart(&mut self) -> io::Result<bool> {
            if self.restartable {
                self.data.clear();
            }
            Ok(self.restartable)
        }
        fn room(&self) -> Option<u64> {
            self.room
        }
    }

    fn fetch(
        peers: &[PeerAddr],
        restartable: bool,
    ) -> (Result<Fetched, FetchError>, Vec<u8>, Vec<String>) {
        fetch_with(
            peers,
            restartable,
            Limits::default(),
            None,
            Duration::from_secs(5),
        )
    }

    fn fetch_with(
        peers: &[PeerAddr],
        restartable: bool,
        limits: Limits,
        room: Option<u64>,
        timeout: Duration,
    ) -> (Result<Fetched, FetchError>, Vec<u8>, Vec<String>) {
        let mut notes = Vec::new();
        let mut sink = Memory {
            data: Vec::new(),
            restartable,
            room,
        };
        let result = Fetcher {
            timeout,
            limits,
            expect: None,
            note: &mut |line| notes.push(line.to_string()),
            progress: &mut (),
        }
        .fetch(peers, &FileName::new("f.bin").unwrap(), &mut sink);
        (result, sink.data, notes)
    }

    #[test]
    fn a_header_dripped_byte_by_byte_costs_one_timeout() {
        let dripping = streaming_peer(|_, stream| {
            let header = format!("FILE {} {}\n", CONTENT.len(), blake3::hash(CONTENT));
            for byte in header.bytes() {
                if stream.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let (good, _) = fake_peer(honest(CONTENT));
        let started = Instant::now();
        let (result, data, notes) = fetch_with(
            &[dripping, good],
            false,
            Limits::default(),
            None,
            Duration::from_secs(1),
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(result.unwrap().peer, good);
        assert_eq!(data, CONTENT);
        assert_eq!(
            notes,
            [format!("peer {dripping}: timed out waiting for the reply")]
        );
    }

    #[test]
    fn a_size_over_the_limit_or_the_free_space_is_not_fetched() {
        let (huge, _) =
            fake_peer(|_| format!("FILE {} {}\n", u64::MAX / 2, blake3::hash(b"x")).into_bytes());
        let (good, _) = fake_peer(honest(CONTENT));
        let limits = Limits {
            max_size: Some(1000),
            ..Limits::default()
        };
        let timeout = Duration::from_secs(5);
        // The liar is skipped, the honest holder delivers.
        let (result, data, notes) = fetch_with(&[huge, good], false, limits, None, timeout);
        assert_eq!(result.unwrap().peer, good);
        assert_eq!(data, CONTENT);
        assert!(notes[0].contains("over --max-size 1000"), "{notes:?}");
        // Alone, it is this side's limit that stops the fetch: nothing written.
        let (result, data, _) = fetch_with(&[huge], false, limits, None, timeout);
        assert!(
            matches!(result, Err(FetchError::TooBig { .. })),
            "{result:?}"
        );
        assert!(data.is_empty());
        // Without --max-size, the free space decides.
        let (result, data, _) =
            fetch_with(&[huge], false, Limits::default(), Some(1 << 30), timeout);
        let err = result.unwrap_err();
        assert!(err.to_string().contains("bytes free"), "{err}");
        assert!(data.is_empty());
        let (result, _, _) = fetch_with(&[good], false, Limits::default(), Some(35), timeout);
        assert!(matches!(result, Err(FetchError::TooBig { .. })));
        let (result, _, _) = fetch_with(&[good], false, Limits::default(), Some(36), timeout);
        assert!(result.is_ok());
    }

    #[test]
    fn a_peer_below_the_speed_limit_is_dropped_and_the_next_resumes() {
        // 4 bytes every 100 ms: 40 bytes/s, each read well within the timeout.
        let slow = streaming_peer(|_, stream| {
            let header = format!("FILE {} {}\n", CONTENT.len(), blake3::hash(CONTENT));
            let _ = stream.write_all(header.as_bytes());
            for piece in CONTENT.chunks(4) {
                if stream.write_all(piece).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let (good, requests) = fake_peer(honest(CONTENT));
        let limits = Limits {
            max_size: None,
            speed_limit: 100,
            speed_time: Duration::from_millis(300),
        };
        let (result, data, notes) =
            fetch_with(&[slow, good], false, limits, None, Duration::from_secs(5));
        assert_eq!(result.unwrap().peer, good);
        assert_eq!(data, CONTENT);
        assert!(notes[0].contains("slower than 100 bytes/s"), "{notes:?}");
        let resumed_at: u64 = requests
            .recv()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(resumed_at > 0 && resumed_at < CONTENT.len() as u64);
    }

    const CONTENT: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

    #[test]
    fn a_broken_transfer_resumes_at_the_next_peer_from_the_same_byte() {
        let (first, _) = fake_peer(cut_off(CONTENT, 10));
        let (second, requests) = fake_peer(honest(CONTENT));
        let (result, data, notes) = fetch(&[first, second], false);
        assert_eq!(result.unwrap().peer, second);
        assert_eq!(data, CONTENT);
        assert_eq!(requests.recv().unwrap(), "RP2P/1 GET f.bin 10");
        assert_eq!(
            notes,
            [format!("peer {first}: connection closed at 10 of 36 bytes")]
        );
    }

    #[test]
    fn a_peer_with_other_content_is_not_used_to_resume_stdout() {
        let (first, _) = fake_peer(cut_off(CONTENT, 10));
        let (other, _) = fake_peer(honest(b"something else entirely"));
        let (last, _) = fake_peer(honest(CONTENT));
        let (result, data, notes) = fetch(&[first, other, last], false);
        assert_eq!(result.unwrap().peer, last);
        assert_eq!(data, CONTENT);
        assert!(notes[1].contains("has another version"), "{notes:?}");
    }

    #[test]
    fn a_restartable_sink_starts_over_with_the_other_version() {
        let (first, _) = fake_peer(cut_off(CONTENT, 10));
        let (other, _) = fake_peer(honest(b"something else entirely"));
        let (result, data, _) = fetch(&[first, other], true);
        assert_eq!(result.unwrap().peer, other);
        assert_eq!(data, b"something else entirely");
    }

    #[test]
    fn a_shorter_other_version_is_recognised_by_its_refusal_to_resume() {
        let (first, _) = fake_peer(cut_off(CONTENT, 10));
        let (shorter, requests) = fake_peer(|line: &str| {
            if line.ends_with(" 10") {
                b"ERR bad-request offset 10 is past the end\n".to_vec()
            } else {
                honest(b"short")(line)
            }
        });
        let (result, data, _) = fetch(&[first, shorter], true);
        assert_eq!(result.unwrap().peer, shorter);
        assert_eq!(data, b"short");
        assert_eq!(requests.recv().unwrap(), "RP2P/1 GET f.bin 10");
        assert_eq!(requests.recv().unwrap(), "RP2P/1 GET f.bin");
    }

    #[test]
    fn corrupt_content_fails_where_it_cannot_be_taken_back() {
        let (liar, _) = fake_peer(|_| {
            let mut reply =
                format!("FILE {} {}\n", CONTENT.len(), blake3::hash(CONTENT)).into_bytes();
            reply.extend_from_slice(&[b'x'; 36]);
            reply
        });
        let (honest_peer, _) = fake_peer(honest(CONTENT));
        let (result, _, _) = fetch(&[liar, honest_peer], false);
        let err = result.unwrap_err();
        assert!(
            err.to_string().contains("content does not match its hash"),
            "{err}"
        );
        // Into a file it is thrown away and fetched again.
        let (result, data, _) = fetch(&[liar, honest_peer], true);
        assert!(result.is_ok());
        assert_eq!(data, CONTENT);
    }

    #[test]
    fn not_found_and_unreachable_are_told_apart() {
        let (a, _) = fake_peer(missing);
        let (b, _) = fake_peer(missing);
        let (result, _, _) = fetch(&[a, b], false);
        let err = result.unwrap_err();
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "\"f.bin\" not found on any of 2 peers");

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dead: PeerAddr = closed.to_string().parse().unwrap();
        let (result, _, notes) = fetch(&[dead], false);
        let err = result.unwrap_err();
        assert!(!err.is_not_found());
        assert_eq!(notes, [format!("peer {dead}: connection refused")]);
    }

    #[test]
    fn a_busy_peer_is_asked_again_after_the_others() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = std::sync::Arc::new(AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&asked);
        let (hashing, _) = fake_peer(move |line| {
            if count.fetch_add(1, Ordering::SeqCst) < 2 {
                b"ERR busy \"f.bin\" (36 bytes) is being hashed\n".to_vec()
            } else {
                honest(CONTENT)(line)
            }
        });
        let (missing_peer, _) = fake_peer(missing);
        let (result, data, notes) = fetch(&[hashing, missing_peer], false);
        assert_eq!(result.unwrap().peer, hashing);
        assert_eq!(data, CONTENT);
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        assert!(
            notes[0].contains("asking 1 busy peer(s) again"),
            "{notes:?}"
        );
    }

    #[test]
    fn a_peer_busy_for_longer_than_the_timeout_is_given_up() {
        let (busy, _) = fake_peer(|_| b"ERR busy try later\n".to_vec());
        let started = std::time::Instant::now();
        let mut notes = Vec::new();
        let result = Fetcher {
            timeout: Duration::from_secs(1),
            limits: Limits::default(),
            expect: None,
            note: &mut |line| notes.push(line.to_string()),
            progress: &mut (),
        }
        .fetch(
            &[busy],
            &FileName::new("f.bin").unwrap(),
            &mut Memory {
                data: Vec::new(),
                restartable: false,
                room: None,
            },
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        let err = result.unwrap_err();
        assert!(!err.is_not_found(), "{err}");
        assert!(notes.last().unwrap().ends_with("giving up"), "{notes:?}");
    }

    #[test]
    fn a_peer_that_lies_about_the_protocol_is_skipped() {
        let (liar, _) = fake_peer(|_| b"HELLO there\n".to_vec());
        let (good, _) = fake_peer(honest(CONTENT));
        let (result, data, notes) = fetch(&[liar, good], false);
        assert!(result.is_ok());
        assert_eq!(data, CONTENT);
        assert!(
            notes[0].contains("bad reply: unexpected reply \"HELLO there\""),
            "{notes:?}"
        );
    }
}
