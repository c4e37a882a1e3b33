//! Graceful stop on Ctrl-C / SIGTERM: a shared flag, a condition variable for
//! sleeping threads, and a self-connect that wakes the blocking `accept`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

pub struct Shutdown {
    flag: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    listener: SocketAddr,
}

impl Shutdown {
    /// Installs the signal handler for a server listening on `listener`.
    pub fn install(listener: SocketAddr) -> anyhow::Result<Arc<Self>> {
        let shutdown = Arc::new(Shutdown {
            flag: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            listener,
        });
        let handle = Arc::clone(&shutdown);
        ctrlc::set_handler(move || handle.trigger())
            .map_err(|e| anyhow::anyhow!("cannot install the signal handler: {e}"))?;
        Ok(shutdown)
    }

    pub fn trigger(&self) {
        {
            // Set the flag under the lock so a thread about to sleep cannot miss it.
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.flag.store(true, Ordering::SeqCst);
        }
        self.wake.notify_all();
        // `accept` only returns for a connection: make one.
        let mut target = self.listener;
        if target.ip().is_unspecified() {
            target.set_ip(match target {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
    }

    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration` or until shutdown; returns true on shutdown.
    pub fn sleep(&self, duration: Duration) -> bool {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _unused = self
            .wake
            .wait_timeout_while(guard, duration, |_| !self.is_triggered())
            .unwrap_or_else(|p| p.into_inner());
        self.is_triggered()
    }
}
