//! Phase 3: fetch a file from the peers that hold it, verified as it
//! arrives, from several of them at once.
//!
//! Every live peer is asked for the file's size and hash (`HEAD`, all at
//! once); the holders of the first version found, in the relay's order,
//! become the sources, at most `Options::sources` of them. The file is cut
//! into pieces, and each source takes the next piece nobody has taken (so
//! a faster source takes more of them), asks for it with `RANGE`, checks
//! the proof against the hash before any byte, then every 16 KiB chunk
//! group as it arrives. Verified groups go to the file at their offset
//! (`-o`), or to stdout in order through a bounded reorder buffer. A source
//! that fails (refuses, breaks off, is slower than `--speed-limit`, sends a
//! group or a proof that does not check out) is dropped at once and its
//! piece goes back to the others, from the last verified byte. When no
//! piece is left to take, an idle source joins a piece still being fetched
//! (endgame): whichever delivers a group first wins it.
//!
//! To a file, each source writes what it verified itself, at its offset,
//! outside the board's lock (several sources write at once), and only
//! then notes it in the record of verified ranges.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{self, Read},
    sync::{mpsc, Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use netkit::call::{Call, CallError, Phase};
use protocol::{
    identity::{file_message, PeerKey},
    peer::{proof, FileHeader, Request, Response, CHANGED},
    ContentHash, ErrorCode, FileName, PeerAddr, ProtocolError,
};

use crate::resume::{Partial, Resumed};

/// Longest pause before asking busy peers again.
const MAX_PAUSE: Duration = Duration::from_secs(4);

/// Content read, verified and written at a time by one source: whole
/// chunk groups, few enough that they are still in the cache when they
/// are hashed and then written.
const BATCH: usize = 512 << 10;

/// Most peers asked for a file's size and hash at once.
const MAX_PROBES: usize = 64;

/// Most sources of one fetch.
pub const MAX_SOURCES: usize = 32;

/// Piece size with one source: few connections, proofs of 256 KiB.
const SOLO_PIECE: u64 = 64 << 20;
/// Piece size with several: small enough to balance fast and slow sources.
const SHARED_PIECE: u64 = 4 << 20;
/// How far ahead of what stdout has taken pieces may be fetched: the most
/// the reorder buffer holds, whatever the number of sources.
const WINDOW: u64 = 32 << 20;

/// Where fetched bytes go.
pub trait Sink: Send {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Bytes that can still be written, where that is known (a file
    /// system's free space); `None` where it is not (a pipe, a device).
    fn room(&self) -> Option<u64> {
        None
    }
    /// A handle to write at any offset, where the output is a file that
    /// can take pieces out of order; `None` where content must come in
    /// order (stdout, a FIFO).
    fn positional(&mut self) -> Option<Box<dyn WriteAt>> {
        None
    }
    /// Where a download is kept for a later run to continue, where it can
    /// be (a file; not stdout or a FIFO).
    fn partial(&self) -> Option<Arc<Partial>> {
        None
    }
}

/// Output that takes bytes at any offset: the partial file. Shared by the
/// sources, which write at once.
pub trait WriteAt: Send + Sync {
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()>;
}

impl WriteAt for File {
    fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, at)
    }
}

/// What a download may cost: how big a file is accepted, and how slow a
/// peer may be before the next holder is asked instead.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Files announced bigger than this are not fetched.
    pub max_size: Option<u64>,
    /// A peer sending fewer bytes a second than this, on average over
    /// `speed_time`, is dropped (the transfer resumes elsewhere); 0: never.
    pub speed_limit: u64,
    /// The window over which `speed_limit` is judged.
    pub speed_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: None,
            speed_limit: 1024,
            speed_time: Duration::from_secs(30),
        }
    }
}

/// How a fetch is spread; [`Fetcher::fetch`] uses the defaults.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Most holders fetched from at once.
    pub sources: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { sources: 4 }
    }
}

/// Hooks for progress display; the default does nothing.
pub trait Progress {
    fn start(&mut self, _size: u64, _already: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}

impl Progress for () {}

/// A successful fetch.
#[derive(Debug)]
pub struct Fetched {
    /// The source that delivered the most.
    pub peer: PeerAddr,
    pub size: u64,
    /// Every source that delivered verified bytes, with how many.
    pub from: Vec<(PeerAddr, u64)>,
    /// Bytes an earlier run had verified, not fetched again.
    pub resumed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no live peers to ask for {0:?}")]
    NoPeers(String),
    #[error("{name:?} not found on any of {asked} peers")]
    NotFound { name: String, asked: usize },
    #[error("cannot fetch {name:?}: {reason}")]
    Failed { name: String, reason: String },
    #[error("cannot write {name:?}: {source}")]
    Output { name: String, source: io::Error },
    /// Every peer holding it announced a size over a limit of this side.
    #[error("cannot fetch {name:?}: {reason}")]
    TooBig { name: String, reason: String },
}

impl FetchError {
    /// True when the file simply is not there, as opposed to a failure.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FetchError::NotFound { .. } | FetchError::NoPeers(_))
    }
}

/// One version of a file: what a holder announces and the sources share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    size: u64,
    hash: ContentHash,
}

/// What a peer answered to `HEAD`.
enum Probe {
    Holds(Version),
    Missing,
    Busy(String),
    Skipped(String),
}

pub struct Fetcher<'a> {
    pub timeout: Duration,
    pub limits: Limits,
    /// The content wanted, where the relay's index said which: a peer
    /// that has other content under the name now is passed over.
    pub expect: Option<ContentHash>,
    /// The keys the relay names the holders by: each must prove its own
    /// (a peer without an entry here is not asked to).
    pub keys: HashMap<PeerAddr, PeerKey>,
    /// Called with one line for every peer skipped and why.
    pub note: &'a mut dyn FnMut(&str),
    pub progress: &'a mut dyn Progress,
}

/// How often at most the verified ranges of a download to a file are
/// recorded (each time after flushing the file to disk): what a kill or a
/// power cut can cost a later run.
const CHECKPOINT: Duration = Duration::from_secs(1);

/// How often at most a source reports its progress: each report wakes
/// the fetch's own thread.
const REPORT: Duration = Duration::from_millis(100);

/// What the sources report to the fetch's own thread, which alone talks
/// to the user.
enum Event {
    Note(String),
    Bytes(u64),
}

impl Fetcher<'_> {
    /// Fetches `name` from the holders among `peers` with the default
    /// [`Options`]: the same as [`Fetcher::fetch_with`].
    pub fn fetch(
        &mut self,
        peers: &[PeerAddr],
        name: &FileName,
        sink: &mut dyn Sink,
    ) -> Result<Fetched, FetchError> {
        self.fetch_with(peers, name, sink, Options::default())
    }

    /// Fetches `name` from the holders among `peers` (the relay's order:
    /// the first holder's version is the one fetched), from up to
    /// `options.sources` of them at once, into `sink`.
    pub fn fetch_with(
        &mut self,
        peers: &[PeerAddr],
        name: &FileName,
        sink: &mut dyn Sink,
        options: Options,
    ) -> Result<Fetched, FetchError> {
        if peers.is_empty() {
            return Err(FetchError::NoPeers(name.to_string()));
        }
        let peers = &peers[..peers.len().min(MAX_PROBES)];
        let probes = self.probe_all(peers, name);
        let mut skipped = Vec::new();
        let (mut missing, mut too_big, mut chosen) = (0, 0, None);
        for (peer, probe) in peers.iter().zip(&probes) {
            match probe {
                Probe::Missing => missing += 1,
                Probe::Busy(why) | Probe::Skipped(why) => skipped.push(format!("{peer}: {why}")),
                Probe::Holds(version) if self.expect.is_some_and(|want| want != version.hash) => {
                    let why = format!(
                        "has other content under that name now ({}, not the one wanted)",
                        version.hash
                    );
                    self.skip(&mut skipped, *peer, &why);
                }
                Probe::Holds(version) if chosen.is_some_and(|c| c != *version) => {}
                Probe::Holds(version) => match self.too_big(version, sink) {
                    Some(why) => {
                        too_big += 1;
                        self.skip(&mut skipped, *peer, &why);
                    }
                    None => chosen = Some(*version),
                },
            }
        }
        let Some(version) = chosen else {
            if too_big > 0 && too_big == skipped.len() {
                // Asking again will not help: this side's limit is the obstacle.
                return Err(FetchError::TooBig {
                    name: name.to_string(),
                    reason: skipped.join("; "),
                });
            }
            if skipped.is_empty() {
                return Err(FetchError::NotFound {
                    name: name.to_string(),
                    asked: peers.len(),
                });
            }
            let reason = if missing > 0 {
                // A peer that could not be asked may have it: worth a
                // retry, so not "not found".
                format!(
                    "not found on {missing} of {} peers, and the others could not be asked ({})",
                    peers.len(),
                    skipped.join("; ")
                )
            } else {
                format!("no peer could serve it ({})", skipped.join("; "))
            };
            return Err(FetchError::Failed {
                name: name.to_string(),
                reason,
            });
        };
        let sources: Vec<PeerAddr> = peers
            .iter()
            .zip(&probes)
            .filter(|(_, probe)| matches!(probe, Probe::Holds(v) if *v == version))
            .map(|(peer, _)| *peer)
            .take(options.sources.clamp(1, MAX_SOURCES))
            .collect();
        self.transfer(&sources, name, version, sink)
    }

    /// Asks every peer at once for the file's size and hash; peers that
    /// answer `busy` are asked again, with growing pauses, for up to the
    /// timeout, while no peer has answered that it holds the file.
    fn probe_all(&mut self, peers: &[PeerAddr], name: &FileName) -> Vec<Probe> {
        let mut probes: Vec<Probe> = probe(peers, name, self.timeout, &self.keys);
        let (mut pause, give_up) = (Duration::from_millis(250), Instant::now() + self.timeout);
        loop {
            let busy: Vec<usize> = (0..peers.len())
                .filter(|&i| matches!(probes[i], Probe::Busy(_)))
                .collect();
            let holder = probes.iter().any(|p| matches!(p, Probe::Holds(_)));
            if busy.is_empty() || holder {
                break;
            }
            let Probe::Busy(why) = &probes[busy[0]] else {
                break;
            };
            if Instant::now() + pause > give_up {
                for &i in &busy {
                    if let Probe::Busy(why) = &probes[i] {
                        (self.note)(&format!("peer {}: {why}; giving up", peers[i]));
                    }
                }
                break;
            }
            (self.note)(&format!(
                "peer {}: {why}; asking {} busy peer(s) again in {pause:.1?}",
                peers[busy[0]],
                busy.len()
            ));
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
            let again: Vec<PeerAddr> = busy.iter().map(|&i| peers[i]).collect();
            for (i, answer) in busy
                .into_iter()
                .zip(probe(&again, name, self.timeout, &self.keys))
            {
                probes[i] = answer;
            }
        }
        for (peer, probe) in peers.iter().zip(&probes) {
            if let Probe::Skipped(why) = probe {
                (self.note)(&format!("peer {peer}: {why}"));
            }
        }
        probes
    }

    /// Why a holder's announced size rules it out, if it does.
    fn too_big(&self, version: &Version, sink: &dyn Sink) -> Option<String> {
        if let Some(max) = self.limits.max_size.filter(|&max| version.size > max) {
            return Some(format!(
                "announces {} bytes, over --max-size {max}",
                version.size
            ));
        }
        match sink.room() {
            Some(room) if version.size > room => Some(format!(
                "announces {} bytes, more than the {room} bytes free where it would be saved",
                version.size
            )),
            _ => None,
        }
    }

    /// Notes why `peer` was passed over.
    fn skip(&mut self, skipped: &mut Vec<String>, peer: PeerAddr, why: &dyn std::fmt::Display) {
        (self.note)(&format!("peer {peer}: {why}"));
        skipped.push(format!("{peer}: {why}"));
    }

    /// Fetches `version` from `sources` into `sink`, each on a thread of
    /// its own; this thread passes their notes and progress on.
    fn transfer(
        &mut self,
        sources: &[PeerAddr],
        name: &FileName,
        version: Version,
        sink: &mut dyn Sink,
    ) -> Result<Fetched, FetchError> {
        let positional = sink.positional();
        let ordered = positional.is_none();
        let partial = positional.as_ref().and_then(|_| sink.partial());
        let output = |source| FetchError::Output {
            name: name.to_string(),
            source,
        };
        let (have, resumed) = match &partial {
            Some(partial) => partial.start(version.size, version.hash).map_err(output)?,
            None => (Vec::new(), Resumed::Fresh),
        };
        let resumed = match resumed {
            Resumed::Fresh => 0,
            Resumed::Kept(bytes) => {
                let part = partial.as_ref().map(|p| p.path().display().to_string());
                (self.note)(&format!(
                    "resuming from {}: {bytes} of {} bytes verified by an earlier run",
                    part.unwrap_or_default(),
                    version.size
                ));
                bytes
            }
            Resumed::StartedOver(why) => {
                let part = partial.as_ref().map(|p| p.path().display().to_string());
                (self.note)(&format!(
                    "not resuming from {}: {why}; starting over",
                    part.unwrap_or_default()
                ));
                0
            }
        };
        let piece = if sources.len() == 1 {
            SOLO_PIECE
        } else {
            SHARED_PIECE
        };
        let board = Board::new(version.size, piece, &have, ordered.then_some(WINDOW), sink);
        let job = Job {
            name,
            version,
            timeout: self.timeout,
            limits: self.limits,
            board: &board,
            file: positional.as_deref(),
            partial: partial.as_deref(),
        };
        self.progress.start(version.size, resumed);
        let (events, inbox) = mpsc::channel();
        let mut checkpoint = Checkpoint {
            partial: partial.as_deref(),
            saved: None,
            failed: false,
        };
        let outcomes: Vec<(PeerAddr, Outcome)> = thread::scope(|scope| {
            let workers: Vec<_> = sources
                .iter()
                .map(|&peer| {
                    let (job, events) = (&job, events.clone());
                    (peer, scope.spawn(move || job.run(peer, &events)))
                })
                .collect();
            drop(events);
            // Ends when every source has ended and dropped its sender.
            for event in inbox {
                match event {
                    Event::Note(line) => (self.note)(&line),
                    Event::Bytes(n) => {
                        self.progress.advance(n);
                        checkpoint.now_and_then(self.note);
                    }
                }
            }
            workers
                .into_iter()
                .map(|(peer, worker)| {
                    let outcome = worker.join().unwrap_or(Outcome {
                        delivered: 0,
                        dropped: Some("its thread failed".into()),
                    });
                    (peer, outcome)
                })
                .collect()
        });
        self.progress.finish();
        let state = board.into_state();
        if let Some(source) = state.output {
            return Err(FetchError::Output {
                name: name.to_string(),
                source,
            });
        }
        let have = state.pieces.iter().map(|p| p.got - p.start).sum::<u64>();
        if state.pieces.iter().any(|p| p.got < p.end) || (ordered && state.out < version.size) {
            let reasons: Vec<String> = outcomes
                .iter()
                .filter_map(|(peer, o)| o.dropped.as_ref().map(|why| format!("{peer}: {why}")))
                .collect();
            let reason = if have > 0 {
                format!(
                    "transfer stopped at {have} of {} bytes and no other peer could finish it ({})",
                    version.size,
                    reasons.join("; ")
                )
            } else {
                format!("no peer could serve it ({})", reasons.join("; "))
            };
            return Err(FetchError::Failed {
                name: name.to_string(),
                reason,
            });
        }
        let from: Vec<(PeerAddr, u64)> = outcomes
            .iter()
            .filter(|(_, o)| o.delivered > 0)
            .map(|(peer, o)| (*peer, o.delivered))
            .collect();
        let peer = from
            .iter()
            .max_by_key(|(_, n)| *n)
            .map_or(sources[0], |(peer, _)| *peer);
        Ok(Fetched {
            peer,
            size: version.size,
            from,
            resumed,
        })
    }
}

/// Records the verified ranges of a download to a file now and then.
struct Checkpoint<'p> {
    partial: Option<&'p Partial>,
    saved: Option<Instant>,
    /// Told once: the record could not be written.
    failed: bool,
}

impl Checkpoint<'_> {
    /// Records at the first verified bytes, then at most every CHECKPOINT.
    fn now_and_then(&mut self, note: &mut dyn FnMut(&str)) {
        let Some(partial) = self.partial else {
            return;
        };
        if self.saved.is_some_and(|at| at.elapsed() < CHECKPOINT) {
            return;
        }
        self.saved = Some(Instant::now());
        if let Err(e) = partial.save() {
            if !self.failed {
                self.failed = true;
                note(&format!(
                    "cannot record the progress of {}: {e} (a later run may have to start over)",
                    partial.path().display()
                ));
            }
        }
    }
}

/// Asks `peers` for the size and hash of `name`, all at once.
/// Asks each of `peers` for the size and hash of `name`, at once. A peer
/// whose key the relay named (in `keys`) must sign its answer with it over
/// a fresh nonce: one that cannot is not the peer the relay meant.
fn probe(
    peers: &[PeerAddr],
    name: &FileName,
    timeout: Duration,
    keys: &HashMap<PeerAddr, PeerKey>,
) -> Vec<Probe> {
    thread::scope(|scope| {
        let asks: Vec<_> = peers
            .iter()
            .map(|peer| {
                let key = keys.get(peer).copied();
                scope.spawn(move || {
                    let mut nonce = [0; 16];
                    if key.is_some() && getrandom::getrandom(&mut nonce).is_err() {
                        return Probe::Skipped("no randomness for a nonce".into());
                    }
                    let request = Request::Head {
                        name: name.clone(),
                        nonce: key.map(|_| nonce),
                    };
                    let reply = netkit::call::call(
                        peer.socket_addr(),
                        timeout,
                        |w| request.write_to(w),
                        |r| Response::read_from(r),
                    );
                    let reply = match (reply, key) {
                        (
                            Ok(Response::Vouched {
                                header,
                                key: theirs,
                                sig,
                            }),
                            Some(want),
                        ) => {
                            let message =
                                file_message(&nonce, &name.encode(), header.size, &header.hash);
                            if theirs != want || !want.verify(&message, &sig) {
                                return Probe::Skipped(format!(
                                    "is not the peer the relay names (its key is not {})",
                                    want.short()
                                ));
                            }
                            Ok(Response::File(header))
                        }
                        (Ok(Response::File(_)), Some(want)) => {
                            return Probe::Skipped(format!(
                                "did not prove it is the peer the relay names (key {})",
                                want.short()
                            ));
                        }
                        (Ok(Response::Vouched { header, .. }), None) => Ok(Response::File(header)),
                        (reply, _) => reply,
                    };
                    match reply {
                        Ok(Response::File(FileHeader { size, hash })) => {
                            if size == 0 && hash != blake3::hash(b"") {
                                Probe::Skipped("announces an empty file with another hash".into())
                            } else {
                                // An empty file is its hash: nothing to fetch.
                                Probe::Holds(Version { size, hash })
                            }
                        }
                        Ok(Response::Error(e)) if e.code == ErrorCode::NotFound => Probe::Missing,
                        Ok(Response::Error(e)) if e.code == ErrorCode::Busy => {
                            Probe::Busy(format!("busy: {}", e.message))
                        }
                        Ok(Response::Error(e)) => Probe::Skipped(CallError::Refused(e).to_string()),
                        Ok(other) => Probe::Skipped(
                            CallError::BadReply(ProtocolError::UnexpectedReply(format!(
                                "{other:?}"
                            )))
                            .to_string(),
                        ),
                        Err(e) => Probe::Skipped(e.to_string()),
                    }
                })
            })
            .collect();
        asks.into_iter()
            .map(|ask| {
                ask.join()
                    .unwrap_or_else(|_| Probe::Skipped("its thread failed".into()))
            })
            .collect()
    })
}

/// One part of the file, fetched by one source (two in the endgame).
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: u64,
    end: u64,
    /// Everything before this is verified and delivered.
    got: u64,
    /// Sources at work on it.
    workers: u8,
}

/// The state every source shares.
struct State<'s> {
    pieces: Vec<Piece>,
    /// In order (stdout): bytes written so far.
    out: u64,
    /// In order: verified bytes waiting for the ones before them.
    pending: BTreeMap<u64, Vec<u8>>,
    /// In order: how far past `out` pieces may be taken.
    window: Option<u64>,
    sink: &'s mut dyn Sink,
    /// Writing failed: every source stops.
    output: Option<io::Error>,
    /// Sources waiting for a change: only then is anyone woken (a wake is
    /// a system call, and most deliveries concern nobody waiting).
    waiting: usize,
}

struct Board<'s> {
    state: Mutex<State<'s>>,
    changed: Condvar,
}

/// What a source is to do next.
enum Claim {
    /// Fetch piece `index` from byte `from`.
    Piece { index: usize, from: u64 },
    /// Nothing to take now; pieces may come back.
    Wait,
    /// Nothing left to do.
    Finished,
}

/// What became of verified bytes handed to the board.
enum Delivered {
    More,
    /// The piece is complete (maybe by another source): leave it.
    PieceDone,
    /// Writing failed: stop.
    Stop,
}

impl<'s> Board<'s> {
    /// The pieces of a file of `size` bytes, each at most `piece` long,
    /// that cover what is not in `have` (sorted ranges, verified before).
    fn new(
        size: u64,
        piece: u64,
        have: &[(u64, u64)],
        window: Option<u64>,
        sink: &'s mut dyn Sink,
    ) -> Self {
        let mut pieces = Vec::new();
        if size == 0 {
            pieces.push(Piece {
                start: 0,
                end: 0,
                got: 0,
                workers: 0,
            });
        }
        // The gaps between the ranges had: `have` is sorted and apart.
        let mut gaps = Vec::new();
        let mut at = 0;
        for &(start, end) in have {
            if start > at {
                gaps.push((at, start));
            }
            at = at.max(end);
        }
        if at < size {
            gaps.push((at, size));
        }
        for (mut start, gap_end) in gaps {
            while start < gap_end {
                let end = (start + piece).min(gap_end);
                pieces.push(Piece {
                    start,
                    end,
                    got: start,
                    workers: 0,
                });
                start = end;
            }
        }
        Board {
            state: Mutex::new(State {
                pieces,
                out: 0,
                pending: BTreeMap::new(),
                window,
                sink,
                output: None,
                waiting: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<'s>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn into_state(self) -> State<'s> {
        self.state.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// The next piece for a source: one nobody has (the first), or else,
    /// in the endgame, one a single other source is still at.
    fn claim(&self) -> Claim {
        let mut state = self.lock();
        if state.output.is_some() {
            return Claim::Finished;
        }
        let limit = state
            .window
            .map_or(u64::MAX, |w| state.out.saturating_add(w));
        let open = |p: &Piece| p.got < p.end && p.start < limit;
        if let Some(index) = state.pieces.iter().position(|p| p.workers == 0 && open(p)) {
            let piece = &mut state.pieces[index];
            piece.workers += 1;
            return Claim::Piece {
                index,
                from: piece.got,
            };
        }
        if state.pieces.iter().all(|p| p.got >= p.end) {
            return Claim::Finished;
        }
        if let Some(index) = state.pieces.iter().position(|p| p.workers == 1 && open(p)) {
            let piece = &mut state.pieces[index];
            piece.workers += 1;
            return Claim::Piece {
                index,
                from: piece.got,
            };
        }
        Claim::Wait
    }

    /// Waits a moment for pieces to be given back or finished.
    fn wait(&self) {
        let mut state = self.lock();
        state.waiting += 1;
        let mut state = match self.changed.wait_timeout(state, Duration::from_millis(100)) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        };
        state.waiting -= 1;
    }

    /// Lets go of the state after a change, waking the sources waiting.
    fn changed(&self, state: MutexGuard<'_, State<'s>>) {
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.changed.notify_all();
        }
    }

    /// A source leaves piece `index` (done, failed or given up).
    fn leave(&self, index: usize) {
        let mut state = self.lock();
        let piece = &mut state.pieces[index];
        piece.workers = piece.workers.saturating_sub(1);
        self.changed(state);
    }

    /// Hands on verified bytes of piece `index` starting at `offset`.
    /// Bytes another source delivered already are skipped. In order
    /// (stdout) the rest is written here; for a file it is the caller's to
    /// write (`Fresh`), outside this lock.
    fn deliver(
        &self,
        index: usize,
        offset: u64,
        data: &[u8],
        delivered: &mut u64,
    ) -> (Delivered, Option<Fresh>) {
        let mut state = self.lock();
        if state.output.is_some() {
            return (Delivered::Stop, None);
        }
        let piece = state.pieces[index];
        let end = offset + data.len() as u64;
        // Sources deliver in order from where the piece stood when they
        // took it, so `offset <= piece.got`; anything else is not used.
        if end <= piece.got || offset > piece.got {
            let next = if piece.got >= piece.end {
                Delivered::PieceDone
            } else {
                Delivered::More
            };
            return (next, None);
        }
        let skip = (piece.got - offset) as usize;
        let at = piece.got;
        let fresh = if state.window.is_some() {
            if let Err(e) = state.in_order(at, &data[skip..]) {
                state.output = Some(e);
                self.changed(state);
                return (Delivered::Stop, None);
            }
            None
        } else {
            Some(Fresh { at, skip })
        };
        state.pieces[index].got = end;
        *delivered += end - at;
        self.changed(state);
        let next = if end >= piece.end {
            Delivered::PieceDone
        } else {
            Delivered::More
        };
        (next, fresh)
    }

    /// Writing failed: every source stops at its next delivery or claim.
    fn fail(&self, e: io::Error) {
        let mut state = self.lock();
        state.output.get_or_insert(e);
        self.changed(state);
    }
}

/// Bytes a source delivered first, for it to write: `data[skip..]` of
/// what it handed to the board, at offset `at` of the file.
struct Fresh {
    at: u64,
    skip: usize,
}

impl State<'_> {
    /// Writes `data` (at `at`) to the sink if it is next, with whatever
    /// waited for it; keeps it for later otherwise.
    fn in_order(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        if at != self.out {
            self.pending.insert(at, data.to_vec());
            return Ok(());
        }
        self.sink.write_all(data)?;
        self.out += data.len() as u64;
        while let Some(next) = self.pending.remove(&self.out) {
            self.sink.write_all(&next)?;
            self.out += next.len() as u64;
        }
        Ok(())
    }
}

/// What every source works from.
struct Job<'a, 's> {
    name: &'a FileName,
    version: Version,
    timeout: Duration,
    limits: Limits,
    board: &'a Board<'s>,
    /// The file verified bytes are written to, at their offsets; `None`
    /// for stdout (the board writes in order).
    file: Option<&'a dyn WriteAt>,
    /// Where bytes written to the file are noted as verified.
    partial: Option<&'a Partial>,
}

/// A source's progress, passed on at most every REPORT (the first bytes
/// at once: they start the record of a download to a file).
struct Report<'e> {
    events: &'e mpsc::Sender<Event>,
    pending: u64,
    sent: Option<Instant>,
}

impl Report<'_> {
    fn add(&mut self, bytes: u64) {
        self.pending += bytes;
        if self.sent.is_none_or(|at| at.elapsed() >= REPORT) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            let _ = self.events.send(Event::Bytes(self.pending));
            self.pending = 0;
            self.sent = Some(Instant::now());
        }
    }
}

/// How a source ended.
struct Outcome {
    /// Verified bytes it delivered.
    delivered: u64,
    /// Why it was dropped, if it was.
    dropped: Option<String>,
}

/// How one request for one piece ended.
enum Attempt {
    /// The piece is complete (maybe by another source).
    Done,
    /// The peer is at its connection limit: ask again later.
    Busy(String),
    /// The source is dropped for this fetch.
    Drop(String),
    /// Writing failed; the fetch stops.
    Stop,
}

impl Job<'_, '_> {
    /// One source: takes pieces until none is left or the source fails.
    fn run(&self, peer: PeerAddr, events: &mpsc::Sender<Event>) -> Outcome {
        let mut outcome = Outcome {
            delivered: 0,
            dropped: None,
        };
        let mut report = Report {
            events,
            pending: 0,
            sent: None,
        };
        let (mut pause, mut busy_since) = (Duration::from_millis(50), None);
        // Bounded: every round either finishes a piece, waits at most 100
        // ms, or ends the source; a stuck fetch ends by the timeouts.
        loop {
            let (index, from) = match self.board.claim() {
                Claim::Finished => return outcome,
                Claim::Wait => {
                    self.board.wait();
                    continue;
                }
                Claim::Piece { index, from } => (index, from),
            };
            let attempt = self.fetch_piece(peer, index, from, &mut report, &mut outcome.delivered);
            report.flush();
            self.board.leave(index);
            match attempt {
                Attempt::Done => busy_since = None,
                Attempt::Stop => return outcome,
                Attempt::Busy(why) => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() + pause > self.timeout {
                        return self.dropped(outcome, peer, events, format!("{why}; giving up"));
                    }
                    thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Attempt::Drop(why) => return self.dropped(outcome, peer, events, why),
            }
        }
    }

    fn dropped(
        &self,
        mut outcome: Outcome,
        peer: PeerAddr,
        events: &mpsc::Sender<Event>,
        why: String,
    ) -> Outcome {
        let _ = events.send(Event::Note(format!("peer {peer}: {why}")));
        outcome.dropped = Some(why);
        outcome
    }

    /// Asks `peer` for piece `index` from byte `from`, and delivers what
    /// checks out.
    fn fetch_piece(
        &self,
        peer: PeerAddr,
        index: usize,
        from: u64,
        report: &mut Report<'_>,
        delivered: &mut u64,
    ) -> Attempt {
        let Version { size, hash } = self.version;
        let end = self.board.lock().pieces[index].end;
        let request = Request::Range {
            name: self.name.clone(),
            hash,
            start: from,
            end,
        };
        let due = proof::proof_len(size, from, end);
        // The header must arrive whole within the timeout: a peer dripping
        // it byte by byte cannot hold the client longer.
        let reply = Call::connect(peer.socket_addr(), self.timeout).and_then(|mut call| {
            call.send(|w| request.write_to(w))?;
            let header = call.receive(|r| Response::read_from(r))?;
            Ok((call, header))
        });
        let mut call = match reply {
            Ok((call, Response::Range(h))) if h.size == size && h.hash == hash => {
                if h.proof != due {
                    return Attempt::Drop(format!(
                        "announces a proof of {} bytes where {due} are due",
                        h.proof
                    ));
                }
                call
            }
            Ok((_, Response::Range(_))) => {
                return Attempt::Drop("answered for other content".into())
            }
            Ok((_, Response::Error(e))) if e.code == ErrorCode::Busy => {
                return Attempt::Busy(format!("busy: {}", e.message))
            }
            Ok((_, Response::Error(e))) if e.code.as_str() == CHANGED => {
                return Attempt::Drop(format!("its file changed: {}", e.message))
            }
            Ok((_, Response::Error(e))) if e.code == ErrorCode::NotFound => {
                return Attempt::Drop(format!("no longer has it: {}", e.message))
            }
            Ok((_, Response::Error(e))) => return Attempt::Drop(CallError::Refused(e).to_string()),
            Ok((_, other)) => {
                return Attempt::Drop(
                    CallError::BadReply(ProtocolError::UnexpectedReply(format!("{other:?}")))
                        .to_string(),
                )
            }
            Err(e) => return Attempt::Drop(e.to_string()),
        };
        let reader = call.content();
        let broke = |at: u64, e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                format!("connection closed at byte {at} of {size}")
            } else {
                let e = CallError::Io {
                    phase: Phase::Content,
                    source: e,
                };
                format!("transfer broke at byte {at} of {size}: {e}")
            }
        };
        // `due` is at most 0.4% of a piece: bounded.
        let mut proof_bytes = vec![0; due as usize];
        if let Err(e) = reader.read_exact(&mut proof_bytes) {
            return Attempt::Drop(broke(from, e));
        }
        let groups = match proof::verify_proof(size, &hash, from, end, &proof_bytes) {
            Ok(groups) => groups,
            Err(e) => return Attempt::Drop(format!("sent a proof that does not check out: {e}")),
        };
        drop(proof_bytes);
        let mut buf = vec![0; BATCH];
        // Bytes received since `window` began, for the low-speed limit.
        let (mut window, mut in_window) = (Instant::now(), 0u64);
        let mut rest = &groups[..];
        while !rest.is_empty() {
            // Whole groups, up to a batch (at least one).
            let mut take = 0;
            let mut len = 0;
            while take < rest.len() && (take == 0 || len + rest[take].len <= BATCH) {
                len += rest[take].len;
                take += 1;
            }
            let (batch, after) = rest.split_at(take);
            rest = after;
            let at = batch[0].offset;
            // Each group is checked as soon as it is whole; `good` bytes
            // of the batch (`checked` groups) have checked out.
            let (mut filled, mut good, mut checked) = (0, 0, 0);
            let mut failure = None;
            while filled < len && failure.is_none() {
                let n = match reader.read(&mut buf[filled..len]) {
                    Ok(0) => {
                        let eof = io::ErrorKind::UnexpectedEof.into();
                        failure = Some(broke(at + filled as u64, eof));
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        failure = Some(broke(at + filled as u64, e));
                        break;
                    }
                };
                filled += n;
                while checked < batch.len() && good + batch[checked].len <= filled {
                    let group = &batch[checked];
                    if !group.verify(&buf[good..good + group.len]) {
                        failure = Some(format!(
                            "sent bytes {}-{} that fail verification; dropped",
                            group.offset,
                            group.offset + group.len as u64
                        ));
                        break;
                    }
                    good += group.len;
                    checked += 1;
                }
                in_window += n as u64;
                let spent = window.elapsed();
                if failure.is_none()
                    && self.limits.speed_limit > 0
                    && spent >= self.limits.speed_time
                {
                    let rate = in_window as f64 / spent.as_secs_f64();
                    if rate < self.limits.speed_limit as f64 {
                        failure = Some(format!(
                            "slower than {} bytes/s for {}s ({rate:.0} bytes/s) at byte {} of {size}",
                            self.limits.speed_limit,
                            self.limits.speed_time.as_secs(),
                            at + filled as u64
                        ));
                    }
                    (window, in_window) = (Instant::now(), 0);
                }
            }
            // What checked out is kept, even from a source that then fails.
            if good > 0 {
                let before = *delivered;
                let (result, fresh) = self.board.deliver(index, at, &buf[..good], delivered);
                if let (Some(file), Some(Fresh { at, skip })) = (self.file, fresh) {
                    let data = &buf[skip..good];
                    if let Err(e) = file.write_all_at(data, at) {
                        self.board.fail(e);
                        return Attempt::Stop;
                    }
                    // Written, so a checkpoint's flush covers it.
                    if let Some(partial) = self.partial {
                        partial.verified(at, at + data.len() as u64);
                    }
                }
                report.add(*delivered - before);
                match result {
                    Delivered::More => {}
                    Delivered::PieceDone if failure.is_none() => return Attempt::Done,
                    Delivered::PieceDone => {}
                    Delivered::Stop => return Attempt::Stop,
                }
            }
            if let Some(why) = failure {
                return Attempt::Drop(why);
            }
        }
        Attempt::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{BufRead, BufReader, Write},
        net::{TcpListener, TcpStream},
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };

    /// A fake peer answering each request line with what `answer` writes.
    /// The request lines it saw arrive on the returned channel.
    fn fake_peer(
        answer: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static,
    ) -> (PeerAddr, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = mpsc::channel();
        let answer = Arc::new(answer);
        thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                let (answer, tx) = (Arc::clone(&answer), tx.clone());
                thread::spawn(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(&stream).read_line(&mut line);
                    let _ = tx.send(line.trim_end().to_string());
                    answer(line.trim_end(), &mut stream);
                });
            }
        });
        (addr, rx)
    }

    /// What an honest peer holding `content` answers, as bytes.
    fn reply(content: &[u8], line: &str) -> Vec<u8> {
        let hash = blake3::hash(content);
        let size = content.len() as u64;
        let words: Vec<&str> = line.split(' ').collect();
        match words.get(1) {
            Some(&"HEAD") => format!("FILE {size} {hash}\n").into_bytes(),
            Some(&"RANGE") => {
                let start: u64 = words[4].parse().unwrap();
                let end: u64 = words[5].parse().unwrap();
                let ob = proof::outboard(content, size).unwrap();
                let len = proof::proof_len(size, start, end);
                let mut out = format!("RANGE {size} {hash} {len}\n").into_bytes();
                proof::encode_proof(&ob, start, end, &mut out).unwrap();
                out.extend_from_slice(&content[start as usize..end as usize]);
                out
            }
            _ => b"ERR bad-request\n".to_vec(),
        }
    }

    fn honest(content: Arc<Vec<u8>>) -> impl Fn(&str, &mut TcpStream) + Send + Sync {
        move |line, stream| {
            let _ = stream.write_all(&reply(&content, line));
        }
    }

    /// Flips the byte `at` bytes into every range it sends.
    fn flipping(content: Arc<Vec<u8>>, at: u64) -> impl Fn(&str, &mut TcpStream) + Send + Sync {
        move |line, stream| {
            let mut out = reply(&content, line);
            if line.contains("RANGE") {
                let start: u64 = line.split(' ').nth(4).unwrap().parse().unwrap();
                let end: u64 = line.split(' ').nth(5).unwrap().parse().unwrap();
                if start + at < end {
                    let i = out.len() - (end - start - at) as usize;
                    out[i] ^= 1;
                }
            }
            let _ = stream.write_all(&out);
        }
    }

    fn content(len: usize) -> Arc<Vec<u8>> {
        Arc::new((0..len).map(|i| (i * 31 % 251) as u8).collect())
    }

    struct Memory {
        data: Vec<u8>,
        room: Option<u64>,
        file: Option<tempfile::NamedTempFile>,
    }

    impl Sink for Memory {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.data.extend_from_slice(buf);
            Ok(())
        }
        fn room(&self) -> Option<u64> {
            self.room
        }
        fn positional(&mut self) -> Option<Box<dyn WriteAt>> {
            self.file
                .as_ref()
                .map(|f| Box::new(f.reopen().unwrap()) as Box<dyn WriteAt>)
        }
    }

    struct Run {
        result: Result<Fetched, FetchError>,
        data: Vec<u8>,
        notes: Vec<String>,
    }

    /// Fetches "f.bin" from `peers` into `sink`, `sources` at a time.
    fn fetch_into(
        sink: &mut dyn Sink,
        peers: &[PeerAddr],
        sources: usize,
        limits: Limits,
        note: &mut dyn FnMut(&str),
    ) -> Result<Fetched, FetchError> {
        Fetcher {
            timeout: Duration::from_secs(2),
            limits,
            expect: None,
            keys: HashMap::new(),
            note,
            progress: &mut (),
        }
        .fetch_with(
            peers,
            &FileName::new("f.bin").unwrap(),
            sink,
            Options { sources },
        )
    }

    fn run(peers: &[PeerAddr], sources: usize, positional: bool, limits: Limits) -> Run {
        let mut notes = Vec::new();
        let mut sink = Memory {
            data: Vec::new(),
            room: None,
            file: positional.then(|| tempfile::NamedTempFile::new().unwrap()),
        };
        let result = fetch_into(&mut sink, peers, sources, limits, &mut |line| {
            notes.push(line.to_string())
        });
        let data = match &sink.file {
            Some(file) => std::fs::read(file.path()).unwrap(),
            None => sink.data,
        };
        Run {
            result,
            data,
            notes,
        }
    }

    fn get(peers: &[PeerAddr], sources: usize) -> Run {
        run(peers, sources, false, Limits::default())
    }

    #[test]
    fn files_of_every_size_arrive_whole_from_one_peer() {
        for len in [0, 1, 16384, 100_000, (SHARED_PIECE + 5) as usize] {
            let content = content(len);
            let (peer, _) = fake_peer(honest(Arc::clone(&content)));
            for positional in [false, true] {
                let r = run(&[peer], 1, positional, Limits::default());
                let fetched = r.result.unwrap();
                assert_eq!(fetched.size, len as u64);
                assert!(r.data == *content, "{len} bytes, positional {positional}");
            }
        }
    }

    /// Honest, but a RANGE is answered only once `together` ranges are
    /// asked for at once over all the peers sharing `gate` (or after 5 s):
    /// no source can take every piece before the others have started.
    fn gathering(
        content: Arc<Vec<u8>>,
        gate: Arc<(Mutex<usize>, Condvar)>,
        together: usize,
    ) -> impl Fn(&str, &mut TcpStream) + Send + Sync {
        move |line, stream| {
            if line.contains("RANGE") {
                let (count, arrived) = &*gate;
                let mut count = count.lock().unwrap();
                *count += 1;
                arrived.notify_all();
                let _ = arrived
                    .wait_timeout_while(count, Duration::from_secs(5), |n| *n < together)
                    .unwrap();
            }
            let _ = stream.write_all(&reply(&content, line));
        }
    }

    #[test]
    fn several_sources_share_the_work_and_stdout_gets_it_in_order() {
        let content = content(3 * SHARED_PIECE as usize + 1000);
        for positional in [false, true] {
            let gate = Arc::new((Mutex::new(0), Condvar::new()));
            let peers: Vec<PeerAddr> = (0..3)
                .map(|_| fake_peer(gathering(Arc::clone(&content), Arc::clone(&gate), 2)).0)
                .collect();
            let r = run(&peers, 3, positional, Limits::default());
            let fetched = r.result.unwrap();
            assert!(r.data == *content);
            assert!(fetched.from.len() >= 2, "{:?}", fetched.from);
            assert_eq!(
                fetched.from.iter().map(|(_, n)| n).sum::<u64>(),
                content.len() as u64
            );
        }
        // -j 1 takes one source only.
        let peers: Vec<PeerAddr> = (0..3)
            .map(|_| fake_peer(honest(Arc::clone(&content))).0)
            .collect();
        let fetched = get(&peers, 1).result.unwrap();
        assert_eq!(fetched.from.len(), 1);
    }

    #[test]
    fn a_liar_is_dropped_at_its_first_bad_group() {
        let content = content(2 * SHARED_PIECE as usize);
        let bad_at = 70_000;
        let (liar, liar_asked) = fake_peer(flipping(Arc::clone(&content), bad_at));
        let (good, _) = fake_peer(honest(Arc::clone(&content)));
        let group = bad_at / proof::GROUP * proof::GROUP;
        // Alone, the liar has nobody to hand over to; the groups before
        // the bad one were good and are kept.
        let r = get(&[liar, good], 1);
        let err = r.result.unwrap_err().to_string();
        assert!(err.contains("fail verification"), "{err}");
        assert_eq!(r.data.len() as u64, group);
        let _ = liar_asked.try_iter().count();
        let r = get(&[liar, good], 2);
        let fetched = r.result.unwrap();
        assert!(r.data == *content);
        let bad = r
            .notes
            .iter()
            .filter(|n| n.starts_with(&format!("peer {liar}: sent bytes")))
            .count();
        assert_eq!(bad, 1, "{:?}", r.notes);
        let ranges = liar_asked
            .try_iter()
            .filter(|l| l.contains("RANGE"))
            .count();
        assert_eq!(
            ranges, 1,
            "the liar is asked for nothing after its bad group"
        );
        let from_liar = fetched.from.iter().find(|(p, _)| *p == liar);
        assert!(
            from_liar.is_none_or(|(_, n)| *n <= group),
            "{:?}",
            fetched.from
        );
    }

    #[test]
    fn a_forged_proof_is_refused_before_any_byte() {
        let content = content(100_000);
        let forger = {
            let content = Arc::clone(&content);
            move |line: &str, stream: &mut TcpStream| {
                let mut out = reply(&content, line);
                if line.contains("RANGE") {
                    let header = out.iter().position(|&b| b == b'\n').unwrap();
                    out[header + 5] ^= 1;
                }
                let _ = stream.write_all(&out);
            }
        };
        let (forger, _) = fake_peer(forger);
        let r = get(&[forger], 1);
        let err = r.result.unwrap_err().to_string();
        assert!(
            err.contains("sent a proof that does not check out"),
            "{err}"
        );
        assert!(r.data.is_empty());
    }

    #[test]
    fn a_broken_transfer_goes_on_elsewhere_from_the_last_verified_group() {
        let content = content(200_000);
        let cut = {
            let content = Arc::clone(&content);
            move |line: &str, stream: &mut TcpStream| {
                let out = reply(&content, line);
                let cut = if line.contains("RANGE") { 100_000 } else { 0 };
                let _ = stream.write_all(&out[..out.len() - cut]);
            }
        };
        let (first, _) = fake_peer(cut);
        // Busy at first, so that it starts only once the first broke off.
        let ranges = AtomicUsize::new(0);
        let second = {
            let content = Arc::clone(&content);
            move |line: &str, stream: &mut TcpStream| {
                if line.contains("RANGE") && ranges.fetch_add(1, Ordering::SeqCst) == 0 {
                    thread::sleep(Duration::from_millis(200));
                    let _ = stream.write_all(b"ERR busy later\n");
                } else {
                    let _ = stream.write_all(&reply(&content, line));
                }
            }
        };
        let (second, requests) = fake_peer(second);
        let r = get(&[first, second], 1);
        // -j 1: the second holder is asked only once the first failed.
        let err = r.result.unwrap_err().to_string();
        assert!(
            err.contains("transfer stopped at 98304 of 200000 bytes"),
            "{err}"
        );
        let r = get(&[first, second], 2);
        assert!(r.result.is_ok(), "{:?}", r.notes);
        assert!(r.data == *content);
        assert!(
            r.notes[0].starts_with(&format!("peer {first}: connection closed at byte")),
            "{:?}",
            r.notes
        );
        let asked: Vec<String> = requests.try_iter().collect();
        assert!(
            asked.iter().any(|l| l.ends_with(" 98304 200000")),
            "{asked:?}"
        );
    }

    #[test]
    fn a_file_changed_on_the_peer_is_never_mixed() {
        let old = content(100_000);
        let changed = |line: &str, stream: &mut TcpStream| {
            let reply = if line.contains("HEAD") {
                format!("FILE 100000 {}\n", blake3::hash(&content(100_000)))
            } else {
                "ERR changed \"f.bin\" has other content now\n".into()
            };
            let _ = stream.write_all(reply.as_bytes());
        };
        let (peer, _) = fake_peer(changed);
        let r = get(&[peer], 1);
        let err = r.result.unwrap_err().to_string();
        assert!(err.contains("its file changed"), "{err}");
        assert!(r.data.is_empty());
        let _ = old;
    }

    #[test]
    fn the_first_holders_version_is_fetched_and_others_are_not_sources() {
        let (first, _) = fake_peer(honest(content(50_000)));
        let (other, other_asked) = fake_peer(honest(Arc::new(b"another version".to_vec())));
        let r = get(&[first, other], 4);
        assert!(r.data == *content(50_000));
        assert_eq!(r.result.unwrap().from.len(), 1);
        assert!(other_asked.try_iter().all(|l| l.contains("HEAD")));
    }

    #[test]
    fn not_found_and_unreachable_are_told_apart() {
        let missing = |_: &str, stream: &mut TcpStream| {
            let _ = stream.write_all(b"ERR not-found no file\n");
        };
        let (a, _) = fake_peer(missing);
        let (b, _) = fake_peer(missing);
        let err = get(&[a, b], 4).result.unwrap_err();
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "\"f.bin\" not found on any of 2 peers");

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dead: PeerAddr = closed.to_string().parse().unwrap();
        let r = get(&[dead], 4);
        assert!(!r.result.unwrap_err().is_not_found());
        assert_eq!(r.notes, [format!("peer {dead}: connection refused")]);
    }

    #[test]
    fn a_busy_peer_is_asked_again() {
        let content = content(1000);
        let asked = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&asked);
        let hashing = move |line: &str, stream: &mut TcpStream| {
            if count.fetch_add(1, Ordering::SeqCst) < 2 {
                let _ = stream.write_all(b"ERR busy \"f.bin\" is being hashed\n");
            } else {
                let _ = stream.write_all(&reply(&content, line));
            }
        };
        let (peer, _) = fake_peer(hashing);
        let r = get(&[peer], 1);
        assert!(r.result.is_ok(), "{:?}", r.notes);
        assert_eq!(
            asked.load(Ordering::SeqCst),
            4,
            "two HEADs busy, a third, a RANGE"
        );
        assert!(
            r.notes[0].contains("asking 1 busy peer(s) again"),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn a_header_dripped_byte_by_byte_costs_one_timeout() {
        let content = content(1000);
        let dripping = {
            let content = Arc::clone(&content);
            move |line: &str, stream: &mut TcpStream| {
                if line.contains("HEAD") {
                    let _ = stream.write_all(&reply(&content, line));
                    return;
                }
                for byte in b"RANGE 1000 " {
                    if stream.write_all(&[*byte]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(300));
                }
            }
        };
        let (dripping, _) = fake_peer(dripping);
        let started = Instant::now();
        let r = get(&[dripping], 1);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        let err = r.result.unwrap_err().to_string();
        assert!(err.contains("timed out waiting for the reply"), "{err}");
    }

    #[test]
    fn a_peer_slower_than_the_speed_limit_is_dropped_for_another() {
        let content = content(300_000);
        let slow = {
            let content = Arc::clone(&content);
            move |line: &str, stream: &mut TcpStream| {
                let out = reply(&content, line);
                if line.contains("HEAD") {
                    let _ = stream.write_all(&out);
                    return;
                }
                for part in out.chunks(2000) {
                    if stream.write_all(part).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let (slow, _) = fake_peer(slow);
        let (good, _) = fake_peer(honest(Arc::clone(&content)));
        let limits = Limits {
            max_size: None,
            speed_limit: 100_000,
            speed_time: Duration::from_millis(300),
        };
        // One source at a time, so that the slow one must be dropped.
        let r = run(&[slow, good], 1, false, limits);
        let err = r.result.unwrap_err().to_string();
        assert!(err.contains("slower than 100000 bytes/s"), "{err}");
        let r = run(&[slow, good], 2, false, limits);
        assert!(r.result.is_ok(), "{:?}", r.notes);
        assert!(r.data == *content);
    }

    #[test]
    fn a_file_over_the_limits_is_not_fetched() {
        let (peer, asked) = fake_peer(honest(content(5000)));
        let limits = Limits {
            max_size: Some(4999),
            ..Limits::default()
        };
        let err = run(&[peer], 1, false, limits).result.unwrap_err();
        assert!(matches!(err, FetchError::TooBig { .. }), "{err}");
        assert!(err.to_string().contains("over --max-size 4999"), "{err}");
        assert!(asked.try_iter().all(|l| l.contains("HEAD")));
    }

    /// Takes writes until `room` bytes are used, then fails as a full disk
    /// does; notes what it took.
    struct Filling {
        out: Box<dyn WriteAt>,
        room: u64,
        taken: Mutex<Vec<(u64, u64)>>,
    }

    impl WriteAt for Arc<Filling> {
        fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
            let mut taken = self.taken.lock().unwrap();
            let used: u64 = taken.iter().map(|(start, end)| end - start).sum();
            if used + buf.len() as u64 > self.room {
                return Err(io::Error::from_raw_os_error(28));
            }
            self.out.write_all_at(buf, at)?;
            taken.push((at, at + buf.len() as u64));
            Ok(())
        }
    }

    /// A real download to a file (`FileSink`: the `.part` and its record)
    /// whose writes go through `filling`, once it is set.
    struct FullDisk {
        inner: crate::save::FileSink,
        room: u64,
        filling: Option<Arc<Filling>>,
    }

    impl Sink for FullDisk {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.inner.write_all(buf)
        }
        fn positional(&mut self) -> Option<Box<dyn WriteAt>> {
            let filling = Arc::new(Filling {
                out: self.inner.positional()?,
                room: self.room,
                taken: Mutex::new(Vec::new()),
            });
            self.filling = Some(Arc::clone(&filling));
            Some(Box::new(filling))
        }
        fn partial(&self) -> Option<Arc<Partial>> {
            self.inner.partial()
        }
    }

    /// Sorted, touching ranges merged: as a record holds them.
    fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        ranges.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match out.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => out.push((start, end)),
            }
        }
        out
    }

    /// A disk that fills up during a download (a source's write fails,
    /// with one source and with two writing at once): the fetch stops with
    /// the local error (exit code 4), and the record of the partial file
    /// names exactly the bytes written, which a later run keeps and
    /// finishes from.
    #[test]
    fn a_disk_that_fills_up_stops_the_fetch_and_keeps_only_what_was_written() {
        let content = content(2 * SHARED_PIECE as usize + 100_000);
        let hash = blake3::hash(&content);
        let name = FileName::new("f.bin").unwrap();
        for sources in [1, 2] {
            let peers: Vec<PeerAddr> = (0..sources)
                .map(|_| fake_peer(honest(Arc::clone(&content))).0)
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("f.bin");
            let mut sink = FullDisk {
                inner: crate::save::FileSink::create(&dest, &name).unwrap(),
                room: 3 * BATCH as u64,
                filling: None,
            };
            let err =
                fetch_into(&mut sink, &peers, sources, Limits::default(), &mut |_| {}).unwrap_err();
            assert!(
                matches!(&err, FetchError::Output { source, .. } if source.raw_os_error() == Some(28)),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "cannot write \"f.bin\": {}",
                    io::Error::from_raw_os_error(28)
                )
            );
            assert_eq!(crate::failure::Failure::from(err).exit_code(), 4);
            let written = merged(sink.filling.take().unwrap().taken.lock().unwrap().clone());
            assert_eq!(
                written.iter().map(|(s, e)| e - s).sum::<u64>(),
                3 * BATCH as u64,
                "{sources} source(s)"
            );
            if sources == 1 {
                assert_eq!(written, [(0, 3 * BATCH as u64)]);
            }
            // What the client does on a failure; then the next run.
            let part = sink.inner.set_aside().expect("the partial file is kept");
            let bytes = std::fs::read(&part).unwrap();
            for &(start, end) in &written {
                let (start, end) = (start as usize, end as usize);
                assert!(bytes[start..end] == content[start..end]);
            }
            let partial = Partial::open(&dest).unwrap();
            let (kept, _) = partial.start(content.len() as u64, hash).unwrap();
            assert_eq!(kept, written, "the record names what was written");
            drop(partial);
            let mut sink = crate::save::FileSink::create(&dest, &name).unwrap();
            let fetched =
                fetch_into(&mut sink, &peers, sources, Limits::default(), &mut |_| {}).unwrap();
            assert_eq!(fetched.resumed, 3 * BATCH as u64);
            sink.commit().unwrap();
            assert!(std::fs::read(&dest).unwrap() == *content);
        }
    }
}
