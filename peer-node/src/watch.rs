//! Watching the served folder, so that a file added, changed or removed is
//! announced to the relay at once rather than at the next heartbeat.
//! Where watching is not possible (no inotify, too many watches), the
//! heartbeat's rescan is the fallback.

use std::path::Path;

use log::{debug, info};
use notify::{
    event::{AccessKind, AccessMode},
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher,
};

/// Calls `changed` after each change under `root`; `None` (with a log
/// line saying so) where the folder cannot be watched. Watching stops when
/// the watcher is dropped.
pub(crate) fn folder(
    root: &Path,
    changed: impl Fn() + Send + 'static,
) -> Option<RecommendedWatcher> {
    let handler = move |event: notify::Result<Event>| match event {
        Ok(event) if is_change(&event.kind) => changed(),
        Ok(_) => {}
        Err(e) => debug!("watching the folder: {e}"),
    };
    let watching = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map(|()| watcher)
    });
    match watching {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            info!(
                "cannot watch {} ({e}): changes reach the relay at the next heartbeat",
                root.display()
            );
            None
        }
    }
}

/// Reading a file (serving it) is not a change; writing one is.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{sync::mpsc, time::Duration};

    #[test]
    fn writes_are_seen_and_reads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "a").unwrap();
        let (tx, rx) = mpsc::channel();
        let Some(_watcher) = folder(dir.path(), move || {
            let _ = tx.send(());
        }) else {
            return eprintln!("skipped: this machine cannot watch folders");
        };
        let _ = std::fs::read(dir.path().join("a")).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a read was taken for a change"
        );
        std::fs::write(dir.path().join("b"), "b").unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a new file is seen");
    }
}
