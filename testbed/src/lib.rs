//! The test bed the detector's integration tests, its lab and the bench build on: network
//! namespaces entered with setns (never `ip netns exec`, which remounts /sys and hides bpffs),
//! veth pairs, BPF maps made with raw bpf(2) calls, TCP echo servers and resets, and guards
//! that undo sysctls and stop child processes on drop.
//!
//! It ships inside the lab-enabled detector binary, so it returns errors instead of panicking.

pub mod bpfmap;
pub mod cmd;
mod error;
pub mod netns;
pub mod process;
pub mod sysctl;
pub mod tcp;
pub mod veth;

pub use error::{Error, Result};
