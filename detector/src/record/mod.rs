//! Decoding of ring-buffer records into typed events, one record kind per file.
//!
//! Records are checked for length and version and their kinds mapped with `TryFrom`; nothing
//! is transmuted into an enum, and an unknown kind is an error the caller counts.

mod ct;
mod map_delete;
mod map_write;
mod packet_drop;
mod tuple;

use detector_common::{
    self as common, CtEvent, EventHeader, MapDeleteEvent, MapWriteEvent, PacketDropEvent,
    RECORD_VERSION,
};
use serde::Serialize;
use thiserror::Error;

pub use ct::{CtKind, CtRecord, DestroyReason, Source, entry_id};
pub use map_delete::{DeleteView, MapDeleteRecord, TcpState};
pub use map_write::{MapOp, MapWriteRecord};
pub use packet_drop::PacketDropRecord;
pub use tuple::{FlowTuple, PackedTuple, proto_name};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record kind {kind} claims {claimed} bytes but {actual} arrived")]
    Length {
        kind: u8,
        claimed: usize,
        actual: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record version {0}, this detector reads version {RECORD_VERSION}")]
    Version(u8),
    #[error("unknown {what} value {value}")]
    UnknownValue { what: &'static str, value: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    CtNew,
    CtDestroy,
    MapDelete,
    PacketDrop,
    MapWrite,
}

impl TryFrom<u8> for Kind {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        match v {
            common::kind::CT_NEW => Ok(Kind::CtNew),
            common::kind::CT_DESTROY => Ok(Kind::CtDestroy),
            common::kind::MAP_DELETE => Ok(Kind::MapDelete),
            common::kind::PACKET_DROP => Ok(Kind::PacketDrop),
            common::kind::MAP_WRITE => Ok(Kind::MapWrite),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::CtNew,
        Kind::CtDestroy,
        Kind::MapDelete,
        Kind::PacketDrop,
        Kind::MapWrite,
    ];

    pub fn raw(self) -> u8 {
        match self {
            Kind::CtNew => common::kind::CT_NEW,
            Kind::CtDestroy => common::kind::CT_DESTROY,
            Kind::MapDelete => common::kind::MAP_DELETE,
            Kind::PacketDrop => common::kind::PACKET_DROP,
            Kind::MapWrite => common::kind::MAP_WRITE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::CtNew => "ct_new",
            Kind::CtDestroy => "ct_destroy",
            Kind::MapDelete => "map_delete",
            Kind::PacketDrop => "packet_drop",
            Kind::MapWrite => "map_write",
        }
    }
}

/// The task in whose context the probe fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
}

impl From<&common::TaskInfo> for Task {
    fn from(t: &common::TaskInfo) -> Self {
        let end = t.comm.iter().position(|&b| b == 0).unwrap_or(t.comm.len());
        Self {
            pid: t.pid,
            tid: t.tid,
            comm: String::from_utf8_lossy(&t.comm[..end]).into_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ct(CtRecord),
    MapDelete(MapDeleteRecord),
    PacketDrop(PacketDropRecord),
    MapWrite(MapWriteRecord),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Ct(c) => c.ts_ns,
            Event::MapDelete(d) => d.ts_ns,
            Event::PacketDrop(p) => p.ts_ns,
            Event::MapWrite(w) => w.ts_ns,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Event::Ct(c) => c.kind.kind(),
            Event::MapDelete(_) => Kind::MapDelete,
            Event::PacketDrop(_) => Kind::PacketDrop,
            Event::MapWrite(_) => Kind::MapWrite,
        }
    }
}

/// Copies a `T` out of the front of `bytes` (ring-buffer data is not aligned for T).
fn read_record<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked above; T is a padding-free repr(C) record of integers and byte
    // arrays (detector-common checks that at compile time), so any bytes are a valid T.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let hdr: EventHeader = read_record(bytes);
    if hdr.version != RECORD_VERSION {
        return Err(DecodeError::Version(hdr.version));
    }
    let kind = Kind::try_from(hdr.kind)?;
    let expect = match kind {
        Kind::CtNew | Kind::CtDestroy => size_of::<CtEvent>(),
        Kind::MapDelete => size_of::<MapDeleteEvent>(),
        Kind::PacketDrop => size_of::<PacketDropEvent>(),
        Kind::MapWrite => size_of::<MapWriteEvent>(),
    };
    if hdr.size as usize != expect || bytes.len() < expect {
        return Err(DecodeError::Length {
            kind: hdr.kind,
            claimed: hdr.size as usize,
            actual: bytes.len(),
        });
    }
    match kind {
        Kind::CtNew => ct::decode(bytes, true),
        Kind::CtDestroy => ct::decode(bytes, false),
        Kind::MapDelete => map_delete::decode(bytes),
        Kind::PacketDrop => packet_drop::decode(bytes),
        Kind::MapWrite => map_write::decode(bytes),
    }
}

#[cfg(test)]
pub(crate) mod tests;
