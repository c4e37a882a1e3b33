//! Keeping this peer on each relay's list and in its index: announce at
//! start, heartbeat on an interval (and at once when the folder changes),
//! send the list of files when the relay asks for it, retry with backoff
//! while the relay is away, and unregister on the way out. One thread per
//! relay does all of it for that relay, so UNREGISTER is always the last
//! thing a relay hears from this peer: no heartbeat can overtake it and
//! list a stopped peer again. The relays are told independently: each has
//! its own thread, its own knowledge of what it holds and its own backoff,
//! so that one that is down or frozen costs the others nothing.

use std::{
    net::{IpAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, info, warn};
use netkit::{
    call::{Call, CallError},
    Shutdown,
};
use protocol::{
    index::{write_offer_body, Holding, ListDigest},
    peer::MAX_FILES,
    relay::{Request, Response},
    ErrorCode, ErrorReply,
};

use crate::serve::Peer;

/// Longest wait between two attempts while the relay cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait a relay's `retry-after` is taken for: a relay gone wrong
/// cannot silence the peer for longer.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// Longest a shutdown waits for the relay to take note.
pub(crate) const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// After a change in the folder, how long to wait for more before
/// announcing: saving a file is often several events.
const SETTLE: Duration = Duration::from_millis(100);

/// The announcers of one peer, one per relay.
pub(crate) struct Announcers {
    each: Vec<Arc<Announcer>>,
    shared: Arc<Shared>,
}

impl Announcers {
    pub(crate) fn new(
        relays: &[String],
        port: u16,
        advertise: Option<IpAddr>,
        heartbeat: Duration,
        timeout: Duration,
        peer: &Arc<Peer>,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let each = relays
            .iter()
            .map(|relay| {
                Arc::new(Announcer {
                    relay: relay.clone(),
                    port,
                    advertise,
                    heartbeat,
                    timeout,
                    peer: Arc::clone(peer),
                    in_flight: Mutex::new(None),
                    wake: Wake::default(),
                    legacy: AtomicBool::new(false),
                    left_out: AtomicUsize::new(0),
                    shared: Arc::clone(&shared),
                    incomplete: AtomicBool::new(false),
                })
            })
            .collect();
        Announcers { each, shared }
    }

    /// One announcer per relay, each to be run on a thread of its own.
    pub(crate) fn each(&self) -> &[Arc<Announcer>] {
        &self.each
    }

    /// The folder changed: every relay is to hear of it.
    pub(crate) fn nudge(&self) {
        for announcer in &self.each {
            announcer.wake.nudge();
        }
    }

    /// A hash was finished: each announcer whose last list lacked files
    /// announces at once.
    pub(crate) fn hashed(&self) {
        for announcer in &self.each {
            announcer.hashed();
        }
    }

    /// Called after the shutdown signal: wakes the announcers, lets the
    /// announcements in flight finish for up to `patience` (together, not
    /// one after the other), so that each relay has carried its one out
    /// before it hears UNREGISTER, then cuts the rest short, so that a
    /// frozen relay cannot hold up the shutdown.
    pub(crate) fn settle(&self, patience: Duration) {
        self.nudge();
        self.shared.wait_idle(patience);
        for announcer in &self.each {
            let taken = announcer.lock_in_flight().take();
            if let Some(stream) = taken {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// What the announcers of one peer share.
#[derive(Default)]
struct Shared {
    /// The time of the last signed request, in Unix milliseconds.
    last_ts: AtomicU64,
    /// Requests in flight, to any relay.
    busy: Mutex<usize>,
    /// Told when no request is in flight any more.
    idle: Condvar,
}

impl Shared {
    /// The time for the next signed request, in Unix milliseconds: the
    /// clock's, but always later than the last one, whichever relay it
    /// goes to, since a relay takes each key's requests in increasing
    /// order only (no replays), and relays may share what they know of a
    /// key.
    fn stamp(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let previous = self
            .last_ts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }

    fn lock_busy(&self) -> MutexGuard<'_, usize> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a request in flight until the guard is dropped.
    fn begin(&self) -> Busy<'_> {
        *self.lock_busy() += 1;
        Busy(self)
    }

    /// Waits until no request is in flight to any relay, or `patience`
    /// has passed.
    fn wait_idle(&self, patience: Duration) {
        let busy = self.lock_busy();
        let _ = self
            .idle
            .wait_timeout_while(busy, patience, |busy| *busy > 0)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// A request in flight, counted in [`Shared`] while it lives.
struct Busy<'a>(&'a Shared);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.lock_busy();
        *busy = busy.saturating_sub(1);
        if *busy == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// What talks to one relay, on its own thread.
pub(crate) struct Announcer {
    /// `host:port` of the relay, resolved again on every attempt.
    relay: String,
    /// The port this peer serves on.
    port: u16,
    /// The address to be listed under instead of the one seen by the relay.
    advertise: Option<IpAddr>,
    heartbeat: Duration,
    timeout: Duration,
    /// What is served, to list it.
    peer: Arc<Peer>,
    /// The connection of the announcement in flight, so that a shutdown
    /// can cut it short instead of waiting out a frozen relay.
    in_flight: Mutex<Option<TcpStream>>,
    /// Wakes the announcer before its heartbeat is due.
    wake: Wake,
    /// The relay answered that it has no index (an older relay): plain
    /// REGISTER heartbeats from then on.
    legacy: AtomicBool,
    /// Files left out of the last list sent, so that a warning is given
    /// when the number changes, not at every heartbeat.
    left_out: AtomicUsize,
    /// The clock of signed requests and the count of requests in flight,
    /// shared with the other relays' announcers.
    shared: Arc<Shared>,
    /// The last list computed left files out because they were still
    /// being hashed (or over a limit): a finished hash is then news.
    incomplete: AtomicBool,
}

/// A flag and a condition variable: "something changed, announce now".
#[derive(Default)]
pub(crate) struct Wake {
    nudged: Mutex<bool>,
    cond: Condvar,
}

impl Wake {
    /// Wakes the announcer (the folder changed, or the peer is stopping).
    pub(crate) fn nudge(&self) {
        *self.nudged.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }

    /// Waits `timeout` or until nudged; true when nudged.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.nudged.lock().unwrap_or_else(|p| p.into_inner());
        let (mut nudged, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |nudged| !*nudged)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *nudged)
    }
}

/// Why one exchange with the relay failed.
#[derive(Debug, thiserror::Error)]
enum AnnounceError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("relay said: {0}")]
    Refused(ErrorReply),
    #[error("unexpected reply {0:?}")]
    Unexpected(Response),
    #[error("cannot list the folder: {0}")]
    Folder(#[source] std::io::Error),
    #[error("shutting down")]
    ShuttingDown,
}

impl AnnounceError {
    /// How long the relay asked to be left alone, if it did (busy).
    fn retry_after(&self) -> Option<Duration> {
        match self {
            AnnounceError::Refused(e) => e.retry_after().map(|after| after.min(MAX_RETRY_AFTER)),
            _ => None,
        }
    }
}

impl Announcer {
    /// Announces now and then every heartbeat, or sooner when nudged,
    /// until shutdown; then unregisters, as its last word.
    pub(crate) fn run(&self, shutdown: &Shutdown) {
        let mut backoff = Duration::from_secs(1);
        let mut registered = false;
        let mut not_before = None;
        while !shutdown.is_triggered() {
            let wait = match self.announce(shutdown) {
                Ok(ttl_secs) => {
                    if !registered {
                        info!("registered with relay {} (ttl {ttl_secs}s)", self.relay);
                        if self.heartbeat.as_secs() >= ttl_secs {
                            warn!(
                                "heartbeat of {}s is not shorter than the relay's ttl of {ttl_secs}s: \
                                 the relay will drop this peer between heartbeats",
                                self.heartbeat.as_secs()
                            );
                        }
                    }
                    registered = true;
                    backoff = Duration::from_secs(1);
                    self.heartbeat
                }
                Err(_) if shutdown.is_triggered() => break,
                Err(why) => {
                    // A busy relay that says when to come back is not
                    // asked sooner: not by the backoff, nor on a change.
                    let asked = why.retry_after();
                    let wait = backoff.max(asked.unwrap_or_default());
                    not_before = asked.map(|after| Instant::now() + after);
                    warn!(
                        "cannot register with relay {}: {why}; retrying in {}s",
                        self.relay,
                        wait.as_secs()
                    );
                    registered = false;
                    backoff = (backoff * 2)
                        .min(MAX_BACKOFF)
                        .min(self.heartbeat.max(Duration::from_secs(1)));
                    wait
                }
            };
            if self.wake.wait(wait) && !shutdown.is_triggered() {
                // Let a burst of changes settle into one announcement.
                let settled = Instant::now() + SETTLE;
                while self
                    .wake
                    .wait(settled.saturating_duration_since(Instant::now()))
                {}
                debug!("the folder changed: announcing");
            }
            if let Some(until) = not_before.take() {
                // A change woke it early: wait out the rest, unless stopping.
                while !shutdown.is_triggered() {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.wake.wait(left);
                }
            }
        }
        // Relays may share one store: an announcement still on its way to
        // another relay must not be carried out after this UNREGISTER and
        // list the stopped peer again. Each waits for all (the shutdown
        // cuts those to a frozen relay short).
        self.shared.wait_idle(UNREGISTER_TIMEOUT);
        self.unregister();
    }

    /// A hash was finished: announce at once if the last list lacked files
    /// (a big file that was still being hashed), not otherwise.
    fn hashed(&self) {
        if self.incomplete.load(Ordering::SeqCst) {
            self.wake.nudge();
        }
    }

    fn lock_in_flight(&self) -> MutexGuard<'_, Option<TcpStream>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One heartbeat: ANNOUNCE with the digest of the list, and the list
    /// itself when the relay asks for it; plain REGISTER to a relay
    /// without an index. Returns the relay's TTL.
    fn announce(&self, shutdown: &Shutdown) -> Result<u64, AnnounceError> {
        if self.legacy.load(Ordering::Relaxed) {
            return self.register(shutdown);
        }
        let (files, left_out) = self
            .peer
            .library
            .holdings(MAX_FILES)
            .map_err(AnnounceError::Folder)?;
        self.incomplete.store(left_out > 0, Ordering::SeqCst);
        let request = Request::Announce {
            port: self.port,
            digest: ListDigest::of(&files),
            host: self.advertise,
        };
        match self.exchange(shutdown, &request, None)? {
            Response::Registered { ttl_secs } => Ok(ttl_secs),
            Response::SendList {
                ttl_secs,
                max_files,
            } => {
                self.offer(shutdown, files, left_out, max_files)?;
                Ok(ttl_secs)
            }
            Response::Error(e)
                if e.code == ErrorCode::BadRequest && e.message.starts_with("unknown command") =>
            {
                info!(
                    "relay {} keeps no index of files: registering without the list",
                    self.relay
                );
                self.legacy.store(true, Ordering::Relaxed);
                self.register(shutdown)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Sends the list, cut to what the relay takes.
    fn offer(
        &self,
        shutdown: &Shutdown,
        mut files: Vec<Holding>,
        mut left_out: usize,
        max_files: usize,
    ) -> Result<(), AnnounceError> {
        if files.len() > max_files {
            left_out += files.len() - max_files;
            files.truncate(max_files);
        }
        if self.left_out.swap(left_out, Ordering::Relaxed) != left_out && left_out > 0 {
            warn!(
                "{left_out} files not announced to relay {} (over its limit of {max_files} \
                 files a peer, over this peer's {MAX_FILES}, or still being hashed); \
                 they are served but not found through the relay",
                self.relay
            );
        }
        let request = Request::Offer {
            port: self.port,
            digest: ListDigest::of(&files),
            host: self.advertise,
        };
        match self.exchange(shutdown, &request, Some(&files))? {
            Response::Indexed { files } => {
                info!("relay {} indexed {files} files", self.relay);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }

    fn register(&self, shutdown: &Shutdown) -> Result<u64, AnnounceError> {
        let request = Request::Register {
            port: self.port,
            host: self.advertise,
        };
        match self.exchange(shutdown, &request, None)? {
            Response::Registered { ttl_secs } => Ok(ttl_secs),
            other => Err(unexpected(other)),
        }
    }

    /// One request (with an OFFER's body) and its reply, on record in
    /// `in_flight` so that a shutdown can wait for it, then cut it.
    fn exchange(
        &self,
        shutdown: &Shutdown,
        request: &Request,
        body: Option<&[Holding]>,
    ) -> Result<Response, AnnounceError> {
        again_if_stale(&self.relay, || self.exchange_once(shutdown, request, body))
    }

    fn exchange_once(
        &self,
        shutdown: &Shutdown,
        request: &Request,
        body: Option<&[Holding]>,
    ) -> Result<Response, AnnounceError> {
        let mut call = Call::connect(&self.relay, self.timeout)?;
        let _counted = self.shared.begin();
        {
            let mut in_flight = self.lock_in_flight();
            // Checked after the request is counted and its connection on
            // record: a shutdown that came before is seen here, one that
            // comes after waits for it.
            if shutdown.is_triggered() {
                return Err(AnnounceError::ShuttingDown);
            }
            *in_flight = call.stream().try_clone().ok();
        }
        let reply = self.send(&mut call, request, body);
        self.lock_in_flight().take();
        reply
    }

    /// Sends `request`, signed by this peer's key (and an OFFER's body),
    /// and reads the reply.
    fn send(
        &self,
        call: &mut Call,
        request: &Request,
        body: Option<&[Holding]>,
    ) -> Result<Response, AnnounceError> {
        let auth = self
            .peer
            .identity
            .authorize(&request.canonical(), self.shared.stamp());
        call.send(|w| {
            request.write_signed_to(&auth, w)?;
            match body {
                Some(files) => write_offer_body(w, files),
                None => Ok(()),
            }
        })?;
        Ok(call.receive(|r| Response::read_from(r))?)
    }

    /// Asks the relay to forget this peer at once.
    fn unregister(&self) {
        // Shutdown must stay quick even with a frozen relay.
        let timeout = self.timeout.min(UNREGISTER_TIMEOUT);
        let request = Request::Unregister {
            port: self.port,
            host: self.advertise,
        };
        let outcome = again_if_stale(&self.relay, || {
            Call::connect(&self.relay, timeout)
                .map_err(AnnounceError::from)
                .and_then(|mut call| self.send(&mut call, &request, None))
        });
        match outcome {
            Ok(Response::Unregistered) => info!("unregistered from relay {}", self.relay),
            Ok(other) => warn!(
                "cannot unregister from relay {}: {}",
                self.relay,
                unexpected(other)
            ),
            Err(e) => warn!("cannot unregister from relay {}: {e}", self.relay),
        }
    }
}

/// How many times at most a request refused as not newer is made again.
const STALE_AGAIN: usize = 3;

/// Makes the request of `attempt` again, with a new time, when the relay
/// refused it as not newer than one it has accepted: relays that share one
/// store hear this peer's requests to all of them, and two sent at once to
/// two relays can reach the store in the other order, the later time
/// first. That is no replay, and no reason to back off. The announcers
/// refused at once would send again at once and could cross again, so
/// each waits a few random milliseconds first; at most `STALE_AGAIN` times.
fn again_if_stale(
    relay: &str,
    attempt: impl Fn() -> Result<Response, AnnounceError>,
) -> Result<Response, AnnounceError> {
    let mut outcome = attempt();
    for _ in 0..STALE_AGAIN {
        match &outcome {
            Ok(Response::Error(e))
                if e.code == ErrorCode::Forbidden && e.message.starts_with("not newer than") =>
            {
                debug!("relay {relay} took a request for a replay: sending it again");
                std::thread::sleep(Duration::from_millis(fastrand::u64(1..=20)));
                outcome = attempt();
            }
            _ => break,
        }
    }
    outcome
}

fn unexpected(response: Response) -> AnnounceError {
    match response {
        Response::Error(e) => AnnounceError::Refused(e),
        other => AnnounceError::Unexpected(other),
    }
}
