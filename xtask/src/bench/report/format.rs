//! How the report writes numbers: rates, durations, sizes and the per-observer cells.

use super::super::results::Config;

pub(super) fn k(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

pub(super) fn us(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.0} us", ns / 1e3)
    } else {
        format!("{:.2} us", ns / 1e3)
    }
}

pub(super) fn median(v: &[f64]) -> f64 {
    super::super::stats::median(v)
}

/// An observer's CPU time per operation, `-` when it was not measured (no observer).
pub(super) fn cpu_cell(c: &Config) -> String {
    if c.observer_cpu_ns_per_op.is_empty() {
        "-".to_string()
    } else {
        us(median(&c.observer_cpu_ns_per_op))
    }
}

/// Its BPF programs' time per operation with their runs per operation, `-` when none ran.
pub(super) fn bpf_cell(c: &Config) -> String {
    if c.bpf_ns_per_op.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{} ({:.1})",
            us(median(&c.bpf_ns_per_op)),
            median(&c.bpf_runs_per_op)
        )
    }
}

pub(super) fn ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

pub(super) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

pub(super) fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
