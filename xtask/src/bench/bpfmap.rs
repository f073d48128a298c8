//! The agent map for the bench: a BPF LRU hash with NPA's layout (v4-24/16: the 24-byte IPv4
//! key with ifindex, the 16-byte value with last_seen; see detector/src/npa/layout.rs),
//! created, filled in batches and pinned with raw bpf(2) calls (testbed's) in the bench's
//! own bpffs.

use std::path::Path;

use anyhow::Result;
use detector_common::npa_key::{NpaKeyFields, npa_key_size};
use testbed::bpfmap::{BpfMap, LRU_HASH, MapSpec};

pub const KEY_SIZE: usize = npa_key_size(4, true);
pub const VALUE_SIZE: usize = 16;

pub struct AgentMap {
    map: BpfMap,
}

/// NPA's key for a UDP flow src:sport -> dst:dport owned by `dst`, written by the encoder the
/// detector decodes with.
pub fn key(
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    ifindex: u32,
) -> Result<[u8; KEY_SIZE]> {
    let mut k = [0u8; KEY_SIZE];
    NpaKeyFields {
        src: &src,
        sport,
        dst: &dst,
        dport,
        proto: 17,
        owner: &dst,
        ifindex: Some(ifindex),
    }
    .write(&mut k)?;
    Ok(k)
}

impl AgentMap {
    /// Creates an LRU hash of `max_entries` and pins it at `pin`.
    pub fn create(pin: &Path, max_entries: u32) -> Result<Self> {
        let map = BpfMap::create(&MapSpec {
            map_type: LRU_HASH,
            key_size: KEY_SIZE as u32,
            value_size: VALUE_SIZE as u32,
            max_entries,
            name: "dtbench_ct",
        })?;
        map.pin(pin)?;
        Ok(Self { map })
    }

    /// Inserts `keys` (values: val 1, last_seen `now_ns`) with BPF_MAP_UPDATE_BATCH.
    pub fn fill(&self, keys: &[[u8; KEY_SIZE]], now_ns: u64) -> Result<()> {
        let mut value = [0u8; VALUE_SIZE];
        value[0..8].copy_from_slice(&1u64.to_ne_bytes());
        value[8..16].copy_from_slice(&now_ns.to_ne_bytes());
        for chunk in keys.chunks(4096) {
            let kbuf: Vec<u8> = chunk.iter().flatten().copied().collect();
            let vbuf: Vec<u8> = std::iter::repeat_n(value, chunk.len()).flatten().collect();
            self.map.update_batch(&kbuf, &vbuf)?;
        }
        Ok(())
    }
}
