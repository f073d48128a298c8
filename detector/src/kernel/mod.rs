//! The probe layer: kernel facts, BTF offsets, loading and attaching one backend's programs,
//! and reading the ring buffer and loss counters. Everything kernel-specific stays here.

pub mod backend;
pub mod btf;
pub mod caps;
mod counters;
mod loader;
pub mod map_alloc;
pub mod offsets;
pub mod reader;
pub mod sizing;
pub mod tracefs;

use std::path::{Path, PathBuf};

use aya::programs::ProgramError;
use thiserror::Error;

pub use backend::{Attach, Backend, BackendChoice, ProgSpec, WritesHook};
use btf::BtfError;
pub use counters::{CounterSnapshot, Counters};
pub use loader::Probe;

/// The eBPF object, built by `detector/build.rs` (see `cargo xtask build-ebpf`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector-ebpf.o"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "not privileged: loading eBPF programs needs root, or CAP_BPF and CAP_PERFMON \
         (CAP_SYS_ADMIN on kernels before 5.8). Run it with sudo, or grant those capabilities"
    )]
    NotPrivileged,
    #[error(
        "the parsed BTF was already released (Probe::release_btf); load every program before \
         releasing it"
    )]
    BtfReleased,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("cannot parse {path} for the loader: {source}")]
    AyaBtf {
        path: PathBuf,
        #[source]
        source: aya::BtfError,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "backend `{backend}` is not supported by this kernel: {reason}. \
         Use --backend auto (it would pick `{auto}` here); `detector doctor` explains"
    )]
    Unsupported {
        backend: Backend,
        reason: String,
        auto: String,
    },
    #[error("no backend works on this kernel:\n{0}\nRun `detector doctor` for details")]
    NoBackend(String),
    #[error("attaching {what} failed: {source}")]
    Attach {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot poll the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("map {0} is missing from the eBPF object (stale build? run `cargo xtask build-ebpf`)")]
    MissingMap(&'static str),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("watching agent maps was not requested when the probe was opened")]
    AgentNotRequested,
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Keys of one batch delete judged by default (the kernel's bpf_loop allows up to 1 << 23).
pub const DEFAULT_MAX_BATCH_KEYS: u32 = 8192;
/// bpf_loop's limit on iterations, and so on the keys of one batch judged.
pub const MAX_BATCH_KEYS_LIMIT: u32 = 1 << 23;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// Directory holding kernel BTF (`vmlinux` and module split BTF).
    pub btf_dir: PathBuf,
    pub backend: BackendChoice,
    /// Only report this network namespace (inode); 0 = all.
    pub netns_filter: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Capacity of the in-kernel table of live entries (dedupe + birth times).
    pub max_entries: u32,
    /// Where `max_entries` came from (the flag, the node's nf_conntrack_max, the fallback).
    pub sized_by: sizing::SizedBy,
    /// Also load the agent-map delete programs (needs tracefs; mounted when missing).
    pub watch_agent: bool,
    /// How long after a race the flow's dropped packets are reported, in ms.
    pub drop_watch_ms: u32,
    /// Where the agent map's in-kernel writes are hooked.
    pub writes_hook: WritesHook,
    /// Keys of one batch delete judged one by one; more are counted as truncated.
    pub max_batch_keys: u32,
    /// Let the tables of live entries allocate as they fill where the kernel allows it
    /// (`kernel::map_alloc`); false keeps them preallocated everywhere.
    pub allow_no_prealloc: bool,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            btf_dir: PathBuf::from("/sys/kernel/btf"),
            backend: BackendChoice::Auto,
            netns_filter: 0,
            ring_bytes: 8 << 20,
            max_entries: sizing::FALLBACK_MAX_ENTRIES,
            watch_agent: false,
            drop_watch_ms: 5_000,
            writes_hook: WritesHook::Auto,
            max_batch_keys: DEFAULT_MAX_BATCH_KEYS,
            sized_by: sizing::SizedBy::Fallback,
            allow_no_prealloc: true,
        }
    }
}

/// A verdict on one backend: usable, or why not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSupport {
    pub backend: Backend,
    pub ok: bool,
    pub reason: String,
}

/// Path of the default kernel BTF directory.
pub fn default_btf_dir() -> &'static Path {
    Path::new("/sys/kernel/btf")
}
