use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use crate::ProtocolError;

/// Where a peer serves files: an IP address that can be connected to (not
/// `0.0.0.0`, `::` or multicast) and a port that is not 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(SocketAddr);

impl PeerAddr {
    pub fn new(ip: IpAddr, port: u16) -> Result<Self, ProtocolError> {
        // `::ffff:1.2.3.4` is 1.2.3.4: one address, one entry, one set of checks.
        let ip = ip.to_canonical();
        let addr = SocketAddr::new(ip, port);
        if port == 0 {
            return Err(ProtocolError::invalid("peer port", "0"));
        }
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err(ProtocolError::invalid("peer address", &ip.to_string()));
        }
        Ok(PeerAddr(addr))
    }

    pub fn socket_addr(&self) -> SocketAddr {
        self.0
    }

    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

impl FromStr for PeerAddr {
    type Err = ProtocolError;

    /// `IP:PORT`, with IPv6 in brackets: `127.0.0.1:7000`, `[::1]:7000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| ProtocolError::invalid("peer address", s))?;
        PeerAddr::new(addr.ip(), addr.port())
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_v4_and_v6() {
        assert_eq!("127.0.0.1:7000".parse::<PeerAddr>().unwrap().port(), 7000);
        assert_eq!(
            "[::1]:7000".parse::<PeerAddr>().unwrap().to_string(),
            "[::1]:7000"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_plain_ipv4() {
        let mapped: PeerAddr = "[::ffff:127.0.0.1]:7000".parse().unwrap();
        assert_eq!(mapped, "127.0.0.1:7000".parse().unwrap());
    }

    #[test]
    fn rejects_what_cannot_be_dialled() {
        for s in [
            "127.0.0.1:0",
            "0.0.0.0:80",
            "[::]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "example.com:80",
            "[::ffff:0.0.0.0]:80",
            "127.0.0.1",
            "127.0.0.1:65536",
            "",
        ] {
            assert!(s.parse::<PeerAddr>().is_err(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,48}") {
            let _ = s.parse::<PeerAddr>();
        }

        #[test]
        fn display_then_parse_is_identity(ip in any::<IpAddr>(), port in 1u16..) {
            if let Ok(addr) = PeerAddr::new(ip, port) {
                prop_assert_eq!(addr.to_string().parse::<PeerAddr>().unwrap(), addr);
            }
        }
    }
}
