//! Tab completion of file names in the interactive client, from the merged
//! `ls` of the live peers. The list is fetched in the background, at start
//! and again when it is older than `FRESH`, so that Tab never waits on the
//! network.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use rustyline::{
    completion::Completer, highlight::Highlighter, hint::Hinter, validate::Validator, Context,
    Helper,
};

use crate::{discover::Relay, listing};

/// How long a fetched list is used before it is fetched again.
const FRESH: Duration = Duration::from_secs(30);

/// The most names kept for completion: enough for any folder a person
/// tabs through, bounded on a network with millions.
const MAX_NAMES: usize = 100_000;

/// Words the prompt understands besides file names.
const COMMANDS: [&str; 5] = ["get ", "help", "ls", "peers", "quit"];

/// The file names known to be on the live peers.
#[derive(Clone, Default)]
pub struct Catalog(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// Sorted, as `listing::collect` returns them.
    names: Arc<[String]>,
    fetched: Option<Instant>,
    fetching: bool,
}

impl Catalog {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches the list in the background, unless it is fresh or on its way.
    pub fn refresh_if_stale(&self, relay: &Relay) {
        {
            let mut state = self.lock();
            if state.fetching || state.fetched.is_some_and(|t| t.elapsed() < FRESH) {
                return;
            }
            state.fetching = true;
        }
        let (catalog, relay) = (self.clone(), relay.clone());
        let spawned = thread::Builder::new()
            .name("catalog".into())
            .spawn(move || {
                // Logged, not printed: a status line would tear the prompt being edited.
                let files = listing::names(&relay, MAX_NAMES);
                let mut state = catalog.lock();
                state.fetching = false;
                // Also after a failure, so that a relay that is down is not asked on every Tab.
                state.fetched = Some(Instant::now());
                match files {
                    Ok(names) => state.names = names.into(),
                    Err(e) => log::debug!("cannot list files for completion: {e}"),
                }
            });
        if spawned.is_err() {
            self.lock().fetching = false;
        }
    }

    /// Takes the result of a full `ls` the user ran anyway.
    /// Replaces the names known (sorted, as `ls` gives them).
    pub fn set_names(&self, mut names: Vec<String>) {
        names.dedup();
        names.truncate(MAX_NAMES);
        let mut state = self.lock();
        state.names = names.into();
        state.fetched = Some(Instant::now());
    }

    fn names(&self) -> Arc<[String]> {
        Arc::clone(&self.lock().names)
    }
}

/// The line editor's helper: completes file names and commands.
pub struct Completion {
    pub catalog: Catalog,
    pub relay: Relay,
}

impl Completer for Completion {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        self.catalog.refresh_if_stale(&self.relay);
        let typed = line.get(..pos).unwrap_or(line);
        // A file name is the whole line, spaces included, or what follows `get `.
        let start = typed
            .strip_prefix("get ")
            .map_or(0, |rest| pos - rest.trim_start().len());
        Ok((
            start,
            candidates(&self.catalog.names(), &typed[start..], start == 0),
        ))
    }
}

/// Names that start with `prefix`, cut after the next `/` like a shell does
/// with folders; then commands, when the line could still be one.
fn candidates(names: &[String], prefix: &str, commands: bool) -> Vec<String> {
    let mut found: Vec<String> = names
        .iter()
        .filter_map(|name| {
            let rest = name.strip_prefix(prefix)?;
            let end = rest.find('/').map_or(rest.len(), |i| i + 1);
            Some(format!("{prefix}{}", &rest[..end]))
        })
        .collect();
    // Names sharing a folder are adjacent in sorted order.
    found.dedup();
    if commands {
        found.extend(
            COMMANDS
                .iter()
                .filter(|c| c.starts_with(prefix))
                .map(|c| c.to_string()),
        );
    }
    found
}

impl Hinter for Completion {
    type Hint = String;
}
impl Highlighter for Completion {}
impl Validator for Completion {}
impl Helper for Completion {}

#[cfg(test)]
mod tests {
    use super::candidates;

    fn names() -> Vec<String> {
        [
            "docs/a.txt",
            "docs/b.txt",
            "notes.txt",
            "poem.txt",
            "with space.txt",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn names_complete_to_the_next_folder() {
        assert_eq!(candidates(&names(), "d", false), ["docs/"]);
        assert_eq!(
            candidates(&names(), "docs/", false),
            ["docs/a.txt", "docs/b.txt"]
        );
        assert_eq!(candidates(&names(), "with s", false), ["with space.txt"]);
    }

    #[test]
    fn commands_complete_where_a_command_can_be() {
        assert_eq!(candidates(&names(), "p", true), ["poem.txt", "peers"]);
        assert_eq!(candidates(&names(), "p", false), ["poem.txt"]);
        assert!(candidates(&names(), "x", true).is_empty());
    }
}
