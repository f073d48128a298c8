//! How the report writes numbers: rates, durations, sizes and the per-observer cells.

use std::fmt::Write;

use super::super::results::{Config, Workload};
use super::programs;

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

/// One table per workload (each observer's rate, ratio, CPU and BPF per operation, and the
/// interleaved runs' rates when `runs`), each followed by its per-program table.
pub(super) fn workload_tables(s: &mut String, overhead: &[Workload], runs: bool) {
    for w in overhead {
        let (runs_head, runs_rule) = if runs { (" runs |", "---|") } else { ("", "") };
        let _ = writeln!(
            s,
            "| {} | median {} | vs none |{runs_head} observer CPU/op | BPF/op (runs/op) |",
            w.name, w.unit
        );
        let _ = writeln!(s, "|---|---|---|{runs_rule}---|---|");
        for c in &w.configs {
            let rates = if runs {
                let list: Vec<String> = c.runs.iter().map(|x| k(x.rate())).collect();
                format!(" {} |", list.join(", "))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} |{rates} {} | {} |",
                c.name,
                k(c.median_rate),
                c.ratio,
                cpu_cell(c),
                bpf_cell(c),
            );
        }
        let _ = writeln!(s);
        programs::table(s, w);
    }
}
