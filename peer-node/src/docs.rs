//! `--completions SHELL` and `--man`: a shell completion script and a man
//! page generated from the command line definition, so they never go stale.

use std::io::{self, Write};

use anyhow::Context;
use clap::{FromArgMatches, Parser};

#[derive(clap::Args)]
pub struct Docs {
    /// Print a completion script for SHELL on stdout and exit
    #[arg(long, value_name = "SHELL")]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff) on stdout and exit
    #[arg(long)]
    man: bool,
}

/// Parses the command line like `Parser::parse`, except that `--completions`
/// and `--man` are answered here, without the arguments otherwise required;
/// exits with `failure_code` if that output cannot be written.
pub fn parse<A: Parser>(failure_code: i32) -> A {
    // Not `exclusive`: clap counts values from the environment as given.
    let relaxed = A::command().mut_args(|arg| arg.required(false));
    let docs = relaxed
        .try_get_matches()
        .ok()
        .and_then(|matches| Docs::from_arg_matches(&matches).ok());
    if let Some(docs) = docs.filter(|d| d.completions.is_some() || d.man) {
        let cmd = A::command();
        let name = cmd.get_name().to_string();
        if let Err(e) = docs.print(cmd) {
            eprintln!("{name}: {e:#}");
            std::process::exit(failure_code);
        }
        std::process::exit(0);
    }
    A::parse()
}

impl Docs {
    fn print(&self, mut cmd: clap::Command) -> anyhow::Result<()> {
        // Rendered into memory first: the generators panic when a write fails (`| head`).
        let mut page = Vec::new();
        if let Some(shell) = self.completions {
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut page);
        } else {
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("cannot render the man page")?;
        }
        let mut out = io::stdout().lock();
        out.write_all(&page)
            .and_then(|()| out.flush())
            .context("cannot write to stdout")
    }
}
