//! Dropped packets of flows whose key was deleted while they were live.

use detector_common::PacketDropEvent;
use serde::Serialize;

use super::{DecodeError, Event, FlowTuple, read_record};

/// A dropped packet of a flow whose key was deleted while the flow was live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketDropRecord {
    pub ts_ns: u64,
    pub cpu: u32,
    /// The packet's own direction.
    pub tuple: FlowTuple,
    /// `enum skb_drop_reason` value.
    pub reason: u32,
    /// The delete that put the flow on the watch list.
    pub delete_ns: u64,
}

/// Decodes a packet-drop record of the right length.
pub(super) fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let raw: PacketDropEvent = read_record(bytes);
    Ok(Event::PacketDrop(PacketDropRecord {
        ts_ns: raw.hdr.ts_ns,
        cpu: raw.hdr.cpu,
        tuple: FlowTuple::from_raw(&raw.tuple)?,
        reason: raw.reason,
        delete_ns: raw.delete_ns,
    }))
}
