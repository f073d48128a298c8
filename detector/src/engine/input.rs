//! What the engine consumes: decoded, backend-neutral observations, each with the kernel
//! timestamp (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) it happened at.

use serde::Serialize;

use super::race_instants::ReapedBy;

use crate::npa::{Layout, NpaKey};
use crate::record::{CtKind, CtRecord, DestroyReason, FlowTuple, Task, TcpState};

/// One observation. Kernel conntrack inputs carry the entry's original and reply tuples;
/// agent inputs carry the decoded map key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A conntrack entry was confirmed (inserted into the kernel table).
    CtNew {
        ts_ns: u64,
        id: u64,
        netns: u32,
        orig: FlowTuple,
        reply: FlowTuple,
    },
    /// A confirmed conntrack entry was destroyed.
    CtDestroy {
        ts_ns: u64,
        id: u64,
        netns: u32,
        orig: FlowTuple,
        reply: FlowTuple,
        /// Kernel ts of the entry's NEW, when known.
        born_ns: Option<u64>,
        reason: DestroyReason,
        /// Kernel time its timeout ran (or would have run) out, when known.
        expiry_ns: Option<u64>,
        /// Who removed it, from the task the destroy was seen in.
        reaped_by: ReapedBy,
    },
    /// Start-up snapshot: an entry that already existed, birth unknown.
    CtExisting {
        id: u64,
        netns: u32,
        orig: FlowTuple,
        reply: FlowTuple,
    },
    /// Start-up snapshot: a key already in the agent's map.
    MapExisting { map_id: u32, key: NpaKey },
    /// The agent (userspace) deleted, or tried to delete, a key.
    AgentDelete(AgentDelete),
    /// The datapath inserted or updated a key (only some backends see this).
    AgentInsert {
        ts_ns: u64,
        map_id: u32,
        key: NpaKey,
    },
    /// A packet was dropped; lets a verdict name the first reply denied after the delete.
    PacketDrop {
        ts_ns: u64,
        netns: u32,
        tuple: FlowTuple,
        reason: String,
    },
    /// The kernel reported `count` lost records at about `ts_ns`.
    Lost { ts_ns: u64, count: u64 },
    /// The agent's map was re-created (agent restart): forget the old map's keys.
    MapRecreated {
        ts_ns: u64,
        old_id: u32,
        new_id: u32,
    },
    /// Time has advanced to `now_ns` with nothing else to report; closes trace windows.
    Tick { now_ns: u64 },
}

/// A `bpf(BPF_MAP_DELETE_ELEM)` on the agent's conntrack map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentDelete {
    pub ts_ns: u64,
    /// The deleting task (NPA's cleanup goroutine's thread).
    pub task: Task,
    pub map_id: u32,
    pub key: NpaKey,
    pub layout: Layout,
    pub result: DeleteResult,
    /// The kernel's own liveness verdict taken at the instant of the delete, when the backend
    /// provides one; authoritative over the engine's shadow.
    pub kernel_view: Option<KernelView>,
    /// The network namespace (inode) the kernel view was taken in, when known.
    pub judged_netns: Option<u32>,
}

/// Outcome of the delete syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteResult {
    Deleted,
    /// The key was not in the map (ENOENT): nothing was removed.
    NotFound,
    /// Any other failure, as the negative errno the syscall returned.
    Error(i32),
}

impl DeleteResult {
    /// Maps a `bpf(2)` return value (0 or a negative errno) to a result.
    pub fn from_ret(ret: i64) -> Self {
        match ret {
            0 => DeleteResult::Deleted,
            r if r == -i64::from(libc::ENOENT) => DeleteResult::NotFound,
            r => DeleteResult::Error(i32::try_from(r).unwrap_or(i32::MIN)),
        }
    }
}

/// Liveness of the key's kernel conntrack entry, read in the kernel at the delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KernelView {
    /// A confirmed entry whose timeout has not passed.
    Live {
        entry_id: u64,
        born_ns: u64,
        timeout_left_ns: i64,
        /// Conntrack's TCP state of the entry, when read (TCP flows on kernels that report it).
        tcp_state: Option<TcpState>,
    },
    /// The entry's timeout has passed but no one has reaped it yet: deleting the key is right.
    ExpiredNotReaped {
        entry_id: u64,
        born_ns: u64,
        expired_for_ns: u64,
    },
    /// No entry for the key's flow.
    Absent,
}

impl Input {
    /// Kernel timestamp of the observation; `None` for start-up snapshot inputs.
    pub fn ts_ns(&self) -> Option<u64> {
        match self {
            Input::CtNew { ts_ns, .. }
            | Input::CtDestroy { ts_ns, .. }
            | Input::AgentInsert { ts_ns, .. }
            | Input::PacketDrop { ts_ns, .. }
            | Input::Lost { ts_ns, .. }
            | Input::MapRecreated { ts_ns, .. } => Some(*ts_ns),
            Input::AgentDelete(d) => Some(d.ts_ns),
            Input::Tick { now_ns } => Some(*now_ns),
            Input::CtExisting { .. } | Input::MapExisting { .. } => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Input::CtNew { .. } => "ct_new",
            Input::CtDestroy { .. } => "ct_destroy",
            Input::CtExisting { .. } => "ct_existing",
            Input::MapExisting { .. } => "map_existing",
            Input::AgentDelete(_) => "agent_delete",
            Input::AgentInsert { .. } => "agent_insert",
            Input::PacketDrop { .. } => "packet_drop",
            Input::Lost { .. } => "lost",
            Input::MapRecreated { .. } => "map_recreated",
            Input::Tick { .. } => "tick",
        }
    }
}

impl From<&CtRecord> for Input {
    fn from(c: &CtRecord) -> Self {
        match c.kind {
            CtKind::New => Input::CtNew {
                ts_ns: c.ts_ns,
                id: c.id,
                netns: c.netns,
                orig: c.orig,
                reply: c.reply,
            },
            CtKind::Destroy => {
                // The decoder always sets a reason on a destroy; should one ever be missing,
                // the remaining timeout tells the same story.
                let reason = c.reason.unwrap_or(if c.timeout_left_jiffies <= 0 {
                    DestroyReason::Expired
                } else {
                    DestroyReason::Killed
                });
                Input::CtDestroy {
                    ts_ns: c.ts_ns,
                    id: c.id,
                    netns: c.netns,
                    orig: c.orig,
                    reply: c.reply,
                    // The kernel side writes 0 when the entry predates the detector.
                    born_ns: (c.born_ns != 0).then_some(c.born_ns),
                    reason,
                    expiry_ns: (c.expiry_ns != 0).then_some(c.expiry_ns),
                    reaped_by: ReapedBy::of(&c.task, reason),
                }
            }
        }
    }
}
