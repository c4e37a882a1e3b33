use std::{fmt, io, str::FromStr, time::Duration};

/// Everything that can go wrong while reading or parsing a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("connection closed in the middle of a line")]
    TruncatedLine,
    #[error("connection closed before a reply")]
    Closed,
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("empty request")]
    EmptyRequest,
    #[error("control character in the request line")]
    ControlChar,
    #[error("unsupported protocol version {0:?} (requests start with {v})", v = crate::VERSION)]
    Version(String),
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("unexpected argument {0:?}")]
    Unexpected(String),
    #[error("invalid {what} {value:?}")]
    Invalid { what: &'static str, value: String },
    #[error("invalid file name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("list of {count} entries is longer than the limit of {limit}")]
    TooMany { count: usize, limit: usize },
    #[error("unexpected reply {0:?}")]
    UnexpectedReply(String),
}

impl ProtocolError {
    pub(crate) fn invalid(what: &'static str, value: &str) -> Self {
        ProtocolError::Invalid {
            what,
            value: value.to_string(),
        }
    }

    /// The code a server answers with when a request fails this way.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Io(_) => ErrorCode::Internal,
            ProtocolError::LineTooLong { .. } => ErrorCode::TooLong,
            ProtocolError::Version(_) => ErrorCode::Version,
            ProtocolError::BadName { .. } => ErrorCode::Forbidden,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// The machine-readable part of an `ERR` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    TooLong,
    Version,
    NotFound,
    Forbidden,
    Busy,
    Timeout,
    Internal,
    /// A code this version does not know; kept so newer servers stay readable.
    Other(String),
}

impl ErrorCode {
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::TooLong => "too-long",
            ErrorCode::Version => "version",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Busy => "busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Other(code) => code,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "bad-request" => ErrorCode::BadRequest,
            "too-long" => ErrorCode::TooLong,
            "version" => ErrorCode::Version,
            "not-found" => ErrorCode::NotFound,
            "forbidden" => ErrorCode::Forbidden,
            "busy" => ErrorCode::Busy,
            "timeout" => ErrorCode::Timeout,
            "internal" => ErrorCode::Internal,
            other if is_token(other) => ErrorCode::Other(other.to_string()),
            other => return Err(ProtocolError::invalid("error code", other)),
        })
    }
}

/// True for a non-empty word of printable ASCII without spaces.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The word that starts the message of a `busy` reply that says when to
/// ask again: `ERR busy retry-after <secs> <message>`.
const RETRY_AFTER: &str = "retry-after";

/// An `ERR <code> <message>` reply: the request failed and the connection ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl fmt::Display) -> Self {
        // The message travels on one line: fold anything that would break it.
        let message = message
            .to_string()
            .split(|c: char| c.is_control())
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_string();
        ErrorReply { code, message }
    }

    /// `ERR busy retry-after <secs> <message>`: busy, and not worth asking
    /// again before `after` (rounded up to whole seconds, at least 1).
    pub fn busy_retry_after(after: Duration, message: impl fmt::Display) -> Self {
        let secs = after
            .as_secs()
            .saturating_add(u64::from(after.subsec_nanos() > 0));
        ErrorReply::new(
            ErrorCode::Busy,
            format!("{RETRY_AFTER} {} {message}", secs.max(1)),
        )
    }

    /// How long a `busy` reply asks the caller to wait before asking
    /// again, when its message starts with `retry-after <secs>`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.split_retry_after().map(|(after, _)| after)
    }

    /// The message without its `retry-after <secs>`, for people.
    pub fn detail(&self) -> &str {
        self.split_retry_after()
            .map_or(self.message.as_str(), |(_, rest)| rest)
    }

    fn split_retry_after(&self) -> Option<(Duration, &str)> {
        if self.code != ErrorCode::Busy {
            return None;
        }
        let rest = self.message.strip_prefix(RETRY_AFTER)?.strip_prefix(' ')?;
        let (secs, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        // Digits only: `parse` would also take a leading `+`.
        if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let secs: u64 = secs.parse().ok()?;
        Some((Duration::from_secs(secs), rest))
    }

    /// Sends the reply line, in one write.
    pub fn write_to<W: io::Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        crate::write_whole(w, |buf| self.encode(buf))
    }

    pub(crate) fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        use io::Write;
        if self.message.is_empty() {
            writeln!(w, "ERR {}", self.code)
        } else {
            writeln!(w, "ERR {} {}", self.code, self.message)
        }
    }

    /// Parses what follows `ERR ` on a reply line.
    pub(crate) fn parse(rest: &str) -> Result<Self, ProtocolError> {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        Ok(ErrorReply::new(code.parse()?, message))
    }
}

impl From<&ProtocolError> for ErrorReply {
    fn from(e: &ProtocolError) -> Self {
        ErrorReply::new(e.code(), e)
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for ErrorReply {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_folded_onto_one_line() {
        let e = ErrorReply::new(ErrorCode::Internal, "a\nb\r\n c\t");
        assert_eq!(e.message, "a b  c");
    }

    #[test]
    fn each_failure_maps_to_its_code() {
        let cases = [
            (
                ProtocolError::Io(io::ErrorKind::BrokenPipe.into()),
                ErrorCode::Internal,
            ),
            (ProtocolError::LineTooLong { limit: 10 }, ErrorCode::TooLong),
            (ProtocolError::Version("RP2P/9".into()), ErrorCode::Version),
            (
                ProtocolError::BadName {
                    name: "../x".into(),
                    reason: "it climbs",
                },
                ErrorCode::Forbidden,
            ),
            (ProtocolError::EmptyRequest, ErrorCode::BadRequest),
            (ProtocolError::Missing("port"), ErrorCode::BadRequest),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(ErrorReply::from(&e).code, code, "{e:?}");
        }
    }

    #[test]
    fn retry_after_is_written_and_read_back() {
        let e = ErrorReply::busy_retry_after(Duration::from_millis(1500), "slow down");
        assert_eq!(e.message, "retry-after 2 slow down");
        let mut line = Vec::new();
        e.encode(&mut line).unwrap();
        assert_eq!(line, b"ERR busy retry-after 2 slow down\n");
        let back = ErrorReply::parse("busy retry-after 2 slow down").unwrap();
        assert_eq!(back.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(back.detail(), "slow down");
        // Less than a second still says 1: 0 would invite a busy loop.
        let soon = ErrorReply::busy_retry_after(Duration::from_millis(10), "x");
        assert_eq!(soon.retry_after(), Some(Duration::from_secs(1)));
        let bare = ErrorReply::parse("busy retry-after 7").unwrap();
        assert_eq!(bare.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(bare.detail(), "");
    }

    #[test]
    fn only_a_busy_reply_that_starts_so_has_a_retry_after() {
        for rest in [
            "busy too many connections (limit 2)",
            "busy retry-after",
            "busy retry-after soon",
            "busy retry-after +3 x",
            "busy retry-after 99999999999999999999999 x",
            "busy retry-after-3 x",
            "internal retry-after 3 x",
        ] {
            let e = ErrorReply::parse(rest).unwrap();
            assert_eq!(e.retry_after(), None, "{rest}");
            assert_eq!(e.detail(), e.message, "{rest}");
        }
    }

    #[test]
    fn a_reply_is_one_line_on_the_wire_and_message_then_code_in_text() {
        let busy = ErrorReply::new(ErrorCode::Busy, "too many connections");
        let mut wire = Vec::new();
        busy.write_to(&mut wire).unwrap();
        assert_eq!(wire, b"ERR busy too many connections\n");
        assert_eq!(busy.to_string(), "too many connections (busy)");
        let mut wire = Vec::new();
        ErrorReply::new(ErrorCode::NotFound, "")
            .write_to(&mut wire)
            .unwrap();
        assert_eq!(wire, b"ERR not-found\n");
    }

    #[test]
    fn every_code_round_trips() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::TooLong,
            ErrorCode::Version,
            ErrorCode::NotFound,
            ErrorCode::Forbidden,
            ErrorCode::Busy,
            ErrorCode::Timeout,
            ErrorCode::Internal,
            ErrorCode::Other("slow-down".into()),
        ] {
            assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
        }
        assert!("".parse::<ErrorCode>().is_err());
    }
}
