//! Short, lowercase words for network errors, for messages and logs.

use std::io;

/// A socket timeout shows up as `WouldBlock` on Unix and `TimedOut` on Windows.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A short, lowercase reason for a network error: "timed out" rather than
/// "Resource temporarily unavailable (os error 11)", "connection refused"
/// rather than "Connection refused (os error 111)".
pub fn describe_io(e: &io::Error) -> String {
    use io::ErrorKind::*;
    if is_timeout(e) {
        return "timed out".to_string();
    }
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | AddrNotAvailable | HostUnreachable | NetworkUnreachable | NetworkDown | UnexpectedEof => {
            e.kind().to_string()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_errors_read_short() {
        assert_eq!(describe_io(&io::ErrorKind::WouldBlock.into()), "timed out");
        assert_eq!(
            describe_io(&io::ErrorKind::ConnectionRefused.into()),
            "connection refused"
        );
        assert_eq!(
            describe_io(&io::Error::other("disk on fire")),
            "disk on fire"
        );
    }

    #[test]
    fn timeouts_of_both_platforms_are_recognised() {
        assert!(is_timeout(&io::ErrorKind::WouldBlock.into()));
        assert!(is_timeout(&io::ErrorKind::TimedOut.into()));
        assert!(!is_timeout(&io::ErrorKind::ConnectionReset.into()));
    }
}
