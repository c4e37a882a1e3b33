//! How results appear on stdout: aligned text for people, or JSON Lines
//! (one object per line, shapes documented in the README) for scripts.

use std::io::{self, Write};

use protocol::{identity::PeerKey, PeerAddr};
use serde_json::json;

use crate::listing::Listed;

/// Text or JSON Lines.
#[derive(Clone, Copy)]
pub enum Format {
    Text,
    Json,
}

/// One line per peer: `IP:PORT`, or `{"addr":"IP:PORT","ip":"IP","port":PORT}`.
/// With `long`, each peer's id (the short form of its key) after it; the
/// JSON has the whole key (when the relay gives keys).
pub fn peers(
    out: &mut impl Write,
    peers: &[(PeerAddr, Option<PeerKey>)],
    format: Format,
    long: bool,
) -> io::Result<()> {
    for (peer, key) in peers {
        match format {
            Format::Text if long => {
                let id = key.map_or("-".to_string(), |k| k.short());
                writeln!(out, "{peer} {id}")?
            }
            Format::Text => writeln!(out, "{peer}")?,
            Format::Json => {
                let mut line = json!({
                    "addr": peer.to_string(),
                    "ip": peer.ip().to_string(),
                    "port": peer.port(),
                });
                if let Some(key) = key {
                    line["key"] = key.to_string().into();
                }
                writeln!(out, "{line}")?
            }
        }
    }
    out.flush()
}

/// One line per file (per version of a name): size, number of peers,
/// with `long` the hash, and name; or
/// `{"name":"NAME","size":BYTES,"peers":N,"hash":"HEX"}` (hash when known).
pub fn files(out: &mut impl Write, files: &[Listed], format: Format, long: bool) -> io::Result<()> {
    for file in files {
        match format {
            Format::Text if long => {
                let hash = file.hash.map_or("-".repeat(64), |h| h.to_hex().to_string());
                writeln!(
                    out,
                    "{:>12} {:>3} {hash} {}",
                    file.size, file.peers, file.name
                )?
            }
            Format::Text => writeln!(out, "{:>12} {:>3} {}", file.size, file.peers, file.name)?,
            Format::Json => {
                let mut line = json!({
                    "name": file.name.as_str(),
                    "size": file.size,
                    "peers": file.peers,
                });
                if let Some(hash) = file.hash {
                    line["hash"] = hash.to_hex().to_string().into();
                }
                writeln!(out, "{line}")?
            }
        }
    }
    out.flush()
}

/// One `NAME VALUE` line per counter, or a single object of all of them.
pub fn stats(out: &mut impl Write, stats: &[(String, u64)], format: Format) -> io::Result<()> {
    match format {
        Format::Text => {
            for (name, value) in stats {
                writeln!(out, "{name} {value}")?;
            }
        }
        Format::Json => {
            let object: serde_json::Map<String, serde_json::Value> = stats
                .iter()
                .map(|(name, value)| (name.clone(), (*value).into()))
                .collect();
            writeln!(out, "{}", serde_json::Value::Object(object))?;
        }
    }
    out.flush()
}
