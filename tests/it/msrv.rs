//! The documented minimum Rust version is one that can build everything
//! the lockfile holds, the tests' dependencies included.

use std::process::Command;

use serde_json::Value;

/// `1.85` and `1.85.0` alike, as (major, minor, patch).
fn version(v: &str) -> [u64; 3] {
    let mut parts = v.split('.').map(|n| n.parse().unwrap_or(0));
    [(); 3].map(|()| parts.next().unwrap_or(0))
}

#[test]
fn rust_version_covers_every_locked_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This machine's platform only: the others' dependencies (kqueue on
    // macOS, say) need not be downloaded, and do not build here anyway.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("run rustc");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc names its host");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let packages = metadata["packages"].as_array().expect("packages");
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (version(needs) > ours).then(|| format!("{} {} needs {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "rust-version {} is too old: {too_new:?}",
        env!("CARGO_PKG_RUST_VERSION")
    );
}
