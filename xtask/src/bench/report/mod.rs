//! BENCHMARKS.md: the machine, a summary table (each figure, its target, met or missed by how
//! much), then the detail of each measurement.

use std::fmt::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::{Plan, Results};

mod format;
mod guest;
mod notes;
mod previous;
mod programs;

use format::{fmt_num, k, median, mib, ms, us, workload_tables};
pub use guest::{GuestBench, guest_section, read_guest};
pub use notes::dhat_top;
use notes::notes;
pub use previous::with_previous;

/// The machine and the code measured.
pub fn machine(root: &Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    // Only git needs the checkout (absent in a vm-bench guest, where the rest still answers).
    let out = |cmd: &str, args: &[&str]| {
        let mut c = Command::new(cmd);
        if cmd == "git" {
            c.current_dir(root);
        }
        c.args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    // The bench's own output files do not make the measured code dirty.
    let dirty = !out(
        "git",
        &[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":!BENCHMARKS.md",
            ":!benchmarks",
        ],
    )
    .is_empty();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "kernel": out("uname", &["-r"]),
        "date": out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "commit": format!("{}{}", out("git", &["rev-parse", "--short", "HEAD"]),
                          if dirty { " (with uncommitted changes)" } else { "" }),
        "conntrack_tool": out("conntrack", &["--version"]),
    })
}

/// The unsigned integers in a line, in order.
pub fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Lower is better: met, or missed by how much.
fn at_most(value: f64, target: f64, unit: &str) -> String {
    if value <= target {
        "met".into()
    } else {
        format!(
            "**missed** by {} {unit} ({:.1}x the target)",
            fmt_num(value - target),
            value / target
        )
    }
}

/// An observer's loss threshold: the lowest rate at which it missed anything, and the
/// highest rate below that at which it delivered everything, in events/s. (A clean step above
/// a lossy one does not raise the threshold: losses come with bursts, and one clean run at a
/// higher rate does not make the lower rate safe.)
pub fn thresholds(r: &Results, observer: &str) -> (Option<f64>, Option<f64>) {
    let steps: Vec<_> = r
        .completeness
        .iter()
        .filter(|s| s.observer == observer)
        .collect();
    let lossy = steps
        .iter()
        .filter(|s| s.missing > 0 || s.reported_lost > 0)
        .map(|s| s.events_per_s)
        .reduce(f64::min);
    let clean = steps
        .iter()
        .filter(|s| s.missing == 0 && s.reported_lost == 0)
        .map(|s| s.events_per_s)
        .filter(|&e| lossy.is_none_or(|l| e < l))
        .reduce(f64::max);
    (clean, lossy)
}

pub fn markdown(r: &Results, plan: &Plan, guest: Option<&GuestBench>) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `cargo xtask bench{}` (raw figures: [benchmarks/bench.json](benchmarks/bench.json)). \
         Every figure below was measured in the same run, side by side, in network namespaces the \
         bench created (veth only). Targets are goals, not test assertions.\n",
        if plan.mode == "quick" { " --quick" } else { "" }
    );
    let _ = writeln!(
        s,
        "- machine: {} ({} cores, {} GiB), kernel {}\n- date: {}, commit {}, mode `{}`, wall time {:.0} s\n- backends that load here: {}\n- load average (1/5/15 min) during the run: {}\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        plan.mode,
        r.wall_s,
        r.backends.join(", "),
        r.load
            .iter()
            .map(|(w, l)| format!("{w}: {l}"))
            .collect::<Vec<_>>()
            .join("; "),
    );
    let busy = r
        .load
        .iter()
        .filter_map(|(_, l)| l.split_whitespace().next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    let _ = writeln!(s, "## Summary\n");
    if busy > 1.0 {
        let _ = writeln!(
            s,
            "The machine had other load during this run (1-minute load average up to {busy:.1}): \
             throughput ratios and latencies are noisy; the CPU-time-per-operation rows, \
             completeness counts and memory figures are not affected much.\n"
        );
    }
    let _ = writeln!(s, "| figure | measured | target | result |");
    let _ = writeln!(s, "|---|---|---|---|");
    let default = r.backends.first().cloned().unwrap_or_default();
    for w in &r.overhead {
        let Some(base) = w.configs.first() else {
            continue;
        };
        for c in w.configs.iter().skip(1) {
            let cost = (1.0 - c.ratio) * 100.0;
            let target = if c.name.starts_with("detector") && w.name != "unrelated slab frees" {
                if c.name.contains(&default) {
                    format!("<= 3% ({default}, default)")
                } else {
                    "<= 3%".into()
                }
            } else {
                "none (comparison)".into()
            };
            let result = if target.starts_with("none") {
                "-".into()
            } else {
                at_most(cost, 3.0, "pp")
            };
            let _ = writeln!(
                s,
                "| {} cost with {} | {:.1}% ({} vs {} {}) | {target} | {result} |",
                w.name,
                c.name,
                cost,
                k(c.median_rate),
                k(base.median_rate),
                w.unit,
            );
            // The same cost as CPU time per operation: what the machine's other load does
            // not distort.
            if !c.observer_cpu_ns_per_op.is_empty() {
                let user = median(&c.observer_cpu_ns_per_op);
                let bpf = median(&c.bpf_ns_per_op);
                let cores = m["cores"].as_f64().unwrap_or(1.0).max(1.0);
                let share = (user + bpf) * 1e-9 * base.median_rate / cores * 100.0;
                let _ = writeln!(
                    s,
                    "| ... as CPU time per operation | {} in the process{} = {:.1}% of the {cores:.0} CPUs at {} {} | - | - |",
                    us(user),
                    if c.bpf_ns_per_op.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " + {} in BPF programs ({:.1} runs/op)",
                            us(bpf),
                            median(&c.bpf_runs_per_op)
                        )
                    },
                    share,
                    k(base.median_rate),
                    w.unit
                );
            }
        }
    }
    if let Some(row) = r
        .overhead
        .iter()
        .find(|w| w.name == "unrelated slab frees")
        .and_then(programs::slab_free_row)
    {
        let _ = writeln!(s, "{row}");
    }
    let det = r
        .backends
        .first()
        .map(|b| format!("detector trace ({b})"))
        .unwrap_or_default();
    let (d_clean, d_lossy) = thresholds(r, &det);
    let (c_clean, c_lossy) = thresholds(r, "conntrack -E");
    // The detector's own CPU use slows the generator on this small machine: the "highest
    // rate the machine sustains" is the one reached while the detector was running.
    let max_rate = r
        .completeness
        .iter()
        .filter(|s| s.observer == det)
        .map(|s| s.events_per_s)
        .fold(0.0, f64::max);
    let goal = 200e3f64.min(max_rate);
    if !r.completeness.is_empty() {
        let d_text = format!(
            "none lost up to {} events/s{}",
            d_clean.map_or("-".into(), k),
            d_lossy.map_or(String::new(), |l| format!("; losses from {}", k(l)))
        );
        let d_result = match d_clean {
            Some(c) if c >= goal * 0.98 => "met".to_string(),
            Some(c) => format!(
                "**missed**: lossless only up to {} ({:.0}% of it)",
                k(c),
                100.0 * c / goal
            ),
            None => "**missed**: lost events at every rate".into(),
        };
        let _ = writeln!(
            s,
            "| events lost by {det} | {d_text} | 0 at >= 200k/s or the highest rate reached with it running ({}) | {d_result} |",
            k(max_rate)
        );
        let _ = writeln!(
            s,
            "| events lost by conntrack -E | none lost up to {} events/s{} | none (comparison) | - |",
            c_clean.map_or("-".into(), k),
            c_lossy.map_or("; never lost".into(), |l| format!("; losses from {}", k(l)))
        );
        let (ratio_text, ratio_result) = match (d_clean, c_lossy) {
            (Some(d), Some(c)) => {
                let x = d / c;
                (
                    format!("{x:.1}x ({} / {})", k(d), k(c)),
                    if x >= 10.0 {
                        "met".to_string()
                    } else {
                        format!("**missed** by {:.1}x", 10.0 / x)
                    },
                )
            }
            (Some(_), None) => (
                "conntrack -E lost nothing either at these rates".to_string(),
                "not measurable here".to_string(),
            ),
            _ => ("-".to_string(), "**missed**".to_string()),
        };
        let _ = writeln!(
            s,
            "| detector's lossless rate / conntrack -E's loss threshold | {ratio_text} | >= 10x | {ratio_result} |"
        );
    }
    if let Some(l) = &r.latency {
        let _ = writeln!(
            s,
            "| verdict latency, delete to verdict (lab, {} verdicts) | p50 {}, p99 {}, max {} | p99 <= 5 ms | {} |",
            l.verdicts,
            ms(l.p50_ns),
            ms(l.p99_ns),
            ms(l.max_ns),
            at_most(l.p99_ns as f64 / 1e6, 5.0, "ms")
        );
    }
    if let Some(mem) = &r.memory {
        let kb = mem.kernel_map_bytes as f64 / mem.flows_target as f64;
        let _ = writeln!(
            s,
            "| bytes per tracked flow, user space ((RSS at {} - idle RSS) / flows) | {:.0} B (+ {:.0} B in kernel maps) | <= 160 B | {} |",
            k(mem.flows_target as f64),
            mem.user_bytes_per_flow,
            kb,
            at_most(mem.user_bytes_per_flow, 160.0, "B")
        );
        let _ = writeln!(
            s,
            "| RSS at {} flows (peak VmHWM; steady VmRSS) | {} peak, {} steady | <= 96 MiB | {} |",
            k(mem.flows_target as f64),
            mib(mem.hwm),
            mib(mem.rss),
            at_most(mem.hwm as f64 / 1048576.0, 96.0, "MiB")
        );
        let _ = writeln!(
            s,
            "| start to ready at {} flows (median of {}) | {:.2} s | <= 2 s | {} |",
            k(mem.flows_target as f64),
            mem.ready_s.len(),
            mem.ready_median_s,
            at_most(mem.ready_median_s, 2.0, "s")
        );
    }
    let _ = writeln!(s);
    notes(&mut s, r);

    let _ = writeln!(s, "## 1. Overhead\n");
    let _ = writeln!(
        s,
        "Throughput through conntrack in the bench's client namespace (an nft `ct state new` rule \
         on output makes conntrack track every flow leaving it for the server namespace): TCP connect + close with RST by 8 client threads, each \
         connection one conntrack entry; UDP datagrams by 2 threads with sendmmsg, each to a new \
         5-tuple (32 source ports x 64000 destination ports); and, for the tracepoint backend's \
         `kmem_cache_free` hook, UDP sockets opened and closed by 2 threads (frees of other slab \
         caches), also with an empty BPF program (`r0 = 0; exit`, loaded by the bench) on that \
         tracepoint alone: its ns per run is the floor bpf_stats shows for any program there. \
         Each configuration ran {} time(s) for {:.0} s, interleaved; the median is shown. \
         `detector run` watched the namespace (`--netns`) and an empty agent map, with \
         `--max-entries 1048576` (sized to the bench's nf_conntrack_max, as its help asks); `conntrack -E` ran \
         in the namespace with its output read by the bench. CPU/op: the observer process's CPU \
         time (user + system, /proc/PID/stat) and its BPF programs' run time \
         (`kernel.bpf_stats_enabled`, set for the run and restored; it adds two clock reads per \
         program run) over the run, per operation: unlike throughput, the machine's other load \
         hardly moves them.\n",
        plan.reps, plan.phase_s
    );
    workload_tables(&mut s, &r.overhead, true);
    s.push_str(&guest.map(guest_section).unwrap_or_default());
    let _ = writeln!(s, "## 2. Event completeness\n");
    let _ = writeln!(
        s,
        "UDP new flows at a paced rate for {:.0} s per step (2 generator threads), each flow one NEW; \
         the bench namespace's UDP timeout is 1 s, and the step ends when the kernel's gc has reaped \
         every entry (each one DESTROY; after 5 s the rest is flushed with `conntrack -F`, also \
         one DESTROY each), so the events generated are exactly 2 x flows (the \
         kernel's own `insert_failed`/`drop` counters, from /proc/net/stat/nf_conntrack, would \
         show flows that were not created). Each observer ran alone: `detector trace --max-entries 1048576` (its \
         summary gives NEW, DESTROY and the kernel's loss counters; default 8 MiB ring buffer) and `conntrack -E` (lines printed; \
         ENOBUFS warnings). An observer that lost at two rates in a row skips the higher paced \
         rates. Events/s: NEW + DESTROY generated per second of the step.\n",
        plan.step_s
    );
    let _ = writeln!(
        s,
        "| observer | asked events/s | events/s | expected NEW+DESTROY | delivered NEW+DESTROY | missing | reported lost | reaped by gc in | flushed |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for st in &r.completeness {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} + {} | {} + {} | {} | {} | {:.1} s | {} |",
            st.observer,
            st.target_events_per_s.map_or("max".into(), k),
            k(st.events_per_s),
            st.expected_new,
            st.expected_destroy,
            st.delivered_new,
            st.delivered_destroy,
            st.missing,
            st.reported_lost,
            st.drain_s,
            st.flushed
        );
    }
    let _ = writeln!(s);

    if let Some(l) = &r.latency {
        let _ = writeln!(s, "## 3. Verdict latency\n");
        let _ = writeln!(
            s,
            "`detector lab --ports {} --cycles {}` (legacy cleanup, ground truth per delete): \
             {} cycles, {} port reuses, {} wrongful deletes, {} verdicts, {} events lost. Latency: \
             the delete's kernel timestamp to the moment `detector run` emitted the verdict \
             (`detection_latency_ns`, same clock); the lab runs the detector with a {} ms reorder \
             watermark (`detector run`'s default too), which every verdict waits out.\n",
            plan.lab_ports,
            plan.lab_cycles,
            l.cycles,
            l.port_reuses,
            l.wrongful_deletes,
            l.verdicts,
            l.events_lost,
            l.watermark_ms
        );
        let _ = writeln!(s, "| samples | p50 | p99 | max |\n|---|---|---|---|");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |\n",
            l.verdicts,
            ms(l.p50_ns),
            ms(l.p99_ns),
            ms(l.max_ns)
        );
    }
    if let Some(mem) = &r.memory {
        let _ = writeln!(s, "## 4. Memory and start-up\n");
        let _ = writeln!(
            s,
            "{} UDP entries in a fresh namespace's conntrack table (UDP timeout 600 s; the table \
             held {}) and an LRU hash agent map of {} entries in NPA's v4-24/16 layout, filled with \
             those flows' keys and pinned in the bench's bpffs ({} keys seen by the detector); \
             built in {:.1} s. `detector run --netns <ns> --map-pin <pin> --max-entries {} \
             --max-flows {}`; ready = process start to its `watching map` line (after the probes \
             are attached, the ctnetlink dump and the map's keys are read). Memory read 2 s after \
             ready from /proc/PID/status; kernel maps: the sum of `memlock` over the detector's \
             BPF map fds ({} maps). Idle: the same command on an empty table and an empty map.\n",
            mem.flows_target,
            mem.kernel_entries,
            mem.flows_target,
            mem.map_keys,
            mem.fill_s,
            mem.flows_target,
            mem.flows_target,
            mem.kernel_maps
        );
        let _ = writeln!(
            s,
            "| state | VmRSS | VmHWM | kernel maps | ready |\n|---|---|---|---|---|"
        );
        let _ = writeln!(
            s,
            "| idle | {} | {} | {} | {:.2} s |",
            mib(mem.idle_rss),
            mib(mem.idle_hwm),
            mib(mem.kernel_map_bytes_idle),
            mem.idle_ready_s
        );
        let _ = writeln!(
            s,
            "| {} flows | {} | {} | {} | {} |\n",
            k(mem.flows_target as f64),
            mib(mem.rss),
            mib(mem.hwm),
            mib(mem.kernel_map_bytes),
            mem.ready_s
                .iter()
                .map(|x| format!("{x:.2} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !r.profiles.is_empty() {
        let _ = writeln!(
            s,
            "## 5. Profiles
"
        );
        let _ = writeln!(
            s,
            "Where a target is missed, these say what dominates the cost. They ran after the \
             measurements, not during them.\n"
        );
        for p in &r.profiles {
            let _ = writeln!(s, "{}:\n\n```", p.what);
            for l in &p.top {
                let _ = writeln!(s, "{l}");
            }
            let _ = writeln!(s, "```\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_a_summary_line() {
        assert_eq!(
            numbers(
                "detector: 12 NEW, 10 DESTROY; lost in kernel: 3 (ring buffer full), dedupe \
                 table full: 0, kernel read failures: 1, undecodable: 0"
            ),
            vec![12, 10, 3, 0, 1, 0]
        );
    }

    #[test]
    fn at_most_says_by_how_much() {
        assert_eq!(at_most(2.0, 3.0, "pp"), "met");
        assert!(at_most(6.0, 3.0, "pp").contains("by 3.0 pp (2.0x"));
    }

    #[test]
    fn thresholds_split_clean_and_lossy() {
        let mut r = Results::default();
        for (rate, missing) in [(10e3, 0), (50e3, 0), (100e3, 5), (200e3, 9)] {
            r.completeness.push(super::super::Step {
                observer: "x".into(),
                events_per_s: rate,
                missing,
                ..Default::default()
            });
        }
        assert_eq!(thresholds(&r, "x"), (Some(50e3), Some(100e3)));
        // A clean step above the first lossy one does not move the threshold.
        r.completeness[3].missing = 0;
        assert_eq!(thresholds(&r, "x"), (Some(50e3), Some(100e3)));
        assert_eq!(thresholds(&r, "y"), (None, None));
    }
}
