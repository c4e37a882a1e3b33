//! `ls`: what the live peers hold, merged by name.

use std::{collections::BTreeMap, thread};

use protocol::{
    peer::{FileEntry, Request, Response},
    FileName, PeerAddr, ProtocolError,
};

use crate::{discover::Relay, net, Failure};

/// Peers asked at the same time.
const MAX_PARALLEL: usize = 64;

/// One file name across peers.
pub struct Listed {
    pub name: FileName,
    pub size: u64,
    pub peers: usize,
}

/// Asks every live peer for its list; peers that fail are reported, not fatal.
pub fn collect(
    relay: &Relay,
    pattern: Option<&str>,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<Listed>, Failure> {
    let mut merged: BTreeMap<FileName, (u64, usize)> = BTreeMap::new();
    let peers = relay.peers()?;
    // Many peers at once (a lookup returns a few dozen by default), so that
    // frozen peers cost one timeout in all, not one each.
    let mut answers = Vec::with_capacity(peers.len());
    for group in peers.chunks(MAX_PARALLEL) {
        thread::scope(|scope| {
            let asks: Vec<_> = group
                .iter()
                .map(|&peer| scope.spawn(move || list_peer(peer, relay)))
                .collect();
            for ask in asks {
                answers.push(ask.join().unwrap_or_else(|_| Err("listing failed".into())));
            }
        });
    }
    for (peer, answer) in peers.into_iter().zip(answers) {
        match answer {
            Ok(entries) => {
                for FileEntry { size, name } in entries {
                    if pattern.is_some_and(|p| !name.as_str().contains(p)) {
                        continue;
                    }
                    merged.entry(name).or_insert((size, 0)).1 += 1;
                }
            }
            Err(why) => note(&format!("peer {peer}: {why}")),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(name, (size, peers))| Listed { name, size, peers })
        .collect())
}

fn list_peer(peer: PeerAddr, relay: &Relay) -> Result<Vec<FileEntry>, String> {
    let stream = net::connect(peer.socket_addr(), relay.timeout).map_err(|e| net::describe(&e))?;
    let mut reply =
        net::send(&stream, |w| Request::List.write_to(w)).map_err(|e| net::describe(&e))?;
    match Response::read_from(&mut reply) {
        Ok(Response::Files { entries, .. }) => Ok(entries),
        Ok(Response::Error(e)) => Err(format!("refused: {e}")),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(ProtocolError::Io(e)) => Err(net::describe(&e)),
        Err(e) => Err(format!("bad reply: {e}")),
    }
}
