//! `peer-client`: the command line around the `peer_client` library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use netkit::cli;
use peer_client::{Args, Failure};

fn main() -> ExitCode {
    let args: Args = cli::parse(4);
    cli::init_logging(args.verbose(), false, log::LevelFilter::Warn);
    match peer_client::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // Shown as clap shows the other mistakes on the command line.
        Err(Failure::Usage(e)) => cli::usage_error::<Args>(e),
        Err(e) => {
            eprintln!("peer-client: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
