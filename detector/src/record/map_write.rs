//! Writes to the agent's map seen in the kernel's hash-map code (kprobe/fentry backends).

use detector_common::{self as common, MapWriteEvent};
use serde::Serialize;

use super::{DecodeError, Event, Task, read_record};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapOp {
    Update,
    Delete,
}

/// A write to a watched map seen in the kernel's hash-map code (kprobe/fentry backends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapWriteRecord {
    pub ts_ns: u64,
    pub cpu: u32,
    pub task: Task,
    pub map_id: u32,
    pub op: MapOp,
    /// Part of a bpf(2) call (userspace) rather than a BPF program (the datapath).
    pub from_syscall: bool,
    pub key: Vec<u8>,
}

/// Decodes a map-write record of the right length.
pub(super) fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let raw: MapWriteEvent = read_record(bytes);
    let op = match raw.op {
        common::map_op::UPDATE => MapOp::Update,
        common::map_op::DELETE => MapOp::Delete,
        value => {
            return Err(DecodeError::UnknownValue {
                what: "map op",
                value,
            });
        }
    };
    let n = (raw.key_size as usize).min(common::MAX_KEY);
    Ok(Event::MapWrite(MapWriteRecord {
        ts_ns: raw.hdr.ts_ns,
        cpu: raw.hdr.cpu,
        task: Task::from(&raw.task),
        map_id: raw.map_id,
        op,
        from_syscall: raw.from_syscall != 0,
        key: raw.key[..n].to_vec(),
    }))
}
