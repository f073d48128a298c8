//! Everything the bench measures, serialized as bench.json (and read back from a guest's
//! bench-guest.json, so fields a file lacks take their defaults).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::load::Count;

/// Everything measured; serialized as bench.json.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Results {
    pub machine: Value,
    pub plan: Value,
    pub backends: Vec<String>,
    pub overhead: Vec<Workload>,
    pub completeness: Vec<Step>,
    pub latency: Option<Latency>,
    pub memory: Option<Memory>,
    pub profiles: Vec<Profile>,
    pub load: Vec<(String, String)>,
    pub wall_s: f64,
}

/// One workload's throughput under each observer, repetitions interleaved.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    pub name: String,
    pub unit: String,
    pub configs: Vec<Config>,
}

/// One BPF program's run time and runs per operation, per run.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProgramCost {
    pub ns_per_op: Vec<f64>,
    pub runs_per_op: Vec<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub name: String,
    pub runs: Vec<Count>,
    /// The observer process's CPU time (user + system) per operation, per run, ns.
    pub observer_cpu_ns_per_op: Vec<f64>,
    /// Run time of the detector's BPF programs per operation, per run, ns
    /// (kernel.bpf_stats_enabled).
    pub bpf_ns_per_op: Vec<f64>,
    /// BPF program runs per operation, per run.
    pub bpf_runs_per_op: Vec<f64>,
    /// The same two figures for each BPF program, by program name.
    pub bpf_programs: std::collections::BTreeMap<String, ProgramCost>,
    pub median_rate: f64,
    /// Median rate over the baseline's median.
    pub ratio: f64,
}

/// One rate step of the completeness test, for one observer.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    pub observer: String,
    /// Events per second asked (None: unlimited).
    pub target_events_per_s: Option<f64>,
    pub flows: Count,
    /// NEW + DESTROY per second generated: 2 x flows / s.
    pub events_per_s: f64,
    pub expected_new: u64,
    pub expected_destroy: u64,
    pub delivered_new: u64,
    pub delivered_destroy: u64,
    /// What the observer itself says it lost: the detector's kernel counters (ring buffer
    /// full, dedupe table full), `conntrack -E`'s ENOBUFS warnings.
    pub reported_lost: u64,
    pub missing: u64,
    /// The kernel's own per-namespace counters over the step (insert_failed, drop, ...).
    pub kernel_stats: std::collections::BTreeMap<String, u64>,
    pub drain_s: f64,
    /// Entries the gc had not reaped after 5 s, flushed (a burst of DESTROYs).
    pub flushed: u64,
    /// The observer process's CPU time (user + system) per event it delivered, over the
    /// step and its drain, ns.
    pub observer_cpu_ns_per_event: Option<f64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    pub samples: Vec<u64>,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub cycles: u64,
    pub port_reuses: u64,
    pub wrongful_deletes: u64,
    pub verdicts: u64,
    pub events_lost: u64,
    pub watermark_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Memory {
    pub flows_target: u64,
    pub kernel_entries: u64,
    pub map_keys: u64,
    pub idle_rss: u64,
    pub idle_hwm: u64,
    pub idle_ready_s: f64,
    pub rss: u64,
    pub hwm: u64,
    pub ready_s: Vec<f64>,
    pub ready_median_s: f64,
    pub user_bytes_per_flow: f64,
    pub kernel_map_bytes: u64,
    pub kernel_maps: usize,
    pub kernel_map_bytes_idle: u64,
    pub fill_s: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    pub what: String,
    pub top: Vec<String>,
}
