//! `peer-client`: the command line around the `peer_client` library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use netkit::cli;
use peer_client::Args;

fn main() -> ExitCode {
    let args: Args = cli::parse(4);
    cli::init_logging(args.verbose(), false, log::LevelFilter::Warn);
    match peer_client::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer-client: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
