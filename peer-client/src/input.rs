//! Where the interactive client's lines come from: a line editor with
//! history and file-name completion when a person types at a terminal,
//! plain stdin otherwise (pipes, files, scripts).

use std::{
    fs::OpenOptions,
    io::{self, BufRead, IsTerminal, Read, StdinLock, Write},
};

use rustyline::{
    config::{Behavior, CompletionType, Config},
    error::ReadlineError,
    history::DefaultHistory,
    Editor,
};

use crate::{
    complete::{Catalog, Completion},
    discover::Relay,
};

/// Longest input line accepted from a pipe.
const MAX_INPUT: usize = 64 * 1024;

const PROMPT: &str = "> ";

/// Why the prompt cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The line editor failed (it talks to the terminal).
    #[error("cannot read input: {0}")]
    Editor(#[from] ReadlineError),
    /// Standard input failed.
    #[error("cannot read input: {0}")]
    Read(#[source] io::Error),
    /// A line longer than anyone types.
    #[error("input line longer than {MAX_INPUT} bytes")]
    TooLong,
}

pub enum Input {
    Editor(Box<Editor<Completion, DefaultHistory>>),
    Plain(StdinLock<'static>),
}

impl Input {
    pub fn open(relay: &Relay, catalog: &Catalog) -> Result<Input, InputError> {
        if !line_editing() {
            return Ok(Input::Plain(io::stdin().lock()));
        }
        let config = Config::builder()
            // Prompt and echo on the terminal itself: stdout carries only content.
            .behavior(Behavior::PreferTerm)
            .completion_type(CompletionType::List)
            .auto_add_history(true)
            .history_ignore_space(true)
            .history_ignore_dups(true)?
            .max_history_size(1000)?
            .build();
        let mut editor = Editor::with_config(config)?;
        editor.set_helper(Some(Completion {
            catalog: catalog.clone(),
            relay: relay.clone(),
        }));
        catalog.refresh_if_stale(relay);
        Ok(Input::Editor(Box::new(editor)))
    }

    /// The next line, without its line end; `None` at end of input.
    pub fn next_line(&mut self) -> Result<Option<String>, InputError> {
        match self {
            Input::Editor(editor) => match editor.readline(PROMPT) {
                Ok(line) => Ok(Some(line)),
                // Ctrl-C drops the line being typed, as in a shell.
                Err(ReadlineError::Interrupted) => Ok(Some(String::new())),
                Err(ReadlineError::Eof) => Ok(None),
                Err(e) => Err(InputError::Editor(e)),
            },
            Input::Plain(stdin) => {
                eprint!("{PROMPT}");
                let _ = io::stderr().flush();
                let mut line = String::new();
                match stdin.by_ref().take(MAX_INPUT as u64).read_line(&mut line) {
                    Ok(0) => Ok(None),
                    Ok(_) if line.len() == MAX_INPUT && !line.ends_with('\n') => {
                        Err(InputError::TooLong)
                    }
                    Ok(_) => Ok(Some(line.trim_end_matches(['\n', '\r']).to_string())),
                    Err(e) => Err(InputError::Read(e)),
                }
            }
        }
    }
}

/// True when a person types at a terminal that the editor can drive. The
/// editor then talks to /dev/tty; without one it would fall back to stdout.
fn line_editing() -> bool {
    // The terminals rustyline cannot edit on; it would print its prompt to stdout there.
    let dumb =
        std::env::var("TERM").is_ok_and(|t| matches!(t.as_str(), "dumb" | "cons25" | "emacs"));
    io::stdin().is_terminal()
        && !dumb
        && OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .is_ok()
}
