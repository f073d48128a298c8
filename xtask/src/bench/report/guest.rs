//! The guest's section of BENCHMARKS.md: the overhead part measured by `cargo xtask vm-bench`
//! in a Debian guest under qemu, where the kprobe backend loads next to the tracepoint one.
//! Its absolute figures are emulated (TCG); the section leads with what is not: runs per
//! operation and the ratios between the backends.

use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::super::Results;
use super::format::{median, us, workload_tables};

/// The guest the figures come from (written by `cargo xtask vm-bench` on the host).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestInfo {
    pub label: String,
    pub kernel: String,
    /// `TCG` (emulated) or `KVM`.
    pub accel: String,
    pub vcpus: u32,
    pub memory: String,
    pub commit: String,
    pub date: String,
    pub boot_to_end_s: f64,
    pub prepare_s: f64,
}

/// benchmarks/bench-guest.json: the guest, and the bench's results as the guest wrote them.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestBench {
    pub guest: GuestInfo,
    pub results: Results,
}

/// The stored guest results at `path`, if there are any; a file that does not parse is
/// reported and left out of the report (it is not this run's to fix).
pub fn read_guest(path: &Path) -> Option<GuestBench> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!(
                "bench: {} does not parse ({e}); its section is left out",
                path.display()
            );
            None
        }
    }
}

/// `x / base` as `1.23x`, or `-` without a base.
fn ratio(x: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}x", x / b),
        _ => "-".into(),
    }
}

pub fn guest_section(g: &GuestBench) -> String {
    let (info, r) = (&g.guest, &g.results);
    let emulated = info.accel != "KVM";
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## 1b. Overhead by backend in a guest: kprobe vs tracepoint{}\n",
        if emulated {
            " (qemu TCG: emulated)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "The overhead part above, run by `cargo xtask vm-bench` inside the Debian {} guest of \
         `cargo xtask vm-test` (kernel {}, qemu {}, {} vCPUs, {}), where the kprobe backend \
         loads next to the tracepoint one (this machine's kernel has no kprobes): `xtask bench \
         --only overhead` ({} mode) with every backend that loads there ({}), {} interleaved \
         run(s) of {} s per configuration, medians shown; {}, commit {}, {:.0} s from boot to \
         power-off. Raw figures: [benchmarks/bench-guest.json](benchmarks/bench-guest.json). \
         A full `cargo xtask bench` runs `cargo xtask vm-bench` last and renders what it \
         stored; `--quick` and `--no-guest` render the stored file as it is, so the date and \
         commit here may be older than this file's.\n",
        info.label,
        info.kernel,
        info.accel,
        info.vcpus,
        info.memory,
        r.plan["mode"].as_str().unwrap_or("?"),
        r.backends.join(", "),
        r.plan["reps"],
        r.plan["phase_s"],
        info.date,
        info.commit,
        info.boot_to_end_s
    );
    if emulated {
        let _ = writeln!(
            s,
            "**The absolute figures in this section are emulated**: under TCG qemu translates \
             every instruction of the guest, its kernel and the JIT-compiled BPF programs \
             included, so rates, ns and CPU time per operation are many times the native ones \
             and not comparable with the rest of this file. What counts here: **runs per \
             operation** (how often each backend's programs fire, whatever the CPU's speed) \
             and **the ratio between the backends** (the same workload on the same emulated \
             CPU; the ratio columns are each backend over the tracepoint backend). Even the \
             ratios are TCG's (it charges by translated instruction, not by native cycle): \
             read them as which backend does more work per operation, not as native \
             nanoseconds. BPF ns/op is the programs' own run time (bpf_stats); the cost of \
             the hook around them (a kprobe's ftrace entry or breakpoint, a kretprobe's \
             return hook, a tracepoint's call) is in neither it nor the observer's CPU, only \
             in the throughput column, the noisiest figure under emulation. The kprobe backend's destroy program (on `nf_ct_destroy`) runs when \
             an entry is freed, mostly after the measured seconds (the bench's entries time \
             out 1 s after their last packet), so its share is under-counted: its runs/op \
             says which fraction was counted. The tracepoint backend's (on every \
             `kmem_cache_free`) runs on all the workload's slab frees and is fully counted.\n"
        );
    }
    let _ = writeln!(
        s,
        "| workload | backend | BPF runs/op | BPF ns/op{e} | BPF vs tracepoint | observer \
         CPU/op{e} | CPU vs tracepoint | throughput vs no observer |",
        e = if emulated { " (emulated)" } else { "" }
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for w in &r.overhead {
        let detectors: Vec<_> = w
            .configs
            .iter()
            .filter(|c| c.name.starts_with("detector"))
            .collect();
        let reference = detectors.iter().find(|c| c.name.contains("tracepoint"));
        let bpf_ref = reference
            .filter(|c| !c.bpf_ns_per_op.is_empty())
            .map(|c| median(&c.bpf_ns_per_op));
        let cpu_ref = reference
            .filter(|c| !c.observer_cpu_ns_per_op.is_empty())
            .map(|c| median(&c.observer_cpu_ns_per_op));
        for c in detectors {
            let backend = c.name.split(['(', ')']).nth(1).unwrap_or(c.name.as_str());
            let (bpf, cpu) = (median(&c.bpf_ns_per_op), median(&c.observer_cpu_ns_per_op));
            let _ = writeln!(
                s,
                "| {} | {backend} | {:.2} | {bpf:.0} | {} | {} | {} | {:.3} |",
                w.name,
                median(&c.bpf_runs_per_op),
                ratio(bpf, bpf_ref),
                us(cpu),
                ratio(cpu, cpu_ref),
                c.ratio
            );
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Each workload under each observer in the guest{}:\n",
        if emulated { " (emulated rates)" } else { "" }
    );
    workload_tables(&mut s, &r.overhead, false);
    s
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]
mod tests {
    use super::*;

    /// A guest file as vm-bench writes it, cut to one workload.
    const SAMPLE: &str = r#"{
      "guest": {"label": "6.1 amd64", "kernel": "6.1.0-56-amd64", "accel": "TCG", "vcpus": 2,
                "memory": "1536M", "commit": "abc1234", "date": "2026-12-01 11:00 UTC",
                "boot_to_end_s": 812.4, "prepare_s": 30.0},
      "results": {
        "machine": {"cpu": "QEMU", "kernel": "6.1.0-56-amd64"},
        "plan": {"mode": "quick", "phase_s": 2.0, "reps": 1},
        "backends": ["kprobe", "tracepoint"],
        "overhead": [{
          "name": "TCP connection churn", "unit": "connections/s",
          "configs": [
            {"name": "no observer", "runs": [{"ops": 2000, "errors": 0, "secs": 2.0}],
             "median_rate": 1000.0, "ratio": 1.0},
            {"name": "detector run (kprobe)", "runs": [{"ops": 1600, "errors": 0, "secs": 2.0}],
             "observer_cpu_ns_per_op": [40000.0], "bpf_ns_per_op": [30000.0],
             "bpf_runs_per_op": [6.0],
             "bpf_programs": {"kp_confirm": {"ns_per_op": [30000.0], "runs_per_op": [6.0]}},
             "median_rate": 800.0, "ratio": 0.8},
            {"name": "detector run (tracepoint)",
             "runs": [{"ops": 1400, "errors": 0, "secs": 2.0}],
             "observer_cpu_ns_per_op": [50000.0], "bpf_ns_per_op": [60000.0],
             "bpf_runs_per_op": [24.0], "median_rate": 700.0, "ratio": 0.7}
          ]}],
        "wall_s": 700.0
      }
    }"#;

    #[test]
    fn renders_the_backends_side_by_side_and_says_emulated() {
        let g: GuestBench = serde_json::from_str(SAMPLE).unwrap();
        let s = guest_section(&g);
        assert!(s.contains("(qemu TCG: emulated)"), "{s}");
        assert!(s.contains("**The absolute figures in this section are emulated**"));
        assert!(s.contains("kernel 6.1.0-56-amd64"));
        assert!(s.contains("commit abc1234"));
        // kprobe against tracepoint: half the BPF time, 0.8x the CPU.
        assert!(
            s.contains(
                "| TCP connection churn | kprobe | 6.00 | 30000 | 0.50x | 40 us | 0.80x | 0.800 |"
            ),
            "{s}"
        );
        assert!(s.contains(
            "| TCP connection churn | tracepoint | 24.00 | 60000 | 1.00x | 50 us | 1.00x | 0.700 |"
        ));
        assert!(s.contains("| kp_confirm | 6.00 | 5000 | 30000 |"));
    }

    #[test]
    fn the_committed_guest_file_renders() {
        let path = crate::root().join("benchmarks/bench-guest.json");
        let Some(g) = read_guest(&path) else {
            assert!(!path.exists(), "{} does not parse", path.display());
            return;
        };
        let s = guest_section(&g);
        assert!(s.contains("| workload | backend | BPF runs/op"));
        assert!(!g.results.overhead.is_empty());
    }
}
