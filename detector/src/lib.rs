//! detector: finds conntrack-cache cleanup races of the AWS network policy agent with eBPF.
//!
//! The modules read as the pipeline: `kernel` (BTF offsets, backends, loading, the ring
//! buffer), `record` (decoding ring records), `pipeline` (event loop, reorder by kernel
//! timestamp), `engine` (pure correlation: events in, verdicts out), `npa` (the agent's map
//! layouts and finding its map), `snapshot` (ctnetlink dump), `report` (readable lines, NDJSON,
//! trace files), `telemetry` (metrics), `http` (server and streams), `k8s` (pods, Events),
//! `cli` (the commands), and `lab` (the local reproducer, behind the `lab` feature).

pub mod cli;
pub mod clock;
pub mod engine;
pub mod http;
pub mod k8s;
pub mod kernel;
#[cfg(feature = "lab")]
pub mod lab;
pub mod npa;
pub mod pipeline;
pub mod postmortem;
pub mod record;
pub mod report;
pub mod snapshot;
pub mod stderr;
pub mod telemetry;
#[cfg(test)]
mod testutil;
