//! What the engine produces: verdicts, traces and the timeline events they carry, plus the
//! classification rule.

use serde::Serialize;

use super::input::{DeleteResult, KernelView};
pub use super::race_instants::OldEntry;
use super::race_instants::RaceInstants;
use crate::npa::{Layout, NpaKey};
use crate::record::{DestroyReason, FlowTuple, Task, TcpState};

/// One output of [`super::Engine::push`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "output", rename_all = "snake_case")]
pub enum Output {
    /// Emitted at the harmful delete itself.
    Verdict(Verdict),
    /// Emitted once the after-window of a verdict has passed.
    TraceReady(Trace),
    /// Emitted at a delete of a key whose kernel entry was live but whose connection was
    /// already closed (TCP CLOSE or TIME_WAIT): no packet of it must pass any more, so it is
    /// no race; shown and counted apart.
    ClosedFlowDelete(ClosedFlowDelete),
    /// A race's harm seen or not: emitted at the first denied packet of the raced flow
    /// (confirmed), or, when none came within the after-window, just before its trace
    /// (unconfirmed).
    RaceConfirmation(RaceConfirmation),
    /// A delete the engine could not judge: no live entry was found, but the state that would
    /// have shown one was lost to a bound. Never a rightful delete.
    Unjudged(Unjudged),
}

/// A delete left unjudged, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unjudged {
    pub ts_ns: u64,
    pub key: NpaKey,
    pub reason: UnjudgedReason,
    /// [`UnjudgedReason::LiveInOtherNetns`]: the namespace the kernel judged in, and the
    /// one the live entry is in.
    pub judged_netns: Option<u32>,
    pub live_netns: Option<u32>,
}

/// The bound that left a delete unjudged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnjudgedReason {
    /// The engine's flow table (`--max-flows`) evicted the flow's state while it had a live
    /// entry.
    ShadowEvicted,
    /// The kernel saw no entry, but its tables of live entries (`--max-entries`) had
    /// overflowed.
    KernelTableFull,
    /// The kernel saw no entry in the namespace it judged in (the deleting task's, or
    /// `--netns`), but the flow has a live entry in another namespace: the agent's conntrack
    /// may live there.
    LiveInOtherNetns,
}

impl UnjudgedReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::ShadowEvicted => {
                "the flow's state was evicted from the engine (--max-flows) while it had a live \
                 entry"
            }
            Self::KernelTableFull => {
                "the kernel's table of live entries was full (--max-entries): an absent entry \
                 proves nothing"
            }
            Self::LiveInOtherNetns => {
                "no entry in the namespace judged in, but a live one in another namespace: if \
                 the agent's conntrack is there, this delete is a race (judge there with --netns)"
            }
        }
    }
}

/// Whether a race's flow had a packet denied after the delete, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RaceConfirmation {
    /// A packet of the flow was dropped within the after-window.
    pub confirmed: bool,
    pub class: VerdictClass,
    pub key: NpaKey,
    /// The race's delete (names the race with `key`).
    pub delete_ts_ns: u64,
    pub live_entry_id: u64,
    /// The delete -> the first denied packet.
    pub delete_to_denied_ns: Option<u64>,
    pub first_denied: Option<DeniedPacket>,
    pub after_window_ns: u64,
    /// Unconfirmed only: records were lost after the delete, or the race's trace was emitted
    /// before its window closed (bounded state), so a denial may have been missed.
    pub maybe_incomplete: bool,
}

/// A delete of a closed connection's key: its entry had not timed out yet, but the flow
/// carries no more packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClosedFlowDelete {
    pub key: NpaKey,
    pub map_id: u32,
    /// The deleting task.
    pub agent: Task,
    pub delete_ts_ns: u64,
    pub entry_id: u64,
    /// 0 when unknown.
    pub born_ns: u64,
    pub timeout_left_ns: i64,
    pub tcp_state: TcpState,
}

/// The only verdict kind so far; a field of its own so consumers can tell kinds apart later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictKind {
    /// The agent deleted the key of a flow whose kernel entry was confirmed and unexpired.
    LiveEntryDelete,
}

/// Why the agent's view was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerdictClass {
    /// An earlier entry of the same flow was destroyed and a new one created since (#462).
    PortReuse,
    /// No predecessor; the live entry is younger than the snapshot-lag window (#246).
    SnapshotLag,
    /// The live entry is older than the window (or predates the detector): the agent's
    /// matching of keys to kernel entries is wrong.
    StaleMatch,
}

impl VerdictClass {
    pub const ALL: [VerdictClass; 3] = [
        VerdictClass::PortReuse,
        VerdictClass::SnapshotLag,
        VerdictClass::StaleMatch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VerdictClass::PortReuse => "port-reuse",
            VerdictClass::SnapshotLag => "snapshot-lag",
            VerdictClass::StaleMatch => "stale-match",
        }
    }
}

/// Who decided the entry was live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecidedBy {
    /// The kernel's own view at the delete ([`KernelView`]).
    Kernel,
    /// The engine's shadow of the conntrack table (cannot see per-packet timeout refreshes,
    /// so it treats every confirmed, not yet destroyed entry as live).
    Shadow,
}

/// The kernel entry that was live at the delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LiveEntry {
    pub id: u64,
    /// `None` when the entry predates the detector.
    pub born_ns: Option<u64>,
    /// Known when the shadow holds the entry (a kernel view alone carries only id and birth).
    pub netns: Option<u32>,
    pub orig: Option<FlowTuple>,
    pub reply: Option<FlowTuple>,
    /// Remaining timeout at the delete, from the kernel view.
    pub timeout_left_ns: Option<i64>,
}

/// The first dropped packet of the flow after the delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeniedPacket {
    pub ts_ns: u64,
    pub netns: u32,
    pub tuple: FlowTuple,
    pub reason: String,
}

/// A harmful delete, explained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub class: VerdictClass,
    pub decided_by: DecidedBy,
    pub key: NpaKey,
    pub layout: Layout,
    pub map_id: u32,
    /// The deleting task.
    pub agent: Task,
    pub delete_ts_ns: u64,
    pub live: LiveEntry,
    /// The predecessor whose end the agent mistook for this flow's end (port-reuse only).
    pub old: Option<OldEntry>,
    /// When the datapath last inserted the key, if the backend reports datapath writes.
    pub key_inserted_ns: Option<u64>,
    /// Old entry's destroy -> live entry's birth. Signed: probes that see a destroy late
    /// (e.g. a slab free after an RCU grace period) can put it after the new birth.
    pub reuse_gap_ns: Option<i64>,
    /// Live entry's birth -> the delete.
    pub delete_lag_ns: Option<u64>,
    /// Port-reuse only: the predecessor's expiry and reap, the reuse and the delete, with
    /// the gaps between them.
    pub instants: Option<RaceInstants>,
    /// The delete -> the first packet of the flow dropped after it (traces only; the verdict
    /// is emitted before any such drop can be seen).
    pub delete_to_denied_ns: Option<u64>,
    pub first_denied: Option<DeniedPacket>,
    /// Records were lost between the start of the story (old entry's birth, or the
    /// before-window) and the delete, so a piece of it may be missing.
    pub maybe_incomplete: bool,
    /// Oddities worth a human's attention (owner not an end of the key, several live
    /// entries, kernel view contradicting the shadow...).
    pub notes: Vec<String>,
    /// Every retained event touching the flow up to and including the delete, by time.
    pub timeline: Vec<TimelineEvent>,
    /// Events of the story may be missing from `timeline`: the bounded flight recorder
    /// pushed out events from after the story's start, or a flow had more than
    /// `timeline_len` events (only its newest are shown).
    pub timeline_truncated: bool,
}

/// A verdict with the flow's flight-recorder timeline around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    pub verdict: Verdict,
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    /// Events of the flow (and global markers: lost records, map re-creations) inside
    /// `[window_start_ns, window_end_ns]`, by time.
    pub timeline: Vec<TimelineEvent>,
    /// Records were lost after the delete within the window (a denial may be missing).
    pub after_window_incomplete: bool,
    /// A packet of the flow was denied within the window (`verdict.first_denied`); false:
    /// the race is unconfirmed.
    pub confirmed: bool,
    /// Events of the window may be missing from `timeline`: the bounded flight recorder
    /// pushed out events from inside the window, or a flow had more than `timeline_len`
    /// events (only its newest are shown).
    pub timeline_truncated: bool,
}

/// One entry of a flow's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEvent {
    /// Arrival order in the engine; ties on `ts_ns` keep it, and it de-duplicates events
    /// recorded under several flow ids.
    pub seq: u64,
    pub ts_ns: u64,
    #[serde(flatten)]
    pub what: TimelineKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TimelineKind {
    CtNew {
        id: u64,
        netns: u32,
        orig: FlowTuple,
        reply: FlowTuple,
    },
    CtDestroy {
        id: u64,
        netns: u32,
        born_ns: Option<u64>,
        reason: DestroyReason,
    },
    /// Snapshot entry; `ts_ns` is when the engine learnt of it.
    CtExisting {
        id: u64,
        netns: u32,
        orig: FlowTuple,
        reply: FlowTuple,
    },
    MapExisting {
        map_id: u32,
        key: NpaKey,
    },
    AgentInsert {
        map_id: u32,
        key: NpaKey,
    },
    /// Boxed: the largest event and a rare one, it would set the size of every event in the
    /// flight recorder.
    AgentDelete(Box<DeleteEvent>),
    PacketDrop {
        netns: u32,
        tuple: FlowTuple,
        reason: String,
    },
    Lost {
        count: u64,
    },
    MapRecreated {
        old_id: u32,
        new_id: u32,
    },
}

/// An agent delete as a timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeleteEvent {
    pub task: Task,
    pub map_id: u32,
    pub key: NpaKey,
    pub result: DeleteResult,
    pub kernel_view: Option<KernelView>,
}

/// Classifies a live-entry delete.
///
/// An entry older than `window_ns` (or of unknown birth, i.e. present when the detector
/// started) outlived at least one full cleanup period, so the agent's dump must have shown
/// it: the agent's matching is wrong whatever happened before (stale-match). A younger entry
/// with a destroyed predecessor is the port-reuse race; without one it is snapshot lag.
/// Returns the predecessor when it explains the verdict.
pub(crate) fn classify(
    delete_ts: u64,
    live_id: u64,
    live_born: Option<u64>,
    last_destroyed: Option<&OldEntry>,
    window_ns: u64,
) -> (VerdictClass, Option<OldEntry>) {
    let Some(born) = live_born else {
        return (VerdictClass::StaleMatch, None);
    };
    if delete_ts.saturating_sub(born) > window_ns {
        return (VerdictClass::StaleMatch, None);
    }
    // A predecessor counts when it is another lifetime that began no later than the live
    // one and ended before the delete. Its destroy time is not compared with the new birth:
    // two entries with one tuple cannot coexist in a netns, and late destroy probes would
    // otherwise hide real reuse.
    let old = last_destroyed.filter(|o| {
        o.id != live_id && o.born_ns.is_none_or(|ob| ob <= born) && o.destroyed_ns <= delete_ts
    });
    match old {
        Some(o) => (VerdictClass::PortReuse, Some(*o)),
        None => (VerdictClass::SnapshotLag, None),
    }
}
