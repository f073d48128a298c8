//! The run's summary: its last NDJSON line and the `summary-*.json` file.

use serde_json::json;

use crate::engine::Stats;
use crate::kernel::CounterSnapshot;
use crate::npa::target::AgentMap;
use crate::report::trace_file::TRACE_SCHEMA_VERSION;

/// What the run counted, besides the engine's and the kernel's counters.
pub struct RunCounts {
    pub races: u64,
    pub traces_written: u64,
    /// Deletes of keys the layout could not decode.
    pub undecodable_keys: u64,
    /// Keys of the start-up map snapshot the layout could not decode (left out of the engine).
    pub undecodable_startup_keys: u64,
    /// Ring records that did not decode.
    pub undecodable_records: u64,
    pub socket_teardown_drops_ignored: u64,
    /// Trace files that did not make it to disk, and old ones removed.
    pub trace_writes: TraceWriteCounts,
    /// Times the judged namespace's kernel conntrack table was found full, and agent deletes
    /// made while it was.
    pub conntrack_full: u64,
    pub conntrack_full_deletes: u64,
}

/// Trace files failed (disk full, read-only, no descriptors), dropped (queue full) and
/// removed (retention).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct TraceWriteCounts {
    pub failed: u64,
    pub dropped: u64,
    pub removed: u64,
}

/// Where and when the run was.
pub struct RunInfo<'a> {
    pub started: &'a str,
    pub ended: &'a str,
    pub host: &'a str,
    pub backend: &'a str,
    pub map: &'a AgentMap,
}

pub fn summary(
    info: &RunInfo<'_>,
    counts: &RunCounts,
    engine: &Stats,
    kernel: &CounterSnapshot,
    // The event loop's reorder statistics, as it serialises them (the pipeline's type: the
    // report layer sits below the pipeline and does not name it).
    reorder: &impl serde::Serialize,
) -> serde_json::Value {
    json!({
        "type": "summary",
        "schema_version": TRACE_SCHEMA_VERSION,
        "started_at": info.started,
        "ended_at": info.ended,
        "host": info.host,
        "backend": info.backend,
        "map": info.map,
        "races": counts.races,
        "traces_written": counts.traces_written,
        "undecodable_keys": counts.undecodable_keys,
        "undecodable_startup_keys": counts.undecodable_startup_keys,
        "undecodable_records": counts.undecodable_records,
        "socket_teardown_drops_ignored": counts.socket_teardown_drops_ignored,
        "unjudged_deletes": engine.deletes.unjudged,
        "conntrack_full": counts.conntrack_full,
        "conntrack_full_deletes": counts.conntrack_full_deletes,
        "maybe_incomplete": overflowed(kernel, engine, counts) > 0 || kernel.lost_total() > 0,
        "trace_writes": counts.trace_writes,
        "stderr_lines_lost": crate::stderr::lost(),
        "engine": engine,
        "kernel": kernel,
        "reorder": reorder,
    })
}

/// The exit line's account of what was not judged because a bound was hit: every capacity
/// counter, zero or not, so that silence on the line means nothing overflowed.
pub fn capacity_line(kernel: &CounterSnapshot, stats: &Stats, counts: &RunCounts) -> String {
    let ev = &stats.evictions;
    let line = format!(
        "not judged: {} unjudged deletes ({} with a live entry only in another netns), \
         batch_truncated {}, seen_full {}, flows_full {}, \
         pending_full {}, confirm_full {}, shadow evictions flows {} map_keys {}, undecodable \
         keys {} (start-up {}), kernel conntrack table full {} time(s) ({} deletes in it)",
        stats.deletes.unjudged,
        stats.deletes.unjudged_other_netns,
        kernel.batch_truncated,
        kernel.seen_full,
        kernel.flows_full,
        kernel.pending_full,
        kernel.confirm_full,
        ev.flows,
        ev.map_keys,
        counts.undecodable_keys,
        counts.undecodable_startup_keys,
        counts.conntrack_full,
        counts.conntrack_full_deletes,
    );
    if overflowed(kernel, stats, counts) > 0 {
        format!("{line} (MAYBE INCOMPLETE)")
    } else {
        line
    }
}

/// How many things a bound left unjudged (0: the run's silence means "no race").
fn overflowed(kernel: &CounterSnapshot, stats: &Stats, counts: &RunCounts) -> u64 {
    let ev = &stats.evictions;
    stats.deletes.unjudged
        + kernel.batch_truncated
        + kernel.seen_full
        + kernel.flows_full
        + kernel.pending_full
        + kernel.confirm_full
        + ev.flows
        + ev.map_keys
        + counts.undecodable_keys
        + counts.undecodable_startup_keys
        + counts.conntrack_full
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts() -> RunCounts {
        RunCounts {
            races: 0,
            traces_written: 0,
            undecodable_keys: 0,
            undecodable_startup_keys: 0,
            undecodable_records: 0,
            socket_teardown_drops_ignored: 0,
            trace_writes: TraceWriteCounts::default(),
            conntrack_full: 0,
            conntrack_full_deletes: 0,
        }
    }

    #[test]
    fn capacity_line_names_every_counter_and_flags_an_overflow() {
        let mut kernel = CounterSnapshot::default();
        let stats = Stats::default();
        let clean = capacity_line(&kernel, &stats, &counts());
        assert!(clean.contains("batch_truncated 0"), "{clean}");
        assert!(!clean.contains("MAYBE INCOMPLETE"), "{clean}");
        kernel.batch_truncated = 1968;
        let mut c = counts();
        c.undecodable_startup_keys = 3;
        let line = capacity_line(&kernel, &stats, &c);
        assert!(line.contains("batch_truncated 1968"), "{line}");
        assert!(line.contains("(start-up 3)"), "{line}");
        assert!(line.contains("MAYBE INCOMPLETE"), "{line}");
    }

    #[test]
    fn a_full_conntrack_table_makes_the_run_maybe_incomplete() {
        let kernel = CounterSnapshot::default();
        let stats = Stats::default();
        let clean = capacity_line(&kernel, &stats, &counts());
        assert!(clean.contains("conntrack table full 0 time(s)"), "{clean}");
        let mut c = counts();
        c.conntrack_full = 1;
        c.conntrack_full_deletes = 4;
        let line = capacity_line(&kernel, &stats, &c);
        assert!(line.contains("full 1 time(s) (4 deletes in it)"), "{line}");
        assert!(line.contains("MAYBE INCOMPLETE"), "{line}");
        let info = RunInfo {
            started: "",
            ended: "",
            host: "",
            backend: "",
            map: &AgentMap {
                id: 1,
                name: String::new(),
                key_size: 24,
                value_size: 16,
                max_entries: 1,
                layout: crate::npa::Layout::detect(24, 16).unwrap_or_else(|e| panic!("{e}")),
                found_by: String::new(),
                pin: None,
            },
        };
        let reorder = serde_json::json!({"late": 0, "forced": 0});
        let s = summary(&info, &c, &stats, &kernel, &reorder);
        assert_eq!(s["maybe_incomplete"], true);
        assert_eq!(s["conntrack_full_deletes"], 4);
    }
}
