//! The relay's index (issue 11): a file held by 1 of 1,000 peers, found by
//! real `peer-client get` processes; and a relay indexing 100,000 peers ×
//! 100 files: its memory, who-holds time, re-announcing, heartbeats, `ls`.
//!
//! The simulated peers speak the protocol from the harness. Peer `i` holds
//! the names `f{j:07}` for `j = (i * files + k) * 999_983 mod names`,
//! `k < files`. 999,983 is prime, so the map is a bijection mod `names`:
//! every name is held by exactly `peers * files / names` peers, and each
//! peer's names are scattered over the whole name space, as on a real
//! network, rather than one sorted run. Zero-padded, so that name order is
//! number order. One version per name: its hash is BLAKE3 of the name.

use std::{
    fs::{self, File},
    io::{self, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use protocol::{
    index::{write_offer_body, Holding, ListDigest, MAX_BATCH},
    peer::{self, proof},
    relay::Request,
    ErrorCode, ErrorReply, FileName,
};

use crate::{
    load::{self, Load},
    procs::{self, Server},
    relay::{log_len, server_times, stat, stats},
    report::{median, mib, ms, percentile, secs, Row},
    sign, Setup,
};

/// The stride of the name map; prime.
const STRIDE: u64 = 999_983;
/// The file only one peer holds.
const RARE: &str = "rare.bin";
/// Lookups made one after another to read the relay's time for each.
const SEQUENTIAL: usize = 2000;
/// Files in the list re-announced, the relay's default cap per peer.
const BIG_LIST: usize = 10_000;
/// Re-announcements timed, alternating two lists.
const REANNOUNCES: usize = 10;
/// The longest the 100,000 OFFERs may take in all.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// Threads sending OFFERs: enough to keep the relay busy on two cores.
const LOADERS: usize = 4;
/// Loopback addresses the simulated peers come from (127.0.1.1 ...).
const SOURCE_IPS: usize = 16;
const FIRST_PORT: usize = 10_000;
/// Where the re-announcing peer comes from: apart from the others.
const BIG_PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 2, 1);
const BIG_PEER_PORT: u16 = 7000;
/// Its key's number: apart from those of the simulated peers, 0, 1, ...
const BIG_PEER_KEY: u64 = u64::MAX;
const GET_LIMIT: Duration = Duration::from_secs(30);

/// The names of the simulated network, each with its line of an OFFER
/// (`<size> <hash> <name>\n`), built once: 1 M lines is about 85 MB.
pub struct Catalog {
    lines: Vec<u8>,
    /// Where line `j` starts; it ends where line `j + 1` starts.
    starts: Vec<usize>,
    names: usize,
    files: usize,
}

impl Catalog {
    pub fn new(names: usize, files: usize) -> anyhow::Result<Catalog> {
        // The stride is prime: coprime with `names` unless it divides it.
        ensure!(
            (1..=10_000_000).contains(&names)
                && !names.is_multiple_of(STRIDE as usize)
                && (1..=names).contains(&files),
            "need 1 <= files per peer <= names <= 10,000,000, names not a multiple of {STRIDE}"
        );
        eprintln!("index: building the {names} names of the simulated network");
        let mut catalog = Catalog {
            lines: Vec::with_capacity(names * 90),
            starts: Vec::with_capacity(names + 1),
            names,
            files,
        };
        for j in 0..names {
            catalog.starts.push(catalog.lines.len());
            catalog.lines.extend_from_slice(&line(&holding(j)?));
        }
        catalog.starts.push(catalog.lines.len());
        catalog.check()?;
        Ok(catalog)
    }

    /// The harness writes OFFERs' bodies from its own lines, for speed:
    /// check once that they are what the protocol crate would send.
    fn check(&self) -> anyhow::Result<()> {
        let js = self.names_of(1);
        let holdings = js
            .iter()
            .map(|&j| holding(j))
            .collect::<Result<Vec<_>, _>>()?;
        let (digest, body) = offer_body(&self.lines_of(&js))?;
        let mut expected = Vec::new();
        write_offer_body(&mut expected, &holdings)?;
        ensure!(
            digest == ListDigest::of(&holdings) && body == expected,
            "the harness's OFFER differs from the protocol crate's"
        );
        Ok(())
    }

    /// Peer `i`'s names, by number, sorted (which sorts them by name).
    fn names_of(&self, i: usize) -> Vec<usize> {
        let mut js: Vec<usize> = (0..self.files)
            .map(|k| ((i * self.files + k) as u64 * STRIDE % self.names as u64) as usize)
            .collect();
        js.sort_unstable();
        js.dedup();
        js
    }

    fn lines_of(&self, js: &[usize]) -> Vec<&[u8]> {
        js.iter()
            .map(|&j| &self.lines[self.starts[j]..self.starts[j + 1]])
            .collect()
    }

    /// Files each simulated peer offers.
    pub fn files(&self) -> usize {
        self.files
    }

    /// How many peers hold each name when `peers` peers are loaded.
    pub fn holders_each(&self, peers: usize) -> usize {
        peers * self.files / self.names
    }
}

/// Name `j` of the network, as a peer would announce it.
fn holding(j: usize) -> anyhow::Result<Holding> {
    let name = format!("f{j:07}");
    Ok(Holding {
        size: 1 + (j as u64 * 7919) % 1_000_000,
        hash: blake3::hash(name.as_bytes()),
        name: FileName::new(&name)?,
    })
}

/// A holding's line in an OFFER, as `protocol::index` writes it.
fn line(h: &Holding) -> Vec<u8> {
    format!("{} {} {}\n", h.size, h.hash, h.name.encode()).into_bytes()
}

/// The body of an OFFER of the list `lines` (sorted by name), and the
/// list's digest: BLAKE3 of the lines, cut to 16 bytes.
fn offer_body(lines: &[&[u8]]) -> anyhow::Result<(ListDigest, Vec<u8>)> {
    let mut hasher = blake3::Hasher::new();
    for l in lines {
        hasher.update(l);
    }
    let digest: ListDigest = hasher.finalize().to_hex()[..32].parse()?;
    let mut body = Vec::with_capacity(lines.len() * 90 + 100);
    for batch in lines.chunks(MAX_BATCH) {
        writeln!(body, "BATCH {}", batch.len())?;
        batch.iter().for_each(|l| body.extend_from_slice(l));
    }
    body.extend_from_slice(b"END\n");
    Ok((digest, body))
}

/// A whole OFFER from `port` of the list `lines`, signed by `peer` now,
/// and the list's digest.
fn offer(
    peer: &mut sign::Peer,
    port: u16,
    lines: &[&[u8]],
) -> anyhow::Result<(ListDigest, Vec<u8>)> {
    let (digest, body) = offer_body(lines)?;
    let mut request = peer.sign(&Request::Offer {
        port,
        digest,
        host: None,
    });
    request.extend_from_slice(&body);
    Ok((digest, request))
}

fn encode(request: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = request.write_to(&mut buf);
    buf
}

/// Where simulated peer `i` comes from and the port it names: the relay
/// keys peers by source address and port.
pub fn peer_addr(i: usize) -> (IpAddr, u16) {
    let ip = Ipv4Addr::new(127, 0, 1, 1 + (i % SOURCE_IPS) as u8);
    (IpAddr::V4(ip), (FIRST_PORT + i / SOURCE_IPS) as u16)
}

/// A rare file among `peers` simulated peers, each listening on its own
/// socket and offering its list from that socket's port; the one holder
/// serves the file, and `gets` real `peer-client get` processes fetch it.
pub fn rare_file(
    setup: &Setup,
    catalog: &Catalog,
    peers: usize,
    gets: usize,
) -> anyhow::Result<Vec<Row>> {
    let relay = setup.start_relay_with("rare", &["--ttl", "3600"])?;
    let mut content = vec![0u8; 100 * 1024];
    fastrand::fill(&mut content);
    let rare = Holding {
        name: FileName::new(RARE)?,
        size: content.len() as u64,
        hash: blake3::hash(&content),
    };
    let rare_line = line(&rare);
    let mut listeners = Vec::with_capacity(peers);
    for _ in 0..peers {
        listeners.push(TcpListener::bind("127.0.0.1:0").context("cannot listen for a peer")?);
    }
    let holder = fastrand::usize(..peers);
    eprintln!("rare file: {peers} peers offer their lists; peer {holder} also holds {RARE}");
    let mut buf = Vec::new();
    for (i, listener) in listeners.iter().enumerate() {
        let js = catalog.names_of(i);
        let mut lines = catalog.lines_of(&js);
        if i == holder {
            // "rare.bin" sorts after every "f..." name.
            lines.push(&rare_line);
        }
        let port = listener.local_addr()?.port();
        let (_, request) = offer(&mut sign::Peer::new(i as u64), port, &lines)?;
        load::exchange(relay.addr, &request, &mut buf)
            .with_context(|| format!("peer {i} could not offer its list"))?;
        let expect = format!("INDEXED {}\n", lines.len());
        ensure!(
            buf.starts_with(expect.as_bytes()),
            "peer {i}'s offer was answered {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    let serving = FakePeer::start(
        listeners.remove(holder),
        rare.clone(),
        content.clone(),
        sign::identity(holder as u64),
    )?;

    eprintln!("rare file: {gets} real `peer-client get {RARE}`, each next to a get of small.txt");
    let client = setup.bin("peer-client");
    let out = setup.work.join("rare.out");
    let (port, small_port) = (
        relay.addr.port().to_string(),
        setup.relay.addr.port().to_string(),
    );
    let (mut found, mut times, mut base_times) = (0, Vec::new(), Vec::new());
    let mut first_problem = None;
    for _ in 0..gets {
        let mut get = Command::new(&client);
        get.args(["127.0.0.1", &port, "get", RARE])
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(Stdio::null());
        match procs::timed(&mut get, "peer-client get", GET_LIMIT) {
            Ok(took) if fs::read(&out)? == content => {
                found += 1;
                times.push(took);
            }
            Ok(_) => {
                first_problem.get_or_insert_with(|| "wrong content".to_string());
            }
            Err(e) => {
                first_problem.get_or_insert_with(|| e.to_string());
            }
        }
        let mut small = Command::new(&client);
        small
            .args(["127.0.0.1", &small_port, "get", "small.txt"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        base_times.push(procs::timed(
            &mut small,
            "peer-client get small.txt",
            GET_LIMIT,
        )?);
    }
    let served = serving.stop();
    // Nobody should have asked the others: count what waits in their queues.
    let mut strays = 0;
    for listener in &listeners {
        listener.set_nonblocking(true)?;
        while strays < 10_000 && listener.accept().is_ok() {
            strays += 1;
        }
    }
    thread::sleep(Duration::from_millis(100));
    let log = fs::read_to_string(&relay.log).unwrap_or_default();
    let who = format!(" WHO {RARE:?} -> ");
    let asked = log.lines().filter(|l| l.contains(&who)).count();
    let named_one = log
        .lines()
        .filter(|l| l.contains(&format!("{who}1:")))
        .count();

    let problem = first_problem.map_or(String::new(), |p| format!("; first failure: {p}"));
    ensure!(!times.is_empty(), "no get of {RARE} succeeded{problem}");
    let (ours, base) = (median(&secs(&times)), median(&secs(&base_times)));
    let d = Duration::from_secs_f64;
    Ok(vec![
        Row::new(
            format!(
                "file held by 1 of {peers} peers: found by real `peer-client get`, content checked"
            ),
            format!(
                "{found}/{gets} found; WHO named the one holder {named_one}/{asked}; \
                 holder answered {served} requests (HEAD, RANGE), the other {} peers got {strays} connections{problem}",
                peers - 1
            ),
        )
        .target(format!("{gets}/{gets}"), found == gets && strays == 0),
        Row::new(
            format!(
                "  that `peer-client get` ({} KiB), whole process (median)",
                content.len() / 1024
            ),
            ms(d(ours)),
        )
        .baseline("get small.txt, relay with 1 peer", ms(d(base)))
        .ratio(ours / base),
    ])
}

/// The one holder of the rare file: serves it to whoever asks, in turn.
struct FakePeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FakePeer {
    fn start(
        listener: TcpListener,
        file: Holding,
        content: Vec<u8>,
        identity: protocol::identity::Identity,
    ) -> anyhow::Result<FakePeer> {
        let addr = listener.local_addr()?;
        // The BLAKE3 tree that RANGE's proofs come from, as a peer keeps it.
        let outboard = proof::outboard(&content[..], file.size)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        if serve(&stream, &file, &content, &outboard, &identity).unwrap_or(false) {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Ok(FakePeer {
            addr,
            stop,
            served,
            thread: Some(thread),
        })
    }

    /// Stops serving; returns how many requests it answered.
    fn stop(mut self) -> u64 {
        self.end();
        self.served.load(Ordering::Relaxed)
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The blocked accept needs a connection to notice the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.end();
    }
}

/// Answers one HEAD, RANGE (with its proof) or GET of `file` as a peer
/// does; anything else is not found. True when it was answered.
fn serve(
    stream: &TcpStream,
    file: &Holding,
    content: &[u8],
    outboard: &proof::Outboard,
    identity: &protocol::identity::Identity,
) -> io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let request = peer::Request::read_from(&mut BufReader::new(stream));
    let mut out = stream;
    let header = peer::Response::File(peer::FileHeader {
        size: file.size,
        hash: file.hash,
    });
    match request {
        Ok(Some(peer::Request::Head { name, nonce })) if name == file.name => {
            // With a nonce, proved by the key the relay knows this peer by,
            // as a real peer does.
            match nonce {
                Some(nonce) => peer::Response::Vouched {
                    header: peer::FileHeader {
                        size: file.size,
                        hash: file.hash,
                    },
                    key: identity.key(),
                    sig: identity.sign(&protocol::identity::file_message(
                        &nonce,
                        &name.encode(),
                        file.size,
                        &file.hash,
                    )),
                }
                .write_to(&mut out)?,
                None => header.write_to(&mut out)?,
            }
            return Ok(true);
        }
        Ok(Some(peer::Request::Get { name, offset })) if name == file.name => {
            if let Some(rest) = usize::try_from(offset).ok().and_then(|o| content.get(o..)) {
                header.write_to(&mut out)?;
                out.write_all(rest)?;
                return Ok(true);
            }
        }
        Ok(Some(peer::Request::Range {
            name,
            hash,
            start,
            end,
        })) if name == file.name
            && hash == file.hash
            && proof::check_range(file.size, start, end).is_ok() =>
        {
            let mut head = Vec::new();
            peer::Response::Range(peer::RangeHeader {
                size: file.size,
                hash: file.hash,
                proof: proof::proof_len(file.size, start, end),
            })
            .write_to(&mut head)?;
            proof::encode_proof(outboard, start, end, &mut head)?;
            out.write_all(&head)?;
            out.write_all(&content[start as usize..end as usize])?;
            return Ok(true);
        }
        _ => {}
    }
    let reply = ErrorReply::new(ErrorCode::NotFound, "not held here");
    peer::Response::Error(reply).write_to(&mut out)?;
    Ok(false)
}

/// A relay indexing `peers` peers × the catalog's files each.
pub fn big_index(setup: &Setup, catalog: &Catalog, peers: usize) -> anyhow::Result<Vec<Row>> {
    ensure!(
        FIRST_PORT + peers / SOURCE_IPS < 65_536,
        "at most {} simulated peers",
        (65_536 - FIRST_PORT) * SOURCE_IPS
    );
    ensure!(catalog.names > BIG_LIST, "the big list needs more names");
    let holdings = peers * catalog.files;
    let (max_peers, max_holdings) = ((peers + 1000).to_string(), (holdings * 2).to_string());
    let max_files = catalog.files.max(BIG_LIST).to_string();
    let relay = setup.start_relay_with(
        "index",
        &[
            "--ttl",
            "3600",
            "--max-registered",
            &max_peers,
            "--max-holdings",
            &max_holdings,
            "--max-files-per-peer",
            &max_files,
        ],
    )?;
    let empty_rss = procs::vm_kib(relay.pid(), "VmRSS").context("relay is gone")?;

    eprintln!("index: baselines on the empty relay");
    let empty_who = who_times(&relay, catalog, 0)?;
    let empty_reannounce = reannounce(&relay, catalog)?;

    eprintln!(
        "index: {peers} peers offer {} files each, {LOADERS} threads",
        catalog.files
    );
    let cpu_before = procs::cpu_secs(relay.pid()).unwrap_or(0.0);
    let log_before = log_len(&relay.log);
    let t0 = Instant::now();
    let loaded = load_peers(relay.addr, catalog, peers)?;
    let load_secs = t0.elapsed().as_secs_f64();
    let load_cpu = procs::cpu_secs(relay.pid()).unwrap_or(0.0) - cpu_before;
    ensure!(
        loaded.ok == peers as u64,
        "only {} of {peers} offers were indexed ({} refused, {} failed; first: {:?} {:?})",
        loaded.ok,
        loaded.refused,
        loaded.failed,
        loaded.first_refusal,
        loaded.first_failure
    );
    thread::sleep(Duration::from_millis(200));
    let offer_times = server_times(&relay.log, log_before, |l| {
        l.contains(" OFFER ") && l.contains(" files indexed")
    })?;
    let counts = stats(relay.addr)?;
    let (live, held, names) = (
        stat(&counts, "peers_live"),
        stat(&counts, "holdings"),
        stat(&counts, "names_indexed"),
    );
    ensure!(
        (live, held, names) == (peers as u64, holdings as u64, catalog.names as u64),
        "the relay holds {live} peers, {held} holdings, {names} names"
    );
    let loaded_rss = procs::vm_kib(relay.pid(), "VmRSS").context("relay is gone")?;
    let loaded_peak = procs::vm_kib(relay.pid(), "VmHWM").context("relay is gone")?;

    eprintln!("index: lookups, heartbeats and re-announcements at {holdings} holdings");
    let who = who_times(&relay, catalog, catalog.holders_each(peers))?;
    let beats = heartbeats(&relay, catalog, peers)?;
    let big_reannounce = reannounce(&relay, catalog)?;

    eprintln!("index: `peer-client ls` over {} names", catalog.names);
    let client = setup.bin("peer-client");
    let log_before = log_len(&relay.log);
    let (ls_kib, ls_time) = ls_peak(&client, relay.addr, &setup.work)?;
    thread::sleep(Duration::from_millis(200));
    let (pages, listed) = ls_pages(&relay.log, log_before);
    let page_times = server_times(&relay.log, log_before, |l| l.contains(" LS \"**\" -> "))?;
    let (base_kib, base_time) = ls_peak(&client, setup.relay.addr, &setup.work)?;
    let final_peak = procs::vm_kib(relay.pid(), "VmHWM").context("relay is gone")?;

    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let p = |t: &[Duration], q| percentile(t, q);
    let per_holding = (loaded_peak.saturating_sub(empty_rss) * 1024) as f64 / holdings as f64;
    let size = format!("{peers} peers × {} files", catalog.files);
    let (announce50, register50) = (p(&beats.announce, 50.0), p(&beats.register, 50.0));
    let beat_ratio = announce50.as_secs_f64() / register50.as_secs_f64().max(1e-9);
    let (re_mid, re_max) = (
        median(&secs(&big_reannounce)),
        big_reannounce.iter().max().copied().unwrap_or_default(),
    );
    let re_base = median(&secs(&empty_reannounce));
    let d = Duration::from_secs_f64;
    Ok(vec![
        Row::new(
            format!("index, {size} ({holdings} holdings, {} names): relay RSS after loading (peak)", catalog.names),
            format!("{} ({} now; {per_holding:.0} B per holding over empty)", mib(loaded_peak), mib(loaded_rss)),
        )
        .baseline("same relay, empty", mib(empty_rss))
        .ratio(loaded_peak as f64 / empty_rss as f64)
        .target("< 1 GiB", loaded_peak < 1 << 20),
        Row::new("  the aim: about 50 B per holding", format!("{per_holding:.0} B"))
            .target("<= 512 MiB", loaded_peak <= 512 << 10),
        Row::new(
            "  relay peak RSS after everything below (ls included)",
            mib(final_peak),
        ),
        Row::new(
            format!("who-holds (WHO, random name, {} holders): server time p50 / p99", catalog.holders_each(peers)),
            format!("{} / {}", us(p(&who, 50.0)), us(p(&who, 99.0))),
        )
        .baseline(
            "WHO on the same relay, empty",
            format!("{} / {}", us(p(&empty_who, 50.0)), us(p(&empty_who, 99.0))),
        )
        .ratio(p(&who, 99.0).as_secs_f64() / p(&empty_who, 99.0).as_secs_f64().max(1e-9))
        .target("p99 < 1 ms", p(&who, 99.0) < Duration::from_millis(1)),
        Row::new(
            format!("re-announcing {BIG_LIST} files (ANNOUNCE + OFFER): relay time, median / max of {REANNOUNCES}"),
            format!("{} / {}", ms(d(re_mid)), ms(re_max)),
        )
        .baseline("same, relay with an empty index", ms(d(re_base)))
        .ratio(re_mid / re_base)
        .target("< 50 ms", d(re_mid) < Duration::from_millis(50)),
        Row::new(
            "heartbeat, unchanged digest (ANNOUNCE): server time p50 / p99",
            format!("{} / {}", us(announce50), us(p(&beats.announce, 99.0))),
        )
        .baseline(
            "REGISTER, same relay, alternating",
            format!("{} / {}", us(register50), us(p(&beats.register, 99.0))),
        )
        .ratio(beat_ratio)
        .target("<= 1.2x REGISTER", beat_ratio <= 1.2),
        Row::new(
            "  heartbeat round trip, client side (median)",
            ms(d(median(&secs(&beats.announce_rtt)))),
        )
        .baseline("REGISTER", ms(d(median(&secs(&beats.register_rtt)))))
        .ratio(median(&secs(&beats.announce_rtt)) / median(&secs(&beats.register_rtt))),
        Row::new(
            format!("`peer-client ls` over {} names: client peak RSS", catalog.names),
            mib(ls_kib),
        )
        .baseline("same ls, relay with 1 peer", mib(base_kib))
        .ratio(ls_kib as f64 / base_kib as f64)
        .target("< 64 MiB", ls_kib < 64 << 10),
        Row::new(
            "  that ls: wall time, lines the relay sent, LS server time per page p50",
            format!(
                "{:.2} s, {listed} lines in {pages} pages, {}",
                ls_time.as_secs_f64(),
                us(p(&page_times, 50.0))
            ),
        )
        .baseline("relay with 1 peer", format!("{:.3} s", base_time.as_secs_f64()))
        .target(format!("{} lines", catalog.names), listed == catalog.names),
        Row::new(
            format!("loading {size}, {LOADERS} threads"),
            format!(
                "{:.0} offers/s; relay CPU {:.0} µs per offer; OFFER server time p50 {}",
                peers as f64 / load_secs,
                load_cpu * 1e6 / peers as f64,
                us(p(&offer_times, 50.0))
            ),
        ),
    ])
}

/// Sends every peer's OFFER from `LOADERS` threads; peer `i` from its own
/// address and port.
pub fn load_peers(relay: SocketAddr, catalog: &Catalog, peers: usize) -> anyhow::Result<Load> {
    let deadline = Instant::now() + LOAD_LIMIT;
    let expect = format!("INDEXED {}\n", catalog.files);
    let loads = thread::scope(|scope| {
        let workers: Vec<_> = (0..LOADERS)
            .map(|t| {
                let expect = &expect;
                scope.spawn(move || -> anyhow::Result<Load> {
                    let (mut load, mut buf) = (Load::default(), Vec::new());
                    for i in (t..peers).step_by(LOADERS) {
                        if Instant::now() > deadline {
                            break;
                        }
                        let (ip, port) = peer_addr(i);
                        // Signed just before it is sent, as a peer does.
                        let (_, request) = offer(
                            &mut sign::Peer::new(i as u64),
                            port,
                            &catalog.lines_of(&catalog.names_of(i)),
                        )?;
                        let started = Instant::now();
                        let result = load::exchange_from(ip, relay, &request, &mut buf);
                        load.record(started, result, &buf, expect);
                    }
                    Ok(load)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| bail!("a loader thread panicked"))
            })
            .collect::<Vec<_>>()
    });
    let mut total = Load::default();
    for load in loads {
        total.merge(load?);
    }
    Ok(total)
}

/// Server times of `SEQUENTIAL` WHOs for random names, each answered with
/// `holders` holders.
fn who_times(relay: &Server, catalog: &Catalog, holders: usize) -> anyhow::Result<Vec<Duration>> {
    let before = log_len(&relay.log);
    let expect = format!("HOLDERS {}\n", holders.min(50));
    let mut buf = Vec::new();
    for _ in 0..SEQUENTIAL {
        let name = holding(fastrand::usize(..catalog.names))?.name;
        load::exchange(relay.addr, &encode(&Request::Who { name }), &mut buf)?;
        ensure!(
            buf.starts_with(expect.as_bytes()),
            "WHO was answered {:?}, not {expect:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(80)])
        );
    }
    // The relay logs after replying: give the last line time to land.
    thread::sleep(Duration::from_millis(100));
    server_times(&relay.log, before, |l| l.contains(" WHO \""))
}

struct Heartbeats {
    register: Vec<Duration>,
    announce: Vec<Duration>,
    register_rtt: Vec<Duration>,
    announce_rtt: Vec<Duration>,
}

/// REGISTER and ANNOUNCE with an unchanged digest from random loaded
/// peers, alternating which goes first.
fn heartbeats(relay: &Server, catalog: &Catalog, peers: usize) -> anyhow::Result<Heartbeats> {
    let before = log_len(&relay.log);
    let (mut register_rtt, mut announce_rtt) = (Vec::new(), Vec::new());
    let mut buf = Vec::new();
    // Keys picked twice keep their last time.
    let mut signers = std::collections::HashMap::new();
    for n in 0..SEQUENTIAL / 2 {
        let i = fastrand::usize(..peers);
        let (ip, port) = peer_addr(i);
        let (digest, _) = offer_body(&catalog.lines_of(&catalog.names_of(i)))?;
        let signer = signers
            .entry(i)
            .or_insert_with(|| sign::Peer::new(i as u64));
        for first in [n % 2 == 0, n % 2 == 1] {
            // Signed just before it is sent, so that its time is later
            // than the other's.
            let request = if first {
                signer.sign(&Request::Register { port, host: None })
            } else {
                signer.sign(&Request::Announce {
                    port,
                    digest,
                    host: None,
                })
            };
            let t0 = Instant::now();
            load::exchange_from(ip, relay.addr, &request, &mut buf)?;
            let took = t0.elapsed();
            ensure!(
                buf.starts_with(b"REGISTERED "),
                "a heartbeat was answered {:?}",
                String::from_utf8_lossy(&buf)
            );
            if first {
                register_rtt.push(took);
            } else {
                announce_rtt.push(took);
            }
        }
    }
    thread::sleep(Duration::from_millis(100));
    Ok(Heartbeats {
        register: server_times(&relay.log, before, |l| {
            l.contains(" REGISTER 127.0.1.") && l.contains(" refreshed:")
        })?,
        announce: server_times(&relay.log, before, |l| l.contains(", list unchanged:"))?,
        register_rtt,
        announce_rtt,
    })
}

/// Relay time of re-announcing a list of `BIG_LIST` files that changed
/// (one name gone, one new): ANNOUNCE, answered SEND-LIST, then the whole
/// OFFER, as a peer does. Two lists alternate; the peer leaves after.
fn reannounce(relay: &Server, catalog: &Catalog) -> anyhow::Result<Vec<Duration>> {
    let lists: Vec<Vec<usize>> = vec![(0..BIG_LIST).collect(), (1..=BIG_LIST).collect()];
    // The bodies are built once; each request line is signed as it is sent.
    let bodies = lists
        .iter()
        .map(|js| offer_body(&catalog.lines_of(js)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut peer = sign::Peer::new(BIG_PEER_KEY);
    let offer = |peer: &mut sign::Peer, n: usize| {
        let (digest, body) = &bodies[n % 2];
        let mut request = peer.sign(&Request::Offer {
            port: BIG_PEER_PORT,
            digest: *digest,
            host: None,
        });
        request.extend_from_slice(body);
        request
    };
    let ip = IpAddr::V4(BIG_PEER);
    let indexed = format!("INDEXED {BIG_LIST}\n");
    let mut buf = Vec::new();
    let mut send = |request: &[u8], expect: &str| -> anyhow::Result<()> {
        load::exchange_from(ip, relay.addr, request, &mut buf)?;
        ensure!(
            buf.starts_with(expect.as_bytes()),
            "expected {expect:?}, got {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(())
    };
    // The first list is new to the relay; only the changes after it count.
    send(&offer(&mut peer, 1), &indexed)?;
    // Its log line lands after the reply.
    thread::sleep(Duration::from_millis(100));
    let before = log_len(&relay.log);
    for n in 0..REANNOUNCES {
        let announce = peer.sign(&Request::Announce {
            port: BIG_PEER_PORT,
            digest: bodies[n % 2].0,
            host: None,
        });
        send(&announce, "SEND-LIST ")?;
        send(&offer(&mut peer, n), &indexed)?;
    }
    thread::sleep(Duration::from_millis(100));
    let me = format!("{BIG_PEER}:{BIG_PEER_PORT}");
    let announces = server_times(&relay.log, before, |l| {
        l.contains(&format!(" ANNOUNCE {me} "))
    })?;
    let offers = server_times(&relay.log, before, |l| {
        l.contains(&format!(" OFFER {me}: "))
    })?;
    ensure!(
        announces.len() == REANNOUNCES && offers.len() == REANNOUNCES,
        "found {} ANNOUNCEs and {} OFFERs of {REANNOUNCES} in the log",
        announces.len(),
        offers.len()
    );
    let unregister = peer.sign(&Request::Unregister {
        port: BIG_PEER_PORT,
        host: None,
    });
    send(&unregister, "UNREGISTERED")?;
    Ok(announces
        .iter()
        .zip(&offers)
        .map(|(a, o)| *a + *o)
        .collect())
}

/// Peak RSS (KiB, from GNU time) and wall time of a whole `peer-client
/// ls` against `relay`, stdout to /dev/null.
fn ls_peak(client: &Path, relay: SocketAddr, work: &Path) -> anyhow::Result<(u64, Duration)> {
    let report = work.join("ls.time");
    let mut ls = Command::new("/usr/bin/time");
    ls.args(["-f", "maxrss_kib %M"])
        .arg(client)
        .args(["127.0.0.1", &relay.port().to_string(), "ls"])
        .stdin(Stdio::null())
        .stdout(File::create("/dev/null")?)
        .stderr(File::create(&report)?);
    let took = procs::timed(&mut ls, "peer-client ls", Duration::from_secs(120))?;
    let text = fs::read_to_string(&report)?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kib ")?.trim().parse().ok())
        .with_context(|| format!("no peak RSS in the output of /usr/bin/time: {text:?}"))?;
    Ok((kib, took))
}

/// Pages of `LS "**"` the relay answered since byte `from` of its log,
/// and the lines they held.
fn ls_pages(log: &Path, from: usize) -> (usize, usize) {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
    let counts: Vec<usize> = text
        .lines()
        .filter_map(|l| {
            l.split_once(" LS \"**\" -> ")?
                .1
                .split_once(':')?
                .0
                .parse()
                .ok()
        })
        .collect();
    (counts.len(), counts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_held_equally_and_offers_match_the_protocol() {
        let catalog = Catalog::new(1000, 10).unwrap();
        let mut held = vec![0; 1000];
        for i in 0..500 {
            let js = catalog.names_of(i);
            assert_eq!(js.len(), 10);
            js.iter().for_each(|&j| held[j] += 1);
        }
        assert!(held.iter().all(|&n| n == catalog.holders_each(500)));
    }

    #[test]
    fn peers_have_distinct_addresses() {
        let addrs: std::collections::HashSet<_> = (0..100_000).map(peer_addr).collect();
        assert_eq!(addrs.len(), 100_000);
    }
}
