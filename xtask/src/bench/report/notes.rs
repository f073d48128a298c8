//! The report's notes on missed targets, and the heap profile's top allocation sites.

use std::fmt::Write;

use serde_json::Value;

use super::format::{median, us};
use super::{Results, thresholds};

/// What dominates each missed target (from the code's structure and the profiles in section
/// 5), written only for targets this run missed.
pub(super) fn notes(s: &mut String, r: &Results) {
    let mut n = Vec::new();
    let default = r.backends.first().cloned().unwrap_or_default();
    let overhead_missed = r.overhead.iter().any(|w| {
        w.name != "unrelated slab frees"
            && w.configs
                .iter()
                .any(|c| c.name.contains(&format!("run ({default})")) && (1.0 - c.ratio) > 0.03)
    });
    if overhead_missed {
        let per_op: Vec<String> = r
            .overhead
            .iter()
            .filter(|w| w.name != "unrelated slab frees")
            .filter_map(|w| {
                let c = w
                    .configs
                    .iter()
                    .find(|c| c.name.contains(&format!("run ({default})")))?;
                Some(format!(
                    "{}: {} in the detector process and {} in {:.1} BPF program runs per \
                     operation",
                    w.name,
                    us(median(&c.observer_cpu_ns_per_op)),
                    us(median(&c.bpf_ns_per_op)),
                    median(&c.bpf_runs_per_op)
                ))
            })
            .collect();
        n.push(format!(
            "Overhead: the load generator keeps both CPUs of this machine busy, so every cycle the \
             detector spends comes out of the throughput ({}). In the kernel, the tracepoint \
             backend's programs run on every packet that leaves with a conntrack entry (the \
             first-packet NEW probe looks the entry up in, and adds it to, its dedupe hash map: \
             `htab_map_update_elem`/`lookup_nulls_elem_raw` in the profile) and on every slab free \
             (each packet's own buffers are slab objects, hence the many runs per TCP \
             connection); in user space, the loop reads two records per flow (NEW and DESTROY) \
             through the reorder buffer into the engine's shadows. The per-program tables below \
             show where the BPF time goes: a NEW report (`ct_new_net_dev_queue` on a flow's first \
             packet) costs about 3 us and a DESTROY about 1 us, most of it the inserts into and \
             removals from the two tables of live entries (`SEEN`, `FLOWS`); packets of an \
             established flow leave before any map operation. Those tables allocate each entry as \
             it is inserted (`BPF_F_NO_PREALLOC`, the default from Linux 6.1, which keeps their \
             idle memory small); `detector run --preallocate-tables` spares the inserts that \
             allocation for all of the tables' memory taken at start (measure it with a \
             `--detector` wrapper that adds the flag). The cost is per operation, \
             so at the rates of a real node (far below this saturating generator) it is the same \
             microseconds per flow, not this share of the throughput. Section 5's system-wide \
             profile shows the split. `conntrack -E` is measured the same way for comparison.",
            per_op.join("; ")
        ));
    }
    if let Some(note) = loss_note(r, &default) {
        n.push(note);
    }
    if let Some(l) = &r.latency
        && l.p99_ns > 5_000_000
    {
        n.push(format!(
            "Verdict latency: the liveness is decided in the kernel at the delete; the verdict is \
             emitted when the delete's record leaves the reorder buffer, {} ms after its \
             timestamp (the event loop wakes on the ring buffer and, through a timerfd, when \
             the oldest held record is due, releasing what falls due within the next 0.25 ms \
             with it: detector/src/pipeline/event_loop.rs). The first verdict of a burst comes \
             out about then; the later ones of the same burst (the lab's cleanup deletes its \
             keys in one) leave about 150 us apart although their records are all in the loop \
             within half a millisecond of their deletes (measured with a build that logged each \
             delete record's arrival), and a `perf record -p` of the detector during the lab \
             finds its thread parked most of the time: it waits for a CPU, which the lab's \
             agent, reproducer and reader (it parses every verdict line) take on this \
             two-CPU machine. The engine's decision and its lines cost microseconds (`cargo run \
             --release -p detector --example engine_mem`).",
            l.watermark_ms
        ));
    }
    if let Some(m) = &r.memory {
        if m.user_bytes_per_flow > 160.0 || m.hwm > 96 << 20 {
            n.push(
                "Memory: per tracked flow the detector keeps, in user space, a 104-byte node in \
                 the engine's flow table (a dense slab with a u32-linked recency list: the flow's \
                 packed tuple once; its live entries and its agent-map keys, 32 bytes each when \
                 it has one of each, as they name the tuple's ends by one bit; the last \
                 destroyed entry boxed, as most flows have none; the head of its timeline), the \
                 table's hash index (about 10 B) and the pre-existing-entry index (24 B); `cargo \
                 run --release -p detector --example engine_mem` prints the engine's part per \
                 flow at 524288 flows, and its flight recorder of the last 32768 events is a \
                 fixed cost (about 5 MiB). The steady RSS is the idle process (the binary, its \
                 runtime and buffers: the idle row) plus those bytes per flow. The peak (VmHWM) \
                 is above the steady RSS by the start-up's transients: the flow table's slab and \
                 index growing by doubling, the map's keys not yet fed (they go in a chunk at a \
                 time while the kernel dumps, their memory given back as they go) and the dump's \
                 batches in flight. The idle run's peak is the parsed kernel BTF (two parsers', \
                 about 50 MiB, freed and trimmed once the programs are loaded). The heap profile \
                 in section 5 gives each part's bytes per flow."
                    .to_string(),
            );
        }
        if m.ready_median_s > 2.0 {
            n.push(
                "Start-up: the map's keys are read in batches (`BPF_MAP_LOOKUP_BATCH`) while the \
                 kernel dumps its conntrack table on another thread, and the dump's entries go \
                 into the engine as they arrive; what remains is the idle start (BTF, loading \
                 and attaching the programs: the idle row's ready time), the kernel's ctnetlink \
                 dump, and the engine's inserts of 524288 entries and keys (`cargo run --release \
                 -p detector --example engine_mem` prints their time), whose hash lookups lead \
                 the start-up profile in section 5."
                    .to_string(),
            );
        }
    }
    let (_, c_lossy) = thresholds(r, "conntrack -E");
    if c_lossy.is_some() {
        n.push(
            "`conntrack -E` (default socket buffer) loses DESTROY events first: the kernel's \
             conntrack gc reaps expired entries in bursts, and a burst overflows the netlink \
             socket (ENOBUFS) even when the average rate is low."
                .to_string(),
        );
    }
    if n.is_empty() {
        return;
    }
    let _ = writeln!(s, "### Notes on the figures\n");
    for x in n {
        let _ = writeln!(s, "- {x}");
    }
    let _ = writeln!(s);
}

/// A dhat profile's heap at its peak (`gb` of each allocation point), summed by the first
/// detector function on the stack (the allocator's and std's frames skipped), largest first,
/// with bytes per flow.
pub fn dhat_top(v: &Value, flows: u64, n: usize) -> Vec<String> {
    let frames: Vec<&str> = v["ftbl"]
        .as_array()
        .map(|a| a.iter().map(|f| f.as_str().unwrap_or("")).collect())
        .unwrap_or_default();
    let mut by: std::collections::HashMap<String, u64> = Default::default();
    let mut total = 0;
    for pp in v["pps"].as_array().into_iter().flatten() {
        let bytes = pp["gb"].as_u64().unwrap_or(0);
        if bytes == 0 {
            continue;
        }
        total += bytes;
        let site = pp["fs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| frames.get(i.as_u64()? as usize))
            .find(|f| f.contains("detector::"))
            .map(|f| {
                // "0x1234: <fn> (file.rs:12:5)" -> "<fn>"
                let f = f.split_once(": ").map_or(*f, |(_, rest)| rest);
                let f = f.rsplit_once(" (").map_or(f, |(name, _)| name);
                f.chars().take(140).collect::<String>()
            })
            .unwrap_or_else(|| "(outside the detector's code)".into());
        *by.entry(site).or_default() += bytes;
    }
    let mut sites: Vec<(String, u64)> = by.into_iter().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    let per = |b: u64| b as f64 / flows.max(1) as f64;
    let mut out = vec![format!(
        "{:8.1} MiB {:7.0} B/flow  heap at peak, total",
        total as f64 / 1048576.0,
        per(total)
    )];
    out.extend(sites.into_iter().take(n).map(|(site, b)| {
        format!(
            "{:8.1} MiB {:7.0} B/flow  {site}",
            b as f64 / 1048576.0,
            per(b)
        )
    }));
    out
}

/// What bounds a lossless rate, when this run could not show one of 500k events/s: the
/// consumer's CPU per event (one CPU of its own sustains its inverse) and how long the default
/// ring rides out a consumer that gets no CPU at all.
fn loss_note(r: &Results, default: &str) -> Option<String> {
    let det = format!("detector trace ({default})");
    let (clean, _) = thresholds(r, &det);
    let clean = clean?;
    if clean >= 500e3 {
        return None;
    }
    let step = r
        .completeness
        .iter()
        .filter(|s| s.observer == det && s.events_per_s <= clean)
        .max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s))?;
    let cpu = step.observer_cpu_ns_per_event?;
    // `detector run` (the product) on the UDP workload: two records (NEW, DESTROY) per flow.
    let run = r
        .overhead
        .iter()
        .find(|w| w.name == "UDP new flows")
        .and_then(|w| {
            w.configs
                .iter()
                .find(|c| c.name == format!("detector run ({default})"))
        })
        .filter(|c| !c.observer_cpu_ns_per_op.is_empty())
        .map(|c| median(&c.observer_cpu_ns_per_op) / 2.0)
        .map_or(String::new(), |ns| {
            format!(
                " (`detector run`'s loop, engine included, spent {:.2} us per record on the UDP \
                 workload: about {:.0}k records/s on one CPU)",
                ns / 1e3,
                1e6 / ns
            )
        });
    // A NEW or DESTROY record and the ring's 8-byte header per record.
    let record = std::mem::size_of::<detector_common::CtEvent>() as u64 + 8;
    let records = (u64::from(detector_common::DEFAULT_RING_MIB) << 20) / record;
    Some(format!(
        "Loss: the generator reached {:.0}k events/s with `detector trace` running, both CPUs \
         busy; that, not the ring, bounds the lossless rate this run shows. At that rate \
         `detector trace` spent {:.2} us of CPU per event, so one CPU of its own keeps up with \
         about {:.0}k events/s{run}: the consumer's CPU per record, not the ring, is what \
         bounds a lossless rate once it has a CPU to itself. The default ring ({} MiB, `--ring-mib`) holds \
         {records} records of {record} bytes: {:.0} ms of events at 500k/s while the consumer \
         gets no CPU at all. Losses at a saturating rate come from a consumer starved of CPU \
         for longer than that, and are counted (`lost` in the exit line and /metrics).",
        step.events_per_s / 1e3,
        cpu / 1e3,
        1e6 / cpu,
        detector_common::DEFAULT_RING_MIB,
        records as f64 / 500e3 * 1e3,
    ))
}
