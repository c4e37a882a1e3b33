//! Who may speak for a peer, and where the relay may send clients.
//!
//! Requests that change the registry are signed by the peer's key (see
//! `protocol::identity`); a signature must verify, be recent, come from an
//! allowed key on a private relay, and be newer than the key's last one
//! (the registry checks that). The address listed is the one the
//! connection came from; an advertised other address is listed only after
//! the relay has connected to it and the peer there has proved the same
//! key. Loopback and link-local addresses are listed only by a relay that
//! itself serves loopback only: elsewhere they would send clients to their
//! own machine.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::IpAddr,
    path::PathBuf,
    sync::{Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use protocol::{
    identity::{address_message, Auth, PeerKey},
    peer::{Request as PeerRequest, Response as PeerResponse},
    relay::{Credential, Request},
    PeerAddr,
};

/// How far a request's time may be from the relay's clock.
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(300);
/// How long a connect-back may take, connection and answer.
const PROVE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Trust {
    /// The relay listens on loopback only: a network on one machine.
    loopback_only: bool,
    /// `--network-secret`: lookups must carry a MAC made with it.
    network_secret: Option<[u8; 32]>,
    /// `--allow-keys`: the file, and the keys it held when last read.
    allow_file: Option<PathBuf>,
    allowed: RwLock<Option<HashSet<PeerKey>>>,
    /// Advertised addresses proven recently, so that a heartbeat does not
    /// cost a connection back each time.
    proven: Mutex<HashMap<(PeerKey, PeerAddr), Instant>>,
    proven_for: Duration,
    max_proven: usize,
}

/// Why a request is refused as `forbidden`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Distrust {
    #[error("requests that change the registry must be signed (KEY, TS and SIG; see PROTOCOL.md)")]
    Unsigned,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the request's time is {0}s off the relay's clock (more than {max}s): check the peer's clock", max = MAX_SKEW.as_secs())]
    Clock(u64),
    #[error("key {0} is not allowed on this relay")]
    NotAllowed(String),
    #[error("{0} is a loopback or link-local address, which clients elsewhere cannot reach (a relay bound to 127.0.0.1 lists them, for a network on one machine)")]
    Local(IpAddr),
    #[error("{addr} did not prove to hold this key: {why}")]
    Unproven { addr: PeerAddr, why: String },
    #[error("invalid address: {0}")]
    Invalid(String),
    #[error("this relay serves its own network only: lookups need the network's MAC (peer-client --network-secret FILE)")]
    Outsider,
}

/// Why the allowed keys could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read allowed keys from {}: {source}", .path.display())]
pub struct AllowError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    #[source]
    pub source: io::Error,
}

impl Trust {
    pub(crate) fn new(
        loopback_only: bool,
        allow_file: Option<PathBuf>,
        network_secret: Option<[u8; 32]>,
        ttl: Duration,
        max_proven: usize,
    ) -> Result<Self, AllowError> {
        let trust = Trust {
            loopback_only,
            network_secret,
            allow_file,
            allowed: RwLock::new(None),
            proven: Mutex::default(),
            proven_for: ttl,
            max_proven,
        };
        trust.reload()?;
        Ok(trust)
    }

    /// Reads `--allow-keys` again (on SIGHUP); returns how many keys it holds.
    pub(crate) fn reload(&self) -> Result<Option<usize>, AllowError> {
        let Some(path) = &self.allow_file else {
            return Ok(None);
        };
        let failed = |source| AllowError {
            path: path.clone(),
            source,
        };
        let text = fs::read_to_string(path).map_err(failed)?;
        let mut keys = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let key = line.parse().map_err(|e| {
                failed(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line {}: {e}", n + 1),
                ))
            })?;
            keys.insert(key);
        }
        let count = keys.len();
        *self.allowed.write().unwrap_or_else(|p| p.into_inner()) = Some(keys);
        Ok(Some(count))
    }

    /// A lookup's MAC, on a relay with a network secret.
    pub(crate) fn check_lookup(
        &self,
        request: &Request,
        credential: Option<Credential>,
    ) -> Result<(), Distrust> {
        let Some(secret) = &self.network_secret else {
            return Ok(());
        };
        match credential {
            Some(Credential::Network(mac)) if mac.verifies(secret, &request.canonical()) => {
                check_clock(mac.ts)
            }
            _ => Err(Distrust::Outsider),
        }
    }

    /// The signature of a request that changes the registry.
    pub(crate) fn check(&self, request: &Request, auth: Option<Auth>) -> Result<Auth, Distrust> {
        let auth = auth.ok_or(Distrust::Unsigned)?;
        // The cheap checks first: a stale or unlisted request costs no
        // signature verification (the bulk of a registration's CPU).
        check_clock(auth.ts)?;
        {
            let allowed = self.allowed.read().unwrap_or_else(|p| p.into_inner());
            if allowed
                .as_ref()
                .is_some_and(|keys| !keys.contains(&auth.key))
            {
                return Err(Distrust::NotAllowed(auth.key.short()));
            }
        }
        if !auth.verifies(&request.canonical()) {
            return Err(Distrust::BadSignature);
        }
        Ok(auth)
    }

    /// The address to list for a peer that connected from `from`, serves
    /// on `port`, may advertise `host`, and signs with `key`.
    pub(crate) fn listed_addr(
        &self,
        from: IpAddr,
        port: u16,
        host: Option<IpAddr>,
        key: &PeerKey,
    ) -> Result<PeerAddr, Distrust> {
        let from = from.to_canonical();
        let ip = host.map_or(from, |h| h.to_canonical());
        let addr = PeerAddr::new(ip, port).map_err(|e| Distrust::Invalid(e.to_string()))?;
        if !self.loopback_only && is_local(ip) {
            return Err(Distrust::Local(ip));
        }
        if ip != from {
            self.prove(addr, key)?;
        }
        Ok(addr)
    }

    /// Connects to `addr` and has the peer there sign a fresh nonce with
    /// `key`; remembered for a while once it has.
    fn prove(&self, addr: PeerAddr, key: &PeerKey) -> Result<(), Distrust> {
        let now = Instant::now();
        {
            let proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
            if proven
                .get(&(*key, addr))
                .is_some_and(|when| now.duration_since(*when) < self.proven_for)
            {
                return Ok(());
            }
        }
        let unproven = |why: String| Distrust::Unproven { addr, why };
        let mut nonce = [0; 16];
        getrandom::getrandom(&mut nonce).map_err(|e| unproven(e.to_string()))?;
        let request = PeerRequest::Prove { nonce, addr };
        let reply = netkit::call::call(
            addr.socket_addr(),
            PROVE_TIMEOUT,
            |w| request.write_to(w),
            |r| PeerResponse::read_from(r),
        )
        .map_err(|e| unproven(e.to_string()))?;
        match reply {
            PeerResponse::Proof { key: theirs, sig }
                if theirs == *key
                    && key.verify(&address_message(&nonce, &addr.to_string()), &sig) => {}
            PeerResponse::Proof { .. } => return Err(unproven("another key answered".into())),
            other => return Err(unproven(format!("it answered {other:?}"))),
        }
        let mut proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        if proven.len() >= self.max_proven {
            proven.retain(|_, when| now.duration_since(*when) < self.proven_for);
            if proven.len() >= self.max_proven {
                proven.clear();
            }
        }
        proven.insert((*key, addr), now);
        Ok(())
    }
}

/// A request's time, against the relay's clock.
fn check_clock(ts: u64) -> Result<(), Distrust> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let off = now.abs_diff(ts);
    if off > MAX_SKEW.as_millis() as u64 {
        return Err(Distrust::Clock(off / 1000));
    }
    Ok(())
}

/// Loopback, link-local or unspecified: an address that means "this
/// machine" or "this link" to whoever uses it.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.1.1",
            "::1",
            "fe80::1",
            "0.0.0.0",
        ] {
            assert!(is_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "192.0.2.7", "2001:db8::1", "fd00::1"] {
            assert!(!is_local(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_relay_on_a_public_address_lists_no_loopback_peer() {
        let key = protocol::identity::Identity::from_seed([1; 32]).key();
        let open = Trust::new(false, None, None, Duration::from_secs(90), 10).unwrap();
        assert!(matches!(
            open.listed_addr("127.0.0.1".parse().unwrap(), 7000, None, &key),
            Err(Distrust::Local(_))
        ));
        assert_eq!(
            open.listed_addr("192.0.2.7".parse().unwrap(), 7000, None, &key)
                .unwrap()
                .to_string(),
            "192.0.2.7:7000"
        );
        let local = Trust::new(true, None, None, Duration::from_secs(90), 10).unwrap();
        assert!(local
            .listed_addr("127.0.0.1".parse().unwrap(), 7000, None, &key)
            .is_ok());
    }
}
