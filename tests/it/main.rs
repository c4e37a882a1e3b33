//! End-to-end tests: the real binaries, on loopback, with ephemeral ports.
//! One test binary with a module per topic, so the suite links once.

mod cli;
mod failover;
mod faults;
mod harness;
mod hostile;
mod identity;
mod index;
mod limits;
mod msrv;
mod paths;
mod phases;
mod shared;
mod transfers;
mod ux;
