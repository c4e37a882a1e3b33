//! Talking to the relay: who is live, and how is the relay doing.

use std::{
    fmt, thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use netkit::call::{self, CallError};
use protocol::{
    identity::{NetworkMac, PeerKey},
    index::{Holder, Listed, Pattern},
    relay::{Request, Response},
    ContentHash, ErrorCode, FileName, PeerAddr, ProtocolError,
};

/// A page of the listing, and where the next one starts.
pub type Page = (Vec<Listed>, Option<FileName>);

/// Where the relay is, and how long to wait for it.
#[derive(Clone, Debug)]
pub struct Relay {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The longest any step of a conversation may take.
    pub timeout: Duration,
    /// A private network's secret, which every lookup then carries a MAC of.
    pub secret: Option<[u8; 32]>,
}

/// A conversation with the relay failed.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct RelayError {
    /// The relay, as `host:port`.
    pub relay: String,
    /// What went wrong.
    #[source]
    pub source: CallError,
}

impl RelayError {
    fn describe(&self) -> String {
        match &self.source {
            CallError::Resolve(_) | CallError::Io { .. } => {
                format!("cannot reach relay {}: {}", self.relay, self.source)
            }
            CallError::Refused(e) if e.retry_after().is_some() => format!(
                "relay {} is busy: {}; try again in {}s",
                self.relay,
                e.detail(),
                e.retry_after().unwrap_or_default().as_secs()
            ),
            _ => format!("relay {}: {}", self.relay, self.source),
        }
    }
}

impl Relay {
    /// The live peers, each once.
    pub fn peers(&self) -> Result<Vec<PeerAddr>, RelayError> {
        match self.call(Request::Peers)? {
            Response::Peers(mut peers) => {
                // A relay, or something posing as one, may list a peer
                // twice; asking it twice would only cost time.
                let mut seen = std::collections::HashSet::new();
                peers.retain(|p| seen.insert(*p));
                Ok(peers)
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// The live peers with their keys; `None` from a relay that gives no keys.
    pub fn peers_long(&self) -> Result<Option<Vec<(PeerAddr, PeerKey)>>, RelayError> {
        match self.call_indexed(Request::PeersLong)? {
            Some(Response::PeersLong(mut peers)) => {
                let mut seen = std::collections::HashSet::new();
                peers.retain(|(p, _)| seen.insert(*p));
                Ok(Some(peers))
            }
            Some(other) => Err(self.unexpected(other)),
            None => Ok(None),
        }
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
        match self.call_indexed(request)? {
            Some(Response::Holders(holders)) => Ok(Some(holders)),
            Some(other) => Err(self.unexpected(other)),
            None => Ok(None),
        }
    }

    /// One page of the network-wide listing: the versions of the names
    /// matching `pattern` after `after`, and where the next page starts;
    /// `None` from a relay that keeps no index.
    pub fn list_page(
        &self,
        pattern: &Pattern,
        after: Option<FileName>,
    ) -> Result<Option<Page>, RelayError> {
        let request = Request::Ls {
            pattern: pattern.clone(),
            after,
        };
        match self.call_indexed(request)? {
            Some(Response::Listing { entries, next }) => Ok(Some((entries, next))),
            Some(other) => Err(self.unexpected(other)),
            None => Ok(None),
        }
    }

    /// `call`, with an older relay's refusal of an unknown command as `None`.
    fn call_indexed(&self, request: Request) -> Result<Option<Response>, RelayError> {
        match self.call(request) {
            Err(RelayError {
                source: CallError::Refused(e),
                ..
            }) if e.code == ErrorCode::BadRequest
                && (e.message.starts_with("unknown command")
                    || e.message.starts_with("unexpected argument")) =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// The relay's counters.
    pub fn stats(&self) -> Result<Vec<(String, u64)>, RelayError> {
        match self.call(Request::Stats)? {
            Response::Stats(stats) => Ok(stats),
            other => Err(self.unexpected(other)),
        }
    }

    /// One request; a busy relay that says when to ask again is asked once
    /// more then, if that is within the timeout.
    fn call(&self, request: Request) -> Result<Response, RelayError> {
        let started = Instant::now();
        let first = self.call_once(&request);
        if let Err(RelayError {
            source: CallError::Refused(e),
            ..
        }) = &first
        {
            if let Some(after) = e.retry_after() {
                if started.elapsed() + after <= self.timeout {
                    eprintln!(
                        "relay {self} is busy: {}; asking again in {}s",
                        e.detail(),
                        after.as_secs()
                    );
                    thread::sleep(after);
                    return self.call_once(&request);
                }
            }
        }
        first
    }

    fn call_once(&self, request: &Request) -> Result<Response, RelayError> {
        let reply = call::call(
            (self.host.as_str(), self.port),
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
            Ok(Response::Error(e)) => Err(self.error(CallError::Refused(e))),
            Ok(response) => Ok(response),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, source: CallError) -> RelayError {
        RelayError {
            relay: self.to_string(),
            source,
        }
    }

    fn unexpected(&self, response: Response) -> RelayError {
        self.error(CallError::BadReply(ProtocolError::UnexpectedReply(
            format!("{response:?}"),
        )))
    }
}

impl fmt::Display for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
