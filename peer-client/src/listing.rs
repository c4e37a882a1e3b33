//! `ls`: what the network holds. From the relay's index, page by page;
//! from a relay without one, by asking every live peer and merging.

use std::{
    collections::{BTreeMap, HashSet},
    ops::ControlFlow,
    thread,
};

use globset::GlobMatcher;
use netkit::call::{self, CallError};
use protocol::{
    index::Pattern,
    peer::{FileEntry, Request, Response},
    ContentHash, FileName, PeerAddr, ProtocolError,
};

use crate::discover::{Relay, RelayError};

/// The matcher for a glob as the relay applies it: `*` stays within a
/// folder, `**` crosses them.
pub fn matcher(pattern: &Pattern) -> Result<GlobMatcher, globset::Error> {
    Ok(globset::GlobBuilder::new(pattern.as_str())
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

/// Streams the listing from the relay's index, one page at a time, to
/// `page` (which may stop it with `Break`); returns how many lines there
/// were, or `None` when the relay keeps no index. Memory holds one page
/// (at most 1000 lines), however many names the network has.
pub fn stream(
    relay: &Relay,
    pattern: &Pattern,
    page: &mut dyn FnMut(&[Listed]) -> std::io::Result<ControlFlow<()>>,
) -> Result<Option<usize>, StreamError> {
    let (mut after, mut total) = (None, 0);
    // A relay that answers pages forever (a broken or hostile one) must
    // not keep the client forever either: 1M names at 1000 a page is 1000
    // pages; allow ten times that.
    for _ in 0..10_000 {
        let Some((entries, next)) = relay.list_page(pattern, after.take())? else {
            return Ok(None);
        };
        let lines: Vec<Listed> = entries
            .into_iter()
            .map(|e| Listed {
                name: e.name,
                size: e.size,
                peers: e.holders as usize,
                hash: Some(e.hash),
            })
            .collect();
        total += lines.len();
        let flow = page(&lines).map_err(StreamError::Output)?;
        match next {
            Some(next) if flow.is_continue() => after = Some(next),
            _ => return Ok(Some(total)),
        }
    }
    Ok(Some(total))
}

/// Up to `limit` distinct names the network holds, sorted, for completion:
/// from the index, or from the peers.
pub fn names(relay: &Relay, limit: usize) -> Result<Vec<String>, RelayError> {
    let mut names: Vec<String> = Vec::new();
    let all = crate::everything();
    let streamed = stream(relay, &all, &mut |page| {
        for file in page {
            // A name's versions come together: one entry each.
            if names.last().map(String::as_str) != Some(file.name.as_str()) {
                names.push(file.name.as_str().to_string());
            }
        }
        Ok(if names.len() >= limit {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    });
    match streamed {
        Ok(Some(_)) => {}
        Ok(None) => {
            let matcher = matcher(&all).map_err(|_| unreachable!("** is a glob"))?;
            let listing = collect(relay, &matcher, &mut |line| log::debug!("{line}"))?;
            names = listing
                .files
                .into_iter()
                .map(|f| f.name.as_str().to_string())
                .collect();
        }
        Err(StreamError::Relay(e)) => return Err(e),
        // Nothing is written here.
        Err(StreamError::Output(_)) => {}
    }
    names.truncate(limit);
    Ok(names)
}

/// Why a streamed listing stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The relay failed.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The page could not be written.
    #[error("cannot write to stdout: {0}")]
    Output(#[source] std::io::Error),
}

/// Peers asked at the same time.
const MAX_PARALLEL: usize = 64;

/// One file name across peers (one version of it, from the index).
pub struct Listed {
    /// The name.
    pub name: FileName,
    /// Its size (without an index: on the first peer, in the relay's
    /// order, that listed it).
    pub size: u64,
    /// How many peers list it.
    pub peers: usize,
    /// Its content hash, known from the index.
    pub hash: Option<ContentHash>,
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
    pattern: &GlobMatcher,
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
                    if !pattern.is_match(name.as_str()) {
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
            .map(|(name, (size, peers))| Listed {
                name,
                size,
                peers,
                hash: None,
            })
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
