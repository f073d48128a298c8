//! The agent's map deletes, seen at the bpf(2) syscall with the kernel's view of the flow's
//! conntrack entry.

use detector_common::{self as common, MapDeleteEvent};
use serde::Serialize;

use super::{DecodeError, Event, Task, entry_id, read_record};

/// The kernel's view, at the delete, of the conntrack entry for the deleted key's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteView {
    /// The key did not decode into a flow in the kernel (layout without a family).
    Unknown,
    Absent,
    Live,
    /// Timeout passed (or dying) but not freed yet.
    Expired,
}

/// A userspace delete on a watched map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapDeleteRecord {
    /// Syscall entry.
    pub ts_ns: u64,
    pub exit_ns: u64,
    pub cpu: u32,
    pub task: Task,
    pub map_id: u32,
    pub cmd: u32,
    /// 0 or a negative errno.
    pub ret: i64,
    pub key: Vec<u8>,
    pub view: DeleteView,
    /// The entry was found through the reversed key.
    pub view_reversed: bool,
    pub ct_addr: u64,
    /// 0 when unknown.
    pub ct_born_ns: u64,
    pub ct_timeout_left_jiffies: i32,
    pub ct_status: u32,
}

impl MapDeleteRecord {
    /// Id of the entry the kernel found, in the same form as `CtRecord::id`.
    pub fn entry_id(&self) -> Option<u64> {
        (self.ct_addr != 0).then(|| entry_id(self.ct_addr, self.ct_born_ns))
    }
}

/// Decodes a map-delete record of the right length.
pub(super) fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let raw: MapDeleteEvent = read_record(bytes);
    let view = match raw.view {
        common::view::UNKNOWN => DeleteView::Unknown,
        common::view::ABSENT => DeleteView::Absent,
        common::view::LIVE => DeleteView::Live,
        common::view::EXPIRED => DeleteView::Expired,
        value => {
            return Err(DecodeError::UnknownValue {
                what: "delete view",
                value,
            });
        }
    };
    let n = (raw.key_size as usize).min(common::MAX_KEY);
    Ok(Event::MapDelete(MapDeleteRecord {
        ts_ns: raw.hdr.ts_ns,
        exit_ns: raw.exit_ns,
        cpu: raw.hdr.cpu,
        task: Task::from(&raw.task),
        map_id: raw.map_id,
        cmd: raw.cmd,
        ret: raw.ret,
        key: raw.key[..n].to_vec(),
        view,
        view_reversed: raw.view_reversed != 0,
        ct_addr: raw.ct_addr,
        ct_born_ns: raw.ct_born_ns,
        ct_timeout_left_jiffies: raw.ct_timeout_left,
        ct_status: raw.ct_status,
    }))
}
