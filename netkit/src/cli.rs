//! What every binary's command line has: `--completions SHELL` and `--man`
//! (generated from the clap definition, so they never go stale), `-v`/`-q`
//! logging, the bound address as the first line of stdout, and the list of
//! relays a peer or a client is given.

use std::{
    io::{self, Write},
    net::SocketAddr,
};

use crate::server::Running;

use clap::{error::ErrorKind, CommandFactory, FromArgMatches, Parser};

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

/// Exits as clap does on a usage mistake (the message, the usage line,
/// exit code 2), for a mistake that only shows after parsing.
pub fn usage_error<A: CommandFactory>(message: impl std::fmt::Display) -> ! {
    A::command()
        .error(ErrorKind::ValueValidation, message)
        .exit()
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

/// Most relays a peer or a client takes: each costs a peer a thread and a
/// heartbeat, and a client one timeout when it is down.
pub const MAX_RELAYS: usize = 16;

/// The value parser of `--relay`: `HOST:PORT`, an IPv6 address in
/// brackets (`[::1]:8888`), kept as written.
pub fn parse_relay(s: &str) -> Result<String, String> {
    let s = s.trim();
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not HOST:PORT"));
    };
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => {
            ip.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        }
        None if host.contains(':') => {
            return Err(format!(
                "{s:?}: an IPv6 address goes in brackets, as in [::1]:8888"
            ))
        }
        None if host.is_empty()
            || host.contains(|c: char| c.is_whitespace() || "[],".contains(c)) =>
        {
            return Err(format!("{s:?} is not HOST:PORT"))
        }
        None => {}
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?}: the port must be a number from 1 to 65535")),
    }
}

/// The relays to use, in order: the positional `HOST PORT` (the older form
/// of the command line) first when given, then those of `--relay` or the
/// environment variable `env`, each once. At least one and at most
/// [`MAX_RELAYS`].
pub fn relay_list(
    host: Option<String>,
    port: Option<u16>,
    more: Vec<String>,
    env: &str,
) -> Result<Vec<String>, String> {
    // Checked here rather than by clap (`requires`), which would also ask
    // for the port before `--completions` and `--man`.
    let first = match (host, port) {
        (Some(host), Some(port)) if host.contains(':') && !host.starts_with('[') => {
            Some(format!("[{host}]:{port}"))
        }
        (Some(host), Some(port)) => Some(format!("{host}:{port}")),
        (Some(host), None) => return Err(format!("relay host {host} given without its port")),
        (None, Some(port)) => return Err(format!("relay port {port} given without its host")),
        (None, None) => None,
    };
    let mut relays: Vec<String> = Vec::new();
    for relay in first.into_iter().chain(more) {
        // Host names do not care about case: one relay is asked once.
        if !relays.iter().any(|r| r.eq_ignore_ascii_case(&relay)) {
            relays.push(relay);
        }
    }
    match relays.len() {
        0 => Err(format!(
            "no relay given: name one as HOST PORT, with --relay HOST:PORT, \
             or in {env} (HOST:PORT,HOST:PORT)"
        )),
        n if n > MAX_RELAYS => Err(format!("{n} relays given; at most {MAX_RELAYS} are taken")),
        _ => Ok(relays),
    }
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
        // Each refused for what it is, not by accident further on.
        refused_saying(
            parse_size,
            &[
                ("", "not a whole number"),
                ("K", "not a whole number"),
                ("1.5M", "not a whole number"),
                ("10X", "the suffix must be"),
                ("99999999999T", "too big"),
            ],
        );
    }

    /// `parse` refuses each input with an error that says what is given.
    fn refused_saying<T: std::fmt::Debug>(
        parse: fn(&str) -> Result<T, String>,
        cases: &[(&str, &str)],
    ) {
        for (bad, says) in cases {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn relays_are_host_port_and_ipv6_in_brackets() {
        for good in [
            "relay.example.org:8888",
            "127.0.0.1:1",
            "[::1]:8888",
            " a:65535 ",
        ] {
            assert_eq!(parse_relay(good), Ok(good.trim().to_string()), "{good}");
        }
        refused_saying(
            parse_relay,
            &[
                ("relay", "not HOST:PORT"),
                (":8888", "not HOST:PORT"),
                ("a b:8888", "not HOST:PORT"),
                ("a:0", "from 1 to 65535"),
                ("a:65536", "from 1 to 65535"),
                ("a:http", "from 1 to 65535"),
                ("::1:8888", "in brackets"),
                ("[relay]:8888", "not an IPv6 address"),
            ],
        );
    }

    #[test]
    fn the_positional_relay_comes_first_and_each_relay_once() {
        let list = |positional: Option<(&str, u16)>, more: &[&str]| {
            relay_list(
                positional.map(|(h, _)| h.to_string()),
                positional.map(|(_, p)| p),
                more.iter().map(|s| s.to_string()).collect(),
                "RELAYS",
            )
        };
        assert_eq!(
            list(Some(("a", 1)), &["b:2", "A:1", "b:2", "c:3"]).unwrap(),
            ["a:1", "b:2", "c:3"]
        );
        assert_eq!(list(Some(("::1", 1)), &[]).unwrap(), ["[::1]:1"]);
        assert!(list(None, &[]).unwrap_err().contains("in RELAYS"));
        let half = |host: Option<&str>, port| relay_list(host.map(String::from), port, vec![], "R");
        assert!(half(Some("a"), None)
            .unwrap_err()
            .contains("without its port"));
        assert!(half(None, Some(1))
            .unwrap_err()
            .contains("without its host"));
        let many: Vec<String> = (1..=17).map(|p| format!("a:{p}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(list(None, &many[..16]).unwrap().len(), 16);
        assert!(list(None, &many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn verbose_wins_over_quiet() {
        assert_eq!(level(false, false, Info), Info);
        assert_eq!(level(true, false, Info), Debug);
        assert_eq!(level(false, true, Info), Warn);
        assert_eq!(level(true, true, Info), Debug);
    }
}
