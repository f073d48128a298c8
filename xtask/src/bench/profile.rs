//! Profiling tools (perf, valgrind) when installed.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// Whether a profiling tool is installed.
pub(super) fn tool_ok(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The top lines of a perf recording by self time, sorted by `sort` (comm, dso, sym...).
pub(super) fn perf_top(data: &Path, sort: &str, n: usize) -> Result<Vec<String>> {
    perf_report(data, &["--sort", sort], n)
}

/// The top lines of one command's samples (`comm`) by symbol, as shares of that command's
/// own time.
pub(super) fn perf_top_of(data: &Path, comm: &str, n: usize) -> Result<Vec<String>> {
    perf_report(
        data,
        &[
            "--comms",
            comm,
            "--percentage",
            "relative",
            "--sort",
            "dso,sym",
        ],
        n,
    )
}

fn perf_report(data: &Path, args: &[&str], n: usize) -> Result<Vec<String>> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children"])
        .args(args)
        .arg("-i")
        .arg(data)
        .output()
        .context("perf report")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('%'))
        .take(n)
        .map(|l| {
            let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
            // Rust symbols can be very long; the start says enough.
            l.chars().take(160).collect()
        })
        .collect())
}
