//! The interactive client: ask the relay who is live, then fetch file
//! after file by name. Prompts and status go to stderr (or the terminal),
//! content to stdout.

use std::io::{self, IsTerminal};

use protocol::{FileName, PeerAddr};

use crate::{
    complete::Catalog,
    discover::Relay,
    fetch::{Fetcher, Limits},
    input::Input,
    listing,
    print::{self, Format},
    progress::Bar,
    save::StdoutSink,
    Failure,
};

const HELP: &str = "\
commands:
  NAME          print the file NAME (same as: get NAME); Tab completes names
  get NAME      print the file NAME
  ls [TEXT]     list the files on the live peers (names containing TEXT)
  peers         list the live peers
  help          show this help
  quit          leave (so does end of input, Ctrl-D)";

pub fn run(relay: &Relay, limits: Limits) -> Result<(), Failure> {
    let mut peers = relay.peers()?;
    eprintln!(
        "{} live peers via relay {relay}; type a file name, or help",
        peers.len()
    );
    let catalog = Catalog::default();
    let mut input = Input::open(relay, &catalog)?;
    while let Some(line) = input.next_line()? {
        let line = line.trim();
        let (command, rest) = line
            .split_once(' ')
            .map_or((line, ""), |(c, r)| (c, r.trim()));
        match command {
            "" => {}
            "quit" | "exit" => break,
            "help" | "?" => eprintln!("{HELP}"),
            "peers" => {
                refresh(relay, &mut peers);
                show(print::peers(&mut io::stdout(), &peers, Format::Text));
                eprintln!("{} live peers", peers.len());
            }
            "ls" => ls(relay, &catalog, rest),
            "get" => get(relay, limits, &mut peers, rest),
            _ => get(relay, limits, &mut peers, line),
        }
    }
    Ok(())
}

/// Asks the relay again, so that peers that came or went since are seen;
/// keeps the last list if the relay is away.
fn refresh(relay: &Relay, peers: &mut Vec<PeerAddr>) {
    match relay.peers() {
        Ok(fresh) => *peers = fresh,
        Err(e) => eprintln!("{e}; using the last list of {} peers", peers.len()),
    }
}

fn ls(relay: &Relay, catalog: &Catalog, pattern: &str) {
    let pattern = Some(pattern).filter(|p| !p.is_empty());
    match listing::collect(relay, pattern, &mut |l| eprintln!("{l}")) {
        Ok(listing) => {
            if pattern.is_none() {
                catalog.set(&listing.files);
            }
            show(print::files(
                &mut io::stdout(),
                &listing.files,
                Format::Text,
            ));
            eprintln!("{} files", listing.files.len());
        }
        Err(e) => eprintln!("{e}"),
    }
}

/// A failed write to stdout is reported; the prompt goes on.
fn show(written: io::Result<()>) {
    if let Err(e) = written {
        eprintln!("cannot write to stdout: {e}");
    }
}

fn get(relay: &Relay, limits: Limits, peers: &mut Vec<PeerAddr>, name: &str) {
    let name = match FileName::new(name) {
        Ok(name) => name,
        Err(e) => return eprintln!("{e}"),
    };
    refresh(relay, peers);
    let mut out = StdoutSink::new();
    let mut bar = Bar::new(true);
    let result = Fetcher {
        timeout: relay.timeout,
        limits,
        note: &mut bar.printer(),
        progress: &mut bar,
    }
    .fetch(peers, &name, &mut out);
    // Keep the prompt on a line of its own after content without a final newline.
    if out.last.is_some_and(|b| b != b'\n') && io::stdout().is_terminal() {
        println!();
    }
    drop(out);
    match result {
        Ok(fetched) => eprintln!("({} bytes from {})", fetched.size, fetched.peer),
        Err(e) => eprintln!("{e}"),
    }
}
