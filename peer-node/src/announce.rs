//! Keeping this peer on the relay's list: register at start, heartbeat on
//! an interval, retry with backoff while the relay is away, and unregister
//! on the way out. One thread does all of it, so UNREGISTER is always the
//! last thing the relay hears from this peer: no heartbeat can overtake it
//! and list a stopped peer again.

use std::{
    net::{IpAddr, TcpStream},
    sync::Mutex,
    time::Duration,
};

use log::{info, warn};
use netkit::{
    call::{Call, CallError},
    Shutdown,
};
use protocol::relay::{Request, Response};

/// Longest wait between two attempts while the relay cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest a shutdown waits for the relay to take note.
pub(crate) const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Announcer {
    /// `host:port` of the relay, resolved again on every attempt.
    pub(crate) relay: String,
    /// The port this peer serves on.
    pub(crate) port: u16,
    /// The address to be listed under instead of the one seen by the relay.
    pub(crate) advertise: Option<IpAddr>,
    pub(crate) heartbeat: Duration,
    pub(crate) timeout: Duration,
    /// The connection of the registration in flight, so that a shutdown
    /// can cut it short instead of waiting out a frozen relay.
    pub(crate) in_flight: Mutex<Option<TcpStream>>,
}

/// Why one exchange with the relay failed.
#[derive(Debug, thiserror::Error)]
enum AnnounceError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("relay said: {0}")]
    Refused(protocol::ErrorReply),
    #[error("unexpected reply {0:?}")]
    Unexpected(Response),
    #[error("shutting down")]
    ShuttingDown,
}

impl Announcer {
    /// Registers now and then every heartbeat until shutdown; then
    /// unregisters, as its last word.
    pub(crate) fn run(&self, shutdown: &Shutdown) {
        let mut backoff = Duration::from_secs(1);
        let mut registered = false;
        while !shutdown.is_triggered() {
            let wait = match self.register(shutdown) {
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
                    warn!(
                        "cannot register with relay {}: {why}; retrying in {}s",
                        self.relay,
                        backoff.as_secs()
                    );
                    registered = false;
                    let wait = backoff;
                    backoff = (backoff * 2)
                        .min(MAX_BACKOFF)
                        .min(self.heartbeat.max(Duration::from_secs(1)));
                    wait
                }
            };
            if shutdown.sleep(wait) {
                break;
            }
        }
        self.unregister();
    }

    /// Called after the shutdown signal: lets a registration in flight
    /// finish for up to `patience`, so that the relay has carried it out
    /// before it hears UNREGISTER, then cuts it short, so that a frozen
    /// relay cannot hold up the shutdown.
    pub(crate) fn settle(&self, patience: Duration) {
        let deadline = std::time::Instant::now() + patience;
        while self.lock_in_flight().is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let taken = self.lock_in_flight().take();
        if let Some(stream) = taken {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, Option<TcpStream>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, shutdown: &Shutdown) -> Result<u64, AnnounceError> {
        let request = Request::Register {
            port: self.port,
            host: self.advertise,
        };
        let mut call = Call::connect(&self.relay, self.timeout)?;
        {
            let mut in_flight = self.lock_in_flight();
            // Checked after the connection is on record: a shutdown that
            // came before is seen here, one that comes after waits for it.
            if shutdown.is_triggered() {
                return Err(AnnounceError::ShuttingDown);
            }
            *in_flight = call.stream().try_clone().ok();
        }
        let reply = self.exchange(&mut call, &request);
        self.lock_in_flight().take();
        match reply? {
            Response::Registered { ttl_secs } => Ok(ttl_secs),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the relay to forget this peer at once.
    fn unregister(&self) {
        // Shutdown must stay quick even with a frozen relay.
        let timeout = self.timeout.min(UNREGISTER_TIMEOUT);
        let request = Request::Unregister {
            port: self.port,
            host: self.advertise,
        };
        let outcome = Call::connect(&self.relay, timeout)
            .map_err(AnnounceError::from)
            .and_then(|mut call| self.exchange(&mut call, &request));
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

    fn exchange(&self, call: &mut Call, request: &Request) -> Result<Response, AnnounceError> {
        call.send(|w| request.write_to(w))?;
        Ok(call.receive(|r| Response::read_from(r))?)
    }
}

fn unexpected(response: Response) -> AnnounceError {
    match response {
        Response::Error(e) => AnnounceError::Refused(e),
        other => AnnounceError::Unexpected(other),
    }
}
