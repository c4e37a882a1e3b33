//! The 1 GiB transfer: to stdout against socat, to disk against cat, and the
//! peak memory of both ends.

use std::{
    fs::{self, File},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;

use crate::{
    procs::{self, Guard, PeakWatch},
    report::{median, mib, Row},
    Setup,
};

/// Longest any one transfer may take.
const LIMIT: Duration = Duration::from_secs(300);

/// Gives the next run that writes the file into the page cache memory the
/// guest freed a moment ago: two copies of the file written and removed.
///
/// On a VM whose guest hands freed memory back to the host (virtio-balloon
/// free page reporting, as on the machine of BENCHMARKS.md) the cost of
/// that write depends on where the pages come from, by up to ten times:
/// `dd` of the file took 0.27 s into memory just freed, 2.0-2.8 s into
/// memory given back, which the host must supply again page by page; and
/// which one a run gets changes with what ran before. So every run that
/// writes to disk, ours and the baselines', starts from this state, the
/// one a machine without that reporting is always in. Two copies: after
/// one, `dd` found freed memory every other time only.
fn recycle_memory(big: &Path, scratch: &Path) -> anyhow::Result<()> {
    let second = scratch.with_extension("2");
    for copy in [scratch, &second] {
        fs::copy(big, copy).context("cannot copy the test file")?;
    }
    for copy in [scratch, &second] {
        fs::remove_file(copy).context("cannot remove a scratch copy")?;
    }
    Ok(())
}

pub fn run(setup: &Setup, runs: usize) -> anyhow::Result<Vec<Row>> {
    let big = setup.served.join("big.bin");
    let size_mib = fs::metadata(&big)?.len() as f64 / (1 << 20) as f64;
    let client_out = setup.work.join("client.bin");
    let cat_out = setup.work.join("cat.bin");
    let scratch = setup.work.join("scratch.bin");
    let client_log = setup.work.join("client.log");
    let client_of = |bin: &Path, extra: &[&str]| -> anyhow::Result<Command> {
        let mut cmd = Command::new(bin);
        cmd.args([
            "127.0.0.1",
            &setup.relay.addr.port().to_string(),
            "get",
            "big.bin",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(File::create("/dev/null")?)
        .stderr(File::create(&client_log)?);
        Ok(cmd)
    };
    let client = |extra: &[&str]| client_of(&setup.bin("peer-client"), extra);

    // The peer hashes a file on its first request only, and the page cache
    // should hold the file for everyone: warm both up, untimed.
    eprintln!("transfer: warming up");
    procs::timed(&mut client(&[])?, "peer-client", LIMIT)?;
    procs::timed(
        Command::new("cat")
            .arg(&big)
            .stdout(File::create("/dev/null")?),
        "cat",
        LIMIT,
    )?;

    let (mut ours_out, mut socat, mut ours_disk, mut cat) = (vec![], vec![], vec![], vec![]);
    let (mut socat_disk, mut socat_big, mut before_disk) = (vec![], vec![], vec![]);
    let (mut client_peak, mut recv_peak, mut send_peak) = (0, 0, 0);
    for run in 1..=runs {
        eprintln!("transfer: run {run} of {runs}");
        let mut cmd = client(&[])?;
        let (wall, peak) = timed_with_peak(&mut cmd, "peer-client")?;
        ours_out.push(wall.as_secs_f64());
        client_peak = client_peak.max(peak);

        let (wall, recv, send) = socat_once(&big, None, None)?;
        socat.push(wall.as_secs_f64());
        (recv_peak, send_peak) = (recv_peak.max(recv), send_peak.max(send));

        let (wall, _, _) = socat_once(&big, None, Some(RAW_BUFFER))?;
        socat_big.push(wall.as_secs_f64());

        let out = client_out.to_str().context("work path is not UTF-8")?;
        recycle_memory(&big, &scratch)?;
        let (wall, peak) = timed_with_peak(&mut client(&["-o", out])?, "peer-client -o")?;
        ours_disk.push(wall.as_secs_f64());
        client_peak = client_peak.max(peak);
        fs::remove_file(&client_out).context("cannot remove the client's copy")?;

        if let Some(before) = &setup.client_before {
            recycle_memory(&big, &scratch)?;
            let mut cmd = client_of(before, &["-o", out])?;
            let (wall, _) = timed_with_peak(&mut cmd, "peer-client (before) -o")?;
            before_disk.push(wall.as_secs_f64());
            fs::remove_file(&client_out).context("cannot remove the client's copy")?;
        }

        recycle_memory(&big, &scratch)?;
        let wall = procs::timed(
            Command::new("cat")
                .arg(&big)
                .stdout(File::create(&cat_out)?),
            "cat",
            LIMIT,
        )?;
        cat.push(wall.as_secs_f64());
        fs::remove_file(&cat_out).context("cannot remove cat's copy")?;

        recycle_memory(&big, &scratch)?;
        let (wall, _, _) = socat_once(&big, Some(&cat_out), Some(RAW_BUFFER))?;
        socat_disk.push(wall.as_secs_f64());
        fs::remove_file(&cat_out).context("cannot remove socat's copy")?;
        // Each run's times, so that the spread behind a median can be seen.
        let last = |v: &[f64]| v.last().map_or(String::from("-"), |s| format!("{s:.3}"));
        eprintln!(
            "transfer: run {run}: stdout {} s (socat {} s), -o {} s (socat {} s{}), cat {} s",
            last(&ours_out),
            last(&socat_big),
            last(&ours_disk),
            last(&socat_disk),
            if before_disk.is_empty() {
                String::new()
            } else {
                format!(", before {} s", last(&before_disk))
            },
            last(&cat),
        );
    }
    let peer_peak = procs::vm_kib(setup.peer.pid(), "VmHWM").context("peer is gone")?;

    // Ratios pair by pair, so that drift of the machine's speed cancels.
    let ratio = |ours: &[f64], base: &[f64]| {
        median(
            &ours
                .iter()
                .zip(base)
                .map(|(o, b)| b / o)
                .collect::<Vec<_>>(),
        )
    };
    let rate = |secs: &[f64]| format!("{:.0} MiB/s", size_mib / median(secs));
    let (r_out, r_disk) = (ratio(&ours_out, &socat_big), ratio(&ours_disk, &cat));
    let r_socat_small = ratio(&ours_out, &socat);
    let r_socat_disk = ratio(&ours_disk, &socat_disk);
    let limit = 32 * 1024;
    let socat_disk_name = "socat -b 1 MiB, file -> TCP -> file";
    let mut rows = vec![
        Row::new(
            format!("{size_mib:.0} MiB peer -> client stdout (/dev/null)"),
            rate(&ours_out),
        )
        .baseline("socat -b 1 MiB, file -> TCP -> /dev/null", rate(&socat_big))
        .ratio(r_out)
        .target(">= 0.90", r_out >= 0.9),
        Row::new(
            format!("{size_mib:.0} MiB peer -> client stdout (/dev/null)"),
            rate(&ours_out),
        )
        .baseline("socat with its default 8 KiB buffer", rate(&socat))
        .ratio(r_socat_small),
        Row::new(
            format!("{size_mib:.0} MiB peer -> client -o file"),
            rate(&ours_disk),
        )
        .baseline("cat file > dest", rate(&cat))
        .ratio(r_disk),
        // cat copies inside the kernel (copy_file_range); this baseline
        // takes the same path as the client: TCP in, written to a file.
        Row::new(
            format!("{size_mib:.0} MiB peer -> client -o file"),
            rate(&ours_disk),
        )
        .baseline(socat_disk_name, rate(&socat_disk))
        .ratio(r_socat_disk)
        .target(">= 0.80", r_socat_disk >= 0.8),
    ];
    if !before_disk.is_empty() {
        rows.push(
            Row::new("  the same by --client-before", rate(&before_disk))
                .baseline(socat_disk_name, rate(&socat_disk))
                .ratio(ratio(&before_disk, &socat_disk)),
        );
    }
    rows.extend([
        Row::new("peak RSS, peer-client", mib(client_peak))
            .baseline("socat receiving", mib(recv_peak))
            .ratio(client_peak as f64 / recv_peak.max(1) as f64)
            .target("< 32 MiB", client_peak < limit),
        Row::new("peak RSS, peer-node (whole run)", mib(peer_peak))
            .baseline("socat sending", mib(send_peak))
            .ratio(peer_peak as f64 / send_peak.max(1) as f64)
            .target("< 32 MiB", peer_peak < limit),
    ]);
    Ok(rows)
}

/// Runs `cmd` to completion, watching its peak RSS.
fn timed_with_peak(cmd: &mut Command, name: &str) -> anyhow::Result<(Duration, u64)> {
    // The watch needs the pid, so spawn here and time from just before.
    let start = std::time::Instant::now();
    let guard = Guard::spawn(cmd, name)?;
    let watch = PeakWatch::start(guard.pid());
    let status = guard.wait(LIMIT)?;
    let wall = start.elapsed();
    let peak = watch.finish();
    anyhow::ensure!(status.success(), "{name} failed: {status}");
    Ok((wall, peak))
}

/// socat's buffer for the raw-limit baseline: with 1 MiB reads and writes
/// it moves a cached file over loopback about twice as fast as with its
/// default 8 KiB.
const RAW_BUFFER: usize = 1 << 20;

/// One socat transfer of `file` over loopback TCP into `dest` (/dev/null
/// when `None`), with `buffer` bytes per read and write (socat's default
/// when `None`); returns
/// the wall time from the sender's start to the receiver's exit, and the
/// peak RSS of receiver and sender.
fn socat_once(
    file: &Path,
    dest: Option<&Path>,
    buffer: Option<usize>,
) -> anyhow::Result<(Duration, u64, u64)> {
    let port = procs::free_port()?;
    let buffer: Vec<String> = buffer.map_or(vec![], |b| vec!["-b".into(), b.to_string()]);
    let out = File::create(dest.unwrap_or(Path::new("/dev/null")))?;
    let receiver = Guard::spawn(
        Command::new("socat")
            .args(&buffer)
            .args([
                "-u",
                &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
                "-",
            ])
            .stdin(Stdio::null())
            .stdout(out),
        "socat (receiver)",
    )?;
    procs::wait_listening(port)?;
    let recv_watch = PeakWatch::start(receiver.pid());
    let start = std::time::Instant::now();
    let sender = Guard::spawn(
        Command::new("socat")
            .args(&buffer)
            .arg("-u")
            .arg(format!("FILE:{}", file.display()))
            .arg(format!("TCP:127.0.0.1:{port}"))
            .stdin(Stdio::null()),
        "socat (sender)",
    )?;
    let send_watch = PeakWatch::start(sender.pid());
    let received = receiver.wait(LIMIT)?;
    let wall = start.elapsed();
    let sent = sender.wait(LIMIT)?;
    anyhow::ensure!(received.success() && sent.success(), "socat failed");
    Ok((wall, recv_watch.finish(), send_watch.finish()))
}
