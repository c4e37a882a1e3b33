//! The accept loop and the handling of one connection: one request, then a
//! file or a range of it streamed by the kernel (a range after its proof),
//! or a file's size and hash, or the folder's listing, or an error.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use netkit::{close_gently, describe_io, Deadline};
use protocol::{
    identity::{address_message, file_message, Identity},
    peer::{proof, FileHeader, RangeHeader, Request, Response, CHANGED, MAX_FILES},
    ContentHash, ErrorCode, ErrorReply, FileName, MAX_LINE,
};

use crate::{
    files::{Library, Served},
    stall::{self, Outlet},
};

/// What every connection handler shares.
pub(crate) struct Peer {
    pub(crate) library: Library,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    /// The key that names this peer: it signs what the peer tells the
    /// relay, and proves the peer's address when the relay asks.
    pub(crate) identity: Identity,
    /// The upload cap, shared by every connection.
    pub(crate) throttle: Option<stall::Throttle>,
}

/// Serves one connection: one request (all of its line within the idle
/// timeout), then the file, the listing or an error; logs one line.
pub(crate) fn handle(peer: &Peer, stream: TcpStream) {
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

/// Why a reply could not be given in full.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("reply not delivered: {}", describe_io(.0))]
    Reply(#[from] io::Error),
    #[error("transfer broke: {}", describe_io(.0))]
    Broke(#[source] io::Error),
    #[error("file shrank while being sent: {sent} of {want} bytes")]
    Shrank { sent: u64, want: u64 },
}

/// Reads one request and answers it on `out`; returns a log summary and
/// the outcome, or `None` if the caller closed without asking anything.
fn respond<W: Outlet>(
    peer: &Peer,
    input: &mut impl BufRead,
    out: &mut W,
) -> Option<(String, Result<String, SendError>)> {
    let request = match Request::read_from(input) {
        Ok(Some(request)) => request,
        Ok(None) => return None,
        Err(e) => {
            let sent = Response::Error(netkit::server::refusal(&e)).write_to(out);
            return Some((
                netkit::server::describe_refusal(&e),
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
        Request::Head { name, nonce } => {
            (format!("HEAD {name:?}"), send_head(peer, out, &name, nonce))
        }
        Request::Range {
            name,
            hash,
            start,
            end,
        } => (
            format!("RANGE {name:?} {start}-{end}"),
            send_range(peer, out, &name, &hash, start, end),
        ),
        Request::Prove { nonce, addr } => {
            // Whoever asks gets a signature binding this key to the
            // address it names and its nonce: that proves nothing about
            // anything else, so it is safe to give.
            let sig = peer
                .identity
                .sign(&address_message(&nonce, &addr.to_string()));
            let reply = Response::Proof {
                key: peer.identity.key(),
                sig,
            };
            (
                format!("PROVE {addr}"),
                reply
                    .write_to(out)
                    .map(|()| "proved".to_string())
                    .map_err(Into::into),
            )
        }
    })
}

/// Sends `want` bytes of `file` from `start`: by sendfile, within the
/// upload cap; a slow client is given up on only once it has taken
/// nothing for the write timeout.
fn send_bytes<W: Outlet>(
    peer: &Peer,
    file: &mut std::fs::File,
    out: &mut W,
    name: &FileName,
    start: u64,
    want: u64,
) -> Result<u64, SendError> {
    debug!("sending {want} bytes of {name:?} from {start}");
    let sent = stall::send(
        file,
        start,
        want,
        out,
        peer.write_timeout,
        peer.throttle.as_ref(),
    )
    .map_err(SendError::Broke)?;
    if sent < want {
        return Err(SendError::Shrank { sent, want });
    }
    Ok(sent)
}

/// Opens `name` for serving; when the library refuses, answers the refusal
/// and gives back its log summary instead.
fn open_or_refuse<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
) -> Result<Result<Served, String>, SendError> {
    match peer.library.open_file(name) {
        Ok(served) => Ok(Ok(served)),
        Err(refusal) => {
            let summary = format!("refused: {refusal}");
            Response::Error((&refusal).into()).write_to(out)?;
            Ok(Err(summary))
        }
    }
}

/// Sends the header and the file from `offset`; returns a log summary.
fn send_file<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
    offset: u64,
) -> Result<String, SendError> {
    let served = match open_or_refuse(peer, out, name)? {
        Ok(served) => served,
        Err(summary) => return Ok(summary),
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
    let sent = send_bytes(peer, &mut file, out, name, offset, served.size - offset)?;
    Ok(format!("sent {sent} bytes"))
}

/// Answers the size and hash of `name`, as `GET` would, without content;
/// with a nonce, signed by this peer's key.
fn send_head<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
    nonce: Option<[u8; 16]>,
) -> Result<String, SendError> {
    let served = match open_or_refuse(peer, out, name)? {
        Ok(served) => served,
        Err(summary) => return Ok(summary),
    };
    let header = FileHeader {
        size: served.size,
        hash: served.hash,
    };
    let reply = match nonce {
        None => Response::File(header),
        Some(nonce) => Response::Vouched {
            header,
            key: peer.identity.key(),
            sig: peer.identity.sign(&file_message(
                &nonce,
                &name.encode(),
                served.size,
                &served.hash,
            )),
        },
    };
    reply.write_to(out)?;
    Ok(format!("{} bytes", served.size))
}

/// Sends bytes `start..end` of the file after the proof that lets the
/// client check each chunk group as it arrives, if the file still has the
/// content `hash` names; a file that changed is answered `ERR changed`,
/// never with bytes of another version.
fn send_range<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
    hash: &ContentHash,
    start: u64,
    end: u64,
) -> Result<String, SendError> {
    let refuse = |out: &mut W, code: ErrorCode, message: String| {
        let summary = format!("refused: {message}");
        Response::Error(ErrorReply::new(code, message)).write_to(out)?;
        Ok(summary)
    };
    let changed = || ErrorCode::Other(CHANGED.into());
    let served = match open_or_refuse(peer, out, name)? {
        Ok(served) => served,
        Err(summary) => return Ok(summary),
    };
    if served.hash != *hash {
        let message = format!("{name:?} has other content now (hash {})", served.hash);
        return refuse(out, changed(), message);
    }
    if let Err(e) = proof::check_range(served.size, start, end) {
        return refuse(out, ErrorCode::BadRequest, format!("{name:?}: {e}"));
    }
    let outboard = match peer.library.outboard(&served) {
        Ok(Some(outboard)) => outboard,
        Ok(None) => {
            let message = format!("{name:?} changed while it was being served");
            return refuse(out, changed(), message);
        }
        Err(e) => {
            warn!("cannot hash {name:?}: {e}");
            return refuse(out, ErrorCode::Internal, format!("cannot read {name:?}"));
        }
    };
    // Header and proof leave in one write, the content by sendfile.
    let mut head = Vec::new();
    Response::Range(RangeHeader {
        size: served.size,
        hash: served.hash,
        proof: proof::proof_len(served.size, start, end),
    })
    .write_to(&mut head)?;
    proof::encode_proof(&outboard, start, end, &mut head)?;
    out.write_all(&head)?;
    let mut file = served.file;
    let sent = send_bytes(peer, &mut file, out, name, start, end - start)?;
    let proof = head.len() - head.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok(format!("sent {sent} bytes and a proof of {proof} bytes"))
}

fn send_list<W: Write>(peer: &Peer, out: &mut W) -> Result<String, SendError> {
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
            identity: Identity::from_seed([1; 32]),
            throttle: None,
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
    fn head_answers_size_and_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello world").unwrap();
        let hash = blake3::hash(b"hello world");
        assert_eq!(
            ask(&peer(dir.path()), b"RP2P/1 HEAD a.txt\n"),
            format!("FILE 11 {hash}\n").into_bytes()
        );
        assert!(ask(&peer(dir.path()), b"RP2P/1 HEAD b.txt\n").starts_with(b"ERR not-found"));
    }

    /// The reply to a range, as a client reads it: header, proof, bytes;
    /// checked group by group against the hash.
    fn fetch_range(peer: &Peer, name: &str, hash: &ContentHash, start: u64, end: u64) -> Vec<u8> {
        let reply = ask(
            peer,
            format!("RP2P/1 RANGE {name} {hash} {start} {end}\n").as_bytes(),
        );
        let mut r = Cursor::new(reply);
        let Response::Range(header) = Response::read_from(&mut r).unwrap() else {
            panic!("not a range reply");
        };
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut rest).unwrap();
        let (proof_bytes, content) = rest.split_at(header.proof as usize);
        let groups = proof::verify_proof(header.size, hash, start, end, proof_bytes).unwrap();
        let mut at = 0;
        for g in groups {
            assert!(g.verify(&content[at..at + g.len]), "group at {}", g.offset);
            at += g.len;
        }
        assert_eq!(at, content.len());
        content.to_vec()
    }

    #[test]
    fn a_range_comes_with_a_proof_that_checks_out() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(dir.path().join("big"), &content).unwrap();
        let peer = peer(dir.path());
        let hash = blake3::hash(&content);
        assert!(fetch_range(&peer, "big", &hash, 0, 100_000) == content);
        assert!(fetch_range(&peer, "big", &hash, 16384, 49152) == content[16384..49152]);
        assert!(fetch_range(&peer, "big", &hash, 98304, 100_000) == content[98304..]);
        for (line, expect) in [
            (
                format!("RP2P/1 RANGE big {hash} 1 16384\n"),
                "ERR bad-request",
            ),
            (
                format!("RP2P/1 RANGE big {hash} 0 100001\n"),
                "ERR bad-request",
            ),
            (
                format!("RP2P/1 RANGE big {} 0 16384\n", blake3::hash(b"x")),
                "ERR changed",
            ),
            (
                format!("RP2P/1 RANGE nope {hash} 0 16384\n"),
                "ERR not-found",
            ),
        ] {
            let reply = String::from_utf8_lossy(&ask(&peer, line.as_bytes())).into_owned();
            assert!(reply.starts_with(expect), "{line}: {reply}");
        }
    }

    #[test]
    fn a_range_of_a_file_changed_since_it_was_hashed_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "old content").unwrap();
        let peer = peer(dir.path());
        let old = blake3::hash(b"old content");
        assert_eq!(fetch_range(&peer, "a", &old, 0, 11), b"old content");
        std::fs::write(dir.path().join("a"), "new content").unwrap();
        let reply = ask(&peer, format!("RP2P/1 RANGE a {old} 0 11\n").as_bytes());
        let reply = String::from_utf8(reply).unwrap();
        assert!(
            reply.starts_with("ERR changed \"a\" has other content now"),
            "{reply}"
        );
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
        fn arbitrary_gets_never_panic(line in "RP2P/1 (GET|LIST|get|HEAD|RANGE)( [a-z./%0-9]{0,12}){0,3}( [0-9]{1,6}){0,2}\n") {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("a"), "content").unwrap();
            let _ = respond(&peer(dir.path()), &mut Cursor::new(line), &mut Vec::new());
        }
    }
}
