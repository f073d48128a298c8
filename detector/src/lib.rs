//! detector: finds conntrack-cache cleanup races of the AWS network policy agent with eBPF.
//!
//! Layers: `probe` (kernel: BTF offsets, backends, ring buffer), `event` (decoding),
//! `reorder` (kernel-timestamp order), `output` (text/NDJSON), `cmd` (the CLI's commands).

pub mod agent;
pub mod clock;
pub mod cmd;
pub mod engine;
pub mod event;
pub mod output;
pub mod probe;
pub mod reorder;
pub mod sinks;
pub mod snapshot;
