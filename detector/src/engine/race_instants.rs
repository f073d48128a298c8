//! A port-reuse race's four instants: the previous entry's timeout ran out (expiry), someone
//! removed it from the kernel table (reap), a new connection took the tuple (reuse), and the
//! agent deleted the key (delete). The agent's cleanup is right only when its dump ran after
//! the reuse; the instants say which of them it raced with.

use serde::{Serialize, Serializer};

use crate::record::{DestroyReason, Task};

/// A task's command name as the kernel keeps it (at most 15 bytes and a NUL): fixed-size so
/// that the state kept per flow stays `Copy` and allocation-free.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Comm([u8; 16]);

impl Comm {
    pub fn new(name: &str) -> Self {
        let mut b = [0u8; 16];
        // Keep room for the NUL, as the kernel does; cut at a char boundary.
        let mut end = name.len().min(15);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        b[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self(b)
    }

    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(self.0.len());
        std::str::from_utf8(&self.0[..end]).unwrap_or("?")
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for Comm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Who removed an entry from the kernel table, told from the task the destroy probe ran in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum ReapedBy {
    /// conntrack's garbage collector (`gc_worker`, a kworker) found the expired entry.
    GcWorker,
    /// Packet processing in softirq (an idle CPU's or ksoftirqd): a packet's lookup found the
    /// entry expired, or the stack tore it down.
    Softirq,
    /// The agent that made the delete: its own conntrack dump (ctnetlink walks the table and
    /// reaps the expired entries it meets) or a packet it sent.
    Agent { pid: u32, comm: Comm },
    /// Another task: a conntrack dump (`conntrack -L`, another ctnetlink reader), a lookup by
    /// a packet it sent, or an explicit delete (`conntrack -D`), a kworker that killed it.
    Task { pid: u32, comm: Comm },
}

impl ReapedBy {
    /// Who a destroy seen in `task`'s context was done by.
    pub fn of(task: &Task, reason: DestroyReason) -> Self {
        let comm = Comm::new(&task.comm);
        if task.pid == 0 || task.comm.starts_with("ksoftirqd/") {
            Self::Softirq
        } else if task.comm.starts_with("kworker/") && reason == DestroyReason::Expired {
            Self::GcWorker
        } else {
            Self::Task {
                pid: task.pid,
                comm,
            }
        }
    }

    /// The same reaper, naming the agent as such when it is the task that deleted the key.
    pub fn seen_from(self, agent_pid: u32) -> Self {
        match self {
            Self::Task { pid, comm } if pid == agent_pid => Self::Agent { pid, comm },
            other => other,
        }
    }

    /// How a readable line names it.
    pub fn describe(&self) -> String {
        match self {
            Self::GcWorker => "the gc worker".to_string(),
            Self::Softirq => "packet processing (softirq)".to_string(),
            Self::Agent { pid, comm } => format!("the agent itself ({}/{pid})", comm.as_str()),
            Self::Task { pid, comm } => format!("task {}/{pid}", comm.as_str()),
        }
    }
}

/// The last destroyed entry of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OldEntry {
    pub id: u64,
    pub born_ns: Option<u64>,
    pub netns: u32,
    pub destroyed_ns: u64,
    /// `None` when no destroy record was seen and the engine inferred the end from a new entry
    /// taking the same tuple in the same netns (the record was lost).
    pub reason: Option<DestroyReason>,
    /// When its timeout ran out: set only when it was destroyed expired and the kernel's tick
    /// length was known.
    pub expiry_ns: Option<u64>,
    /// Who removed it from the kernel table (`None` when its end was inferred).
    pub reaped_by: Option<ReapedBy>,
}

/// The instants of a port-reuse race, each a kernel time (ns, CLOCK_MONOTONIC), with the gaps
/// between them. In a real race `expiry <= reap <= reuse <= delete`; a destroy probe that
/// fires late (after an RCU grace period) can put the reap after the reuse, so gaps are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RaceInstants {
    /// The previous entry's timeout ran out (within a jiffy, never after the reap). `None`
    /// when it was removed before its timeout, or the kernel's tick length was unknown.
    pub expiry_ns: Option<u64>,
    /// The previous entry was removed from the kernel table (its destroy).
    pub reap_ns: u64,
    /// Who removed it; `None` when its destroy record was lost and the end was inferred.
    pub reaped_by: Option<ReapedBy>,
    /// The live entry was born: a new connection reused the tuple. `None` when unknown.
    pub reuse_ns: Option<u64>,
    /// The agent deleted the key.
    pub delete_ns: u64,
    pub expiry_to_reap_ns: Option<i64>,
    pub reap_to_reuse_ns: Option<i64>,
    pub reuse_to_delete_ns: Option<i64>,
}

/// `to - from` in ns, signed.
fn gap(from: u64, to: u64) -> Option<i64> {
    i64::try_from(to)
        .ok()?
        .checked_sub(i64::try_from(from).ok()?)
}

impl RaceInstants {
    pub fn new(old: &OldEntry, reuse_ns: Option<u64>, delete_ns: u64) -> Self {
        let reap_ns = old.destroyed_ns;
        Self {
            expiry_ns: old.expiry_ns,
            reap_ns,
            reaped_by: old.reaped_by,
            reuse_ns,
            delete_ns,
            expiry_to_reap_ns: old.expiry_ns.and_then(|e| gap(e, reap_ns)),
            reap_to_reuse_ns: reuse_ns.and_then(|r| gap(reap_ns, r)),
            reuse_to_delete_ns: reuse_ns.and_then(|r| gap(r, delete_ns)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    fn task(pid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid: pid,
            comm: comm.to_string(),
        }
    }

    #[test]
    fn reapers_are_told_apart_by_their_context() {
        let expired = DestroyReason::Expired;
        assert_eq!(
            ReapedBy::of(&task(40, "kworker/u8:2"), expired),
            ReapedBy::GcWorker
        );
        assert_eq!(
            ReapedBy::of(&task(0, "swapper/1"), expired),
            ReapedBy::Softirq
        );
        assert_eq!(
            ReapedBy::of(&task(12, "ksoftirqd/0"), expired),
            ReapedBy::Softirq
        );
        // A kworker that kills a live entry (a netns teardown) is not the gc.
        assert!(matches!(
            ReapedBy::of(&task(40, "kworker/u8:2"), DestroyReason::Killed),
            ReapedBy::Task { pid: 40, .. }
        ));
        let dump = ReapedBy::of(&task(900, "aws-network-policy-agent"), expired);
        // Named as the kernel names it: 15 bytes of the command.
        assert_eq!(
            dump.seen_from(900).describe(),
            "the agent itself (aws-network-pol/900)"
        );
        assert_eq!(dump.seen_from(901).describe(), "task aws-network-pol/900");
    }

    #[test]
    fn gaps_follow_the_instants() {
        let old = OldEntry {
            id: 1,
            born_ns: Some(10),
            netns: 1,
            destroyed_ns: 500,
            reason: Some(DestroyReason::Expired),
            expiry_ns: Some(200),
            reaped_by: Some(ReapedBy::GcWorker),
        };
        let i = RaceInstants::new(&old, Some(700), 1000);
        assert_eq!(
            (
                i.expiry_to_reap_ns,
                i.reap_to_reuse_ns,
                i.reuse_to_delete_ns
            ),
            (Some(300), Some(200), Some(300))
        );
        // A late destroy probe: the reap after the reuse is a negative gap, not a wrap.
        let i = RaceInstants::new(&old, Some(400), 1000);
        assert_eq!(i.reap_to_reuse_ns, Some(-100));
        let killed = OldEntry {
            expiry_ns: None,
            ..old
        };
        assert_eq!(
            RaceInstants::new(&killed, None, 1000).expiry_to_reap_ns,
            None
        );
    }
}
