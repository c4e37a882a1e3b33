//! Talking to the relay: who is live, and how is the relay doing.

use std::time::Duration;

use protocol::{
    relay::{Request, Response},
    PeerAddr, ProtocolError,
};

use crate::net;

/// Where the relay is, and how long to wait for it.
#[derive(Clone)]
pub struct Relay {
    pub host: String,
    pub port: u16,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot reach relay {0}: {1}")]
    Unreachable(String, String),
    #[error("relay {0} gave a bad reply: {1}")]
    BadReply(String, ProtocolError),
    #[error("relay {0} refused: {1}")]
    Refused(String, protocol::ErrorReply),
}

impl Relay {
    pub fn peers(&self) -> Result<Vec<PeerAddr>, RelayError> {
        match self.call(Request::Peers)? {
            Response::Peers(peers) => Ok(peers),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn stats(&self) -> Result<Vec<(String, u64)>, RelayError> {
        match self.call(Request::Stats)? {
            Response::Stats(stats) => Ok(stats),
            other => Err(self.unexpected(other)),
        }
    }

    fn call(&self, request: Request) -> Result<Response, RelayError> {
        let addr = self.to_string();
        let unreachable =
            |e: std::io::Error| RelayError::Unreachable(addr.clone(), net::describe(&e));
        let stream =
            net::connect((self.host.as_str(), self.port), self.timeout).map_err(unreachable)?;
        let mut reply = net::send(&stream, |w| request.write_to(w)).map_err(unreachable)?;
        match Response::read_from(&mut reply) {
            Ok(Response::Error(e)) => Err(RelayError::Refused(addr, e)),
            Ok(response) => Ok(response),
            Err(ProtocolError::Io(e)) => Err(unreachable(e)),
            Err(e) => Err(RelayError::BadReply(addr, e)),
        }
    }

    fn unexpected(&self, response: Response) -> RelayError {
        RelayError::BadReply(
            self.to_string(),
            ProtocolError::UnexpectedReply(format!("{response:?}")),
        )
    }
}

impl std::fmt::Display for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
