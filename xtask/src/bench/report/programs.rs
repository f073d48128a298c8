//! The overhead part's breakdown by BPF program.

use std::fmt::Write;

use super::super::Workload;
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
