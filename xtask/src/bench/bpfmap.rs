//! The agent map for the bench: a BPF LRU hash with NPA's layout (v4-24/16: the 24-byte IPv4
//! key with ifindex, the 16-byte value with last_seen; see detector/src/agent/layout.rs),
//! created, filled in batches and pinned with raw bpf(2) calls in the bench's own bpffs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Result, bail};

const BPF_MAP_CREATE: i64 = 0;
const BPF_OBJ_PIN: i64 = 6;
const BPF_MAP_UPDATE_BATCH: i64 = 26;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const KEY_SIZE: usize = 24;
pub const VALUE_SIZE: usize = 16;

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> i64 {
    // SAFETY: attr is a zeroed bpf_attr-sized buffer that outlives the call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) }
}

fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

pub struct AgentMap {
    fd: OwnedFd,
}

/// NPA's key for a UDP flow src:sport -> dst:dport owned by `dst` (v4-24: addresses in
/// network order, ports and ifindex in host order, padding zero).
pub fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ifindex: u32) -> [u8; KEY_SIZE] {
    let mut k = [0u8; KEY_SIZE];
    k[0..4].copy_from_slice(&src);
    k[4..6].copy_from_slice(&sport.to_ne_bytes());
    k[8..12].copy_from_slice(&dst);
    k[12..14].copy_from_slice(&dport.to_ne_bytes());
    k[14] = 17;
    k[16..20].copy_from_slice(&dst);
    k[20..24].copy_from_slice(&ifindex.to_ne_bytes());
    k
}

impl AgentMap {
    /// Creates an LRU hash of `max_entries` and pins it at `pin`.
    pub fn create(pin: &Path, max_entries: u32) -> Result<Self> {
        let mut a = [0u8; 128];
        put(&mut a, 0, &BPF_MAP_TYPE_LRU_HASH.to_ne_bytes());
        put(&mut a, 4, &(KEY_SIZE as u32).to_ne_bytes());
        put(&mut a, 8, &(VALUE_SIZE as u32).to_ne_bytes());
        put(&mut a, 12, &max_entries.to_ne_bytes());
        put(&mut a, 28, b"dtbench_ct");
        let fd = bpf(BPF_MAP_CREATE, &mut a);
        if fd < 0 {
            bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = CString::new(pin.to_string_lossy().as_bytes())?;
        let mut a = [0u8; 128];
        put(&mut a, 0, &(path.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
        if bpf(BPF_OBJ_PIN, &mut a) != 0 {
            bail!(
                "BPF_OBJ_PIN {}: {}",
                pin.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { fd })
    }

    /// Inserts `keys` (values: val 1, last_seen `now_ns`) with BPF_MAP_UPDATE_BATCH.
    pub fn fill(&self, keys: &[[u8; KEY_SIZE]], now_ns: u64) -> Result<()> {
        let mut value = [0u8; VALUE_SIZE];
        value[0..8].copy_from_slice(&1u64.to_ne_bytes());
        value[8..16].copy_from_slice(&now_ns.to_ne_bytes());
        for chunk in keys.chunks(4096) {
            let kbuf: Vec<u8> = chunk.iter().flatten().copied().collect();
            let vbuf: Vec<u8> = std::iter::repeat_n(value, chunk.len()).flatten().collect();
            let mut a = [0u8; 128];
            put(&mut a, 16, &(kbuf.as_ptr() as u64).to_ne_bytes());
            put(&mut a, 24, &(vbuf.as_ptr() as u64).to_ne_bytes());
            put(&mut a, 32, &(chunk.len() as u32).to_ne_bytes());
            put(&mut a, 36, &(self.fd.as_raw_fd() as u32).to_ne_bytes());
            if bpf(BPF_MAP_UPDATE_BATCH, &mut a) != 0 {
                bail!("BPF_MAP_UPDATE_BATCH: {}", std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
