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

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, sync::Arc, thread, time::Instant};

    fn shutdown() -> (Shutdown, TcpListener) {
        // A listener of our own for `trigger` to wake.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        (Shutdown::new(listener.local_addr().unwrap()), listener)
    }

    #[test]
    fn sleep_lasts_its_duration_unless_triggered() {
        let (shutdown, _listener) = shutdown();
        let started = Instant::now();
        assert!(!shutdown.sleep(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        shutdown.trigger();
        let started = Instant::now();
        assert!(shutdown.sleep(Duration::from_secs(10)));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn wait_returns_when_triggered_and_not_before() {
        let (shutdown, _listener) = shutdown();
        let shutdown = Arc::new(shutdown);
        let waiter = {
            let shutdown = Arc::clone(&shutdown);
            thread::spawn(move || {
                shutdown.wait();
                shutdown.is_triggered()
            })
        };
        // Nothing to synchronise on for "has not returned": give a wait
        // that would return at once a moment to do so.
        thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "wait returned before the trigger");
        shutdown.trigger();
        assert!(waiter.join().unwrap(), "wait returned before the trigger");
    }
}
