//! The CLI's commands.

pub mod cluster;
pub mod doctor;
pub mod forward;
#[cfg(feature = "lab")]
pub mod lab;
pub mod remote;
pub mod run;
pub mod trace;
pub mod traces;
pub mod watch;

use std::path::PathBuf;

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
    #[arg(long, default_value_t = 8, value_name = "MIB", value_parser = parse_ring_mib)]
    pub ring_mib: u32,
    /// Capacity of the in-kernel table of live conntrack entries (size it to nf_conntrack_max).
    #[arg(long, default_value_t = 262_144, value_name = "N")]
    pub max_entries: u32,
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
        ProbeSettings {
            btf_dir: self.btf_dir.clone(),
            backend: self.backend,
            netns_filter,
            ring_bytes: self.ring_mib << 20,
            max_entries: self.max_entries,
            watch_agent,
            drop_watch_ms: 5_000,
            writes_hook: self.writes_hook,
        }
    }
}

/// Returns the heap's free memory to the kernel. Set-up parses tens of MiB (BTF, the object,
/// start-up snapshots) that are freed before the loop starts; glibc keeps freed memory for
/// reuse and would hold it in the process's RSS for the whole run.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
