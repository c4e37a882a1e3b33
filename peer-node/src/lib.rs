//! A peer of a relay-p2p network: serves the files of one folder and keeps
//! itself on the list of live peers of each of its relays. [`bind`] starts
//! one and returns its handle; the `peer-node` binary is a thin command
//! line around it.
//! PROTOCOL.md says what it speaks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use netkit::server::Running;

mod announce;
mod files;
mod key;

pub use key::{default_path as default_key_path, KeyError};
mod serve;
mod stall;
mod watch;

use std::{
    io,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    sync::Arc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{info, warn};
use netkit::{
    server::{spawn_thread, Connections, Limits, Server},
    Shutdown,
};

/// What a peer serves, where, and which relays it keeps informed.
#[derive(Clone, Debug)]
pub struct Config {
    /// The folder whose files are served, subfolders included.
    pub dir: PathBuf,
    /// Address to serve on; port 0 picks a free one.
    pub bind: SocketAddr,
    /// `host:port` of each relay, each told on its own (at least one).
    pub relays: Vec<String>,
    /// The address the relay should list instead of the one it sees.
    pub advertise: Option<IpAddr>,
    /// Time between two registrations with each relay.
    pub heartbeat: Duration,
    /// Most connections served at once; more are answered `ERR busy`.
    pub max_connections: usize,
    /// Most connections served at once from one address (an IPv6 /64
    /// counts as one); more are answered `ERR busy retry-after 1`. 0: no cap.
    pub max_connections_per_ip: usize,
    /// Hold loopback addresses to `max_connections_per_ip` too (they are
    /// exempt otherwise, so that one machine can run a whole test network).
    pub limit_loopback: bool,
    /// How long a client may take to send its request, and one write may
    /// wait on a client that does not read; also bounds calls to a relay.
    pub timeout: Duration,
    /// How long transfers in flight may go on after a stop.
    pub grace: Duration,
    /// The file of the peer's key, made on first start; `None`: a key for
    /// this run only.
    pub key: Option<PathBuf>,
    /// Watch the folder and announce changes at once (otherwise the
    /// rescan at each heartbeat finds them).
    pub watch: bool,
    /// Serve files with more than one hard link (another link may be
    /// outside the folder, which no check can see).
    pub allow_hardlinks: bool,
    /// Most file bytes sent a second, over all connections together;
    /// `None`: no cap.
    pub rate_limit: Option<u64>,
}

impl Config {
    /// The command line's defaults: serve `dir` on 127.0.0.1 and a free
    /// port, registered with the relay at `relay` (`host:port`).
    pub fn new(dir: impl Into<PathBuf>, relay: impl Into<String>) -> Self {
        Config {
            dir: dir.into(),
            bind: ([127, 0, 0, 1], 0).into(),
            relays: vec![relay.into()],
            advertise: None,
            heartbeat: Duration::from_secs(30),
            max_connections: 512,
            max_connections_per_ip: 32,
            limit_loopback: false,
            timeout: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            allow_hardlinks: false,
            watch: true,
            key: None,
            rate_limit: None,
        }
    }
}

/// Why a peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The folder cannot be served.
    #[error(transparent)]
    Folder(#[from] files::FolderError),
    /// The key cannot be had.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// No relay was given.
    #[error("no relay given")]
    NoRelay,
    /// A relay's name does not resolve (a relay that is only down is
    /// waited for: the peer serves meanwhile and keeps retrying).
    #[error("cannot resolve relay {relay}: {source}")]
    Relay {
        /// `host:port` as given.
        relay: String,
        /// What the resolver said.
        source: io::Error,
    },
    /// The listener or a thread could not be started.
    #[error(transparent)]
    Server(#[from] netkit::server::StartError),
}

/// A running peer. Dropping it stops it at once; [`Running::stop`] and
/// [`Running::wait`] unregister and let transfers finish first.
pub struct Node {
    server: Server,
    peer: Arc<serve::Peer>,
    announcers: Arc<announce::Announcers>,
    /// One thread per relay, each its announcer's.
    heartbeats: Vec<JoinHandle<()>>,
    /// Stops watching the folder when dropped.
    watcher: Option<notify::RecommendedWatcher>,
    warm_up: Option<JoinHandle<()>>,
    grace: Duration,
}

/// Opens the folder, binds `config.bind`, starts serving, and registers
/// with each relay, all in background threads.
pub fn bind(config: Config) -> Result<Node, StartError> {
    // First: a key that cannot be used is the one thing to say.
    let identity = match &config.key {
        Some(path) => key::load_or_create(path)?,
        None => key::generate()?,
    };
    info!(
        "peer id {} (key {})",
        identity.key().short(),
        identity.key()
    );
    let options = files::Options {
        allow_hardlinks: config.allow_hardlinks,
    };
    let library = files::Library::open_with(&config.dir, options)?;
    if config.relays.is_empty() {
        return Err(StartError::NoRelay);
    }
    // Fail fast on a relay name that does not exist: a typo, most likely.
    for relay in &config.relays {
        relay
            .to_socket_addrs()
            .map_err(|source| StartError::Relay {
                relay: relay.clone(),
                source,
            })?;
    }
    let limits = Limits {
        max_connections: config.max_connections,
        max_per_ip: config.max_connections_per_ip,
        exempt_loopback: !config.limit_loopback,
        ..Limits::default()
    };
    let (listener, local) = netkit::server::bind(config.bind, limits.backlog)?;
    info!("serving {} on {local}", library.root().display());
    let shutdown = Arc::new(Shutdown::new(local));

    let peer = Arc::new(serve::Peer {
        identity,
        library,
        idle_timeout: config.timeout,
        write_timeout: config.timeout,
        throttle: config.rate_limit.map(stall::Throttle::new),
    });
    let warm_up = {
        // Hash what is already there, so that the first request for a big
        // file does not keep its client waiting (and timing out) for it.
        let (peer, shutdown) = (Arc::clone(&peer), Arc::clone(&shutdown));
        spawn_thread("warm-up", move || {
            peer.library.warm_up(&|| shutdown.is_triggered())
        })?
    };
    let handler = {
        let peer = Arc::clone(&peer);
        Arc::new(move |stream| serve::handle(&peer, stream))
    };
    let server = Server::spawn(
        listener,
        limits,
        Arc::clone(&shutdown),
        Arc::new(Connections::default()),
        handler,
    )?;
    let announcers = Arc::new(announce::Announcers::new(
        &config.relays,
        local.port(),
        config.advertise,
        config.heartbeat,
        config.timeout,
        &peer,
    ));
    {
        // A file hashed in the background (a big one) is announced as soon
        // as its hash is known, not at the next heartbeat.
        let announcers = Arc::clone(&announcers);
        peer.library.on_hashed(move || announcers.hashed());
    }
    let watcher = config.watch.then(|| {
        let announcers = Arc::clone(&announcers);
        watch::folder(peer.library.root(), move || announcers.nudge())
    });
    let mut node = Node {
        server,
        peer,
        announcers,
        heartbeats: Vec::with_capacity(config.relays.len()),
        warm_up: Some(warm_up),
        watcher: watcher.flatten(),
        grace: config.grace,
    };
    // Registered only once the peer serves, so that no client is sent to
    // a peer that is not listening yet. A thread per relay: one that is
    // down or frozen holds up only its own. Should a thread not start,
    // dropping the node stops those that did.
    for announcer in node.announcers.each() {
        let (announcer, shutdown) = (Arc::clone(announcer), Arc::clone(&shutdown));
        let thread = spawn_thread("heartbeat", move || announcer.run(&shutdown))?;
        node.heartbeats.push(thread);
    }
    Ok(node)
}

impl Running for Node {
    fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting (new connections are refused), unregisters from the
    /// relays (waiting at most 2 s for them), lets transfers in flight finish
    /// (up to the grace period) and ends the peer's threads.
    fn stop(mut self) {
        info!("shutting down");
        let left = self.end(self.grace);
        if left > 0 {
            warn!("{left} transfers still running after the grace period; stopping anyway");
        }
        info!("stopped");
    }
}

impl Node {
    fn end(&mut self, grace: Duration) -> usize {
        self.server.stop_accepting();
        self.watcher = None;
        self.announcers.settle(announce::UNREGISTER_TIMEOUT);
        // Each announcer's last word is bounded by UNREGISTER_TIMEOUT, and
        // they say it at the same time; only a connect to an unreachable
        // relay, which nothing can cut short, could take longer, and then
        // the peer does not wait for it (that thread still unregisters
        // last when it gets through).
        let deadline = Instant::now() + announce::UNREGISTER_TIMEOUT + Duration::from_secs(1);
        while self.heartbeats.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        for heartbeat in std::mem::take(&mut self.heartbeats) {
            if heartbeat.is_finished() {
                let _ = heartbeat.join();
            }
        }
        let left = self.server.drain(grace);
        // Grace is over: transfers waiting for upload tokens end now
        // instead of trickling on after the peer has stopped.
        if let Some(throttle) = &self.peer.throttle {
            throttle.close();
        }
        if let Some(warm_up) = self.warm_up.take() {
            // Stops between two files; one big file can take a while.
            if warm_up.is_finished() {
                let _ = warm_up.join();
            }
        }
        left
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.end(Duration::ZERO);
    }
}
