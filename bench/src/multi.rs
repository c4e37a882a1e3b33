//! Several sources at once: four peers capped at 50 MiB/s each feeding one
//! client, the client's memory with eight sources and each peer's memory
//! per transfer, and a lying peer among four (a fake one in the harness
//! that sends correct proofs and one flipped byte in every range).

use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::FileExt,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use protocol::peer::proof;

use crate::{
    load,
    procs::{self, Guard, PeakWatch, Server},
    report::{median, mib, Row},
    Setup,
};

/// Longest any one transfer may take (50 MiB/s a peer: about 5 s a GiB).
const LIMIT: Duration = Duration::from_secs(300);

/// The cap of each of the four capped peers, in MiB/s.
const CAP_MIB: u64 = 50;

pub fn run(setup: &Setup, runs: usize) -> anyhow::Result<Vec<Row>> {
    let big = setup.served.join("big.bin");
    let size = fs::metadata(&big)?.len();
    let size_mib = size as f64 / (1 << 20) as f64;
    let mut rows = Vec::new();

    // Four capped peers, one client fetching from all four.
    eprintln!("multi: four peers capped at {CAP_MIB} MiB/s each");
    let relay = setup.start_relay("capped")?;
    let cap = format!("{CAP_MIB}M");
    let peers = start_peers(setup, &relay, 4, &["--rate-limit", &cap], "capped")?;
    let mut walls = Vec::new();
    for run in 1..=runs {
        eprintln!("multi: capped run {run} of {runs}");
        let mut cmd = client(setup, &relay, &["-j", "4"], None)?;
        walls.push(procs::timed(&mut cmd, "peer-client -j 4", LIMIT)?.as_secs_f64());
    }
    drop(peers);
    let rate = size_mib / median(&walls);
    let sum = (4 * CAP_MIB) as f64;
    rows.push(
        Row::new(
            format!("{size_mib:.0} MiB from 4 peers each --rate-limit {CAP_MIB}M -> client stdout"),
            format!("{rate:.0} MiB/s"),
        )
        .baseline("the sum of the caps", format!("{sum:.0} MiB/s"))
        .ratio(rate / sum)
        .target(">= 180 MiB/s", rate >= 180.0),
    );

    // Eight uncapped peers: the client's peak memory with eight sources
    // (to stdout, where the reorder buffer is, and to a file), and each
    // peer's peak during the transfer (its peak reset just before).
    eprintln!("multi: eight sources");
    let relay = setup.start_relay("eight")?;
    let peers = start_peers(setup, &relay, 8, &[], "eight")?;
    let out = setup.work.join("multi.bin");
    let out_str = out.to_str().context("work path is not UTF-8")?;
    let (mut client_peak, mut peer_peak, mut eight) = (0, 0, Vec::new());
    for run in 1..=runs {
        eprintln!("multi: eight sources, run {run} of {runs}");
        for (extra, name) in [
            (&["-j", "8"][..], "peer-client -j 8"),
            (&["-j", "8", "-o", out_str][..], "peer-client -j 8 -o"),
        ] {
            for peer in &peers {
                reset_peak(peer.pid())?;
            }
            let started = Instant::now();
            let guard = Guard::spawn(&mut client(setup, &relay, extra, None)?, name)?;
            let watch = PeakWatch::start(guard.pid());
            let status = guard.wait(LIMIT)?;
            if extra.len() == 2 {
                eight.push(started.elapsed().as_secs_f64());
            }
            client_peak = client_peak.max(watch.finish());
            anyhow::ensure!(status.success(), "{name} failed: {status}");
            for peer in &peers {
                let peak = procs::vm_kib(peer.pid(), "VmHWM").context("a peer is gone")?;
                peer_peak = peer_peak.max(peak);
            }
            let _ = fs::remove_file(&out);
        }
    }
    drop(peers);
    rows.push(Row::new(
        format!("{size_mib:.0} MiB from 8 peers (-j 8) -> client stdout"),
        format!("{:.0} MiB/s", size_mib / median(&eight)),
    ));
    rows.push(
        Row::new(
            "peak RSS, peer-client with 8 sources (stdout and -o)",
            mib(client_peak),
        )
        .target("< 64 MiB", client_peak < 64 * 1024),
    );
    rows.push(
        Row::new(
            "peak RSS, peer-node during a transfer (8 peers, max)",
            mib(peer_peak),
        )
        .target("< 32 MiB", peer_peak < 32 * 1024),
    );

    // A liar among four.
    eprintln!("multi: a lying peer among four");
    let relay = setup.start_relay("liar")?;
    let peers = start_peers(setup, &relay, 3, &[], "liar")?;
    let liar = Liar::start(&big, &relay)?;
    let expected = hash_file(&big)?;
    let (mut exact, mut caught, mut asked, mut walls) = (0, 0, 0, Vec::new());
    for run in 1..=runs {
        eprintln!("multi: liar run {run} of {runs}");
        let log = setup.work.join("liar-client.log");
        let started = Instant::now();
        let mut cmd = client(setup, &relay, &["-j", "4", "-o", out_str], Some(&log))?;
        let status = Guard::spawn(&mut cmd, "peer-client (liar)")?.wait(LIMIT)?;
        walls.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(status.success(), "peer-client failed with a liar: {status}");
        exact += usize::from(hash_file(&out)? == expected);
        let stderr = fs::read_to_string(&log)?;
        let bad = stderr
            .lines()
            .filter(|l| l.starts_with(&format!("peer {}: sent bytes", liar.addr)))
            .count();
        caught += usize::from(bad == 1);
        asked = asked.max(liar.ranges.swap(0, Ordering::SeqCst));
        fs::remove_file(&out)?;
    }
    drop(peers);
    let rate = size_mib / median(&walls);
    rows.push(
        Row::new(
            format!("{size_mib:.0} MiB from 3 peers and 1 liar (-j 4) -> client -o"),
            format!(
                "{rate:.0} MiB/s; byte-exact {exact} of {runs}; liar dropped at its first bad group {caught} of {runs}, asked for at most {asked} range"
            ),
        )
        .target(
            "byte-exact, liar dropped after one bad group",
            exact == runs && caught == runs && asked <= 1,
        ),
    );
    Ok(rows)
}

/// `peer-client get big.bin` against `relay`, stdout to /dev/null, stderr
/// to `log` (or nowhere).
fn client(
    setup: &Setup,
    relay: &Server,
    extra: &[&str],
    log: Option<&Path>,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(setup.bin("peer-client"));
    cmd.args([
        "127.0.0.1",
        &relay.addr.port().to_string(),
        "get",
        "big.bin",
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(File::create("/dev/null")?);
    match log {
        Some(log) => cmd.stderr(File::create(log)?),
        None => cmd.stderr(Stdio::null()),
    };
    Ok(cmd)
}

/// Starts `n` peers serving the harness's folder for `relay`, and waits
/// until the relay's index names all of them as holders of big.bin.
fn start_peers(
    setup: &Setup,
    relay: &Server,
    n: usize,
    extra: &[&str],
    name: &str,
) -> anyhow::Result<Vec<Server>> {
    let port = relay.addr.port().to_string();
    let dir = setup.served.to_str().context("work path is not UTF-8")?;
    let mut peers = Vec::new();
    for i in 0..n {
        // A key of its own: by default the peers of one folder share one,
        // and the relay takes all but one of them for replays of it.
        let key = setup.work.join(format!("peer-{name}-{i}.key"));
        let key = key.to_str().context("work path is not UTF-8")?;
        let mut args = vec!["127.0.0.1", &port, "--dir", dir, "--bind", "127.0.0.1"];
        // A short heartbeat: a file hashed at start is announced with it.
        args.extend_from_slice(&["--heartbeat", "1", "--key", key]);
        args.extend_from_slice(extra);
        let log = setup.work.join(format!("peer-{name}-{i}.log"));
        peers.push(Server::start(&setup.bin("peer-node"), &args, log)?);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = Vec::new();
    let want = format!(" {n} big.bin");
    while Instant::now() < deadline {
        let _ = load::exchange(relay.addr, b"RP2P/1 WHO big.bin\n", &mut buf);
        let listed = String::from_utf8_lossy(&buf)
            .lines()
            .filter(|l| l.ends_with(" big.bin"))
            .count();
        if listed >= n {
            return Ok(peers);
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the relay's index did not name{want} in time")
}

/// Resets a process's peak RSS (VmHWM) to its current RSS.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("cannot reset the peak RSS of {pid}"))
}

fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize())
}

/// A fake peer holding `big.bin`: answers `HEAD` truly and `RANGE` with
/// the true proof and the content with one byte flipped at a random
/// offset of the range.
struct Liar {
    addr: std::net::SocketAddr,
    /// RANGE requests answered since last taken.
    ranges: Arc<AtomicU64>,
}

impl Liar {
    fn start(file: &Path, relay: &Server) -> anyhow::Result<Liar> {
        let size = fs::metadata(file)?.len();
        let outboard = Arc::new(proof::outboard(File::open(file)?, size)?);
        let hash = outboard.hash();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let ranges = Arc::new(AtomicU64::new(0));
        let file = Arc::new(File::open(file)?);
        {
            let ranges = Arc::clone(&ranges);
            // Lives as long as the harness; only loopback clients.
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (file, outboard, ranges) = (
                        Arc::clone(&file),
                        Arc::clone(&outboard),
                        Arc::clone(&ranges),
                    );
                    thread::spawn(move || {
                        let _ = serve_lie(stream, &file, &outboard, &ranges);
                    });
                }
            });
        }
        offer(relay, addr.port(), size, hash)?;
        Ok(Liar { addr, ranges })
    }
}

fn serve_lie(
    mut stream: TcpStream,
    file: &File,
    outboard: &proof::Outboard,
    ranges: &AtomicU64,
) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    // A request line is short: read at most 4 KiB of it.
    BufReader::new(&stream)
        .take(4096)
        .read_line(&mut line)
        .context("no request")?;
    let (size, hash) = (outboard.size(), outboard.hash());
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.get(1) {
        Some(&"HEAD") => {
            // Proves the key the relay knows it by when asked with a nonce.
            let port = stream.local_addr()?.port();
            let me = crate::sign::identity(u64::from(port));
            let nonce = words
                .get(3)
                .and_then(|n| protocol::identity::parse_nonce(n).ok());
            let reply = match (nonce, words.get(2)) {
                (Some(nonce), Some(name)) => {
                    let message = protocol::identity::file_message(&nonce, name, size, &hash);
                    format!("FILE {size} {hash} {} {}\n", me.key(), me.sign(&message))
                }
                _ => format!("FILE {size} {hash}\n"),
            };
            stream.write_all(reply.as_bytes())?
        }
        Some(&"RANGE") if words.len() == 6 => {
            ranges.fetch_add(1, Ordering::SeqCst);
            let (start, end): (u64, u64) = (words[4].parse()?, words[5].parse()?);
            let mut head = format!(
                "RANGE {size} {hash} {}\n",
                proof::proof_len(size, start, end)
            )
            .into_bytes();
            proof::encode_proof(outboard, start, end, &mut head)?;
            stream.write_all(&head)?;
            let flip = start + fastrand::u64(0..(end - start).max(1));
            let mut buf = vec![0; 1 << 20];
            let mut at = start;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], at)?;
                if (at..at + n as u64).contains(&flip) {
                    buf[(flip - at) as usize] ^= 0x01;
                }
                stream.write_all(&buf[..n])?;
                at += n as u64;
            }
        }
        _ => stream.write_all(b"ERR bad-request\n")?,
    }
    Ok(())
}

/// Tells the relay that the peer listening on `port` holds big.bin.
fn offer(relay: &Server, port: u16, size: u64, hash: blake3::Hash) -> anyhow::Result<()> {
    use protocol::index::{write_offer_body, Holding, ListDigest};
    let files = vec![Holding {
        name: protocol::FileName::new("big.bin")?,
        size,
        hash,
    }];
    // Signed, as a real peer signs: this fake's key is that of simulated
    // peer `port`, which is also what it proves on HEAD.
    let offer = protocol::relay::Request::Offer {
        port,
        digest: ListDigest::of(&files),
        host: None,
    };
    let mut request = crate::sign::Peer::new(u64::from(port)).sign(&offer);
    write_offer_body(&mut request, &files)?;
    let mut reply = Vec::new();
    load::exchange(relay.addr, &request, &mut reply)?;
    anyhow::ensure!(
        reply.starts_with(b"INDEXED"),
        "the relay did not index the liar: {}",
        String::from_utf8_lossy(&reply)
    );
    Ok(())
}
