//! `ls`: what the live peers hold, merged by name.

use std::{
    collections::{BTreeMap, HashSet},
    thread,
};

use netkit::call::{self, CallError};
use protocol::{
    peer::{FileEntry, Request, Response},
    FileName, PeerAddr, ProtocolError,
};

use crate::discover::{Relay, RelayError};

/// Peers asked at the same time.
const MAX_PARALLEL: usize = 64;

/// One file name across peers.
pub struct Listed {
    /// The name.
    pub name: FileName,
    /// Its size on the first peer (in the relay's order) that listed it.
    pub size: u64,
    /// How many peers list it.
    pub peers: usize,
}

/// The merged lists, and how many peers could not be asked.
pub struct Listing {
    /// Sorted by name.
    pub files: Vec<Listed>,
    /// Peers asked.
    pub asked: usize,
    /// Peers that could not be asked or did not answer properly.
    pub failed: usize,
}

/// Asks every live peer for its list; peers that fail are reported through
/// `note` and counted, not fatal.
pub fn collect(
    relay: &Relay,
    pattern: Option<&str>,
    note: &mut dyn FnMut(&str),
) -> Result<Listing, RelayError> {
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
                answers.push(ask.join().unwrap_or_else(|_| {
                    Err(CallError::BadReply(ProtocolError::UnexpectedReply(
                        "listing thread failed".into(),
                    )))
                }));
            }
        });
    }
    let mut failed = 0;
    for (peer, answer) in peers.iter().zip(answers) {
        match answer {
            Ok(entries) => {
                // A name counts once per peer, even if a peer lists it twice.
                let mut seen = HashSet::new();
                for FileEntry { size, name } in entries {
                    if pattern.is_some_and(|p| !name.as_str().contains(p)) {
                        continue;
                    }
                    if seen.insert(name.clone()) {
                        merged.entry(name).or_insert((size, 0)).1 += 1;
                    }
                }
            }
            Err(why) => {
                failed += 1;
                note(&format!("peer {peer}: {why}"));
            }
        }
    }
    Ok(Listing {
        files: merged
            .into_iter()
            .map(|(name, (size, peers))| Listed { name, size, peers })
            .collect(),
        asked: peers.len(),
        failed,
    })
}

fn list_peer(peer: PeerAddr, relay: &Relay) -> Result<Vec<FileEntry>, CallError> {
    let reply = call::call(
        peer.socket_addr(),
        relay.timeout,
        |w| Request::List.write_to(w),
        |r| Response::read_from(r),
    )?;
    match reply {
        Response::Files { entries, .. } => Ok(entries),
        Response::Error(e) => Err(CallError::Refused(e)),
        other => Err(CallError::BadReply(ProtocolError::UnexpectedReply(
            format!("{other:?}"),
        ))),
    }
}
