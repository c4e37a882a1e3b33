//! The relay-p2p wire format: message types and pure functions that parse
//! and encode them over any `BufRead` / `Write`.
//!
//! Every conversation is one request line from the client, then one reply
//! (a header line, sometimes followed by more lines or by raw file bytes).
//! Nothing in this crate opens a socket or starts a thread; the binaries own
//! all I/O policy (timeouts, connection caps) and hand this crate their
//! buffered streams. `PROTOCOL.md` at the repository root is the spec.
#![forbid(unsafe_code)]

mod addr;
mod error;
mod line;
mod name;
pub mod peer;
pub mod relay;

pub use addr::PeerAddr;
pub use error::{ErrorCode, ErrorReply, ProtocolError};
pub use line::{read_line, MAX_LINE};
pub use name::{FileName, MAX_NAME_LEN};

/// The content hash carried in file replies (BLAKE3, 32 bytes, hex on the wire).
pub use blake3::Hash as ContentHash;

/// The token every request line starts with. A future incompatible change
/// raises the number; servers answer `ERR version` to versions they do not speak.
pub const VERSION: &str = "RP2P/1";

/// Splits a request line into its verb and arguments after checking the version token.
fn split_request(line: &str) -> Result<(&str, Args<'_>), ProtocolError> {
    let mut words = line.split_ascii_whitespace();
    let version = words.next().ok_or(ProtocolError::EmptyRequest)?;
    if version != VERSION {
        return Err(ProtocolError::Version(version.to_string()));
    }
    let verb = words.next().ok_or(ProtocolError::Missing("command"))?;
    Ok((verb, Args(words)))
}

/// The whitespace-separated arguments of one line, consumed in order.
struct Args<'a>(std::str::SplitAsciiWhitespace<'a>);

impl<'a> Args<'a> {
    fn required(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        self.0.next().ok_or(ProtocolError::Missing(what))
    }

    fn optional(&mut self) -> Option<&'a str> {
        self.0.next()
    }

    /// Fails if anything is left over, so that typos are not silently ignored.
    fn finish(mut self) -> Result<(), ProtocolError> {
        match self.0.next() {
            None => Ok(()),
            Some(extra) => Err(ProtocolError::Unexpected(extra.to_string())),
        }
    }
}

fn parse_num<T: std::str::FromStr>(what: &'static str, s: &str) -> Result<T, ProtocolError> {
    // `FromStr` for integers accepts a leading '+'; the wire format does not.
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProtocolError::invalid(what, s));
    }
    s.parse().map_err(|_| ProtocolError::invalid(what, s))
}

/// Reads a reply header: `None`-safe wrapper that turns a closed connection into an error.
fn read_reply_line<R: std::io::BufRead + ?Sized>(r: &mut R) -> Result<String, ProtocolError> {
    read_line(r, MAX_LINE)?.ok_or(ProtocolError::Closed)
}

/// Encodes a message in memory, then sends it with one `write_all`, so that
/// it leaves in as few packets as possible even on an unbuffered socket.
fn write_whole<W: std::io::Write + ?Sized>(
    w: &mut W,
    encode: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(128);
    encode(&mut buf)?;
    w.write_all(&buf)
}

/// Reads `count` lines after a list header and parses each one.
fn read_items<R, T>(
    r: &mut R,
    header: &str,
    limit: usize,
    parse: impl Fn(&str) -> Result<T, ProtocolError>,
) -> Result<Vec<T>, ProtocolError>
where
    R: std::io::BufRead + ?Sized,
{
    let count: usize = parse_num("count", header)?;
    if count > limit {
        return Err(ProtocolError::TooMany { count, limit });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(parse(&read_reply_line(r)?)?);
    }
    Ok(items)
}
