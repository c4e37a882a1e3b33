//! The download progress bar: bytes, rate and ETA on stderr, shown only when
//! stderr is a terminal that content is not also printed on, and only once a
//! download has taken longer than a moment, so that scripts, pipes and small
//! files see nothing.

use std::{
    io::{self, IsTerminal},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::fetch::Progress;

/// How long a download runs before its bar appears.
const MOMENT: Duration = Duration::from_millis(500);

const TEMPLATE: &str = "{bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec}, ETA {eta}";

pub struct Bar {
    /// Hidden until shown; the handle also lets status lines print cleanly.
    bar: ProgressBar,
    wanted: bool,
    shown: bool,
    started: Option<Instant>,
}

impl Bar {
    /// A bar for content that goes to a file (`to_stdout` false) or stdout.
    pub fn new(to_stdout: bool) -> Bar {
        let bar = ProgressBar::hidden();
        if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
            bar.set_style(style.progress_chars("=> "));
        }
        Bar {
            bar,
            // Bar and content on one terminal would garble each other.
            wanted: io::stderr().is_terminal() && !(to_stdout && io::stdout().is_terminal()),
            shown: false,
            started: None,
        }
    }

    /// Prints status lines on stderr without tearing the bar.
    pub fn printer(&self) -> impl FnMut(&str) {
        let bar = self.bar.clone();
        move |line| bar.suspend(|| eprintln!("{line}"))
    }
}

impl Progress for Bar {
    fn start(&mut self, size: u64, already: u64) {
        self.bar.set_length(size);
        self.bar.set_position(already);
        // A new peer: the rate and ETA of the last one say nothing about it.
        self.bar.reset_eta();
        self.started.get_or_insert_with(Instant::now);
    }

    fn advance(&mut self, bytes: u64) {
        self.bar.inc(bytes);
        if self.wanted && !self.shown && self.started.is_some_and(|t| t.elapsed() >= MOMENT) {
            self.shown = true;
            // Rate and ETA from here on: the estimator weighs old samples long, and
            // a slow first moment (a reader that waits) would skew them for minutes.
            self.bar.reset_eta();
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
