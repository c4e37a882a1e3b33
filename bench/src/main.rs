//! `bench`: builds relay-p2p in release mode, runs a relay and a peer on
//! loopback, and measures them against baselines taken in the same run
//! (socat, cat, a trivial one-line TCP server). Prints a Markdown table for
//! BENCHMARKS.md. See `cargo run --release -p bench -- --help`.
#![forbid(unsafe_code)]

mod index;
mod load;
mod multi;
mod procs;
mod relay;
mod report;
mod shared;
mod sign;
mod small;
mod transfer;

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use crate::procs::Server;

/// Measures relay-p2p on loopback against baselines taken in the same run.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Figures to measure (all by default)
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Figure>,
    /// Size of the transferred file, in MiB
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Transfers of each kind (ours and baseline alternate)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Runs of the small-file fetch
    #[arg(long, default_value_t = 200)]
    small_runs: usize,
    /// Concurrent lookup clients
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of each lookup load run
    #[arg(long, default_value_t = 2)]
    lookup_secs: u64,
    /// Lookup load runs of each kind (relay and trivial server alternate)
    #[arg(long, default_value_t = 3)]
    lookup_rounds: usize,
    /// Simulated peers registering at once
    #[arg(long, default_value_t = 10_000)]
    herd: usize,
    /// Peers in the big registry
    #[arg(long, default_value_t = 100_000)]
    registry: usize,
    /// Simulated peers offering their lists to the indexing relay
    #[arg(long, default_value_t = 100_000)]
    index_peers: usize,
    /// Files each simulated peer holds
    #[arg(long, default_value_t = 100)]
    index_files: usize,
    /// Distinct names among them
    #[arg(long, default_value_t = 1_000_000)]
    index_names: usize,
    /// Peers among which one holds the rare file
    #[arg(long, default_value_t = 1000)]
    rare_peers: usize,
    /// Real `peer-client get`s of the rare file
    #[arg(long, default_value_t = 100)]
    rare_gets: usize,
    /// Use the binaries already built in this folder instead of building
    #[arg(long, default_value_t = 100_000)]
    shared_peers: usize,
    #[arg(long, default_value_t = 10)]
    shared_files: usize,
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// A relay-server built from before the relay wanted signatures (commit
    /// 425e74b): lookups and registrations are then also measured on it, in
    /// the same run, with unsigned requests
    #[arg(long)]
    relay_before_signing: Option<PathBuf>,
    /// Another peer-client (an earlier build): its `get -o` is then also
    /// timed in the transfer figures, alternating with ours in the same run
    #[arg(long)]
    client_before: Option<PathBuf>,
    /// Where the test files go (a temporary folder inside it, removed after)
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Figure {
    Transfer,
    Multi,
    Small,
    Lookups,
    Registration,
    Registry,
    Rare,
    Index,
    Signing,
    Shared,
}

/// What every figure needs: the binaries, a work folder, and a relay with
/// one peer serving `big.bin` and `small.txt`.
pub struct Setup {
    bins: PathBuf,
    work: PathBuf,
    served: PathBuf,
    relay: Server,
    peer: Server,
    relay_before_signing: Option<PathBuf>,
    client_before: Option<PathBuf>,
}

impl Setup {
    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// A fresh relay on 127.0.0.1, default settings, logging to `NAME.log`.
    fn start_relay(&self, name: &str) -> anyhow::Result<Server> {
        self.start_relay_with(name, &[])
    }

    /// A fresh relay on 127.0.0.1 with `extra` settings.
    fn start_relay_with(&self, name: &str, extra: &[&str]) -> anyhow::Result<Server> {
        let mut args = vec!["0", "--bind", "127.0.0.1"];
        args.extend_from_slice(extra);
        Server::start(
            &self.bin("relay-server"),
            &args,
            self.work.join(format!("relay-{name}.log")),
        )
    }

    /// The relay from before signing, when given, as `start_relay` starts ours.
    fn start_relay_before_signing(&self, name: &str) -> anyhow::Result<Option<Server>> {
        let Some(bin) = &self.relay_before_signing else {
            return Ok(None);
        };
        let log = self.work.join(format!("relay-before-signing-{name}.log"));
        Server::start(bin, &["0", "--bind", "127.0.0.1"], log).map(Some)
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        bail!("the harness measures in release mode: run it as cargo run --release -p bench");
    }
    check_tools()?;
    let bins = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => build()?,
    };
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("relay-p2p-bench.")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a folder in {}", base.display()))?;
    let served = work.path().join("served");
    fs::create_dir(&served)?;
    let wants = |f| args.only.is_empty() || args.only.contains(&f);
    let size = if wants(Figure::Transfer) || wants(Figure::Multi) {
        args.size_mib
    } else {
        1
    };
    eprintln!("writing a {size} MiB test file in {}", served.display());
    write_file(&served.join("big.bin"), size << 20)?;
    fs::write(
        served.join("small.txt"),
        "a small file, fetched end to end\n",
    )?;

    let relay = Server::start(
        &bins.join("relay-server"),
        &["0", "--bind", "127.0.0.1"],
        work.path().join("relay.log"),
    )?;
    let relay_port = relay.addr.port().to_string();
    let served_str = served.to_str().context("work path is not UTF-8")?;
    let peer = Server::start(
        &bins.join("peer-node"),
        &[
            "127.0.0.1",
            &relay_port,
            "--dir",
            served_str,
            "--bind",
            "127.0.0.1",
        ],
        work.path().join("peer.log"),
    )?;
    let setup = Setup {
        bins,
        work: work.path().to_path_buf(),
        served,
        relay,
        peer,
        relay_before_signing: args.relay_before_signing.clone(),
        client_before: args.client_before.clone(),
    };
    wait_registered(&setup)?;

    let mut rows = Vec::new();
    if wants(Figure::Transfer) {
        rows.extend(transfer::run(&setup, args.runs)?);
    }
    if wants(Figure::Multi) {
        rows.extend(multi::run(&setup, args.runs)?);
    }
    if wants(Figure::Small) {
        rows.extend(small::run(&setup, args.small_runs)?);
    }
    let costs = if wants(Figure::Signing) || wants(Figure::Registry) {
        eprintln!("signing: Ed25519 on one core");
        let costs = sign::costs(Duration::from_secs(1));
        if wants(Figure::Signing) {
            rows.extend(sign::rows(&costs));
        }
        Some(costs)
    } else {
        None
    };
    let mut small_registry_times = Vec::new();
    if wants(Figure::Lookups) || wants(Figure::Registry) {
        let lookups = relay::lookups(&setup, args.clients, args.lookup_secs, args.lookup_rounds)?;
        if wants(Figure::Lookups) {
            rows.extend(lookups.rows);
        }
        small_registry_times = lookups.server_times;
    }
    if wants(Figure::Registration) {
        rows.extend(relay::registration(&setup, args.herd, 3)?);
    }
    if let (true, Some(costs)) = (wants(Figure::Registry), &costs) {
        rows.extend(relay::big_registry(
            &setup,
            args.registry,
            args.clients,
            args.lookup_secs,
            &small_registry_times,
            costs,
        )?);
    }

    if wants(Figure::Rare) || wants(Figure::Index) {
        let catalog = index::Catalog::new(args.index_names, args.index_files)?;
        if wants(Figure::Rare) {
            rows.extend(index::rare_file(
                &setup,
                &catalog,
                args.rare_peers,
                args.rare_gets,
            )?);
        }
        if wants(Figure::Index) {
            rows.extend(index::big_index(&setup, &catalog, args.index_peers)?);
        }
    }

    if wants(Figure::Shared) {
        let catalog = index::Catalog::new(args.shared_peers.max(1000) + 1, args.shared_files)?;
        let sizes = shared::Sizes {
            peers: args.shared_peers,
            clients: args.clients,
            secs: args.lookup_secs,
            rounds: args.lookup_rounds,
        };
        rows.extend(shared::run(&setup, &catalog, &sizes)?);
    }

    println!("{}", machine());
    println!("{}", report::table(&rows));
    Ok(())
}

/// The external tools the baselines need, with how to get them.
fn check_tools() -> anyhow::Result<()> {
    if !Path::new("/proc/self/status").exists() {
        bail!("the harness reads /proc (Linux only)");
    }
    let mut missing = Vec::new();
    for (tool, probe, package) in [
        ("socat", "-V", "socat"),
        ("cat", "--version", "coreutils"),
        // Peak RSS of `peer-client ls`.
        ("/usr/bin/time", "--version", "time"),
    ] {
        let found = Command::new(tool)
            .arg(probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            missing.push(format!(
                "{tool} (install it with: apt-get install {package})"
            ));
        }
    }
    if !missing.is_empty() {
        bail!("missing tools for the baselines: {}", missing.join(", "));
    }
    Ok(())
}

/// Builds the three binaries in release mode; returns the folder they are in.
fn build() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("bench has no parent folder")?;
    eprintln!("building relay-server, peer-node and peer-client in release mode");
    let status = Command::new(cargo)
        .current_dir(root)
        // The root package builds the three binaries.
        .args(["build", "--release", "-p", "relay-p2p", "--bins"])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    // This harness runs from the same target folder, release profile.
    let exe = std::env::current_exe().context("cannot find the harness binary")?;
    let dir = exe
        .parent()
        .context("harness binary has no folder")?
        .to_path_buf();
    for name in ["relay-server", "peer-node", "peer-client"] {
        if !dir.join(name).exists() {
            bail!(
                "{name} is not in {} after the build; pass --bin-dir",
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Writes `len` bytes of random content, 1 MiB at a time.
fn write_file(path: &Path, len: u64) -> anyhow::Result<()> {
    let mut out =
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut block = vec![0u8; 1 << 20];
    fastrand::fill(&mut block);
    let mut left = len;
    while left > 0 {
        // Vary each block so the content does not repeat.
        block[..8].copy_from_slice(&left.to_le_bytes());
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Waits until the relay's index names the peer as holder of both test
/// files: `peer-client get` asks the index, and the peer announces a big
/// file only once it has hashed it.
fn wait_registered(setup: &Setup) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = Vec::new();
    let mut held = |name: &str| {
        let request = format!("RP2P/1 WHO {name}\n");
        load::exchange(setup.relay.addr, request.as_bytes(), &mut buf).is_ok()
            && buf.starts_with(b"HOLDERS 1\n")
    };
    while Instant::now() < deadline {
        if held("big.bin") && held("small.txt") {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("the relay's index does not name the peer as holder of big.bin and small.txt")
}

/// A header naming the machine, for BENCHMARKS.md.
fn machine() -> String {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim())
        })
        .unwrap_or("unknown CPU");
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    format!(
        "machine: {cpu}, {cores} cores, {:.0} GiB, Linux {}\ncommand: {}\n",
        mem_kib as f64 / (1 << 20) as f64,
        read("/proc/sys/kernel/osrelease").trim(),
        std::env::args().skip(1).fold(
            "cargo run --release -p bench --".to_string(),
            |cmd, arg| cmd + " " + &arg
        )
    )
}
