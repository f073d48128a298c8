//! The overhead part's breakdown by BPF program.

use std::fmt::Write;

use super::super::{Config, Workload};
use crate::bench::stats::median;

/// Where a workload's BPF time goes: each program's runs and run time per operation (medians
/// over the repetitions), for every configuration that ran programs.
pub(super) fn table(s: &mut String, w: &Workload) {
    for c in w.configs.iter().filter(|c| !c.bpf_programs.is_empty()) {
        let _ = writeln!(
            s,
            "{}, {}, per BPF program (bpf_stats; a run's time includes one of the two clock \
             reads bpf_stats adds around it):\n",
            w.name, c.name
        );
        let _ = writeln!(s, "| program | runs/op | ns/run | BPF ns/op |");
        let _ = writeln!(s, "|---|---|---|---|");
        for (name, p) in &c.bpf_programs {
            let (ns, runs) = (median(&p.ns_per_op), median(&p.runs_per_op));
            let per_run = if runs > 0.0 {
                format!("{:.0}", ns / runs)
            } else {
                "-".to_string()
            };
            let _ = writeln!(s, "| {name} | {runs:.2} | {per_run} | {ns:.0} |");
        }
        let _ = writeln!(s);
    }
}

/// The name the bench gives the empty program's configuration ([`crate::bench::floor`]).
const FLOOR: &str = "empty BPF program (floor)";

/// Median ns per run of the programs of `c` whose name starts with `prefix`.
fn ns_per_run(c: &Config, prefix: &str) -> Option<f64> {
    let (ns, runs) = c
        .bpf_programs
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .fold((0.0, 0.0), |(ns, runs), (_, p)| {
            (ns + median(&p.ns_per_op), runs + median(&p.runs_per_op))
        });
    (runs > 0.0).then(|| ns / runs)
}

/// The summary row for an unrelated slab free: the tracepoint backend's `kmem_cache_free`
/// program per run, next to an empty program's on the same tracepoint (what bpf_stats counts
/// for doing nothing there). `None` when the run lacks either.
pub(super) fn slab_free_row(w: &Workload) -> Option<String> {
    let det = w
        .configs
        .iter()
        .find(|c| c.name == "detector run (tracepoint)")?;
    let floor = w.configs.iter().find(|c| c.name == FLOOR)?;
    let det_ns = ns_per_run(det, "ct_destroy_kmem")?;
    let floor_ns = ns_per_run(floor, "floor")?;
    let result = if det_ns <= 20.0 {
        "met".to_string()
    } else if floor_ns > 20.0 {
        format!(
            "**missed**: the floor alone is {floor_ns:.0} ns here; the program's own work is \
             {:.0} ns a run above it",
            det_ns - floor_ns
        )
    } else {
        format!("**missed** by {:.0} ns", det_ns - 20.0)
    };
    Some(format!(
        "| unrelated slab free, BPF ns per run: the `kmem_cache_free` program / an empty program \
         there (bpf_stats' floor) | {det_ns:.0} ns / {floor_ns:.0} ns | <= 20 ns | {result} |"
    ))
}
