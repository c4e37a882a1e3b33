//! The interactive client: ask the relay who is live, then fetch file
//! after file by name. Prompts and status go to stderr, content to stdout.

use std::io::{self, BufRead, IsTerminal, Read, Write};

use protocol::{FileName, PeerAddr};

use crate::{discover::Relay, fetch::Fetcher, listing, save::StdoutSink, Failure};

/// Longest input line accepted.
const MAX_INPUT: usize = 64 * 1024;

const HELP: &str = "\
commands:
  NAME          print the file NAME (same as: get NAME)
  get NAME      print the file NAME
  ls [TEXT]     list the files on the live peers (names containing TEXT)
  peers         list the live peers
  help          show this help
  quit          leave (so does end of input, Ctrl-D)";

pub fn run(relay: &Relay) -> Result<(), Failure> {
    let mut peers = relay.peers()?;
    eprintln!(
        "{} live peers via relay {relay}; type a file name, or help",
        peers.len()
    );
    let stdin = io::stdin();
    let mut input = stdin.lock();
    loop {
        eprint!("> ");
        let _ = io::stderr().flush();
        let mut line = String::new();
        match (&mut input).take(MAX_INPUT as u64).read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.len() == MAX_INPUT && !line.ends_with('\n') => {
                return Err(Failure::Local(format!(
                    "input line longer than {MAX_INPUT} bytes"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Local(format!("cannot read input: {e}"))),
        }
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
                for peer in &peers {
                    println!("{peer}");
                }
                eprintln!("{} live peers", peers.len());
            }
            "ls" => match listing::collect(relay, Some(rest).filter(|p| !p.is_empty()), &mut |l| {
                eprintln!("{l}")
            }) {
                Ok(files) => {
                    for file in &files {
                        println!("{:>12} {:>3} {}", file.size, file.peers, file.name);
                    }
                    eprintln!("{} files", files.len());
                }
                Err(e) => eprintln!("{e}"),
            },
            "get" => get(relay, &mut peers, rest),
            _ => get(relay, &mut peers, line),
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

fn get(relay: &Relay, peers: &mut Vec<PeerAddr>, name: &str) {
    let name = match FileName::new(name) {
        Ok(name) => name,
        Err(e) => return eprintln!("{e}"),
    };
    refresh(relay, peers);
    let mut out = StdoutSink::new();
    let result = Fetcher {
        timeout: relay.timeout,
        note: &mut |line| eprintln!("{line}"),
        progress: &mut (),
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
