//! Talking to the relays: who is live, and how is the network doing. A
//! client may be given several relays: every call goes through `ask`,
//! which asks the one that answered last and moves to the next when one
//! is down, slow or in trouble, so that failover is done in one place.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, warn};
use netkit::call::{self, CallError};
use protocol::{
    identity::{NetworkMac, PeerKey},
    index::{Holder, Listed, Pattern},
    relay::{Request, Response},
    ContentHash, ErrorCode, ErrorReply, FileName, PeerAddr, ProtocolError,
};

/// A page of the listing, and where the next one starts.
pub type Page = (Vec<Listed>, Option<FileName>);

/// Where the relays are, and how long to wait for each.
#[derive(Clone, Debug)]
pub struct Relay {
    /// `host:port` of each relay, in the order given.
    relays: Arc<[String]>,
    /// The relay that answered last, asked first next time; shared by the
    /// clones (the interactive client's background listing sticks to the
    /// same relay as its prompt).
    current: Arc<AtomicUsize>,
    /// The longest any step of a conversation with one relay may take.
    pub timeout: Duration,
    /// A private network's secret, which every lookup then carries a MAC of.
    pub secret: Option<[u8; 32]>,
}

/// A conversation with the relays failed: the one relay that refused the
/// request, or every relay, each with its own failure.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct RelayError {
    /// Each relay (as `host:port`) that failed, with what went wrong, in
    /// the order asked.
    pub failures: Vec<(String, CallError)>,
}

impl RelayError {
    fn one(relay: &str, source: CallError) -> Self {
        RelayError {
            failures: vec![(relay.to_string(), source)],
        }
    }

    fn describe(&self) -> String {
        match &self.failures[..] {
            [] => "no relay to ask".to_string(),
            [(relay, source)] => describe(relay, source),
            all => {
                let each: Vec<String> = all.iter().map(|(r, e)| describe(r, e)).collect();
                format!("no relay answered: {}", each.join("; "))
            }
        }
    }

    /// The refusal, when one relay refused the request.
    fn refusal(&self) -> Option<&ErrorReply> {
        match &self.failures[..] {
            [(_, CallError::Refused(e))] => Some(e),
            _ => None,
        }
    }
}

/// One relay's failure, for people.
fn describe(relay: &str, source: &CallError) -> String {
    match source {
        CallError::Resolve(_) | CallError::Io { .. } => {
            format!("cannot reach relay {relay}: {source}")
        }
        CallError::Refused(e) if e.retry_after().is_some() => format!(
            "relay {relay} is busy: {}; try again in {}s",
            e.detail(),
            e.retry_after().unwrap_or_default().as_secs()
        ),
        _ => format!("relay {relay}: {source}"),
    }
}

/// True when a failure says the relay itself is in trouble (down, slow,
/// busy, broken, or speaking another version), so that another relay may
/// do better; false for an answer about the request itself (not found,
/// forbidden, a bad request), which every relay would give alike.
fn is_trouble(e: &CallError) -> bool {
    match e {
        CallError::Refused(reply) => !matches!(
            reply.code,
            ErrorCode::BadRequest | ErrorCode::NotFound | ErrorCode::Forbidden | ErrorCode::TooLong
        ),
        CallError::Resolve(_) | CallError::Io { .. } | CallError::BadReply(_) => true,
    }
}

impl Relay {
    /// The relays at `relays` (`host:port` each), asked in this order
    /// until one answers.
    pub fn new(relays: Vec<String>, timeout: Duration, secret: Option<[u8; 32]>) -> Self {
        Relay {
            relays: relays.into(),
            current: Arc::new(AtomicUsize::new(0)),
            timeout,
            secret,
        }
    }

    /// The relay asked first: the one that answered last.
    pub fn current(&self) -> &str {
        let at = self.current.load(Ordering::Relaxed);
        self.relays.get(at).map_or("", String::as_str)
    }

    /// The live peers, each once.
    pub fn peers(&self) -> Result<Vec<PeerAddr>, RelayError> {
        let mut peers = self.ask(Request::Peers, |response| match response {
            Response::Peers(peers) => Ok(peers),
            other => Err(other),
        })?;
        // A relay, or something posing as one, may list a peer twice;
        // asking it twice would only cost time.
        let mut seen = std::collections::HashSet::new();
        peers.retain(|p| seen.insert(*p));
        Ok(peers)
    }

    /// The live peers with their keys; `None` from a relay that gives no keys.
    pub fn peers_long(&self) -> Result<Option<Vec<(PeerAddr, PeerKey)>>, RelayError> {
        let peers = self.ask_indexed(Request::PeersLong, |response| match response {
            Response::PeersLong(peers) => Ok(peers),
            other => Err(other),
        })?;
        Ok(peers.map(|mut peers| {
            let mut seen = std::collections::HashSet::new();
            peers.retain(|(p, _)| seen.insert(*p));
            peers
        }))
    }

    /// Who holds a file named `name`, from the relay's index; `None` from
    /// a relay that keeps no index (an older one).
    pub fn who(&self, name: &FileName) -> Result<Option<Vec<Holder>>, RelayError> {
        self.holders(Request::Who { name: name.clone() })
    }

    /// Who holds the content `hash`, under whatever name; `None` as for `who`.
    pub fn who_has(&self, hash: ContentHash) -> Result<Option<Vec<Holder>>, RelayError> {
        self.holders(Request::WhoHas { hash })
    }

    fn holders(&self, request: Request) -> Result<Option<Vec<Holder>>, RelayError> {
        self.ask_indexed(request, |response| match response {
            Response::Holders(holders) => Ok(holders),
            other => Err(other),
        })
    }

    /// One page of the network-wide listing: the versions of the names
    /// matching `pattern` after `after`, and where the next page starts;
    /// `None` from a relay that keeps no index. The cursor is a name, so
    /// a page may come from another relay than the one before when that
    /// one fails: relays that share their state go on where it stopped.
    pub fn list_page(
        &self,
        pattern: &Pattern,
        after: Option<FileName>,
    ) -> Result<Option<Page>, RelayError> {
        let request = Request::Ls {
            pattern: pattern.clone(),
            after,
        };
        self.ask_indexed(request, |response| match response {
            Response::Listing { entries, next } => Ok((entries, next)),
            other => Err(other),
        })
    }

    /// The relay's counters.
    pub fn stats(&self) -> Result<Vec<(String, u64)>, RelayError> {
        self.ask(Request::Stats, |response| match response {
            Response::Stats(stats) => Ok(stats),
            other => Err(other),
        })
    }

    /// `ask`, with an older relay's refusal of an unknown command as `None`.
    fn ask_indexed<T>(
        &self,
        request: Request,
        pick: impl Fn(Response) -> Result<T, Response>,
    ) -> Result<Option<T>, RelayError> {
        match self.ask(request, pick) {
            Err(e)
                if e.refusal().is_some_and(|e| {
                    e.code == ErrorCode::BadRequest
                        && (e.message.starts_with("unknown command")
                            || e.message.starts_with("unexpected argument"))
                }) =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// One request, with the reply `pick` takes (it gives back any other):
    /// to the relay that answered last, then to each of the others in turn
    /// while they fail in a way that says the relay is in trouble. A
    /// refusal of the request is an answer, and not asked elsewhere.
    fn ask<T>(
        &self,
        request: Request,
        pick: impl Fn(Response) -> Result<T, Response>,
    ) -> Result<T, RelayError> {
        let count = self.relays.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for turn in 0..count {
            let at = (first + turn) % count;
            let relay = &self.relays[at];
            let last = turn + 1 == count;
            let outcome = self
                .call(relay, &request, last)
                .and_then(|response| pick(response).map_err(unexpected));
            match outcome {
                Ok(answer) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e) if !is_trouble(&e) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Err(RelayError::one(relay, e));
                }
                Err(e) => {
                    if last {
                        debug!("{}", describe(relay, &e));
                    } else {
                        let next = &self.relays[(at + 1) % count];
                        warn!("{}; asking relay {next}", describe(relay, &e));
                    }
                    failures.push((relay.clone(), e));
                }
            }
        }
        Err(RelayError { failures })
    }

    /// One request to one relay. A busy relay that says when to ask again
    /// is asked once more then, if that is within the timeout and there is
    /// no other relay left to ask (`may_wait`).
    fn call(&self, relay: &str, request: &Request, may_wait: bool) -> Result<Response, CallError> {
        let started = Instant::now();
        let first = self.call_once(relay, request);
        if let Err(CallError::Refused(e)) = &first {
            if let Some(after) = e.retry_after() {
                if may_wait && started.elapsed() + after <= self.timeout {
                    eprintln!(
                        "relay {relay} is busy: {}; asking again in {}s",
                        e.detail(),
                        after.as_secs()
                    );
                    thread::sleep(after);
                    return self.call_once(relay, request);
                }
            }
        }
        first
    }

    fn call_once(&self, relay: &str, request: &Request) -> Result<Response, CallError> {
        let reply = call::call(
            relay,
            self.timeout,
            |w| match &self.secret {
                Some(secret) => {
                    let ts = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let mac = NetworkMac::new(secret, &request.canonical(), ts);
                    request.write_with_mac_to(&mac, w)
                }
                None => request.write_to(w),
            },
            |r| Response::read_from(r),
        );
        match reply {
            Ok(Response::Error(e)) => Err(CallError::Refused(e)),
            other => other,
        }
    }
}

fn unexpected(response: Response) -> CallError {
    CallError::BadReply(ProtocolError::UnexpectedReply(format!("{response:?}")))
}
