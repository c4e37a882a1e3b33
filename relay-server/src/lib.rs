//! The relay of a relay-p2p network: peers register with it, clients ask
//! it who is live. [`bind`] starts one and returns its handle; the
//! `relay-server` binary is a thin command line around it. PROTOCOL.md
//! says what it speaks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use netkit::server::{Running, StartError};

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The listener or a thread.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The `--allow-keys` file.
    #[error(transparent)]
    AllowKeys(#[from] AllowError),
    /// The `--store` URL.
    #[error(transparent)]
    Store(#[from] RedisUrlError),
}

mod limits;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod trust;

pub use trust::AllowError;
mod serve;

pub use limits::SourceLimits;
pub use store::{RedisTarget, RedisUrlError, StoreConfig};

use std::{net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use log::info;
use netkit::{
    server::{spawn_thread, Connections, Limits, Server},
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
    /// Most files indexed for one peer; a peer is told so and sends no more.
    pub max_files_per_peer: usize,
    /// Most holdings (a file on a peer) in the index; offers beyond get `ERR busy`.
    pub max_holdings: usize,
    /// What one source address may ask and hold.
    pub limits: SourceLimits,
    /// `--allow-keys`: only the peers whose keys this file lists may
    /// register (re-read by [`Relay::reload_allowed_keys`], on SIGHUP).
    pub allow_keys: Option<std::path::PathBuf>,
    /// A private network's secret: lookups must carry a MAC made with it.
    pub network_secret: Option<[u8; 32]>,
    /// Where the live peers, the index and the counters are kept.
    pub store: StoreConfig,
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
            max_files_per_peer: 10_000,
            max_holdings: 20_000_000,
            limits: SourceLimits::default(),
            allow_keys: None,
            network_secret: None,
            store: StoreConfig::Memory,
        }
    }
}

/// A running relay. Dropping it stops it at once; [`Running::stop`] and
/// [`Running::wait`] let replies in flight finish first.
pub struct Relay {
    server: Server,
    state: Arc<serve::State>,
    sweeper: Option<JoinHandle<()>>,
    grace: Duration,
}

/// Binds `config.bind` and starts serving in background threads.
pub fn bind(config: Config) -> Result<Relay, BindError> {
    let limits = Limits {
        max_connections: config.max_connections,
        max_per_ip: config.limits.max_connections_per_ip,
        exempt_loopback: config.limits.exempt_loopback,
        ..Limits::default()
    };
    let (listener, local) = netkit::server::bind(config.bind, limits.backlog)?;
    let shutdown = Arc::new(Shutdown::new(local));
    let connections = Arc::new(Connections::default());
    // A relay that serves loopback only is a network on one machine: it
    // may list loopback addresses, which anywhere else would send clients
    // to their own machine.
    let trust = trust::Trust::new(
        local.ip().is_loopback(),
        config.allow_keys.clone(),
        config.network_secret,
        config.ttl,
        config.max_registered,
    )?;
    let store = store::open(&config)?;
    let state = Arc::new(serve::State::new(
        &config,
        store,
        Arc::clone(&connections),
        trust,
    ));
    let sweeper = {
        let (state, shutdown) = (Arc::clone(&state), Arc::clone(&shutdown));
        spawn_thread("sweeper", move || state.sweep(&shutdown))?
    };
    let handler = {
        let state = Arc::clone(&state);
        Arc::new(move |stream| state.handle(stream))
    };
    let server = Server::spawn(listener, limits, shutdown, connections, handler)?;
    info!(
        "relay listening on {local} (ttl {}s, store {:?})",
        config.ttl.as_secs(),
        config.store
    );
    Ok(Relay {
        server,
        state,
        sweeper: Some(sweeper),
        grace: config.grace,
    })
}

impl Relay {
    /// Reads the `--allow-keys` file again (SIGHUP); returns how many keys
    /// it holds, `None` on a relay open to every key.
    pub fn reload_allowed_keys(&self) -> Result<Option<usize>, AllowError> {
        self.state.trust.reload()
    }

    /// `reload_allowed_keys` for a signal handler's thread, which outlives
    /// the borrow of the relay.
    pub fn key_reloader(&self) -> impl Fn() -> Result<Option<usize>, AllowError> + Send + 'static {
        let state = Arc::clone(&self.state);
        move || state.trust.reload()
    }
}

impl Running for Relay {
    fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting, lets replies in flight finish (up to the grace
    /// period) and ends every thread of the relay.
    fn stop(mut self) {
        info!("shutting down");
        self.end(self.grace);
        info!("stopped");
    }
}

impl Relay {
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
