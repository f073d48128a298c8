//! A stand-in for the agent's conntrack map: an LRU hash map with NPA's layout, created and
//! pinned with raw bpf(2) calls, in a bpffs this test mounts and unmounts. Deletes go through
//! the same syscall NPA's cleanup uses (BPF_MAP_DELETE_ELEM).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use detector::npa::{Layout, NpaKey, NpaValue};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_OBJ_PIN: i64 = 6;
const BPF_MAP_DELETE_BATCH: i64 = 27;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> i64 {
    // SAFETY: attr is a zeroed bpf_attr-sized buffer that outlives the call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) }
}

fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A bpffs mounted on a fresh directory; unmounted and removed on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn mount() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "detector-bpffs-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        super::run_ok("mount", &["-t", "bpf", "bpf", dir.to_str().unwrap()]);
        Self { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = super::run("umount", &[self.dir.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.dir);
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
    fd: OwnedFd,
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
        let mut a = [0u8; 128];
        put(&mut a, 0, &BPF_MAP_TYPE_LRU_HASH.to_ne_bytes());
        put(&mut a, 4, &(layout.key.size() as u32).to_ne_bytes());
        put(&mut a, 8, &(layout.value.size() as u32).to_ne_bytes());
        put(&mut a, 12, &4096u32.to_ne_bytes());
        assert!(name.len() <= 15);
        put(&mut a, 28, name.as_bytes());
        let fd = bpf(BPF_MAP_CREATE, &mut a);
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = CString::new(pin.to_str().unwrap()).unwrap();
        let mut a = [0u8; 128];
        put(&mut a, 0, &(path.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
        let rc = bpf(BPF_OBJ_PIN, &mut a);
        assert_eq!(
            rc,
            0,
            "BPF_OBJ_PIN {}: {}",
            pin.display(),
            std::io::Error::last_os_error()
        );
        Self {
            fd,
            layout,
            pin: pin.to_path_buf(),
            name: name.to_string(),
        }
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
        let mut a = [0u8; 128];
        put(&mut a, 0, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut a, 8, &(k.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 16, &(v.as_ptr() as u64).to_ne_bytes());
        let rc = bpf(BPF_MAP_UPDATE_ELEM, &mut a);
        assert_eq!(
            rc,
            0,
            "BPF_MAP_UPDATE_ELEM: {}",
            std::io::Error::last_os_error()
        );
    }

    /// BPF_MAP_DELETE_BATCH of `keys`; returns (result, keys processed).
    pub fn delete_batch(&self, keys: &[NpaKey]) -> (i64, u32) {
        let mut buf = Vec::new();
        for k in keys {
            buf.extend(k.encode(self.layout.key).unwrap());
        }
        let mut a = [0u8; 128];
        put(&mut a, 16, &(buf.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 32, &(keys.len() as u32).to_ne_bytes());
        put(&mut a, 36, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
        let rc = bpf(BPF_MAP_DELETE_BATCH, &mut a);
        let count = u32::from_ne_bytes(a[32..36].try_into().unwrap());
        if rc < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64;
            (-e, count)
        } else {
            (rc, count)
        }
    }

    /// What NPA's cleanup does; returns the syscall's result (0 or -errno).
    pub fn delete(&self, key: &NpaKey) -> i64 {
        let k = key.encode(self.layout.key).unwrap();
        let mut a = [0u8; 128];
        put(&mut a, 0, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
        put(&mut a, 8, &(k.as_ptr() as u64).to_ne_bytes());
        let rc = bpf(BPF_MAP_DELETE_ELEM, &mut a);
        if rc < 0 {
            -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64)
        } else {
            rc
        }
    }
}
