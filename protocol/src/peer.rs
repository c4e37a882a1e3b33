//! The conversation between a client and a peer: fetch one file (from a byte
//! offset, so that a broken transfer can resume elsewhere), ask for its size
//! and hash, fetch a range of it with the proof that lets each chunk group
//! be checked as it arrives (see [`proof`]), or list them all.

pub mod proof;

use std::io::{self, BufRead, Write};

use crate::{
    identity::{nonce_hex, parse_nonce, PeerKey, Signature},
    parse_num, read_items, read_line, read_reply_line, split_request, write_whole, ContentHash,
    ErrorReply, FileName, PeerAddr, ProtocolError, MAX_LINE, VERSION,
};

/// The most entries a `FILES` reply may carry; peers list no more than this.
pub const MAX_FILES: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// "Send me `name`, starting at byte `offset`."
    Get { name: FileName, offset: u64 },
    /// "Which files do you have?"
    List,
    /// "What size and hash has `name`?" Answered like `Get`, without
    /// content; with a `nonce`, "and sign that you say so" (`Vouched`).
    Head {
        name: FileName,
        nonce: Option<[u8; 16]>,
    },
    /// "Send me bytes `start..end` of `name` if it still hashes to `hash`,
    /// with their proof." `start` is a multiple of [`proof::GROUP`], `end`
    /// one too or the file's size.
    Range {
        name: FileName,
        hash: ContentHash,
        start: u64,
        end: u64,
    },
    /// From a relay checking an advertised address: "prove that you, at
    /// `addr`, hold your key": sign [`crate::identity::address_message`].
    Prove { nonce: [u8; 16], addr: PeerAddr },
}

/// The code of the `ERR` that answers a `RANGE` for content the peer no
/// longer has under that name (the file changed).
pub const CHANGED: &str = "changed";

impl Request {
    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        let (verb, mut args) = split_request(line)?;
        let request = match verb.to_ascii_uppercase().as_str() {
            "GET" => {
                let name = FileName::decode(args.required("file name")?)?;
                let offset = match args.optional() {
                    Some(offset) => parse_num("offset", offset)?,
                    None => 0,
                };
                Request::Get { name, offset }
            }
            "LIST" => Request::List,
            "HEAD" => Request::Head {
                name: FileName::decode(args.required("file name")?)?,
                nonce: args.optional().map(parse_nonce).transpose()?,
            },
            "RANGE" => {
                let name = FileName::decode(args.required("file name")?)?;
                let hash = args.required("hash")?;
                let hash = ContentHash::from_hex(hash)
                    .map_err(|_| ProtocolError::invalid("hash", hash))?;
                let start = parse_num("start", args.required("start")?)?;
                let end = parse_num("end", args.required("end")?)?;
                Request::Range {
                    name,
                    hash,
                    start,
                    end,
                }
            }
            "PROVE" => Request::Prove {
                nonce: parse_nonce(args.required("nonce")?)?,
                addr: args.required("address")?.parse()?,
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

    /// Writes the message with a single `write_all`, so that it leaves in
    /// as few packets as possible.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        write_whole(w, |buf| self.encode(buf))
    }

    fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Request::Get { name, offset: 0 } => writeln!(w, "{VERSION} GET {}", name.encode()),
            Request::Get { name, offset } => {
                writeln!(w, "{VERSION} GET {} {offset}", name.encode())
            }
            Request::List => writeln!(w, "{VERSION} LIST"),
            Request::Head { name, nonce: None } => {
                writeln!(w, "{VERSION} HEAD {}", name.encode())
            }
            Request::Head {
                name,
                nonce: Some(nonce),
            } => writeln!(w, "{VERSION} HEAD {} {}", name.encode(), nonce_hex(nonce)),
            Request::Range {
                name,
                hash,
                start,
                end,
            } => writeln!(w, "{VERSION} RANGE {} {hash} {start} {end}", name.encode()),
            Request::Prove { nonce, addr } => {
                writeln!(w, "{VERSION} PROVE {} {addr}", nonce_hex(nonce))
            }
        }
    }
}

/// The header of a file reply. Exactly `size - offset` bytes of content
/// follow it, where `offset` is the one the request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// The whole file's length in bytes, whatever the offset.
    pub size: u64,
    /// BLAKE3 of the whole file, so a client can verify and resume.
    pub hash: ContentHash,
}

/// The header of a range reply: `proof` bytes of proof follow it, then
/// the `end - start` bytes of content asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeHeader {
    /// The whole file's length in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file: the root the proof leads to.
    pub hash: ContentHash,
    /// The length of the proof, which the client can compute itself.
    pub proof: u64,
}

/// One line of a `FILES` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub size: u64,
    pub name: FileName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    File(FileHeader),
    /// The answer to a `HEAD` with a nonce: the header, signed by the
    /// peer's key over [`crate::identity::file_message`], so that a client
    /// knows the peer it reached is the one the relay named.
    /// `FILE <size> <hash> <key> <signature>` on the wire.
    Vouched {
        header: FileHeader,
        key: PeerKey,
        sig: Signature,
    },
    Range(RangeHeader),
    /// `truncated`: the peer has more files than it listed.
    Files {
        entries: Vec<FileEntry>,
        truncated: bool,
    },
    /// The answer to `PROVE`: the peer's key and its signature.
    Proof {
        key: PeerKey,
        sig: Signature,
    },
    Error(ErrorReply),
}

/// The optional word after the count in `FILES <n> truncated`.
const TRUNCATED: &str = "truncated";

impl Response {
    /// Reads a reply. After `File`, the content is the next bytes in `r`.
    pub fn read_from<R: BufRead + ?Sized>(r: &mut R) -> Result<Self, ProtocolError> {
        let line = read_reply_line(r)?;
        let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
        Ok(match word {
            "FILE" => {
                let words: Vec<&str> = rest.split(' ').collect();
                let header = |size: &str, hash: &str| -> Result<FileHeader, ProtocolError> {
                    Ok(FileHeader {
                        size: parse_num("size", size)?,
                        hash: ContentHash::from_hex(hash)
                            .map_err(|_| ProtocolError::invalid("hash", hash))?,
                    })
                };
                match words[..] {
                    [size, hash] => Response::File(header(size, hash)?),
                    [size, hash, key, sig] => Response::Vouched {
                        header: header(size, hash)?,
                        key: key.parse()?,
                        sig: sig.parse()?,
                    },
                    _ => return Err(ProtocolError::invalid("file header", &line)),
                }
            }
            "RANGE" => {
                let mut words = rest.split(' ');
                let (Some(size), Some(hash), Some(proof), None) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    return Err(ProtocolError::invalid("range header", &line));
                };
                Response::Range(RangeHeader {
                    size: parse_num("size", size)?,
                    hash: ContentHash::from_hex(hash)
                        .map_err(|_| ProtocolError::invalid("hash", hash))?,
                    proof: parse_num("proof length", proof)?,
                })
            }
            "FILES" => {
                // `FILES <n>`, or `FILES <n> truncated` when the peer had more.
                let (count, truncated) = match rest.split_once(' ') {
                    Some((count, TRUNCATED)) => (count, true),
                    Some(_) => return Err(ProtocolError::invalid("files header", &line)),
                    None => (rest, false),
                };
                Response::Files {
                    entries: read_items(r, count, MAX_FILES, parse_entry)?,
                    truncated,
                }
            }
            "PROOF" => {
                let (key, sig) = rest
                    .split_once(' ')
                    .ok_or_else(|| ProtocolError::invalid("proof", &line))?;
                Response::Proof {
                    key: key.parse()?,
                    sig: sig.parse()?,
                }
            }
            "ERR" => Response::Error(ErrorReply::parse(rest)?),
            _ => return Err(ProtocolError::UnexpectedReply(line)),
        })
    }

    /// Writes the reply with a single `write_all`, so that it leaves in as
    /// few packets as possible; for `File` only the header (the caller
    /// streams the content).
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        write_whole(w, |buf| self.encode(buf))
    }

    fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Response::File(header) => writeln!(w, "FILE {} {}", header.size, header.hash),
            Response::Vouched { header, key, sig } => {
                writeln!(w, "FILE {} {} {key} {sig}", header.size, header.hash)
            }
            Response::Range(header) => {
                writeln!(w, "RANGE {} {} {}", header.size, header.hash, header.proof)
            }
            Response::Files { entries, truncated } => {
                if *truncated {
                    writeln!(w, "FILES {} {TRUNCATED}", entries.len())?;
                } else {
                    writeln!(w, "FILES {}", entries.len())?;
                }
                for entry in entries {
                    writeln!(w, "{} {}", entry.size, entry.name.encode())?;
                }
                Ok(())
            }
            Response::Proof { key, sig } => writeln!(w, "PROOF {key} {sig}"),
            Response::Error(e) => e.encode(w),
        }
    }
}

impl From<ErrorReply> for Response {
    fn from(reply: ErrorReply) -> Self {
        Response::Error(reply)
    }
}

fn parse_entry(line: &str) -> Result<FileEntry, ProtocolError> {
    let (size, name) = line
        .split_once(' ')
        .ok_or_else(|| ProtocolError::invalid("file entry", line))?;
    Ok(FileEntry {
        size: parse_num("size", size)?,
        name: FileName::decode(name)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;
    use std::io::{Cursor, Read};

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    fn round_trip_request(req: &Request) -> Request {
        let mut buf = Vec::new();
        req.write_to(&mut buf).unwrap();
        Request::read_from(&mut Cursor::new(buf)).unwrap().unwrap()
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Get {
                name: name("notes.txt"),
                offset: 0,
            },
            Request::Get {
                name: name("a b/ü 100%.bin"),
                offset: u64::MAX,
            },
            Request::List,
            Request::Head {
                name: name("a b"),
                nonce: None,
            },
            Request::Head {
                name: name("a"),
                nonce: Some([3; 16]),
            },
            Request::Range {
                name: name("x/y"),
                hash: blake3::hash(b"x"),
                start: 16384,
                end: u64::MAX,
            },
            Request::Prove {
                nonce: [7; 16],
                addr: "[::1]:7000".parse().unwrap(),
            },
        ] {
            assert_eq!(round_trip_request(&req), req);
        }
    }

    #[test]
    fn hostile_names_are_refused_as_forbidden() {
        for line in [
            "RP2P/1 GET ../x",
            "RP2P/1 GET /etc/passwd",
            "RP2P/1 GET a/../../x",
            "RP2P/1 GET %2e%2e/x",
            "RP2P/1 GET %2Fetc%2Fpasswd",
        ] {
            let err = Request::parse(line).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Forbidden, "{line}: {err}");
        }
    }

    #[test]
    fn bad_requests_are_named() {
        for (line, expect) in [
            ("RP2P/1 GET", "missing file name"),
            ("RP2P/1 GET a -1", "invalid offset \"-1\""),
            ("RP2P/1 GET a 1 2", "unexpected argument \"2\""),
            ("RP2P/1 GET %zz", "invalid escape in file name \"%zz\""),
            ("RP2P/1 PUT a", "unknown command \"PUT\""),
            ("RP2P/1 HEAD", "missing file name"),
            ("RP2P/1 HEAD a b", "invalid nonce \"b\""),
            (
                &format!("RP2P/1 HEAD a {} c", "0".repeat(32)),
                "unexpected argument \"c\"",
            ),
            ("RP2P/1 RANGE a", "missing hash"),
            ("RP2P/1 RANGE a 00 0 1", "invalid hash \"00\""),
            (
                &format!("RP2P/1 RANGE a {} 0", blake3::hash(b"")),
                "missing end",
            ),
            (
                &format!("RP2P/1 RANGE a {} 0 +1", blake3::hash(b"")),
                "invalid end \"+1\"",
            ),
            (
                &format!("RP2P/1 RANGE a {} 0 1 2", blake3::hash(b"")),
                "unexpected argument \"2\"",
            ),
        ] {
            assert_eq!(Request::parse(line).unwrap_err().to_string(), expect);
        }
    }

    #[test]
    fn file_reply_leaves_content_to_read() {
        let hash = blake3::hash(b"abc");
        let mut buf = Vec::new();
        Response::File(FileHeader { size: 3, hash })
            .write_to(&mut buf)
            .unwrap();
        buf.extend_from_slice(b"abc");
        let mut r = Cursor::new(buf);
        assert_eq!(
            Response::read_from(&mut r).unwrap(),
            Response::File(FileHeader { size: 3, hash })
        );
        let mut content = Vec::new();
        r.read_to_end(&mut content).unwrap();
        assert_eq!(content, b"abc");
    }

    #[test]
    fn lists_and_errors_round_trip() {
        let me = crate::identity::Identity::from_seed([5; 32]);
        for resp in [
            Response::Proof {
                key: me.key(),
                sig: me.sign(b"x"),
            },
            Response::Vouched {
                header: FileHeader {
                    size: 3,
                    hash: blake3::hash(b"abc"),
                },
                key: me.key(),
                sig: me.sign(b"y"),
            },
            Response::Files {
                entries: vec![],
                truncated: false,
            },
            Response::Files {
                entries: vec![
                    FileEntry {
                        size: 0,
                        name: name("empty"),
                    },
                    FileEntry {
                        size: 12,
                        name: name("dir/with space.txt"),
                    },
                ],
                truncated: false,
            },
            Response::Files {
                entries: vec![FileEntry {
                    size: 1,
                    name: name("first"),
                }],
                truncated: true,
            },
            Response::Error(ErrorReply::new(ErrorCode::NotFound, "no such file \"x\"")),
        ] {
            let mut buf = Vec::new();
            resp.write_to(&mut buf).unwrap();
            assert_eq!(Response::read_from(&mut Cursor::new(buf)).unwrap(), resp);
        }
    }

    #[test]
    fn a_plain_count_is_a_complete_listing() {
        assert_eq!(
            Response::read_from(&mut Cursor::new(b"FILES 1\n3 a\n")).unwrap(),
            Response::Files {
                entries: vec![FileEntry {
                    size: 3,
                    name: name("a")
                }],
                truncated: false
            }
        );
        let mut buf = Vec::new();
        Response::Files {
            entries: vec![],
            truncated: true,
        }
        .write_to(&mut buf)
        .unwrap();
        assert_eq!(buf, b"FILES 0 truncated\n");
    }

    #[test]
    fn bad_replies_are_errors() {
        for input in [
            &b"FILE 3\n"[..],
            b"FILE x 00\n",
            b"FILE 3 nothex\n",
            b"FILES 1\n",
            b"FILES 1\n3\n",
            b"FILES 1\n3 ../x\n",
            b"FILES 10001\n",
            b"FILES 0 cut\n",
            b"FILES 0 truncated more\n",
            b"FILES 0  truncated\n",
            b"RANGE 3\n",
            b"RANGE 3 00 0\n",
            b"RANGE 3 af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\n",
            b"RANGE 3 af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262 0 1\n",
            b"OK\n",
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
        fn response_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Response::read_from(&mut Cursor::new(bytes));
        }

        #[test]
        fn response_parser_never_panics_on_near_misses(line in "(FILE|FILES|RANGE|ERR) [0-9a-f ]{0,90}\n[0-9a-z ./%]{0,30}\n") {
            let _ = Response::read_from(&mut Cursor::new(line.into_bytes()));
        }

        #[test]
        fn gets_round_trip(n in "[a-zA-Z0-9 %._-]{1,30}", offset in any::<u64>()) {
            if let Ok(name) = FileName::new(&n) {
                let req = Request::Get { name, offset };
                prop_assert_eq!(round_trip_request(&req), req);
            }
        }

        #[test]
        fn listings_round_trip(
            files in proptest::collection::vec((any::<u64>(), "[a-zA-Z0-9 %._/-]{1,20}"), 0..20),
            truncated in any::<bool>(),
        ) {
            let entries = files
                .into_iter()
                .filter_map(|(size, n)| FileName::new(&n).ok().map(|name| FileEntry { size, name }))
                .collect();
            let resp = Response::Files { entries, truncated };
            let mut buf = Vec::new();
            resp.write_to(&mut buf).unwrap();
            prop_assert_eq!(Response::read_from(&mut Cursor::new(buf)).unwrap(), resp);
        }

        #[test]
        fn ranges_round_trip(n in "[a-zA-Z0-9 %._-]{1,30}", bytes in any::<[u8; 32]>(), start in any::<u64>(), end in any::<u64>(), size in any::<u64>(), proof in any::<u64>()) {
            let hash = ContentHash::from_bytes(bytes);
            if let Ok(name) = FileName::new(&n) {
                let req = Request::Range { name, hash, start, end };
                prop_assert_eq!(round_trip_request(&req), req);
            }
            let resp = Response::Range(RangeHeader { size, hash, proof });
            let mut buf = Vec::new();
            resp.write_to(&mut buf).unwrap();
            prop_assert_eq!(Response::read_from(&mut Cursor::new(buf)).unwrap(), resp);
        }

        #[test]
        fn headers_round_trip(size in any::<u64>(), bytes in any::<[u8; 32]>()) {
            let resp = Response::File(FileHeader { size, hash: ContentHash::from_bytes(bytes) });
            let mut buf = Vec::new();
            resp.write_to(&mut buf).unwrap();
            prop_assert_eq!(Response::read_from(&mut Cursor::new(buf)).unwrap(), resp);
        }
    }
}
