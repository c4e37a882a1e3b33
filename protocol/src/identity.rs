//! Who speaks: a peer is named by its Ed25519 public key, and signs what
//! it tells the relay, what it proves about its address, and what it says
//! about the files it serves. Pure: the caller brings the clock and the
//! randomness.
//!
//! Every signature covers a fixed context string first, so that a
//! signature made for one purpose is worthless for another.

use std::{fmt, str::FromStr};

use ed25519_dalek::{Signer, Verifier};

use crate::ProtocolError;

/// A peer's public key: 64 lowercase hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey([u8; 32]);

/// A signature: 128 lowercase hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; 64]);

/// A peer's private key, with which it signs.
pub struct Identity(ed25519_dalek::SigningKey);

/// What a signed request carries after its own words:
/// `KEY <key> TS <unix-milliseconds> SIG <signature>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Auth {
    /// Who signs.
    pub key: PeerKey,
    /// When, in milliseconds since the Unix epoch; a relay accepts each
    /// key's requests only in increasing order, so none can be replayed.
    pub ts: u64,
    /// The signature over [`request_message`].
    pub sig: Signature,
}

/// What a client of a private network adds to a lookup: `TS <unix-ms> MAC
/// <mac>`, the MAC being keyed BLAKE3, with the network's 32-byte secret,
/// over [`lookup_message`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkMac {
    /// When, in milliseconds since the Unix epoch.
    pub ts: u64,
    /// The MAC.
    pub mac: [u8; 32],
}

/// What a network MAC covers: the context, the request line as this crate
/// encodes it, and `TS <ts>`.
pub fn lookup_message(canonical_line: &str, ts: u64) -> Vec<u8> {
    format!("relay-p2p lookup v1\n{canonical_line} TS {ts}").into_bytes()
}

impl NetworkMac {
    /// The MAC of `canonical_line` at `ts` with `secret`.
    pub fn new(secret: &[u8; 32], canonical_line: &str, ts: u64) -> Self {
        let mac = *blake3::keyed_hash(secret, &lookup_message(canonical_line, ts)).as_bytes();
        NetworkMac { ts, mac }
    }

    /// True when this MAC was made with `secret` over `canonical_line`.
    pub fn verifies(&self, secret: &[u8; 32], canonical_line: &str) -> bool {
        // blake3::Hash compares in constant time.
        blake3::keyed_hash(secret, &lookup_message(canonical_line, self.ts))
            == blake3::Hash::from(self.mac)
    }
}

impl fmt::Display for NetworkMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TS {} MAC {}", self.ts, hex(&self.mac))
    }
}

/// A network secret as kept in a file: 64 hex digits.
pub fn parse_secret(s: &str) -> Result<[u8; 32], ProtocolError> {
    unhex(s, "network secret")
}

/// A MAC as 64 hex digits.
pub(crate) fn parse_mac(s: &str) -> Result<[u8; 32], ProtocolError> {
    unhex(s, "mac")
}

/// What a relay request's signature covers: the context, the request line
/// as this crate encodes it (without its line end), and `KEY <key> TS <ts>`.
pub fn request_message(canonical_line: &str, key: &PeerKey, ts: u64) -> Vec<u8> {
    format!("relay-p2p request v1\n{canonical_line} KEY {key} TS {ts}").into_bytes()
}

/// What a peer signs to prove, to a relay that connected to `addr`, that
/// it holds the key: the context, the relay's nonce and the address.
pub fn address_message(nonce: &[u8; 16], addr: &str) -> Vec<u8> {
    format!("relay-p2p address proof v1\n{}\n{addr}", hex(nonce)).into_bytes()
}

/// What a peer signs when it says which content it serves under a name:
/// the context, the client's nonce, the name (as on the wire), size and hash.
pub fn file_message(nonce: &[u8; 16], name: &str, size: u64, hash: &crate::ContentHash) -> Vec<u8> {
    format!(
        "relay-p2p file proof v1\n{}\n{name}\n{size}\n{hash}",
        hex(nonce)
    )
    .into_bytes()
}

impl Identity {
    /// The identity whose secret is these 32 bytes (from a key file, or
    /// from a good random source).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The 32 secret bytes, to be kept in the key file.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key that names this peer.
    pub fn key(&self) -> PeerKey {
        PeerKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }

    /// The trailer for a request whose canonical line is `line`, at `ts`.
    pub fn authorize(&self, line: &str, ts: u64) -> Auth {
        let key = self.key();
        Auth {
            key,
            ts,
            sig: self.sign(&request_message(line, &key, ts)),
        }
    }
}

impl PeerKey {
    /// True when `sig` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify(message, &ed25519_dalek::Signature::from_bytes(&sig.0))
            .is_ok()
    }

    /// A short printable id, for people: the first 12 hex digits.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl Auth {
    /// True when the signature covers `canonical_line` with this key and time.
    pub fn verifies(&self, canonical_line: &str) -> bool {
        self.key.verify(
            &request_message(canonical_line, &self.key, self.ts),
            &self.sig,
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], ProtocolError> {
    let bad = || ProtocolError::invalid(what, s);
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A nonce of 16 bytes as 32 hex digits.
pub fn parse_nonce(s: &str) -> Result<[u8; 16], ProtocolError> {
    unhex(s, "nonce")
}

/// A nonce as it goes on the wire.
pub fn nonce_hex(nonce: &[u8; 16]) -> String {
    hex(nonce)
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({})", self.short())
    }
}

impl FromStr for PeerKey {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(PeerKey(unhex(s, "key")?))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex(&self.0[..6]))
    }
}

impl FromStr for Signature {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Signature(unhex(s, "signature")?))
    }
}

impl fmt::Display for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KEY {} TS {} SIG {}", self.key, self.ts, self.sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_signature_covers_exactly_what_was_signed() {
        let me = Identity::from_seed([7; 32]);
        let auth = me.authorize("RP2P/1 REGISTER 7000", 1_700_000_000_000);
        assert!(auth.verifies("RP2P/1 REGISTER 7000"));
        assert!(!auth.verifies("RP2P/1 REGISTER 7001"));
        assert!(!auth.verifies("RP2P/1 UNREGISTER 7000"));
        let later = Auth {
            ts: auth.ts + 1,
            ..auth
        };
        assert!(!later.verifies("RP2P/1 REGISTER 7000"));
        let other = Identity::from_seed([8; 32]);
        let stolen = Auth {
            key: other.key(),
            ..auth
        };
        assert!(!stolen.verifies("RP2P/1 REGISTER 7000"));
        // The same bytes signed for another purpose prove nothing here.
        let nonce = [1; 16];
        let proof = me.sign(&address_message(&nonce, "127.0.0.1:7000"));
        assert!(me
            .key()
            .verify(&address_message(&nonce, "127.0.0.1:7000"), &proof));
        assert!(!me
            .key()
            .verify(&address_message(&nonce, "127.0.0.1:7001"), &proof));
    }

    #[test]
    fn keys_and_signatures_round_trip_as_hex() {
        let me = Identity::from_seed([9; 32]);
        let key = me.key();
        assert_eq!(key.to_string().parse::<PeerKey>().unwrap(), key);
        assert_eq!(key.short().len(), 12);
        let sig = me.sign(b"x");
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
        assert_eq!(Identity::from_seed(me.seed()).key(), key);
        for bad in ["", "00", &"g".repeat(64), &"A".repeat(64)] {
            assert!(bad.parse::<PeerKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_network_mac_needs_the_secret_and_the_same_line() {
        let mac = NetworkMac::new(&[1; 32], "RP2P/1 PEERS", 5);
        assert!(mac.verifies(&[1; 32], "RP2P/1 PEERS"));
        assert!(!mac.verifies(&[2; 32], "RP2P/1 PEERS"));
        assert!(!mac.verifies(&[1; 32], "RP2P/1 STATS"));
        assert!(!NetworkMac { ts: 6, ..mac }.verifies(&[1; 32], "RP2P/1 PEERS"));
    }

    /// The example in PROTOCOL.md, made with another implementation
    /// (Python's PyNaCl), so that the spec and this crate agree.
    #[test]
    fn the_protocol_example_verifies() {
        let me = Identity::from_seed([7; 32]);
        let key = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
        assert_eq!(me.key().to_string(), key);
        let auth = me.authorize("RP2P/1 REGISTER 7000", 1_764_547_200_000);
        assert_eq!(
            auth.sig.to_string(),
            "63aad81c69fc2f43a031107f2c42862809db2a33ea22e9e69ea02b4f32c97b02\
             ec44b9e0cc9e3ddf26c7f4b8cbc527787d9e43a0bab0b9fae9fcba8239a75708"
        );
        assert!(auth.verifies("RP2P/1 REGISTER 7000"));
    }

    proptest! {
        #[test]
        fn garbage_keys_and_signatures_never_panic(s in "\\PC{0,140}", bytes in any::<[u8; 32]>()) {
            let _ = s.parse::<PeerKey>();
            let _ = s.parse::<Signature>();
            // Not every 32 bytes are a valid point: verification says no, never panics.
            let key = PeerKey(bytes);
            prop_assert!(!key.verify(b"message", &Signature([0; 64])));
        }
    }
}
