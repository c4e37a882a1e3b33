//! What the relay's index is made of on the wire: the list of files a peer
//! announces (in bounded batches, with a digest), who holds what, and
//! pages of the network-wide listing.

use std::{
    fmt,
    io::{self, BufRead, Write},
    str::FromStr,
};

use crate::{
    identity::PeerKey,
    name::{percent_decode, percent_encode},
    parse_num, read_reply_line, ContentHash, FileName, PeerAddr, ProtocolError, MAX_LINE,
};

/// The most entries in one batch of an `OFFER`.
pub const MAX_BATCH: usize = 1000;
/// The most files one `OFFER` may carry, whatever the relay allows.
pub const MAX_OFFER: usize = 100_000;
/// The most lines in a `HOLDERS` or `LISTING` reply.
pub const MAX_REPLY_LINES: usize = 1000;
/// The longest glob, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;

/// A short digest of a peer's list of files: the first 16 bytes of BLAKE3
/// over the list's canonical encoding (see [`ListDigest::of`]), 32 hex
/// digits on the wire. A heartbeat carries it, so that an unchanged list
/// costs one line.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListDigest([u8; 16]);

impl ListDigest {
    /// The digest of `files`, which must be sorted by name without
    /// duplicates: BLAKE3 over the lines `<size> <hash> <encoded name>\n`,
    /// exactly as an `OFFER` sends them, cut to 16 bytes.
    pub fn of(files: &[Holding]) -> Self {
        let mut hasher = blake3::Hasher::new();
        let mut line = Vec::with_capacity(128);
        for file in files {
            line.clear();
            file.encode(&mut line);
            hasher.update(&line);
        }
        let mut digest = [0; 16];
        digest.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        ListDigest(digest)
    }
}

impl fmt::Display for ListDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ListDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ListDigest {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ProtocolError::invalid("digest", s);
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut digest = [0; 16];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ListDigest(digest))
    }
}

/// One file a peer holds: `<size> <hash> <name>` on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    /// The file's name in the peer's folder.
    pub name: FileName,
    /// Its size in bytes.
    pub size: u64,
    /// BLAKE3 of its content.
    pub hash: ContentHash,
}

impl Holding {
    fn encode(&self, w: &mut Vec<u8>) {
        // Writing to a Vec cannot fail.
        let _ = writeln!(w, "{} {} {}", self.size, self.hash, self.name.encode());
    }

    fn parse(line: &str) -> Result<Self, ProtocolError> {
        let mut words = line.split(' ');
        let mut next = |what| words.next().ok_or(ProtocolError::Missing(what));
        let size = parse_num("size", next("size")?)?;
        let hash = parse_hash(next("hash")?)?;
        let name = FileName::decode(next("name")?)?;
        if let Some(extra) = words.next() {
            return Err(ProtocolError::Unexpected(extra.to_string()));
        }
        Ok(Holding { name, size, hash })
    }
}

/// A hash as 64 lowercase hex digits.
pub(crate) fn parse_hash(s: &str) -> Result<ContentHash, ProtocolError> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ProtocolError::invalid("hash", s));
    }
    ContentHash::from_hex(s).map_err(|_| ProtocolError::invalid("hash", s))
}

/// Writes the body of an `OFFER`: `files` in batches of at most
/// [`MAX_BATCH`], each `BATCH <n>` then `n` lines, then `END`.
pub fn write_offer_body<W: Write + ?Sized>(w: &mut W, files: &[Holding]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    for batch in files.chunks(MAX_BATCH) {
        writeln!(buf, "BATCH {}", batch.len())?;
        for file in batch {
            file.encode(&mut buf);
        }
        w.write_all(&buf)?;
        buf.clear();
    }
    w.write_all(b"END\n")
}

/// Reads the body of an `OFFER`: at most `max` files (and never more than
/// [`MAX_OFFER`]), which must come sorted by name without duplicates and
/// hash to `digest`. `before_batch` runs before each batch is read, so the
/// caller can give each batch its own deadline.
pub fn read_offer_body<R: BufRead + ?Sized>(
    r: &mut R,
    max: usize,
    digest: ListDigest,
    before_batch: &mut dyn FnMut(),
) -> Result<Vec<Holding>, ProtocolError> {
    let max = max.min(MAX_OFFER);
    let mut files: Vec<Holding> = Vec::new();
    loop {
        before_batch();
        let line = read_reply_line(r)?;
        let count = match line.split_once(' ') {
            None if line == "END" => break,
            Some(("BATCH", count)) => parse_num::<usize>("batch size", count)?,
            _ => return Err(ProtocolError::invalid("batch header", &line)),
        };
        if count == 0 || count > MAX_BATCH {
            return Err(ProtocolError::TooMany {
                count,
                limit: MAX_BATCH,
            });
        }
        if files.len() + count > max {
            return Err(ProtocolError::TooMany {
                count: files.len() + count,
                limit: max,
            });
        }
        for _ in 0..count {
            let file = Holding::parse(&read_reply_line(r)?)?;
            if files.last().is_some_and(|last| last.name >= file.name) {
                return Err(ProtocolError::invalid(
                    "order (names must be sorted, each once)",
                    file.name.as_str(),
                ));
            }
            files.push(file);
        }
    }
    if ListDigest::of(&files) != digest {
        return Err(ProtocolError::invalid(
            "digest (it does not match the list)",
            &digest.to_string(),
        ));
    }
    Ok(files)
}

/// A holder of a file, in a `HOLDERS` reply:
/// `<ip>:<port> <key> <size> <hash> <holders> <name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Where the peer serves.
    pub addr: PeerAddr,
    /// The key that owns the peer's entry: the peer proves it on request.
    pub key: PeerKey,
    /// The name it holds the content under.
    pub name: FileName,
    /// The content's size.
    pub size: u64,
    /// The content's hash.
    pub hash: ContentHash,
    /// How many live peers hold this version (this name, size and hash).
    pub holders: u64,
}

impl Holder {
    pub(crate) fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        writeln!(
            w,
            "{} {} {} {} {} {}",
            self.addr,
            self.key,
            self.size,
            self.hash,
            self.holders,
            self.name.encode()
        )
    }

    pub(crate) fn parse(line: &str) -> Result<Self, ProtocolError> {
        // `<addr> <key>` and then a `Listed` line: parse that tail as one.
        let mut words = line.splitn(3, ' ');
        let mut next = |what| words.next().ok_or(ProtocolError::Missing(what));
        let addr = next("address")?.parse()?;
        let key = next("key")?.parse()?;
        let Listed {
            name,
            size,
            hash,
            holders,
        } = Listed::parse(next("size")?)?;
        Ok(Holder {
            addr,
            key,
            name,
            size,
            hash,
            holders,
        })
    }
}

/// One version of a name in a `LISTING` page: `<size> <hash> <holders> <name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The name.
    pub name: FileName,
    /// This version's size.
    pub size: u64,
    /// This version's hash.
    pub hash: ContentHash,
    /// How many live peers hold this version.
    pub holders: u64,
}

impl Listed {
    pub(crate) fn encode(&self, w: &mut Vec<u8>) -> io::Result<()> {
        writeln!(
            w,
            "{} {} {} {}",
            self.size,
            self.hash,
            self.holders,
            self.name.encode()
        )
    }

    pub(crate) fn parse(line: &str) -> Result<Self, ProtocolError> {
        let mut words = line.split(' ');
        let mut next = |what| words.next().ok_or(ProtocolError::Missing(what));
        let size = parse_num("size", next("size")?)?;
        let hash = parse_hash(next("hash")?)?;
        let holders = parse_num("holders", next("holders")?)?;
        let name = FileName::decode(next("name")?)?;
        if let Some(extra) = words.next() {
            return Err(ProtocolError::Unexpected(extra.to_string()));
        }
        Ok(Listed {
            name,
            size,
            hash,
            holders,
        })
    }
}

/// A glob over names (`*.txt`, `docs/**`), carried as one word with the
/// file names' `%XX` escapes. Its syntax is the relay's to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern of at most [`MAX_PATTERN_LEN`] bytes without control characters.
    pub fn new(glob: &str) -> Result<Self, ProtocolError> {
        if glob.is_empty() || glob.len() > MAX_PATTERN_LEN || glob.chars().any(char::is_control) {
            return Err(ProtocolError::invalid("pattern", glob));
        }
        Ok(Pattern(glob.to_string()))
    }

    /// The glob.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn encode(&self) -> String {
        percent_encode(&self.0)
    }

    pub(crate) fn decode(token: &str) -> Result<Self, ProtocolError> {
        Pattern::new(&percent_decode(token, "pattern")?)
    }
}

/// Reads `count` lines after a header, as `crate::read_items` does, for the
/// index's replies, which are bounded by [`MAX_REPLY_LINES`].
pub(crate) fn read_lines<R, T>(
    r: &mut R,
    count: usize,
    parse: impl Fn(&str) -> Result<T, ProtocolError>,
) -> Result<Vec<T>, ProtocolError>
where
    R: BufRead + ?Sized,
{
    if count > MAX_REPLY_LINES {
        return Err(ProtocolError::TooMany {
            count,
            limit: MAX_REPLY_LINES,
        });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let line = crate::read_line(r, MAX_LINE)?.ok_or(ProtocolError::Closed)?;
        items.push(parse(&line)?);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn holding(name: &str, content: &[u8]) -> Holding {
        Holding {
            name: FileName::new(name).unwrap(),
            size: content.len() as u64,
            hash: blake3::hash(content),
        }
    }

    fn offer(files: &[Holding]) -> Vec<u8> {
        let mut body = Vec::new();
        write_offer_body(&mut body, files).unwrap();
        body
    }

    fn read(body: &[u8], max: usize, digest: ListDigest) -> Result<Vec<Holding>, ProtocolError> {
        read_offer_body(&mut Cursor::new(body), max, digest, &mut || {})
    }

    #[test]
    fn an_offer_round_trips_in_batches() {
        let files: Vec<Holding> = (0..2500)
            .map(|i| holding(&format!("f{i:05}"), &[i as u8]))
            .collect();
        let body = offer(&files);
        let text = String::from_utf8(body.clone()).unwrap();
        assert_eq!(text.matches("BATCH ").count(), 3);
        assert!(text.ends_with("END\n"));
        let mut batches = 0;
        let back = read_offer_body(
            &mut Cursor::new(&body),
            10_000,
            ListDigest::of(&files),
            &mut || batches += 1,
        )
        .unwrap();
        assert_eq!(back, files);
        assert_eq!(batches, 4, "three batches, then END");
        assert_eq!(read(b"END\n", 10, ListDigest::of(&[])).unwrap(), vec![]);
    }

    #[test]
    fn bad_offers_are_refused() {
        let a = holding("a", b"a");
        let b = holding("b", b"b");
        let digest = ListDigest::of(&[a.clone(), b.clone()]);
        // Wrong digest, unsorted, duplicates, over the cap, empty or huge batch.
        assert!(read(
            &offer(&[a.clone(), b.clone()]),
            10,
            ListDigest::of(std::slice::from_ref(&a))
        )
        .is_err());
        assert!(read(&offer(&[b.clone(), a.clone()]), 10, digest).is_err());
        assert!(read(&offer(&[a.clone(), a.clone()]), 10, digest).is_err());
        assert!(matches!(
            read(&offer(&[a.clone(), b.clone()]), 1, digest),
            Err(ProtocolError::TooMany { .. })
        ));
        assert!(read(b"BATCH 0\nEND\n", 10, digest).is_err());
        assert!(read(b"BATCH 1001\n", 10_000, digest).is_err());
        assert!(read(b"BATCH 1\n1 x ../etc\nEND\n", 10, digest).is_err());
        assert!(read(b"BATCH 2\n", 10, digest).is_err());
        assert!(read(b"NONSENSE\n", 10, digest).is_err());
        // The good one passes.
        assert_eq!(
            read(&offer(&[a.clone(), b.clone()]), 10, digest).unwrap(),
            [a, b]
        );
    }

    #[test]
    fn digests_are_32_lowercase_hex_digits() {
        let d = ListDigest::of(&[holding("a b", b"x")]);
        let text = d.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<ListDigest>().unwrap(), d);
        for bad in ["", "00", &"G".repeat(32), &"A".repeat(32), &"0".repeat(33)] {
            assert!(bad.parse::<ListDigest>().is_err(), "{bad}");
        }
        assert_ne!(d, ListDigest::of(&[holding("a b", b"y")]));
        assert_ne!(d, ListDigest::of(&[]));
    }

    proptest! {
        #[test]
        fn offer_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = read(&bytes, 100, ListDigest::of(&[]));
        }

        #[test]
        fn holder_and_listed_lines_never_panic(line in "\\PC{0,120}") {
            let _ = Holder::parse(&line);
            let _ = Listed::parse(&line);
            let _ = Pattern::decode(&line);
        }

        #[test]
        fn offers_round_trip(names in proptest::collection::btree_set("[a-z0-9 %./]{1,12}", 0..40)) {
            let files: Vec<Holding> = names
                .iter()
                .filter_map(|n| FileName::new(n).ok())
                .map(|name| Holding { size: name.as_str().len() as u64, hash: blake3::hash(name.as_str().as_bytes()), name })
                .collect();
            let mut sorted = files.clone();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            sorted.dedup_by(|a, b| a.name == b.name);
            let back = read(&offer(&sorted), 100, ListDigest::of(&sorted)).unwrap();
            prop_assert_eq!(back, sorted);
        }
    }
}
