//! Statistics and the results table.

use std::time::Duration;

/// One line of the table: our figure, the baseline's, and how they compare.
pub struct Row {
    pub figure: String,
    pub ours: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    /// `None` when the figure has no target, only a number to report.
    pub met: Option<bool>,
}

impl Row {
    pub fn new(figure: impl Into<String>, ours: impl Into<String>) -> Row {
        Row {
            figure: figure.into(),
            ours: ours.into(),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            met: None,
        }
    }

    pub fn baseline(mut self, name: &str, value: impl Into<String>) -> Row {
        self.baseline = format!("{} ({name})", value.into());
        self
    }

    pub fn ratio(mut self, ratio: f64) -> Row {
        self.ratio = format!("{ratio:.2}");
        self
    }

    pub fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

/// The table in Markdown, ready for BENCHMARKS.md.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | ours | baseline (same run) | ratio | target | met |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        out += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.figure, r.ours, r.baseline, r.ratio, r.target, met
        );
    }
    out
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `p`th percentile (0-100) of `durations`, nearest rank.
pub fn percentile(durations: &[Duration], p: f64) -> Duration {
    let mut v = durations.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn secs(values: &[Duration]) -> Vec<f64> {
    values.iter().map(Duration::as_secs_f64).collect()
}
