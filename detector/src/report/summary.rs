//! The run's summary: its last NDJSON line and the `summary-*.json` file.

use serde_json::json;

use crate::engine::Stats;
use crate::kernel::CounterSnapshot;
use crate::npa::target::AgentMap;
use crate::pipeline::reorder::ReorderStats;
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
    reorder: &ReorderStats,
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
        "maybe_incomplete": overflowed(kernel, engine, counts) > 0 || kernel.lost_total() > 0,
        "trace_writes": counts.trace_writes,
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
         keys {} (start-up {})",
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
}
