//! The conversation between the relay and its callers: peers register and
//! unregister, clients ask for the live peers and for the relay's counters.

use std::{
    io::{self, BufRead, Write},
    net::IpAddr,
};

use crate::{
    error::is_token, parse_num, read_items, read_line, read_reply_line, split_request, write_whole,
    ErrorReply, PeerAddr, ProtocolError, MAX_LINE, VERSION,
};

/// The most peers a `PEERS` reply may carry; relays sample down to this.
pub const MAX_PEERS: usize = 1000;
/// The most counters a `STATS` reply may carry.
pub const MAX_STATS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// "I serve files on `port`", at the address the connection comes from,
    /// or at `host` when given (peers behind NAT). Also the heartbeat.
    Register { port: u16, host: Option<IpAddr> },
    /// "Forget me": sent by a peer that shuts down.
    Unregister { port: u16, host: Option<IpAddr> },
    /// "Which peers are live?"
    Peers,
    /// "How are you doing?"
    Stats,
}

impl Request {
    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        let (verb, mut args) = split_request(line)?;
        let request = match verb.to_ascii_uppercase().as_str() {
            "REGISTER" | "UNREGISTER" => {
                let port: u16 = parse_num("port", args.required("port")?)?;
                if port == 0 {
                    return Err(ProtocolError::invalid("port", "0"));
                }
                let host = args
                    .optional()
                    .map(|h| h.parse().map_err(|_| ProtocolError::invalid("host", h)))
                    .transpose()?;
                if verb.eq_ignore_ascii_case("REGISTER") {
                    Request::Register { port, host }
                } else {
                    Request::Unregister { port, host }
                }
            }
            "PEERS" => Request::Peers,
            "STATS" => Request::Stats,
            _ => return Err(ProtocolError::UnknownCommand(verb.to_string())),
        };
        args.finish()?;
        Ok(request)
    }

    /// Reads one request; `Ok(None)` if the caller closed without sending one.
    pub fn read_from<R: BufRead + ?Sized>(r: &mut R) -> Result<Option<Self>, ProtocolError> {
        match read_line(r, MAX_LINE)? {
            Some(line) => Request::parse(&line).map(Some),
            None => Ok(None),
        }
    }

    /// Writes the message with a single `write_all`, so that it leaves in
    /// as few packets as possible.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        write_whole(w, |buf| self.encode(buf))
    }

    fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Request::Register { port, host } | Request::Unregister { port, host } => {
                let verb = if matches!(self, Request::Register { .. }) {
                    "REGISTER"
                } else {
                    "UNREGISTER"
                };
                match host {
                    Some(host) => writeln!(w, "{VERSION} {verb} {port} {host}"),
                    None => writeln!(w, "{VERSION} {verb} {port}"),
                }
            }
            Request::Peers => writeln!(w, "{VERSION} PEERS"),
            Request::Stats => writeln!(w, "{VERSION} STATS"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The peer is listed until `ttl_secs` pass without another `REGISTER`.
    Registered {
        ttl_secs: u64,
    },
    Unregistered,
    Peers(Vec<PeerAddr>),
    /// Named counters, in the relay's order.
    Stats(Vec<(String, u64)>),
    Error(ErrorReply),
}

impl Response {
    pub fn read_from<R: BufRead + ?Sized>(r: &mut R) -> Result<Self, ProtocolError> {
        let line = read_reply_line(r)?;
        let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
        Ok(match word {
            "REGISTERED" => Response::Registered {
                ttl_secs: parse_num("ttl", rest)?,
            },
            "UNREGISTERED" if rest.is_empty() => Response::Unregistered,
            "PEERS" => Response::Peers(read_items(r, rest, MAX_PEERS, str::parse)?),
            "STATS" => Response::Stats(read_items(r, rest, MAX_STATS, parse_stat)?),
            "ERR" => Response::Error(ErrorReply::parse(rest)?),
            _ => return Err(ProtocolError::UnexpectedReply(line)),
        })
    }

    /// Writes the message with a single `write_all`, so that it leaves in
    /// as few packets as possible.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        write_whole(w, |buf| self.encode(buf))
    }

    fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Response::Registered { ttl_secs } => writeln!(w, "REGISTERED {ttl_secs}"),
            Response::Unregistered => writeln!(w, "UNREGISTERED"),
            Response::Peers(peers) => {
                writeln!(w, "PEERS {}", peers.len())?;
                for peer in peers {
                    writeln!(w, "{peer}")?;
                }
                Ok(())
            }
            Response::Stats(stats) => {
                writeln!(w, "STATS {}", stats.len())?;
                for (key, value) in stats {
                    writeln!(w, "{key} {value}")?;
                }
                Ok(())
            }
            Response::Error(e) => e.encode(w),
        }
    }
}

impl From<ErrorReply> for Response {
    fn from(reply: ErrorReply) -> Self {
        Response::Error(reply)
    }
}

fn parse_stat(line: &str) -> Result<(String, u64), ProtocolError> {
    let (key, value) = line
        .split_once(' ')
        .ok_or_else(|| ProtocolError::invalid("stat", line))?;
    if !is_token(key) {
        return Err(ProtocolError::invalid("stat name", key));
    }
    Ok((key.to_string(), parse_num("stat value", value)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn round_trip_request(req: &Request) -> Request {
        let mut buf = Vec::new();
        req.write_to(&mut buf).unwrap();
        Request::read_from(&mut Cursor::new(buf)).unwrap().unwrap()
    }

    fn round_trip_response(resp: &Response) -> Response {
        let mut buf = Vec::new();
        resp.write_to(&mut buf).unwrap();
        let mut r = Cursor::new(buf);
        let back = Response::read_from(&mut r).unwrap();
        assert_eq!(
            r.position() as usize,
            r.get_ref().len(),
            "reply not fully consumed"
        );
        back
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Register {
                port: 7000,
                host: None,
            },
            Request::Register {
                port: 1,
                host: Some("10.0.0.1".parse().unwrap()),
            },
            Request::Unregister {
                port: 65535,
                host: Some("::1".parse().unwrap()),
            },
            Request::Peers,
            Request::Stats,
        ] {
            assert_eq!(round_trip_request(&req), req);
        }
    }

    #[test]
    fn requests_typed_by_hand_parse() {
        assert_eq!(Request::parse("RP2P/1 peers").unwrap(), Request::Peers);
        assert_eq!(
            Request::parse("RP2P/1   REGISTER  7000 ").unwrap(),
            Request::Register {
                port: 7000,
                host: None
            }
        );
    }

    #[test]
    fn bad_requests_are_named() {
        type Check = fn(&ProtocolError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, ProtocolError::EmptyRequest)),
            (
                "PEERS",
                |e| matches!(e, ProtocolError::Version(v) if v == "PEERS"),
            ),
            ("RP2P/2 PEERS", |e| matches!(e, ProtocolError::Version(_))),
            ("RP2P/1", |e| matches!(e, ProtocolError::Missing("command"))),
            (
                "RP2P/1 FLY",
                |e| matches!(e, ProtocolError::UnknownCommand(c) if c == "FLY"),
            ),
            ("RP2P/1 REGISTER", |e| {
                matches!(e, ProtocolError::Missing("port"))
            }),
            ("RP2P/1 REGISTER 0", |e| {
                matches!(e, ProtocolError::Invalid { .. })
            }),
            ("RP2P/1 REGISTER 65536", |e| {
                matches!(e, ProtocolError::Invalid { .. })
            }),
            ("RP2P/1 REGISTER +80", |e| {
                matches!(e, ProtocolError::Invalid { .. })
            }),
            ("RP2P/1 REGISTER 80 not-an-ip", |e| {
                matches!(e, ProtocolError::Invalid { what: "host", .. })
            }),
            (
                "RP2P/1 PEERS now",
                |e| matches!(e, ProtocolError::Unexpected(a) if a == "now"),
            ),
        ];
        for (line, check) in cases {
            let err = Request::parse(line).unwrap_err();
            assert!(check(&err), "{line:?} gave {err:?}");
        }
    }

    #[test]
    fn responses_round_trip() {
        for resp in [
            Response::Registered { ttl_secs: 90 },
            Response::Unregistered,
            Response::Peers(vec![]),
            Response::Peers(vec![
                "127.0.0.1:1".parse().unwrap(),
                "[::1]:2".parse().unwrap(),
            ]),
            Response::Stats(vec![("peers_live".into(), 3), ("uptime_secs".into(), 0)]),
            Response::Error(ErrorReply::new(ErrorCode::Busy, "too many connections")),
            Response::Error(ErrorReply::new(ErrorCode::NotFound, "")),
        ] {
            assert_eq!(round_trip_response(&resp), resp);
        }
    }

    #[test]
    fn bad_responses_are_errors() {
        for input in [
            &b""[..],
            b"PEERS 2\n127.0.0.1:1\n",
            b"PEERS 1001\n",
            b"PEERS x\n",
            b"PEERS 1\nnonsense\n",
            b"REGISTERED\n",
            b"HELLO\n",
            b"STATS 1\nkey\n",
            b"ERR\n",
            b"UNREGISTERED now\n",
        ] {
            assert!(
                Response::read_from(&mut Cursor::new(input)).is_err(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn a_list_may_hold_exactly_the_limit() {
        let full: Vec<PeerAddr> = (1..=MAX_PEERS as u16)
            .map(|port| PeerAddr::new([127, 0, 0, 1].into(), port).unwrap())
            .collect();
        let resp = Response::Peers(full);
        assert_eq!(round_trip_response(&resp), resp);
        // One more is refused on the header alone, before any line is read.
        let err = Response::read_from(&mut Cursor::new(b"PEERS 1001\n")).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::TooMany {
                    count: 1001,
                    limit: MAX_PEERS
                }
            ),
            "{err:?}"
        );
    }

    proptest! {
        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::read_from(&mut Cursor::new(bytes));
        }

        #[test]
        fn request_parser_never_panics_on_near_misses(line in "RP2P/1 (REGISTER|UNREGISTER|PEERS|STATS)( [0-9a-f:.]{0,12}){0,3}") {
            let _ = Request::parse(&line);
        }

        #[test]
        fn response_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Response::read_from(&mut Cursor::new(bytes));
        }

        #[test]
        fn registrations_round_trip(port in 1u16.., host in proptest::option::of(any::<IpAddr>())) {
            let req = Request::Register { port, host };
            prop_assert_eq!(round_trip_request(&req), req);
        }

        #[test]
        fn peer_lists_round_trip(peers in proptest::collection::vec((any::<IpAddr>(), 1u16..), 0..20)) {
            let peers: Vec<PeerAddr> = peers.into_iter().filter_map(|(ip, port)| PeerAddr::new(ip, port).ok()).collect();
            let resp = Response::Peers(peers);
            prop_assert_eq!(round_trip_response(&resp), resp);
        }
    }
}
