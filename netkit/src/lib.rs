//! Plumbing shared by the relay-p2p programs, one copy of each piece:
//!
//! - [`server`]: listen with a chosen backlog, accept into a capped pool of
//!   reused connection threads whose slots are RAII guards, answer `ERR busy`
//!   past the cap, and stop gracefully ([`Shutdown`]);
//! - [`Deadline`]: a socket reader with a deadline over a whole message, not
//!   just over each read, and [`close_gently`];
//! - [`call`]: the blocking one-request client, with errors that name the
//!   phase that failed (connecting, sending, receiving);
//! - [`cli`]: `--completions`, `--man`, logging and the printed address.
//!
//! No protocol logic lives here: the servers hand the pool a function that
//! serves one connection, and the clients hand [`call`] the encode and parse
//! functions of `protocol`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod call;
pub mod cli;
mod io_text;
mod net;
pub mod server;
mod shutdown;

pub use io_text::{describe_io, is_timeout};
pub use net::{close_gently, Clock, Deadline};
pub use shutdown::Shutdown;
