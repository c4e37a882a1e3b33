//! The relay of a relay-p2p network: peers register with it, clients ask
//! it who is live. [`bind`] starts one and returns its handle; the
//! `relay-server` binary is a thin command line around it. PROTOCOL.md
//! says what it speaks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod registry;
mod serve;

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use log::info;
use netkit::{
    server::{listen, Connections, Limits, Server},
    Shutdown,
};

/// How a relay listens, whom it keeps, and for how long.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one.
    pub bind: SocketAddr,
    /// A peer not heard from for this long is forgotten.
    pub ttl: Duration,
    /// Most peers held at once; more registrations are answered `ERR busy`.
    pub max_registered: usize,
    /// Most peers in one answer to a lookup (a random sample beyond).
    pub max_peers_returned: usize,
    /// Most connections served at once; more are answered `ERR busy`.
    pub max_connections: usize,
    /// How long a connection may take to send its request line.
    pub idle_timeout: Duration,
    /// How long replies in flight may go on after a stop.
    pub grace: Duration,
}

impl Default for Config {
    /// The command line's defaults, on 127.0.0.1 and a free port.
    fn default() -> Self {
        Config {
            bind: ([127, 0, 0, 1], 0).into(),
            ttl: Duration::from_secs(90),
            max_registered: 250_000,
            max_peers_returned: 50,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(5),
        }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound (in use, not ours, no permission).
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// What the system said.
        source: io::Error,
    },
}

/// A running relay. Dropping it stops it at once; [`Relay::stop`] and
/// [`Relay::wait`] let replies in flight finish first.
pub struct Relay {
    server: Server,
    sweeper: Option<JoinHandle<()>>,
    grace: Duration,
}

/// Binds `config.bind` and starts serving in background threads.
pub fn bind(config: Config) -> Result<Relay, StartError> {
    let limits = Limits {
        max_connections: config.max_connections,
        ..Limits::default()
    };
    let listener = listen(config.bind, limits.backlog).map_err(|source| StartError::Bind {
        addr: config.bind,
        source,
    })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.bind,
        source,
    })?;
    let shutdown = Arc::new(Shutdown::new(local));
    let connections = Arc::new(Connections::default());
    let state = Arc::new(serve::State::new(&config, Arc::clone(&connections)));
    let sweeper = {
        let (state, shutdown) = (Arc::clone(&state), Arc::clone(&shutdown));
        thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || state.sweep(&shutdown))
            .map_err(|source| StartError::Thread {
                what: "expiry",
                source,
            })?
    };
    let handler = Arc::new(move |stream| state.handle(stream));
    let server =
        Server::spawn(listener, limits, shutdown, connections, handler).map_err(|source| {
            StartError::Thread {
                what: "accept",
                source,
            }
        })?;
    info!("relay listening on {local} (ttl {}s)", config.ttl.as_secs());
    Ok(Relay {
        server,
        sweeper: Some(sweeper),
        grace: config.grace,
    })
}

impl Relay {
    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The relay's stop signal: trigger it (from a signal handler, say) to
    /// make [`Relay::wait`] return.
    pub fn shutdown(&self) -> Arc<Shutdown> {
        Arc::clone(self.server.shutdown())
    }

    /// Serves until the stop signal, then stops gracefully.
    pub fn wait(self) {
        self.server.shutdown().wait();
        self.stop();
    }

    /// Stops accepting, lets replies in flight finish (up to the grace
    /// period) and ends every thread of the relay.
    pub fn stop(mut self) {
        info!("shutting down");
        self.end(self.grace);
        info!("stopped");
    }

    fn end(&mut self, grace: Duration) {
        self.server.stop(grace);
        if let Some(sweeper) = self.sweeper.take() {
            let _ = sweeper.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.end(Duration::ZERO);
    }
}
