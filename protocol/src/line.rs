use std::io::{self, BufRead};

use crate::ProtocolError;

/// The longest line, newline included, that either side reads. Request and
/// reply lines are tiny; the bound keeps a hostile sender from making us
/// buffer more than this per connection.
pub const MAX_LINE: usize = 4096;

/// Reads one `\n`-terminated line of at most `max` bytes (the `\n` included),
/// without the line ending (a `\r` before the `\n` is dropped too, for
/// clients such as `nc -C` and telnet).
///
/// Returns `Ok(None)` when the stream ends cleanly before the first byte.
/// Never buffers more than `max` bytes, and leaves any bytes after the line
/// in the reader, so raw content that follows a header can be read next.
pub fn read_line<R: BufRead + ?Sized>(
    r: &mut R,
    max: usize,
) -> Result<Option<String>, ProtocolError> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if buf.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(ProtocolError::TruncatedLine)
            };
        }
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            if line.len() + end + 1 > max {
                return Err(ProtocolError::LineTooLong { limit: max });
            }
            line.extend_from_slice(&buf[..end]);
            r.consume(end + 1);
            break;
        }
        // No newline yet: even if the very next byte were one, the line
        // would be longer than `max`.
        if line.len() + buf.len() >= max {
            return Err(ProtocolError::LineTooLong { limit: max });
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        r.consume(n);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| ProtocolError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{BufReader, Cursor, Read};

    fn read_all(input: &[u8], max: usize) -> Result<Option<String>, ProtocolError> {
        read_line(&mut Cursor::new(input), max)
    }

    #[test]
    fn reads_a_line_and_leaves_the_rest() {
        let mut r = Cursor::new(&b"FILE 3 x\nabc"[..]);
        assert_eq!(read_line(&mut r, MAX_LINE).unwrap().unwrap(), "FILE 3 x");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"abc");
    }

    #[test]
    fn strips_crlf() {
        assert_eq!(read_all(b"PEERS\r\n", 64).unwrap().unwrap(), "PEERS");
    }

    #[test]
    fn clean_eof_is_none_and_mid_line_eof_is_an_error() {
        assert!(read_all(b"", 64).unwrap().is_none());
        assert!(matches!(
            read_all(b"abc", 64),
            Err(ProtocolError::TruncatedLine)
        ));
    }

    #[test]
    fn exactly_at_the_limit_is_accepted() {
        // 9 bytes of text plus the newline: exactly 10.
        assert_eq!(read_all(b"123456789\n", 10).unwrap().unwrap(), "123456789");
    }

    #[test]
    fn one_byte_past_the_limit_is_rejected() {
        assert!(matches!(
            read_all(b"1234567890\n", 10),
            Err(ProtocolError::LineTooLong { limit: 10 })
        ));
        // Also when the newline never comes.
        assert!(matches!(
            read_all(b"1234567890", 10),
            Err(ProtocolError::LineTooLong { limit: 10 })
        ));
    }

    #[test]
    fn limit_holds_across_small_buffer_refills() {
        let exact = BufReader::with_capacity(3, &b"123456789\nrest"[..]);
        assert_eq!(read_line(&mut { exact }, 10).unwrap().unwrap(), "123456789");
        let over = BufReader::with_capacity(3, &b"1234567890\n"[..]);
        assert!(matches!(
            read_line(&mut { over }, 10),
            Err(ProtocolError::LineTooLong { .. })
        ));
    }

    #[test]
    fn does_not_buffer_past_the_limit() {
        // A stream without newlines must fail at the limit, not grow. Ten
        // times the limit stands in for an endless one, so that a reader
        // that forgot the limit ends (truncated) instead of hanging the test.
        let mut endless = BufReader::new(io::repeat(b'a').take(10 * MAX_LINE as u64));
        assert!(matches!(
            read_line(&mut endless, MAX_LINE),
            Err(ProtocolError::LineTooLong { .. })
        ));
    }

    /// A reader that fails once with `kind`, then yields `data`.
    struct FailsOnce {
        kind: Option<io::ErrorKind>,
        data: &'static [u8],
    }

    impl Read for FailsOnce {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some(kind) = self.kind.take() {
                return Err(kind.into());
            }
            self.data.read(buf)
        }
    }

    #[test]
    fn an_interrupted_read_is_retried_and_other_errors_are_not() {
        let interrupted = FailsOnce {
            kind: Some(io::ErrorKind::Interrupted),
            data: b"PEERS\n",
        };
        assert_eq!(
            read_line(&mut BufReader::new(interrupted), 64).unwrap(),
            Some("PEERS".to_string())
        );
        let reset = FailsOnce {
            kind: Some(io::ErrorKind::ConnectionReset),
            data: b"PEERS\n",
        };
        assert!(matches!(
            read_line(&mut BufReader::new(reset), 64),
            Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset
        ));
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        assert!(matches!(
            read_all(b"\xff\xfe\n", 64),
            Err(ProtocolError::NotUtf8)
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), max in 1usize..300) {
            // Each line read takes at least its newline, so this many
            // rounds are enough; the bound stops a reader that makes no
            // progress from hanging the test.
            let rounds = bytes.len() + 1;
            let mut r = Cursor::new(bytes);
            for _ in 0..rounds {
                match read_line(&mut r, max) {
                    Ok(Some(line)) => prop_assert!(line.len() < max),
                    _ => return Ok(()),
                }
            }
            prop_assert!(false, "{} lines from {} bytes", rounds, rounds - 1);
        }

        #[test]
        fn a_written_line_reads_back(text in "[^\r\n]{0,200}") {
            let input = format!("{text}\n");
            prop_assert_eq!(read_all(input.as_bytes(), MAX_LINE).unwrap().unwrap(), text);
        }
    }
}
