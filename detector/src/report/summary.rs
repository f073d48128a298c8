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
        "trace_writes": counts.trace_writes,
        "engine": engine,
        "kernel": kernel,
        "reorder": reorder,
    })
}
