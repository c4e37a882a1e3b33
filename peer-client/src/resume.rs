//! A download to a file that outlives the client: `PATH.part` holds the
//! bytes as they arrive, at their offsets, and `PATH.part.ranges` records
//! which of them were verified, so that the same command run again fetches
//! only the rest.
//!
//! The record is small text (README, "Resuming a download"):
//!
//! ```text
//! relay-p2p partial 1
//! size 1073741824
//! hash 8a1f...e3 (64 hex digits)
//! ranges 2
//! 0 67108864
//! 134217728 201326592
//! ```
//!
//! Ranges are sorted, apart, and cut at 16 KiB groups (or the file's end),
//! as verified bytes always are. It is replaced whole (written beside,
//! flushed to disk, renamed over), and only after the bytes it names were
//! flushed to disk themselves: after a crash or a power cut it names no
//! byte that is not there. A record that does not parse, or that names
//! other content than the one fetched, is not trusted: the download starts
//! over.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use protocol::{peer::proof::GROUP, ContentHash};

/// The first line of a record: its format and version.
const MAGIC: &str = "relay-p2p partial 1";

/// The most of a record that is read: far more than the ranges of any
/// real download (a few per piece).
const MAX_RECORD: u64 = 16 << 20;

/// What a record says: the content it is part of, and its verified ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub size: u64,
    pub hash: ContentHash,
    /// Sorted, apart (not even touching), each `start < end <= size`.
    pub ranges: Vec<(u64, u64)>,
}

impl Record {
    fn new(size: u64, hash: ContentHash) -> Self {
        Record {
            size,
            hash,
            ranges: Vec::new(),
        }
    }

    /// Verified bytes in all.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(start, end)| end - start).sum()
    }

    fn encode(&self) -> String {
        let mut text = format!(
            "{MAGIC}\nsize {}\nhash {}\nranges {}\n",
            self.size,
            self.hash.to_hex(),
            self.ranges.len()
        );
        for (start, end) in &self.ranges {
            text.push_str(&format!("{start} {end}\n"));
        }
        text
    }

    /// Reads a record, checking everything a later run relies on.
    fn parse(text: &str) -> Result<Record, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err("not a record of a partial download".into());
        }
        let mut field = |key: &str| -> Result<String, String> {
            lines
                .next()
                .and_then(|line| line.strip_prefix(key))
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| format!("no {key} line"))
        };
        let number = |s: &str| s.parse::<u64>().map_err(|_| format!("bad number {s:?}"));
        let size = number(&field("size")?)?;
        let hex = field("hash")?;
        if hex.len() != 64 {
            return Err("bad hash".into());
        }
        let hash = ContentHash::from_hex(&hex).map_err(|_| "bad hash".to_string())?;
        let count = number(&field("ranges")?)?;
        let mut record = Record::new(size, hash);
        let mut last_end = None;
        for _ in 0..count {
            let line = lines.next().ok_or("fewer ranges than announced")?;
            let (start, end) = line.split_once(' ').ok_or("bad range line")?;
            let (start, end) = (number(start)?, number(end)?);
            let aligned = start % GROUP == 0 && (end % GROUP == 0 || end == size);
            if !aligned || start >= end || end > size || last_end.is_some_and(|e| start <= e) {
                return Err(format!("bad range {start}-{end}"));
            }
            last_end = Some(end);
            record.ranges.push((start, end));
        }
        if lines.next().is_some() {
            return Err("more lines than announced".into());
        }
        Ok(record)
    }

    /// Adds `start..end`, merging it with the ranges it touches.
    fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Ranges before it and apart from it stay; so do those after.
        let first = self.ranges.partition_point(|r| r.1 < start);
        let last = self.ranges.partition_point(|r| r.0 <= end);
        for &(s, e) in &self.ranges[first..last] {
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.splice(first..last, [(start, end)]);
    }
}

/// A partial download: the `.part` file (locked while this run uses it)
/// and what is known of it.
pub struct Partial {
    part: PathBuf,
    record_path: PathBuf,
    file: File,
    /// The ranges verified so far (of an earlier run until [`Partial::start`]).
    record: Mutex<Option<Record>>,
    /// One save at a time: the fetch's own, or the signal handler's.
    saving: Mutex<()>,
}

/// What became of an earlier run's bytes when the fetch started.
pub enum Resumed {
    /// Nothing was there.
    Fresh,
    /// Bytes verified earlier are kept: this many.
    Kept(u64),
    /// What was there is not used, for this reason.
    StartedOver(String),
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

impl Partial {
    /// Opens (or creates) `dest.part` and locks it; a run that already
    /// holds the lock makes this fail with `WouldBlock`.
    pub fn open(dest: &Path) -> io::Result<Partial> {
        let part = with_suffix(dest, ".part");
        let record_path = with_suffix(dest, ".part.ranges");
        // Not truncated: it may hold an earlier run's bytes.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(io::Error::from)?;
        let record = read_record(&record_path)
            .ok()
            .filter(|r| file.metadata().is_ok_and(|m| m.len() == r.size));
        Ok(Partial {
            part,
            record_path,
            file,
            record: Mutex::new(record),
            saving: Mutex::new(()),
        })
    }

    /// The `.part` file's path.
    pub fn path(&self) -> &Path {
        &self.part
    }

    /// The `.part` file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Record>> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called once the content to fetch is known: keeps what an earlier
    /// run verified of that content, or starts over; returns the ranges
    /// kept and what happened.
    pub fn start(&self, size: u64, hash: ContentHash) -> io::Result<(Vec<(u64, u64)>, Resumed)> {
        let mut record = self.lock();
        let earlier = match read_record(&self.record_path) {
            Ok(earlier) => Some(Ok(earlier)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => Some(Err(e.to_string())),
        };
        let had_bytes = self.file.metadata()?.len() > 0;
        let why = match (earlier, record.as_ref()) {
            (Some(Ok(earlier)), Some(held)) if *held == earlier => {
                if (earlier.size, earlier.hash) == (size, hash) {
                    let kept = earlier.ranges.clone();
                    return Ok((kept, Resumed::Kept(earlier.bytes())));
                }
                format!(
                    "it holds part of other content ({} bytes, hash {}), not this version",
                    earlier.size,
                    &earlier.hash.to_hex()[..12]
                )
            }
            (Some(Ok(_)), _) => "its length does not match its record".into(),
            (Some(Err(e)), _) => format!("its record cannot be used ({e})"),
            (None, _) if had_bytes => "it has no record of verified bytes".into(),
            (None, _) => String::new(),
        };
        // Nothing of what is there is trusted: an empty file of the right
        // length, and no record until bytes are verified.
        match std::fs::remove_file(&self.record_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Only a file with bytes in it is cut to nothing first: on ext4 a
        // cut to length 0 marks the open file, and its last close then
        // pushes every dirty page of the download to the disk before the
        // client can exit (auto_da_alloc; 0.3 s for 1 GiB here, on the
        // client's exit path). A fresh `.part` is empty already.
        if had_bytes {
            self.file.set_len(0)?;
        }
        allocate(&self.file, size)?;
        *record = Some(Record::new(size, hash));
        let resumed = if why.is_empty() {
            Resumed::Fresh
        } else {
            Resumed::StartedOver(why)
        };
        Ok((Vec::new(), resumed))
    }

    /// Notes that `start..end` was written and verified.
    pub fn verified(&self, start: u64, end: u64) {
        if let Some(record) = self.lock().as_mut() {
            record.add(start, end);
        }
    }

    /// Verified bytes known, of this run or an earlier one.
    pub fn bytes(&self) -> u64 {
        self.lock().as_ref().map_or(0, Record::bytes)
    }

    /// Records the verified ranges: flushes the bytes to disk first, then
    /// replaces the record whole, so that it never names bytes a crash
    /// could lose.
    pub fn save(&self) -> io::Result<()> {
        let _one = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        // Taken before the flush: every range in it was written before.
        let Some(record) = self.lock().clone() else {
            return Ok(());
        };
        self.file.sync_data()?;
        let temp = with_suffix(&self.record_path, ".new");
        let mut out = File::create(&temp)?;
        out.write_all(record.encode().as_bytes())?;
        out.sync_all()?;
        drop(out);
        std::fs::rename(&temp, &self.record_path)?;
        // The rename itself reaches the disk with the folder.
        if let Some(dir) = self.record_path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Removes the record (the `.part` file is renamed or removed by the caller).
    pub fn remove_record(&self) {
        let _ = std::fs::remove_file(&self.record_path);
    }

    /// Removes both files.
    pub fn remove(&self) {
        self.remove_record();
        let _ = std::fs::remove_file(&self.part);
    }
}

/// Makes `file` `size` bytes long, its blocks allocated where the file
/// system can (fallocate): writing into allocated blocks skips ext4's
/// reservation of delayed allocation page by page (for 1 GiB here, `dd`
/// into an allocated file takes 0.20 s of system time, into a sparse one
/// 0.27 s), and a disk too full for the file says so now rather than
/// half way. Elsewhere a sparse file of that length.
fn allocate(file: &File, size: u64) -> io::Result<()> {
    if size > 0 {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, size) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
    }
    file.set_len(size)
}

fn read_record(path: &Path) -> io::Result<Record> {
    let mut text = String::new();
    File::open(path)?
        .take(MAX_RECORD)
        .read_to_string(&mut text)?;
    Record::parse(&text).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> ContentHash {
        blake3::hash(b"content")
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let mut record = Record::new(100_000, hash());
        record.add(16384, 32768);
        record.add(65536, 100_000);
        record.add(0, 16384);
        assert_eq!(record.ranges, [(0, 32768), (65536, 100_000)]);
        assert_eq!(record.bytes(), 32768 + 34464);
        assert_eq!(Record::parse(&record.encode()), Ok(record.clone()));
        record.add(32768, 65536);
        assert_eq!(record.ranges, [(0, 100_000)]);
        let mut gaps = Record::new(1 << 20, hash());
        for start in [5, 1, 3] {
            gaps.add(start * GROUP, (start + 1) * GROUP);
        }
        assert_eq!(gaps.ranges.len(), 3);
        gaps.add(2 * GROUP, 5 * GROUP);
        assert_eq!(gaps.ranges, [(GROUP, 6 * GROUP)]);
    }

    #[test]
    fn a_corrupt_or_strange_record_is_refused() {
        let good = Record {
            size: 100_000,
            hash: hash(),
            ranges: vec![(0, 16384), (32768, 100_000)],
        }
        .encode();
        assert!(Record::parse(&good).is_ok());
        let hex = hash().to_hex();
        let head = format!("{MAGIC}\nsize 100000\nhash {hex}\n");
        for bad in [
            String::new(),
            "garbage".into(),
            good.replace("partial 1", "partial 2"),
            good.replace(&hex.to_string(), "xyz"),
            good.replace("ranges 2", "ranges 3"),
            good.replace("ranges 2", "ranges 1"),
            good[..good.len() - 3].to_string(),
            format!("{head}ranges 1\n1 16384\n"),
            format!("{head}ranges 1\n0 16000\n"),
            format!("{head}ranges 1\n0 0\n"),
            format!("{head}ranges 1\n98304 100001\n"),
            format!("{head}ranges 2\n16384 32768\n0 16384\n"),
            format!("{head}ranges 2\n0 32768\n16384 49152\n"),
            format!("{head}ranges 1\n0 -1\n"),
        ] {
            assert!(Record::parse(&bad).is_err(), "{bad:?}");
        }
    }

    /// A fresh download's file gets its blocks at once (where the file
    /// system allocates ahead at all), and reads as zeros until written.
    #[test]
    fn a_fresh_partial_file_is_allocated_whole() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let probe = File::create(dir.path().join("probe")).unwrap();
        let flags = rustix::fs::FallocateFlags::empty();
        if rustix::fs::fallocate(&probe, flags, 0, 4096).is_err() {
            eprintln!("this file system does not allocate ahead; nothing to check");
            return;
        }
        let size = 10 * GROUP + 5;
        let partial = Partial::open(&dir.path().join("f")).unwrap();
        partial.start(size, hash()).unwrap();
        let meta = partial.file().metadata().unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 >= size, "{} blocks", meta.blocks());
        assert!(std::fs::read(partial.path())
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    /// `Partial::open`, again while another test's child process, forked
    /// while our lock was open, may still hold an inherited copy of it
    /// for the moment before it execs (the lock goes with the last copy).
    fn reopen(dest: &std::path::Path) -> Partial {
        for _ in 0..200 {
            match Partial::open(dest) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                opened => return opened.unwrap(),
            }
        }
        panic!("{} stayed locked", dest.display());
    }

    #[test]
    fn a_saved_record_is_resumed_and_a_foreign_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        let partial = Partial::open(&dest).unwrap();
        assert!(matches!(
            partial.start(100_000, hash()),
            Ok((_, Resumed::Fresh))
        ));
        // One run at a time.
        let again = Partial::open(&dest).err().unwrap();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        partial.verified(0, 32768);
        partial.save().unwrap();
        drop(partial);

        let partial = reopen(&dest);
        let (kept, resumed) = partial.start(100_000, hash()).unwrap();
        assert_eq!(kept, [(0, 32768)]);
        assert!(matches!(resumed, Resumed::Kept(32768)));
        drop(partial);

        let partial = reopen(&dest);
        let other = blake3::hash(b"other");
        let (kept, resumed) = partial.start(100_000, other).unwrap();
        assert!(kept.is_empty());
        let Resumed::StartedOver(why) = resumed else {
            panic!("a record of other content was used");
        };
        assert!(why.contains("other content"), "{why}");
        assert!(!dir.path().join("f.part.ranges").exists());
        drop(partial);

        std::fs::write(dir.path().join("f.part.ranges"), "junk").unwrap();
        let partial = reopen(&dest);
        let (kept, resumed) = partial.start(100_000, other).unwrap();
        assert!(kept.is_empty());
        assert!(matches!(resumed, Resumed::StartedOver(why) if why.contains("cannot be used")));
    }
}
