//! The accept loop and the handling of one connection: one request, then a
//! file streamed by the kernel, or the folder's listing, or an error.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use netkit::{close_gently, describe_io, Deadline};
use protocol::{
    peer::{FileHeader, Request, Response, MAX_FILES},
    ErrorCode, ErrorReply, FileName, MAX_LINE,
};

use crate::{
    files::Library,
    stall::{self, Outlet},
};

/// What every connection handler shares.
pub(crate) struct Peer {
    pub(crate) library: Library,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
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
    })
}

/// Sends the header and the file from `offset`; returns a log summary.
fn send_file<W: Outlet>(
    peer: &Peer,
    out: &mut W,
    name: &FileName,
    offset: u64,
) -> Result<String, SendError> {
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
    let sent =
        stall::send(&mut file, offset, want, out, peer.write_timeout).map_err(SendError::Broke)?;
    if sent < want {
        return Err(SendError::Shrank { sent, want });
    }
    Ok(format!("sent {sent} bytes"))
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
