//! detector: finds conntrack-cache cleanup races of the AWS network policy agent with eBPF.
//!
//! Layers: `probe` (kernel: BTF offsets, backends, ring buffer), `event` (decoding),
//! `reorder` (kernel-timestamp order), `engine` (pure correlation: events in, verdicts out),
//! `agent` (NPA map layouts, finding the map), `snapshot` (ctnetlink dump), `output`
//! (text/NDJSON), `sinks` (trace files), `cmd` (the CLI's commands).

pub mod agent;
pub mod clock;
pub mod cmd;
pub mod engine;
pub mod event;
pub mod k8s;
pub mod lab;
pub mod output;
pub mod postmortem;
pub mod probe;
pub mod reorder;
pub mod serve;
pub mod sinks;
pub mod snapshot;
#[cfg(test)]
mod testutil;
