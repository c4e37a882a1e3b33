//! Keeping this peer on the relay's list: register at start, heartbeat on
//! an interval, retry with backoff while the relay is away, and unregister
//! on the way out.

use std::{
    io::BufReader,
    net::{IpAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use log::{info, warn};
use protocol::{
    describe_io,
    relay::{Request, Response},
    ProtocolError,
};

use crate::shutdown::Shutdown;

/// Longest wait between two attempts while the relay cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest a shutdown waits for the relay to take note.
const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Announcer {
    /// `host:port` of the relay, resolved again on every attempt.
    pub relay: String,
    /// The port this peer serves on.
    pub port: u16,
    /// The address to be listed under instead of the one seen by the relay.
    pub advertise: Option<IpAddr>,
    pub heartbeat: Duration,
    pub timeout: Duration,
}

impl Announcer {
    /// Registers now and then every heartbeat, until shutdown.
    pub fn run(&self, shutdown: &Shutdown) {
        let mut backoff = Duration::from_secs(1);
        let mut registered = false;
        loop {
            let request = Request::Register {
                port: self.port,
                host: self.advertise,
            };
            let wait = match self.call(request, self.timeout, Some(shutdown)) {
                Ok(Response::Registered { ttl_secs }) => {
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
                _ if shutdown.is_triggered() => return,
                outcome => {
                    let why = match outcome {
                        Ok(other) => unexpected(other),
                        Err(e) => e,
                    };
                    warn!(
                        "cannot register with relay {}: {why:#}; retrying in {}s",
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
                return;
            }
        }
    }

    /// Asks the relay to forget this peer at once.
    pub fn unregister(&self) {
        // Shutdown must stay quick even with a frozen relay.
        let timeout = self.timeout.min(UNREGISTER_TIMEOUT);
        let request = Request::Unregister {
            port: self.port,
            host: self.advertise,
        };
        match self.call(request, timeout, None) {
            Ok(Response::Unregistered) => info!("unregistered from relay {}", self.relay),
            Ok(other) => warn!(
                "cannot unregister from relay {}: {:#}",
                self.relay,
                unexpected(other)
            ),
            Err(e) => warn!("cannot unregister from relay {}: {e:#}", self.relay),
        }
    }

    /// One request to the relay. With `shutdown`, nothing is sent once it
    /// is triggered, so a late heartbeat cannot undo the unregistration.
    fn call(
        &self,
        request: Request,
        timeout: Duration,
        shutdown: Option<&Shutdown>,
    ) -> anyhow::Result<Response> {
        let stream = self.connect(timeout)?;
        if shutdown.is_some_and(Shutdown::is_triggered) {
            bail!("shutting down");
        }
        let exchange = || -> Result<Response, ProtocolError> {
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            request.write_to(&mut &stream)?;
            Response::read_from(&mut BufReader::new(&stream))
        };
        exchange().map_err(|e| match e {
            ProtocolError::Io(e) => anyhow!("{}", describe_io(&e)),
            e => e.into(),
        })
    }

    fn connect(&self, timeout: Duration) -> anyhow::Result<TcpStream> {
        let addrs = self
            .relay
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", self.relay))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) => Err(anyhow!("{}", describe_io(&e))),
            None => bail!("{} has no address", self.relay),
        }
    }
}

fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error(e) => anyhow!("relay said: {e}"),
        other => anyhow!("unexpected reply {other:?}"),
    }
}
