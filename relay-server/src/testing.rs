//! A real `redis-server` for tests (the `testing` feature): started on a
//! free loopback port in a folder of its own, stopped and reaped on drop.
//!
//! Where redis-server is not installed, [`RedisServer::start`] says on
//! stderr which test it skips and why, and returns `None`; with
//! `RP2P_REQUIRE_REDIS` set (as CI does, after installing it) it panics
//! instead, so that no Redis test is skipped there unnoticed.

use std::{
    io::{ErrorKind, Write},
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running redis-server of a test's own.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// More redis-server arguments, after the defaults (the last wins).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one for `test`, or says why not (see the module).
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// `start`, with more arguments for redis-server (a benchmark's
    /// `--appendfsync everysec`, say).
    pub fn start_with(test: &str, extra: &[&str]) -> Option<Self> {
        let required = std::env::var_os("RP2P_REQUIRE_REDIS").is_some();
        match Command::new("redis-server").arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Err(e) if e.kind() == ErrorKind::NotFound && !required => {
                // Straight to stderr, not through `eprintln!`, which the
                // test harness keeps to itself when a test passes.
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped {test}: redis-server is not installed (apt install redis-server)"
                );
                return None;
            }
            other => panic!("{test} needs redis-server: {other:?}"),
        }
        // A free port now may be taken by the time Redis binds it: a few tries.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().expect("a temporary folder for redis-server"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("redis-server did not start");
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it as an operator would (SIGTERM), and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Kills it (SIGKILL): what it wrote to its append-only file survives.
    pub fn kill(&mut self) {
        // A frozen server cannot die until it goes on.
        self.thaw();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([which, &child.id().to_string()])
                .status();
            assert!(status.is_ok_and(|s| s.success()), "kill {which} failed");
        }
    }

    /// Starts it again on the same port, from the same folder.
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server did not start again");
    }

    /// Runs one command and returns its reply as text (for INFO, DBSIZE...).
    pub fn query(&self, args: &[&str]) -> String {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("a connection to the test's redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        match cmd.query::<redis::Value>(&mut con).expect("a reply") {
            redis::Value::Int(n) => n.to_string(),
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::SimpleString(s) => s,
            other => format!("{other:?}"),
        }
    }

    /// Starts redis-server; true once it answers PING.
    fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            // Every accepted write on disk before it is answered, so that
            // a Redis killed and started again has lost nothing.
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--logfile", "redis.log"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            let client = redis::Client::open(self.url()).expect("redis url");
            let ping = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut con| redis::cmd("PING").query::<String>(&mut con));
            if ping.is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
