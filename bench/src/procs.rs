//! Starting, timing and stopping processes. Every child is killed and reaped
//! when its guard drops, also when a figure fails half way.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// How long a server may take to print its address, or a tool to listen.
const START: Duration = Duration::from_secs(20);

/// A child process, killed and reaped on drop.
pub struct Guard {
    child: Option<Child>,
    name: String,
}

impl Guard {
    pub fn spawn(cmd: &mut Command, name: &str) -> anyhow::Result<Guard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Guard {
            child: Some(child),
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the process to exit by itself within `timeout`.
    pub fn wait(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            bail!("{} already reaped", self.name);
        };
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One of our servers, started with its log in `log`.
pub struct Server {
    pub guard: Guard,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    /// Starts `bin` and waits for the address it prints as its first line.
    pub fn start(bin: &Path, args: &[&str], log: PathBuf) -> anyhow::Result<Server> {
        let name = bin
            .file_name()
            .map_or("server".into(), |n| n.to_string_lossy());
        let stderr = fs::File::create(&log).context("cannot create a log file")?;
        let mut guard = Guard::spawn(
            Command::new(bin)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr),
            &name,
        )?;
        let stdout = guard
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(START)
            .with_context(|| format!("{name} printed no address; see {}", log.display()))?;
        let addr = line
            .trim()
            .parse()
            .with_context(|| format!("{name} printed {line:?}, not an address"))?;
        Ok(Server { guard, addr, log })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

/// Runs `cmd` to completion and returns its wall time, from just before the
/// spawn to the moment `wait` returns. Fails on a non-zero exit or timeout.
pub fn timed(cmd: &mut Command, name: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let pid = child.id();
    // A blocking wait on another thread, so the end time is exact and the
    // deadline can still be kept.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send((status, Instant::now()));
    });
    let (status, end) = match rx.recv_timeout(timeout) {
        Ok(done) => done,
        Err(_) => {
            // Not yet reaped, so the pid is still this child's.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = rx.recv_timeout(START);
            bail!("{name} did not finish within {timeout:?}; killed");
        }
    };
    let status = status.with_context(|| format!("cannot wait for {name}"))?;
    if !status.success() {
        bail!("{name} failed: {status}");
    }
    Ok(end - start)
}

/// A field of /proc/PID/status in KiB (`VmHWM` is the peak resident set).
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process has used so far, in seconds, from
/// /proc/PID/stat (in clock ticks, 100 a second on Linux).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// CPU time the calling thread has used so far, in seconds.
pub fn thread_cpu_secs() -> Option<f64> {
    stat_cpu_secs("/proc/thread-self/stat")
}

fn stat_cpu_secs(path: &str) -> Option<f64> {
    let stat = fs::read_to_string(path).ok()?;
    // The command name may hold spaces: count fields after its ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// Samples a process's peak RSS until it exits or `finish` is called; a
/// process that exits takes its /proc entry with it, hence the polling.
pub struct PeakWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl PeakWatch {
    pub fn start(pid: u32) -> PeakWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut peak = 0;
            // Bounded in time as well, in case the pid is reused.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match vm_kib(pid, "VmHWM") {
                    Some(kib) => peak = peak.max(kib),
                    None => break,
                }
                thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        PeakWatch { stop, thread }
    }

    /// Peak RSS seen, in KiB.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something listens on 127.0.0.1:`port`, without connecting
/// (a one-shot listener such as socat would take the probe for the client).
pub fn wait_listening(port: u16) -> anyhow::Result<()> {
    let want = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + START;
    while Instant::now() < deadline {
        let table = fs::read_to_string("/proc/net/tcp").context("cannot read /proc/net/tcp")?;
        let listening = table.lines().any(|l| {
            let mut cols = l.split_whitespace().skip(1);
            cols.next() == Some(want.as_str()) && cols.nth(1) == Some("0A")
        });
        if listening {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}
