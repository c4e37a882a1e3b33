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
    print::{self, Format},
    progress::Bar,
    save::StdoutSink,
    Failure, Wanted,
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
        "{} live peers via relay {}; type a file name, or help",
        peers.len(),
        relay.current()
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
                let listed: Vec<_> = peers.iter().map(|&p| (p, None)).collect();
                show(print::peers(
                    &mut io::stdout(),
                    &listed,
                    Format::Text,
                    false,
                ));
                eprintln!("{} live peers", peers.len());
            }
            "ls" => ls(relay, &catalog, rest),
            "get" => get(relay, limits, &peers, rest),
            _ => get(relay, limits, &peers, line),
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
    let pattern = match pattern {
        "" => crate::everything(),
        text => match crate::parse_pattern(text) {
            Ok(pattern) => pattern,
            Err(e) => return eprintln!("invalid pattern: {e}"),
        },
    };
    let everything = pattern == crate::everything();
    let (mut lines, mut names) = (0, Vec::new());
    let listed = crate::ls(relay, &pattern, false, Format::Text, &mut |page| {
        lines += page.len();
        if everything {
            names.extend(page.iter().map(|f| f.name.as_str().to_string()));
        }
    });
    match listed {
        Ok(()) => {
            if everything {
                catalog.set_names(names);
            }
            eprintln!("{lines} files");
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

fn get(relay: &Relay, limits: Limits, peers: &[PeerAddr], name: &str) {
    let name = match FileName::new(name) {
        Ok(name) => name,
        Err(e) => return eprintln!("{e}"),
    };
    let found = match crate::sources(relay, &Wanted::Name(name.clone())) {
        Ok(found) => found,
        Err(Failure::Relay(e)) => {
            eprintln!("{e}; asking the last list of {} peers", peers.len());
            crate::Sources {
                name,
                peers: peers.to_vec(),
                expect: None,
                keys: Default::default(),
            }
        }
        Err(e) => return eprintln!("{e}"),
    };
    let (name, sources) = (found.name, found.peers);
    let mut out = StdoutSink::new();
    let mut bar = Bar::new(true);
    let result = Fetcher {
        timeout: relay.timeout,
        limits,
        expect: found.expect,
        keys: found.keys,
        note: &mut bar.printer(),
        progress: &mut bar,
    }
    .fetch(&sources, &name, &mut out);
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
