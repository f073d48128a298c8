//! A stand-in for the agent's conntrack map: an LRU hash map with NPA's layout, created and
//! pinned with raw bpf(2) calls (testbed's), in a bpffs this test mounts and unmounts. Deletes go through
//! the same syscall NPA's cleanup uses (BPF_MAP_DELETE_ELEM).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::path::{Path, PathBuf};

use detector::npa::{Layout, NpaKey, NpaValue};
use testbed::bpfmap::{BpfMap, LRU_HASH, MapSpec};

/// A bpffs mounted on a fresh directory; unmounted and removed on drop.
pub struct Bpffs(testbed::bpfmap::Bpffs);

impl Bpffs {
    pub fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "detector-bpffs-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        Self(testbed::bpfmap::Bpffs::mount_at(dir).unwrap())
    }
}

impl std::ops::Deref for Bpffs {
    type Target = testbed::bpfmap::Bpffs;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000
}

pub struct AgentMap {
    map: BpfMap,
    pub layout: Layout,
    pub pin: PathBuf,
    pub name: String,
}

/// A map name no other test uses (the detector falls back to finding the map by name while
/// a pin is being replaced, and tests run in parallel).
pub fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "dt{}_{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl AgentMap {
    /// Creates the map named `name` (at most 15 bytes) and pins it at `pin`.
    pub fn create(layout: Layout, pin: &Path, name: &str) -> Self {
        let map = BpfMap::create(&MapSpec {
            map_type: LRU_HASH,
            key_size: layout.key.size() as u32,
            value_size: layout.value.size() as u32,
            max_entries: 4096,
            name,
        })
        .unwrap();
        map.pin(pin).unwrap();
        Self {
            map,
            layout,
            pin: pin.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// Creates the map named `name` without pinning it (the agent between creating its map
    /// and pinning it, or a same-named map of someone else's).
    pub fn create_unpinned(layout: Layout, pin: &Path, name: &str) -> Self {
        let map = BpfMap::create(&MapSpec {
            map_type: LRU_HASH,
            key_size: layout.key.size() as u32,
            value_size: layout.value.size() as u32,
            max_entries: 4096,
            name,
        })
        .unwrap();
        Self {
            map,
            layout,
            pin: pin.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// Pins the map at its `pin` (again, after the pin was removed).
    pub fn pin(&self) {
        self.map.pin(&self.pin).unwrap();
    }

    /// What the datapath does for a new allowed flow.
    pub fn insert(&self, key: &NpaKey, last_seen_ns: u64) {
        let k = key.encode(self.layout.key).unwrap();
        let v = NpaValue {
            val: 1,
            last_seen_ns: (self.layout.value.size() == 16).then_some(last_seen_ns),
        }
        .encode(self.layout.value)
        .unwrap();
        self.map.update(&k, &v).unwrap();
    }

    /// BPF_MAP_DELETE_BATCH of `keys`; returns (result, keys processed).
    pub fn delete_batch(&self, keys: &[NpaKey]) -> (i64, u32) {
        let mut buf = Vec::new();
        for k in keys {
            buf.extend(k.encode(self.layout.key).unwrap());
        }
        let (result, count) = self.map.delete_batch(&buf);
        (errno_result(result), count)
    }

    /// What NPA's cleanup does; returns the syscall's result (0 or -errno).
    pub fn delete(&self, key: &NpaKey) -> i64 {
        let k = key.encode(self.layout.key).unwrap();
        errno_result(self.map.delete(&k))
    }
}

/// 0, or the negative errno a failed call left.
fn errno_result(r: std::io::Result<()>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(0)),
    }
}
