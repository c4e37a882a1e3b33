//! Graceful stop: a shared flag, a condition variable for sleeping threads,
//! and a self-connect that wakes a blocking `accept`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Condvar, Mutex,
    },
    time::Duration,
};

/// The stop signal of one server. Triggering it is safe from any thread,
/// a signal handler's thread included.
pub struct Shutdown {
    flag: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    listener: SocketAddr,
}

impl Shutdown {
    /// The stop signal of a server listening on `listener`.
    pub fn new(listener: SocketAddr) -> Self {
        Shutdown {
            flag: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            listener,
        }
    }

    /// Asks the server to stop: wakes every sleeper and the accept loop.
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

    /// True once `trigger` has been called.
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

    /// Blocks until shutdown is triggered.
    pub fn wait(&self) {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let _unused = self
            .wake
            .wait_while(guard, |_| !self.is_triggered())
            .unwrap_or_else(|p| p.into_inner());
    }
}
