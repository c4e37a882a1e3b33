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

    use protocol::identity::{Identity, NetworkMac};

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    fn signed(me: &Identity, request: &Request, ts: u64) -> Option<Auth> {
        Some(me.authorize(&request.canonical(), ts))
    }

    #[test]
    fn only_allowed_keys_pass_and_a_reload_changes_which() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("allowed");
        let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
        fs::write(&file, format!("# the team\n{}  # a\n\n", a.key())).unwrap();
        let trust =
            Trust::new(true, Some(file.clone()), None, Duration::from_secs(90), 10).unwrap();
        let request = Request::Register {
            port: 7000,
            host: None,
        };
        assert!(trust
            .check(&request, signed(&a, &request, now_ms()))
            .is_ok());
        assert!(matches!(
            trust.check(&request, signed(&b, &request, now_ms())),
            Err(Distrust::NotAllowed(_))
        ));
        fs::write(&file, format!("{}\n{}\n", a.key(), b.key())).unwrap();
        assert_eq!(trust.reload().unwrap(), Some(2));
        assert!(trust
            .check(&request, signed(&b, &request, now_ms()))
            .is_ok());
        // A broken file keeps the keys read before, and says where.
        fs::write(&file, "not a key\n").unwrap();
        let e = trust.reload().unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(trust
            .check(&request, signed(&b, &request, now_ms()))
            .is_ok());
        // An open relay has nothing to reload.
        let open = Trust::new(true, None, None, Duration::from_secs(90), 10).unwrap();
        assert_eq!(open.reload().unwrap(), None);
    }

    #[test]
    fn signatures_and_clocks_are_checked() {
        let trust = Trust::new(true, None, None, Duration::from_secs(90), 10).unwrap();
        let me = Identity::from_seed([3; 32]);
        let request = Request::Register {
            port: 7000,
            host: None,
        };
        assert!(matches!(
            trust.check(&request, None),
            Err(Distrust::Unsigned)
        ));
        let other = Request::Register {
            port: 7001,
            host: None,
        };
        assert!(matches!(
            trust.check(&other, signed(&me, &request, now_ms())),
            Err(Distrust::BadSignature)
        ));
        let ten_minutes_ago = now_ms() - 600_000;
        match trust.check(&request, signed(&me, &request, ten_minutes_ago)) {
            Err(Distrust::Clock(off)) => assert!((599..=601).contains(&off), "{off}"),
            other => panic!("{other:?}"),
        }
        // Just within the window is fine.
        let four_minutes_ago = now_ms() - 240_000;
        assert!(trust
            .check(&request, signed(&me, &request, four_minutes_ago))
            .is_ok());
    }

    #[test]
    fn on_a_private_network_lookups_need_the_mac() {
        let secret = [7; 32];
        let trust = Trust::new(true, None, Some(secret), Duration::from_secs(90), 10).unwrap();
        let peers = Request::Peers;
        assert!(matches!(
            trust.check_lookup(&peers, None),
            Err(Distrust::Outsider)
        ));
        let good = NetworkMac::new(&secret, &peers.canonical(), now_ms());
        assert!(trust
            .check_lookup(&peers, Some(Credential::Network(good)))
            .is_ok());
        let wrong = NetworkMac::new(&[8; 32], &peers.canonical(), now_ms());
        assert!(matches!(
            trust.check_lookup(&peers, Some(Credential::Network(wrong))),
            Err(Distrust::Outsider)
        ));
        let other_request = NetworkMac::new(&secret, "RP2P/1 STATS", now_ms());
        assert!(trust
            .check_lookup(&peers, Some(Credential::Network(other_request)))
            .is_err());
        let stale = NetworkMac::new(&secret, &peers.canonical(), now_ms() - 600_000);
        assert!(matches!(
            trust.check_lookup(&peers, Some(Credential::Network(stale))),
            Err(Distrust::Clock(_))
        ));
        // Without a secret, anyone may look up.
        let open = Trust::new(true, None, None, Duration::from_secs(90), 10).unwrap();
        assert!(open.check_lookup(&peers, None).is_ok());
    }

    /// A peer at 127.0.0.2 that answers `times` PROVEs with `me`'s key.
    fn prover(me: Identity, times: usize) -> PeerAddr {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let addr: PeerAddr = listener.local_addr().unwrap().to_string().parse().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(times) {
                let Ok(stream) = stream else { continue };
                let mut line = String::new();
                let _ = std::io::BufReader::new(&stream).read_line(&mut line);
                if let Ok(PeerRequest::Prove { nonce, addr }) = PeerRequest::parse(line.trim_end())
                {
                    let sig = me.sign(&address_message(&nonce, &addr.to_string()));
                    let _ = PeerResponse::Proof { key: me.key(), sig }.write_to(&mut &stream);
                }
            }
        });
        addr
    }

    #[test]
    fn a_proof_is_remembered_for_the_ttl_and_no_longer() {
        let me = Identity::from_seed([4; 32]);
        let key = me.key();
        // Answers one PROVE only: a second connection back would fail.
        let addr = prover(Identity::from_seed([4; 32]), 1);
        let from: IpAddr = "127.0.0.1".parse().unwrap();
        let trust = Trust::new(true, None, None, Duration::from_secs(90), 10).unwrap();
        let listed = |trust: &Trust| trust.listed_addr(from, addr.port(), Some(addr.ip()), &key);
        assert_eq!(listed(&trust).unwrap(), addr);
        assert_eq!(listed(&trust).unwrap(), addr, "proven once, remembered");
        // A relay that remembers nothing asks again, and the peer no longer answers.
        let forgetful = Trust::new(true, None, None, Duration::ZERO, 10).unwrap();
        let again = prover(me, 1);
        let listed_again =
            |trust: &Trust| trust.listed_addr(from, again.port(), Some(again.ip()), &key);
        assert!(listed_again(&forgetful).is_ok());
        assert!(matches!(
            listed_again(&forgetful),
            Err(Distrust::Unproven { .. })
        ));
    }

    #[test]
    fn the_memory_of_proofs_is_bounded() {
        let me = Identity::from_seed([5; 32]);
        let key = me.key();
        let from: IpAddr = "127.0.0.1".parse().unwrap();
        let trust = Trust::new(true, None, None, Duration::from_secs(90), 1).unwrap();
        let (first, second) = (
            prover(Identity::from_seed([5; 32]), 1),
            prover(Identity::from_seed([5; 32]), 1),
        );
        assert!(trust
            .listed_addr(from, first.port(), Some(first.ip()), &key)
            .is_ok());
        assert!(trust
            .listed_addr(from, second.port(), Some(second.ip()), &key)
            .is_ok());
        // Room for one proof: the first was forgotten to make room, and
        // its peer answers no more.
        assert!(trust
            .listed_addr(from, first.port(), Some(first.ip()), &key)
            .is_err());
        assert!(trust
            .listed_addr(from, second.port(), Some(second.ip()), &key)
            .is_ok());
        let _ = me;
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
