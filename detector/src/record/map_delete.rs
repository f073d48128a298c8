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

/// Conntrack's TCP state of an entry (`enum tcp_conntrack`), read in the kernel at a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
    SynSent2,
}

impl TcpState {
    /// The state of a raw `enum tcp_conntrack` value; `None` for "not read" and for values
    /// this detector does not know (a newer kernel's).
    pub fn from_raw(v: u8) -> Option<Self> {
        use common::tcp_state as t;
        Some(match v {
            t::NONE => Self::None,
            t::SYN_SENT => Self::SynSent,
            t::SYN_RECV => Self::SynRecv,
            t::ESTABLISHED => Self::Established,
            t::FIN_WAIT => Self::FinWait,
            t::CLOSE_WAIT => Self::CloseWait,
            t::LAST_ACK => Self::LastAck,
            t::TIME_WAIT => Self::TimeWait,
            t::CLOSE => Self::Close,
            t::SYN_SENT2 => Self::SynSent2,
            _ => return None,
        })
    }

    /// The name conntrack itself prints (`/proc/net/nf_conntrack`, `conntrack -L`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::Established => "ESTABLISHED",
            Self::FinWait => "FIN_WAIT",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::SynSent2 => "SYN_SENT2",
        }
    }

    /// True when the connection is over and no packet of it must pass any more: after a reset
    /// (CLOSE) or after both FINs were acknowledged (TIME_WAIT). Deleting its key denies
    /// nothing the endpoints still need. LAST_ACK is not closed: the final ACK of the second
    /// FIN is still to pass, and without it the peer retransmits its FIN until it times out.
    pub fn carries_no_packets(self) -> bool {
        matches!(self, Self::Close | Self::TimeWait)
    }
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
    /// The entry's conntrack TCP state, when an entry was found and the flow is TCP.
    pub ct_tcp_state: Option<TcpState>,
    /// The network namespace (inode) the kernel judged the delete in; 0 when unknown.
    pub judged_netns: u32,
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
        ct_tcp_state: TcpState::from_raw(raw.ct_tcp_state),
        judged_netns: raw.judged_netns,
    }))
}
