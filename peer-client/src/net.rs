//! Opening a connection with every timeout set, and one request/reply over it.

use std::{
    io::{self, BufReader, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

/// Connects to the first address of `target` that answers within `timeout`;
/// reads and writes on the stream then time out after `timeout` too.
pub fn connect<A: ToSocketAddrs>(target: A, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in target.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                // Requests are one small line: send it now, not after 40 ms.
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "host has no address")))
}

/// Sends one request line and returns a reader positioned at the reply.
pub fn send(
    stream: &TcpStream,
    write: impl FnOnce(&mut &TcpStream) -> io::Result<()>,
) -> io::Result<BufReader<&TcpStream>> {
    let mut w = stream;
    write(&mut w)?;
    w.flush()?;
    Ok(BufReader::with_capacity(64 * 1024, stream))
}

pub use protocol::describe_io as describe;
