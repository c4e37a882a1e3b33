//! Starting and stopping the real binaries. Every process started here is
//! killed and reaped when its guard drops, also when a test fails.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use protocol::{relay, PeerAddr};
use relay_server::Running;

/// How long any one step may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(20);

/// Path of one of the three binaries, built by cargo with the tests (no
/// second build).
pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(match name {
        "relay-server" => env!("CARGO_BIN_EXE_relay-server"),
        "peer-node" => env!("CARGO_BIN_EXE_peer-node"),
        "peer-client" => env!("CARGO_BIN_EXE_peer-client"),
        other => panic!("no binary {other}"),
    })
}

/// A running server: a process of the real binary (killed and reaped on
/// drop), or one started in this process through its library (stopped on
/// drop), which is quicker to start and needs no signals.
pub struct Server {
    child: Option<Child>,
    here: Option<Here>,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A server running in this process.
enum Here {
    Relay(relay_server::Relay),
    Peer(peer_node::Node),
}

impl Server {
    /// Starts `bin` with `args` and waits for the address it prints first.
    pub fn start(bin_name: &str, args: &[&str]) -> Server {
        Server::start_with_env(bin_name, args, &[])
    }

    /// `start`, with extra environment variables.
    pub fn start_with_env(bin_name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("stderr.log");
        let mut command = Command::new(bin(bin_name));
        // Keys and other per-user data in the test's own folder, not the user's.
        command
            .args(args)
            .env("RUST_LOG", "debug")
            .env("XDG_DATA_HOME", dir.path());
        for (key, value) in env {
            // An empty value removes the variable (RUST_LOG="" to see the flags work).
            if value.is_empty() {
                command.env_remove(key);
            } else {
                command.env(key, value);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin_name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Server {
            child: Some(child),
            here: None,
            addr: ([0, 0, 0, 0], 0).into(),
            log,
            _dir: dir,
        };
        let line = rx
            .recv_timeout(STEP)
            .unwrap_or_else(|_| panic!("{bin_name} printed no address; log:\n{}", server.log()));
        server.addr = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "{bin_name} printed {line:?}, not an address; log:\n{}",
                server.log()
            )
        });
        server
    }

    /// A relay on 127.0.0.1 and a free port.
    pub fn relay(extra: &[&str]) -> Server {
        let mut args = vec!["0", "--bind", "127.0.0.1"];
        args.extend_from_slice(extra);
        Server::start("relay-server", &args)
    }

    /// A peer serving `dir`, registered with `relay`.
    pub fn peer(relay: SocketAddr, dir: &Path, extra: &[&str]) -> Server {
        let port = relay.port().to_string();
        let dir = dir.to_str().expect("utf-8 temp path");
        let mut args = vec!["127.0.0.1", &port, "--dir", dir, "--bind", "127.0.0.1"];
        args.extend_from_slice(extra);
        Server::start("peer-node", &args)
    }

    /// A relay in this process on 127.0.0.1 and a free port, with the
    /// command line's defaults changed by `configure`.
    pub fn relay_here(configure: impl FnOnce(&mut relay_server::Config)) -> Server {
        let mut config = relay_server::Config::default();
        configure(&mut config);
        let relay = relay_server::bind(config).expect("start a relay");
        Server::here(relay.local_addr(), Here::Relay(relay))
    }

    /// A peer in this process serving `dir` on 127.0.0.1 and a free port,
    /// registered with `relay`, with defaults changed by `configure`.
    pub fn peer_here(
        relay: SocketAddr,
        dir: &Path,
        configure: impl FnOnce(&mut peer_node::Config),
    ) -> Server {
        let mut config = peer_node::Config::new(dir, relay.to_string());
        configure(&mut config);
        let node = peer_node::bind(config).expect("start a peer");
        Server::here(node.local_addr(), Here::Peer(node))
    }

    fn here(addr: SocketAddr, here: Here) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        Server {
            child: None,
            here: Some(here),
            addr,
            log: dir.path().join("no-log"),
            _dir: dir,
        }
    }

    /// Stops a server in this process as a signal would: gracefully.
    pub fn stop_here(&mut self) {
        match self.here.take().expect("a server in this process") {
            Here::Relay(relay) => relay.stop(),
            Here::Peer(node) => node.stop(),
        }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running process").id()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `STOP`, `CONT`, `KILL`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped process cannot die until continued.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port nothing listens on, held for as long as the value lives: bound
/// and never listening, so connections to it are refused and no other
/// test's server can be given it meanwhile (a port merely free a moment
/// ago could be).
pub struct DeadPort {
    _held: socket2::Socket,
    pub addr: SocketAddr,
}

pub fn dead_port() -> DeadPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    DeadPort {
        _held: socket,
        addr,
    }
}

/// Runs `peer-client` against `relay` with `args`, feeding it `stdin`.
pub fn client(relay: SocketAddr, args: &[&str], stdin: &str) -> Output {
    let port = relay.port().to_string();
    let mut all = vec!["127.0.0.1", &port];
    all.extend_from_slice(args);
    client_with(&all, &[], stdin)
}

/// Runs `peer-client` with `args` alone (the relays among them) and the
/// extra environment variables `env`, feeding it `stdin`.
pub fn client_with(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(bin("peer-client"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peer-client");
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_string();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let output = wait_output(child);
    let _ = feeder.join();
    output
}

/// `wait_with_output` with a deadline: a hung client fails the test.
pub fn wait_output(mut child: Child) -> Output {
    // A pipe the caller already took (to read it itself) reads as empty.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + STEP * 2;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("peer-client hung for {:?}", STEP * 2);
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout"),
        stderr: stderr.join().expect("stderr"),
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary folder holding `files` (name, content), subfolders made.
pub fn folder_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("write the test folder");
    for (name, content) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("write the test folder");
        }
        fs::write(path, content).expect("write the test folder");
    }
    dir
}

/// Asks the relay directly for its live peers.
/// A relay at its connection cap for a moment (a test that gives it two
/// slots, say, while a peer announces) lists nobody: callers poll with
/// `eventually`, and ask again.
pub fn live_peers(relay: SocketAddr) -> Vec<PeerAddr> {
    let mut stream = TcpStream::connect_timeout(&relay, STEP).expect("connect to relay");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    relay::Request::Peers.write_to(&mut stream).expect("send");
    match relay::Response::read_from(&mut BufReader::new(&stream)).expect("reply") {
        relay::Response::Peers(peers) => peers,
        relay::Response::Error(e) if e.code == protocol::ErrorCode::Busy => Vec::new(),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Polls until `check` holds, failing the test after `STEP`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends raw bytes to a server and returns everything it answers until it closes.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect_timeout(&addr, STEP).expect("connect");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    stream.write_all(request).expect("send");
    let mut reply = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut reply);
    reply
}

/// A relay with one peer per folder, all registered.
pub struct Network {
    pub relay: Server,
    pub peers: Vec<Server>,
}

impl Network {
    /// Relay and peers in this process.
    pub fn start(dirs: &[&Path]) -> Network {
        let relay = Server::relay_here(|_| {});
        let peers = dirs
            .iter()
            .map(|dir| Server::peer_here(relay.addr, dir, |_| {}))
            .collect();
        Network::registered(relay, peers, dirs)
    }

    /// Relay and peers as processes of the real binaries, for tests that
    /// signal them or read their logs.
    pub fn start_processes(dirs: &[&Path]) -> Network {
        let relay = Server::relay(&[]);
        let peers = dirs
            .iter()
            .map(|dir| Server::peer(relay.addr, dir, &[]))
            .collect();
        Network::registered(relay, peers, dirs)
    }

    /// Once every peer is listed and every file of theirs is in the index
    /// (a big file is announced once it is hashed).
    fn registered(relay: Server, peers: Vec<Server>, dirs: &[&Path]) -> Network {
        let files: u64 = dirs.iter().map(|dir| count_files(dir)).sum();
        eventually("every peer is registered and its files indexed", || {
            live_peers(relay.addr).len() == peers.len() && stat(relay.addr, "holdings") == files
        });
        Network { relay, peers }
    }

    pub fn client(&self, args: &[&str]) -> Output {
        client(self.relay.addr, args, "")
    }
}

/// A signature for `request` by the key of a fake peer serving on `port`,
/// as a real peer signs what it tells the relay.
pub fn sign(port: u16, request: &relay::Request) -> protocol::identity::Auth {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as u64;
    LAST.fetch_max(now, Ordering::SeqCst);
    let ts = LAST.fetch_add(1, Ordering::SeqCst) + 1;
    identity(port).authorize(&request.canonical(), ts)
}

/// The key of the fake peer serving on `port`.
pub fn identity(port: u16) -> protocol::identity::Identity {
    protocol::identity::Identity::from_seed(*blake3::hash(&port.to_le_bytes()).as_bytes())
}

/// A fake peer's `reply` to `line`, signed as a real peer signs when the
/// line is a `HEAD` with a nonce and the reply starts with its `FILE`
/// header.
pub fn vouch(port: u16, line: &str, reply: Vec<u8>) -> Vec<u8> {
    use protocol::peer::{Request, Response};
    let Ok(Request::Head {
        name,
        nonce: Some(nonce),
    }) = Request::parse(line.trim_end())
    else {
        return reply;
    };
    let Ok(Response::File(header)) = Response::read_from(&mut &reply[..]) else {
        return reply;
    };
    let me = identity(port);
    let message =
        protocol::identity::file_message(&nonce, &name.encode(), header.size, &header.hash);
    let mut signed = Vec::new();
    let _ = Response::Vouched {
        header,
        key: me.key(),
        sig: me.sign(&message),
    }
    .write_to(&mut signed);
    signed
}

/// The keys a relay knows its live peers by.
pub fn keys(
    relay: SocketAddr,
) -> std::collections::HashMap<SocketAddr, protocol::identity::PeerKey> {
    let reply = raw_exchange(relay, b"RP2P/1 PEERS LONG\n");
    match relay::Response::read_from(&mut &reply[..]) {
        Ok(relay::Response::PeersLong(peers)) => peers
            .into_iter()
            .map(|(addr, key)| (addr.socket_addr(), key))
            .collect(),
        other => panic!("no keys from the relay: {other:?}"),
    }
}

/// Regular files under `dir`, as a peer serving it with the defaults would
/// announce them (not those with several hard links).
fn count_files(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match (e.file_type(), e.metadata()) {
                    (Ok(t), _) if t.is_dir() => count_files(&e.path()),
                    (Ok(t), Ok(meta)) if t.is_file() && meta.nlink() == 1 => 1,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// One of the relay's STATS counters.
pub fn stat(relay: SocketAddr, name: &str) -> u64 {
    let reply = raw_exchange(relay, b"RP2P/1 STATS\n");
    String::from_utf8_lossy(&reply)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}
