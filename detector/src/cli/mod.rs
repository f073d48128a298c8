//! The CLI's commands.

pub mod bounds;
pub mod cluster;
pub mod cluster_races;
pub mod doctor;
pub mod forward;
#[cfg(feature = "lab")]
pub mod lab;
pub mod remote;
pub mod replay;
pub mod run;
pub mod trace;
pub mod traces;
pub mod watch;

use std::path::PathBuf;

use crate::kernel::sizing::MaxEntries;
use crate::kernel::{BackendChoice, ProbeSettings, WritesHook};

/// Options shared by every command that loads programs.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Probe backend: `auto` picks the most precise one this kernel supports.
    #[arg(long, value_enum, default_value = "auto", env = "DETECTOR_BACKEND")]
    pub backend: BackendChoice,
    /// Directory with the kernel's BTF (`vmlinux` and module split BTF).
    #[arg(long, default_value = "/sys/kernel/btf", value_name = "DIR")]
    pub btf_dir: PathBuf,
    /// Hook for the agent map's writes inside the kernel (kprobe/fentry backends): `auto`
    /// prefers fentry where it loads.
    #[arg(long, value_enum, default_value = "auto", env = "DETECTOR_WRITES_HOOK")]
    pub writes_hook: WritesHook,
    /// Ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = detector_common::DEFAULT_RING_MIB, value_name = "MIB", value_parser = parse_ring_mib)]
    pub ring_mib: u32,
    /// Capacity of the in-kernel tables of live conntrack entries: `auto` sizes them to the
    /// node's nf_conntrack_max (262144 when conntrack is not loaded).
    #[arg(long, default_value = "auto", value_name = "N|auto")]
    pub max_entries: MaxEntries,
    /// Preallocate the tables of live entries even where the kernel lets them allocate as they
    /// fill (Linux 6.1 on): all their memory is taken at start.
    #[arg(long)]
    pub preallocate_tables: bool,
    /// Keys of one BPF_MAP_DELETE_BATCH / LOOKUP_AND_DELETE_BATCH judged key by key (up to
    /// 8388608); keys beyond are counted as `batch_truncated` (exit line, /metrics).
    #[arg(long, default_value_t = crate::kernel::DEFAULT_MAX_BATCH_KEYS, value_name = "N",
          value_parser = parse_max_batch_keys)]
    pub max_batch_keys: u32,
}

fn parse_max_batch_keys(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of keys"))?;
    let limit = crate::kernel::MAX_BATCH_KEYS_LIMIT;
    if v == 0 || v > limit {
        return Err(format!(
            "--max-batch-keys must be from 1 to {limit}, not {v}"
        ));
    }
    Ok(v)
}

fn parse_ring_mib(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if v == 0 || !v.is_power_of_two() || v > 1024 {
        return Err(format!(
            "ring buffer size must be a power of two from 1 to 1024 MiB, not {v}"
        ));
    }
    Ok(v)
}

impl ProbeArgs {
    pub fn settings(&self, netns_filter: u32, watch_agent: bool) -> ProbeSettings {
        let (max_entries, sized_by) = self
            .max_entries
            .resolve(crate::kernel::sizing::node_conntrack_max());
        ProbeSettings {
            btf_dir: self.btf_dir.clone(),
            backend: self.backend,
            netns_filter,
            ring_bytes: self.ring_mib << 20,
            max_entries,
            sized_by,
            allow_no_prealloc: !self.preallocate_tables,
            watch_agent,
            drop_watch_ms: 5_000,
            writes_hook: self.writes_hook,
            max_batch_keys: self.max_batch_keys,
        }
    }
}
