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
pub mod identity;
pub mod index;
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
///
/// Words are separated by spaces and tabs only, as PROTOCOL.md says. Any
/// other control character (a CR left in the middle of the line, a form
/// feed) is refused rather than taken as a separator: a line that two
/// implementations would split differently is a line to refuse.
fn split_request(line: &str) -> Result<(&str, Args<'_>), ProtocolError> {
    if line.bytes().any(|b| b != b'\t' && b.is_ascii_control()) {
        return Err(ProtocolError::ControlChar);
    }
    let mut words = words(line);
    let version = words.next().ok_or(ProtocolError::EmptyRequest)?;
    if version != VERSION {
        return Err(ProtocolError::Version(version.to_string()));
    }
    let verb = words.next().ok_or(ProtocolError::Missing("command"))?;
    Ok((verb, Args(words)))
}

type Words<'a> = std::iter::Filter<std::str::Split<'a, [char; 2]>, fn(&&'a str) -> bool>;

/// The words of a line: runs of anything but spaces and tabs.
fn words(line: &str) -> Words<'_> {
    line.split([' ', '\t']).filter(|word| !word.is_empty())
}

/// The space-separated arguments of one line, consumed in order.
struct Args<'a>(Words<'a>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// The code a server would answer a raw request line with, either side.
    fn codes(line: &[u8]) -> [Option<ErrorCode>; 2] {
        [
            relay::Request::read_from(&mut Cursor::new(line))
                .err()
                .map(|e| e.code()),
            peer::Request::read_from(&mut Cursor::new(line))
                .err()
                .map(|e| e.code()),
        ]
    }

    #[test]
    fn words_are_separated_by_spaces_and_tabs_only() {
        assert_eq!(
            relay::Request::parse("RP2P/1\t REGISTER \t7000\t").unwrap(),
            relay::Request::Register {
                port: 7000,
                host: None
            }
        );
        for line in [
            &b"RP2P/1 REGISTER 7000\r192.0.2.7\n"[..],
            b"RP2P/1\x0cPEERS\n",
            b"RP2P/1 PEERS\x0b\n",
            b"RP2P/1 PEERS\r\r\n",
            b"RP2P/1 GET a\rb\n",
            b"\rRP2P/1 LIST\n",
            b"RP2P/1 LIST\x7f\n",
            b"RP2P/1 LIST\x00\n",
        ] {
            for code in codes(line) {
                assert_eq!(code, Some(ErrorCode::BadRequest), "{line:?}");
            }
        }
        // One CR right before the LF is dropped.
        assert_eq!(
            relay::Request::read_from(&mut Cursor::new(b"RP2P/1 PEERS\r\n")).unwrap(),
            Some(relay::Request::Peers)
        );
    }

    fn requests() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"RP2P/1 PEERS".to_vec()),
            Just(b"RP2P/1 STATS".to_vec()),
            Just(b"RP2P/1 LIST".to_vec()),
            (1u16.., any::<std::net::IpAddr>())
                .prop_map(|(port, ip)| format!("RP2P/1 REGISTER {port} {ip}").into_bytes()),
            ("[a-z0-9%. ]{1,20}", any::<u64>()).prop_map(|(name, offset)| {
                let name = FileName::new(&name).unwrap_or_else(|_| FileName::new("x").unwrap());
                format!("RP2P/1 GET {} {offset}", name.encode()).into_bytes()
            }),
        ]
    }

    proptest! {
        #[test]
        fn a_control_character_anywhere_is_refused(
            line in requests(),
            at in any::<prop::sample::Index>(),
            control in (0u8..=0x20).prop_map(|b| if b == 0x20 { 0x7f } else { b }).prop_filter("not tab or LF", |&b| b != b'\t' && b != b'\n'),
        ) {
            let mut line = line;
            let at = at.index(line.len() + 1);
            // A CR at the very end is the one CR that is dropped.
            prop_assume!(!(control == b'\r' && at == line.len()));
            line.insert(at, control);
            line.push(b'\n');
            for code in codes(&line) {
                prop_assert_eq!(code, Some(ErrorCode::BadRequest), "{:?}", String::from_utf8_lossy(&line));
            }
        }

        #[test]
        fn spaces_and_tabs_between_words_change_nothing(line in requests(), seps in proptest::collection::vec("[ \t]{1,3}", 8)) {
            let text = String::from_utf8(line).unwrap();
            let mut seps = seps.into_iter();
            let spaced: String = text
                .split(' ')
                .map(|word| format!("{word}{}", seps.next().unwrap_or_default()))
                .collect();
            let one = codes(format!("{text}\n").as_bytes());
            let other = codes(format!("{spaced}\r\n").as_bytes());
            prop_assert_eq!(one, other);
        }
    }
}
