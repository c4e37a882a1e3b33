//! The conversation between the relay and its callers: peers register,
//! announce what they hold and unregister; clients ask who is live, who
//! holds a file, what the network holds, and for the relay's counters.

use std::{
    io::{self, BufRead, Write},
    net::IpAddr,
};

use crate::{
    error::is_token,
    identity::{parse_mac, Auth, NetworkMac, PeerKey},
    index::{parse_hash, read_lines, Holder, ListDigest, Listed, Pattern},
    parse_num, read_items, read_line, read_reply_line, split_request, write_whole, ContentHash,
    ErrorReply, FileName, PeerAddr, ProtocolError, MAX_LINE, VERSION,
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
    /// "Which peers are live, and with which keys?" (`PEERS LONG`)
    PeersLong,
    /// "How are you doing?"
    Stats,
    /// A heartbeat that also says which list of files the peer holds, by
    /// its digest. Registers like `Register`.
    Announce {
        port: u16,
        digest: ListDigest,
        host: Option<IpAddr>,
    },
    /// "Here is my list of files": the header of an `OFFER`, whose body
    /// ([`crate::index::write_offer_body`]) follows on the same connection.
    /// Registers like `Register`.
    Offer {
        port: u16,
        digest: ListDigest,
        host: Option<IpAddr>,
    },
    /// "Who holds a file of this name?"
    Who { name: FileName },
    /// "Who holds this content, under any name?"
    WhoHas { hash: ContentHash },
    /// "What does the network hold?": names matching `pattern`, in name
    /// order, from after `after`.
    Ls {
        pattern: Pattern,
        after: Option<FileName>,
    },
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
            "PEERS" => match args.optional() {
                None => Request::Peers,
                Some(word) if word.eq_ignore_ascii_case("LONG") => Request::PeersLong,
                Some(other) => return Err(ProtocolError::Unexpected(other.to_string())),
            },
            "STATS" => Request::Stats,
            "ANNOUNCE" | "OFFER" => {
                let port: u16 = parse_num("port", args.required("port")?)?;
                if port == 0 {
                    return Err(ProtocolError::invalid("port", "0"));
                }
                let digest = args.required("digest")?.parse()?;
                let host = args
                    .optional()
                    .map(|h| h.parse().map_err(|_| ProtocolError::invalid("host", h)))
                    .transpose()?;
                if verb.eq_ignore_ascii_case("ANNOUNCE") {
                    Request::Announce { port, digest, host }
                } else {
                    Request::Offer { port, digest, host }
                }
            }
            "WHO" => Request::Who {
                name: FileName::decode(args.required("name")?)?,
            },
            "WHOHAS" => Request::WhoHas {
                hash: parse_hash(args.required("hash")?)?,
            },
            "LS" => Request::Ls {
                pattern: Pattern::decode(args.required("pattern")?)?,
                after: args.optional().map(FileName::decode).transpose()?,
            },
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

    /// Parses a request that may end in a credential: a peer's signature,
    /// `... KEY <key> TS <ts> SIG <signature>` (see [`Auth`]), or a private
    /// network's MAC, `... TS <ts> MAC <mac>` (see [`NetworkMac`]).
    pub fn parse_signed(line: &str) -> Result<(Self, Option<Credential>), ProtocolError> {
        let words: Vec<&str> = crate::words(line).collect();
        let Some(at) = words
            .iter()
            .skip(2)
            .position(|w| *w == "KEY" || *w == "TS")
            .map(|i| i + 2)
        else {
            return Ok((Request::parse(line)?, None));
        };
        let request = Request::parse(&words[..at].join(" "))?;
        let credential = match &words[at..] {
            ["KEY", key, "TS", ts, "SIG", sig] => Credential::Signed(Auth {
                key: key.parse()?,
                ts: parse_num("timestamp", ts)?,
                sig: sig.parse()?,
            }),
            ["TS", ts, "MAC", mac] => Credential::Network(NetworkMac {
                ts: parse_num("timestamp", ts)?,
                mac: parse_mac(mac)?,
            }),
            _ => return Err(ProtocolError::invalid("signature", &words[at..].join(" "))),
        };
        Ok((request, Some(credential)))
    }

    /// Reads one request and its credential, if it has one.
    pub fn read_signed_from<R: BufRead + ?Sized>(
        r: &mut R,
    ) -> Result<Option<(Self, Option<Credential>)>, ProtocolError> {
        match read_line(r, MAX_LINE)? {
            Some(line) => Request::parse_signed(&line).map(Some),
            None => Ok(None),
        }
    }

    /// The request line as this crate writes it, without its line end:
    /// what a signature covers, however the sender spaced its words.
    pub fn canonical(&self) -> String {
        let mut line = Vec::with_capacity(128);
        // Writing to a Vec cannot fail.
        let _ = self.encode(&mut line);
        line.pop();
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Writes the request with its signature, in one write.
    pub fn write_signed_to<W: Write + ?Sized>(&self, auth: &Auth, w: &mut W) -> io::Result<()> {
        write_whole(w, |buf| writeln!(buf, "{} {auth}", self.canonical()))
    }

    /// Writes the request with a private network's MAC, in one write.
    pub fn write_with_mac_to<W: Write + ?Sized>(
        &self,
        mac: &NetworkMac,
        w: &mut W,
    ) -> io::Result<()> {
        write_whole(w, |buf| writeln!(buf, "{} {mac}", self.canonical()))
    }
}

/// What proves a request may be made: a peer's signature, or the MAC of a
/// private network's clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Signed by a peer's key.
    Signed(Auth),
    /// Made with the network's secret.
    Network(NetworkMac),
}

impl Request {
    /// True for requests that change the registry, which a peer signs.
    pub fn changes_registry(&self) -> bool {
        matches!(
            self,
            Request::Register { .. }
                | Request::Unregister { .. }
                | Request::Announce { .. }
                | Request::Offer { .. }
        )
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
            Request::PeersLong => writeln!(w, "{VERSION} PEERS LONG"),
            Request::Stats => writeln!(w, "{VERSION} STATS"),
            Request::Announce { port, digest, host } | Request::Offer { port, digest, host } => {
                let verb = if matches!(self, Request::Announce { .. }) {
                    "ANNOUNCE"
                } else {
                    "OFFER"
                };
                match host {
                    Some(host) => writeln!(w, "{VERSION} {verb} {port} {digest} {host}"),
                    None => writeln!(w, "{VERSION} {verb} {port} {digest}"),
                }
            }
            Request::Who { name } => writeln!(w, "{VERSION} WHO {}", name.encode()),
            Request::WhoHas { hash } => writeln!(w, "{VERSION} WHOHAS {hash}"),
            Request::Ls { pattern, after } => match after {
                Some(after) => writeln!(w, "{VERSION} LS {} {}", pattern.encode(), after.encode()),
                None => writeln!(w, "{VERSION} LS {}", pattern.encode()),
            },
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
    /// Live peers with the keys that own their entries.
    PeersLong(Vec<(PeerAddr, PeerKey)>),
    /// Named counters, in the relay's order.
    Stats(Vec<(String, u64)>),
    /// Registered, but the relay does not hold the list with the digest
    /// announced: send it with `OFFER`, at most `max_files` of it.
    SendList {
        ttl_secs: u64,
        max_files: usize,
    },
    /// The list offered is indexed.
    Indexed {
        files: usize,
    },
    /// Holders of a name or of content: a random sample of each version's
    /// live holders, most held versions first.
    Holders(Vec<Holder>),
    /// A page of the network-wide listing; `next` is where the next page
    /// starts (pass it as `after`), `None` after the last page.
    Listing {
        entries: Vec<Listed>,
        next: Option<FileName>,
    },
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
            "PEERS-LONG" => Response::PeersLong(read_items(r, rest, MAX_PEERS, |line| {
                let (addr, key) = line
                    .split_once(' ')
                    .ok_or_else(|| ProtocolError::invalid("peer", line))?;
                Ok((addr.parse()?, key.parse()?))
            })?),
            "STATS" => Response::Stats(read_items(r, rest, MAX_STATS, parse_stat)?),
            "SEND-LIST" => {
                let (ttl, max) = rest
                    .split_once(' ')
                    .ok_or_else(|| ProtocolError::invalid("SEND-LIST", rest))?;
                Response::SendList {
                    ttl_secs: parse_num("ttl", ttl)?,
                    max_files: parse_num("max files", max)?,
                }
            }
            "INDEXED" => Response::Indexed {
                files: parse_num("count", rest)?,
            },
            "HOLDERS" => {
                let count = parse_num("count", rest)?;
                Response::Holders(read_lines(r, count, Holder::parse)?)
            }
            "LISTING" => {
                let (count, next) = rest
                    .split_once(' ')
                    .ok_or_else(|| ProtocolError::invalid("LISTING", rest))?;
                let next = match next {
                    "-" => None,
                    token => Some(FileName::decode(token)?),
                };
                let count = parse_num("count", count)?;
                Response::Listing {
                    entries: read_lines(r, count, Listed::parse)?,
                    next,
                }
            }
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
            Response::PeersLong(peers) => {
                writeln!(w, "PEERS-LONG {}", peers.len())?;
                for (peer, key) in peers {
                    writeln!(w, "{peer} {key}")?;
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
            Response::SendList {
                ttl_secs,
                max_files,
            } => writeln!(w, "SEND-LIST {ttl_secs} {max_files}"),
            Response::Indexed { files } => writeln!(w, "INDEXED {files}"),
            Response::Holders(holders) => {
                writeln!(w, "HOLDERS {}", holders.len())?;
                holders.iter().try_for_each(|h| h.encode(w))
            }
            Response::Listing { entries, next } => {
                let next = next.as_ref().map_or("-".to_string(), FileName::encode);
                writeln!(w, "LISTING {} {next}", entries.len())?;
                entries.iter().try_for_each(|e| e.encode(w))
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
    use crate::{index::Listed, ErrorCode};
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
            Request::PeersLong,
            Request::Stats,
            Request::Announce {
                port: 7000,
                digest: ListDigest::of(&[]),
                host: None,
            },
            Request::Offer {
                port: 7000,
                digest: ListDigest::of(&[]),
                host: Some("10.0.0.1".parse().unwrap()),
            },
            Request::Who {
                name: FileName::new("a b%/c.txt").unwrap(),
            },
            Request::WhoHas {
                hash: blake3::hash(b"x"),
            },
            Request::Ls {
                pattern: Pattern::new("docs/** *.txt").unwrap(),
                after: None,
            },
            Request::Ls {
                pattern: Pattern::new("*").unwrap(),
                after: Some(FileName::new("m n").unwrap()),
            },
        ] {
            assert_eq!(round_trip_request(&req), req);
        }
    }

    #[test]
    fn signed_requests_parse_and_verify_whatever_the_spacing() {
        let me = crate::identity::Identity::from_seed([3; 32]);
        let request = Request::Register {
            port: 7000,
            host: None,
        };
        let auth = me.authorize(&request.canonical(), 1234);
        let mut line = Vec::new();
        request.write_signed_to(&auth, &mut line).unwrap();
        let line = String::from_utf8(line).unwrap();
        let (back, got) = Request::parse_signed(line.trim_end()).unwrap();
        assert_eq!(back, request);
        assert_eq!(got, Some(Credential::Signed(auth)));
        assert!(auth.verifies(&back.canonical()));
        // Tabs and extra spaces do not change what was signed.
        let spaced = line.trim_end().replace(' ', " \t ");
        let (back, got) = Request::parse_signed(&spaced).unwrap();
        let Some(Credential::Signed(got)) = got else {
            panic!("no signature")
        };
        assert!(got.verifies(&back.canonical()));
        let mac = NetworkMac::new(&[4; 32], "RP2P/1 PEERS", 9);
        let mut line = Vec::new();
        Request::Peers.write_with_mac_to(&mac, &mut line).unwrap();
        let (back, got) =
            Request::parse_signed(String::from_utf8(line).unwrap().trim_end()).unwrap();
        assert_eq!(
            (back, got),
            (Request::Peers, Some(Credential::Network(mac)))
        );
        // Unsigned requests parse as before; a broken trailer does not.
        assert_eq!(
            Request::parse_signed("RP2P/1 PEERS").unwrap(),
            (Request::Peers, None)
        );
        for bad in [
            "RP2P/1 REGISTER 7000 KEY",
            "RP2P/1 REGISTER 7000 KEY 00 TS 1 SIG 00",
            &format!(
                "RP2P/1 REGISTER 7000 KEY {} TS x SIG {}",
                auth.key, auth.sig
            ),
            &format!(
                "RP2P/1 REGISTER 7000 KEY {} TS 1 SIG {} more",
                auth.key, auth.sig
            ),
        ] {
            assert!(Request::parse_signed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_requests_typed_by_hand_parse() {
        let digest = "00112233445566778899aabbccddeeff";
        assert_eq!(
            Request::parse(&format!("RP2P/1 announce 7000 {digest}")).unwrap(),
            Request::Announce {
                port: 7000,
                digest: digest.parse().unwrap(),
                host: None
            }
        );
        assert_eq!(
            Request::parse("RP2P/1 WHO notes%20v2.txt").unwrap(),
            Request::Who {
                name: FileName::new("notes v2.txt").unwrap()
            }
        );
        for bad in [
            "RP2P/1 WHO",
            "RP2P/1 WHO ../x",
            "RP2P/1 WHOHAS abc",
            "RP2P/1 LS",
            "RP2P/1 LS * ../x",
            "RP2P/1 LS * a b",
            "RP2P/1 ANNOUNCE 7000",
            "RP2P/1 ANNOUNCE 7000 xyz",
            "RP2P/1 OFFER 0 00112233445566778899aabbccddeeff",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
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
            Response::SendList {
                ttl_secs: 90,
                max_files: 10_000,
            },
            Response::Indexed { files: 3 },
            Response::PeersLong(vec![(
                "[::1]:2".parse().unwrap(),
                crate::identity::Identity::from_seed([2; 32]).key(),
            )]),
            Response::Holders(vec![]),
            Response::Holders(vec![Holder {
                addr: "127.0.0.1:7000".parse().unwrap(),
                key: crate::identity::Identity::from_seed([1; 32]).key(),
                name: FileName::new("a b.txt").unwrap(),
                size: 3,
                hash: blake3::hash(b"abc"),
                holders: 12,
            }]),
            Response::Listing {
                entries: vec![],
                next: None,
            },
            Response::Listing {
                entries: vec![Listed {
                    name: FileName::new("z%.txt").unwrap(),
                    size: 0,
                    hash: blake3::hash(b""),
                    holders: 1,
                }],
                next: Some(FileName::new("z%.txt").unwrap()),
            },
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
        ] {
            assert!(
                Response::read_from(&mut Cursor::new(input)).is_err(),
                "{input:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::read_from(&mut Cursor::new(bytes));
        }

        #[test]
        fn holders_round_trip(entries in proptest::collection::vec(("[a-z %]{1,10}", any::<u64>(), any::<[u8; 32]>(), any::<u64>(), 1u16..), 0..30)) {
            let holders: Vec<Holder> = entries
                .into_iter()
                .map(|(name, size, hash, holders, port)| Holder {
                    addr: PeerAddr::new([127, 0, 0, 1].into(), port).unwrap(),
                    key: crate::identity::Identity::from_seed([port as u8; 32]).key(),
                    name: FileName::new(&name).unwrap(),
                    size,
                    hash: hash.into(),
                    holders,
                })
                .collect();
            let resp = Response::Holders(holders);
            prop_assert_eq!(round_trip_response(&resp), resp);
        }

        #[test]
        fn request_parser_never_panics_on_near_misses(line in "RP2P/1 (REGISTER|UNREGISTER|PEERS|STATS|ANNOUNCE|OFFER|WHO|WHOHAS|LS)( [0-9a-f:.*%]{0,32}){0,3}") {
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
