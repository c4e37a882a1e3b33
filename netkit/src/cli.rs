//! What every binary's command line has: `--completions SHELL` and `--man`
//! (generated from the clap definition, so they never go stale), `-v`/`-q`
//! logging, and the bound address as the first line of stdout.

use std::{
    io::{self, Write},
    net::SocketAddr,
};

use crate::server::Running;

use clap::{FromArgMatches, Parser};

/// The `--completions` and `--man` options; flatten into a binary's arguments.
#[derive(clap::Args)]
pub struct Docs {
    /// Print a completion script for SHELL on stdout and exit
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff) on stdout and exit
    #[arg(long)]
    man: bool,
}

/// Parses the command line like `Parser::parse`, except that `--completions`
/// and `--man` are answered here, without the arguments otherwise required;
/// exits with `failure_code` if that output cannot be written.
pub fn parse<A: Parser>(failure_code: i32) -> A {
    // Not `exclusive`: clap counts values from the environment as given.
    let relaxed = A::command().mut_args(|arg| arg.required(false));
    let docs = relaxed
        .try_get_matches()
        .ok()
        .and_then(|matches| Docs::from_arg_matches(&matches).ok());
    if let Some(docs) = docs.filter(|d| d.completions.is_some() || d.man) {
        let cmd = A::command();
        let name = cmd.get_name().to_string();
        if let Err(e) = docs.print(cmd) {
            eprintln!("{name}: {e}");
            std::process::exit(failure_code);
        }
        std::process::exit(0);
    }
    A::parse()
}

impl Docs {
    fn print(&self, mut cmd: clap::Command) -> Result<(), String> {
        // Rendered into memory first: the generators panic when a write fails (`| head`).
        let mut page = Vec::new();
        if let Some(shell) = self.completions {
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut page);
        } else {
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| format!("cannot render the man page: {e}"))?;
        }
        let mut out = io::stdout().lock();
        out.write_all(&page)
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))
    }
}

/// Sets up logging to stderr, with timestamps: `default` normally, debug
/// with `verbose`, warnings only with `quiet` (`verbose` wins when both are
/// set, one from the environment and one from the command line). RUST_LOG,
/// when set, overrides all of them.
pub fn init_logging(verbose: bool, quiet: bool, default: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level(verbose, quiet, default))
        .parse_env("RUST_LOG")
        .init();
}

fn level(verbose: bool, quiet: bool, default: log::LevelFilter) -> log::LevelFilter {
    match (verbose, quiet) {
        (true, _) => log::LevelFilter::Debug,
        (_, true) => log::LevelFilter::Warn,
        _ => default,
    }
}

/// Prints the bound address as the first line of stdout, so that scripts
/// and tests can use port 0 and still find the server.
pub fn print_address(addr: SocketAddr) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{addr}")?;
    out.flush()
}

/// What a server's `main` does once it is bound: prints the address, makes
/// Ctrl-C and SIGTERM stop it gracefully, and serves until then.
pub fn serve_until_signal(server: impl Running + Send) -> Result<(), String> {
    print_address(server.local_addr()).map_err(|e| format!("cannot write to stdout: {e}"))?;
    let shutdown = server.shutdown();
    // SIGINT and SIGTERM only: SIGHUP is the relay's "reload", not "stop".
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    // Lives as long as the process: a signal can come at any time.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                shutdown.trigger();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    server.wait();
    Ok(())
}

/// A binary's exit: 0, or the error on one line of stderr (`name: error`)
/// and exit code 1.
pub fn exit(name: &str, result: Result<(), impl std::fmt::Display>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A private network's secret from `path`: 64 hex digits (32 bytes) on its
/// first line, in a file others cannot read. `openssl rand -hex 32 > FILE`
/// makes one.
pub fn read_secret(path: &std::path::Path) -> Result<[u8; 32], String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "secret file {shown} can be read by others (mode {mode:o}): run chmod 600 on it"
            ));
        }
    }
    protocol::identity::parse_secret(text.lines().next().unwrap_or("").trim())
        .map_err(|_| format!("secret file {shown} does not hold 64 hex digits"))
}

/// A size or a rate in bytes: a whole number, plain or with a K, M, G or
/// T suffix (powers of 1024, either case): `65536`, `64K`, `10M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: the suffix must be K, M, G or T")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} is not a whole number of bytes (e.g. 65536, 64K, 10M)"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is too big"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::LevelFilter::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "K",
            "1.5M",
            "-1",
            "10X",
            "1 K",
            "99999999999999999999",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verbose_wins_over_quiet() {
        assert_eq!(level(false, false, Info), Info);
        assert_eq!(level(true, false, Info), Debug);
        assert_eq!(level(false, true, Info), Warn);
        assert_eq!(level(true, true, Info), Debug);
    }
}
