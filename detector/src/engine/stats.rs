//! Counters of everything the engine saw and decided.

use serde::Serialize;

use super::input::Input;
use super::verdict::VerdictClass;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub inputs: InputCounts,
    pub deletes: DeleteCounts,
    pub verdicts: VerdictCounts,
    pub evictions: EvictionCounts,
    /// Sum of the `count` of every [`Input::Lost`].
    pub lost_records: u64,
    /// Timestamped inputs that arrived with a timestamp below one already seen.
    pub out_of_order: u64,
    /// Entries the engine retired because a new entry took their tuple in the same netns
    /// without their destroy being seen (a lost record).
    pub implicit_destroys: u64,
    /// Deleted keys whose owner was neither end of the key (NPA always uses one of them).
    pub owner_not_endpoint: u64,
    /// Decisions where the kernel view contradicted the shadow (it wins).
    pub kernel_overrode_shadow: u64,
    pub traces_emitted: u64,
    /// Gauge: flow states held now.
    pub flows_tracked: u64,
    /// Gauge: agent-map keys held now.
    pub map_keys_tracked: u64,
    /// Timeline events pushed out of the bounded flight recorder (routine: it keeps the
    /// newest `recorder_len`); timelines that reach back past them say so.
    pub timeline_events_pushed_out: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InputCounts {
    pub ct_new: u64,
    pub ct_destroy: u64,
    pub ct_existing: u64,
    pub map_existing: u64,
    pub agent_delete: u64,
    pub agent_insert: u64,
    pub packet_drop: u64,
    pub lost: u64,
    pub map_recreated: u64,
    pub tick: u64,
}

impl InputCounts {
    pub(crate) fn count(&mut self, input: &Input) {
        let c = match input {
            Input::CtNew { .. } => &mut self.ct_new,
            Input::CtDestroy { .. } => &mut self.ct_destroy,
            Input::CtExisting { .. } => &mut self.ct_existing,
            Input::MapExisting { .. } => &mut self.map_existing,
            Input::AgentDelete(_) => &mut self.agent_delete,
            Input::AgentInsert { .. } => &mut self.agent_insert,
            Input::PacketDrop { .. } => &mut self.packet_drop,
            Input::Lost { .. } => &mut self.lost,
            Input::MapRecreated { .. } => &mut self.map_recreated,
            Input::Tick { .. } => &mut self.tick,
        };
        *c += 1;
    }
}

/// Agent deletes by outcome. `live + closed_flow + rightful + unseen` is the number of
/// successful deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeleteCounts {
    /// Harmful: a live entry existed (each one is a verdict).
    pub live: u64,
    /// The flow was really gone, or its entry only expired and not yet reaped.
    pub rightful: u64,
    /// Of `rightful`: the kernel saw an expired, not yet reaped entry.
    pub rightful_expired_not_reaped: u64,
    /// The entry was live but its connection closed (TCP CLOSE/TIME_WAIT): no race, and not
    /// in `rightful` either, so that the two stay apart in every summary.
    pub closed_flow: u64,
    /// No live entry, and the engine held no state at all for the key (neither map nor kernel
    /// shadow nor history): harmless as far as anyone can tell, but a sign the detector
    /// started late or lost records.
    pub unseen: u64,
    /// Could not be judged: no live entry was found, but the state that would have shown one
    /// was lost to a bound (never counted as rightful). By reason below.
    pub unjudged: u64,
    /// Of `unjudged`: the engine had evicted the flow's state while it had a live entry.
    pub unjudged_shadow_evicted: u64,
    /// Of `unjudged`: the kernel saw no entry, but its tables of live entries had overflowed.
    pub unjudged_kernel_table_full: u64,
    /// Of `unjudged`: no entry in the namespace judged in, a live one in another.
    pub unjudged_other_netns: u64,
    /// ENOENT: nothing was deleted.
    pub not_found: u64,
    /// Any other failure.
    pub error: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerdictCounts {
    pub port_reuse: u64,
    pub snapshot_lag: u64,
    pub stale_match: u64,
    pub decided_by_kernel: u64,
    /// Races whose flow had a packet denied within the after-window.
    pub confirmed: u64,
    /// Races whose after-window closed with no denied packet.
    pub unconfirmed: u64,
    pub decided_by_shadow: u64,
}

impl VerdictCounts {
    pub(crate) fn count(&mut self, class: VerdictClass) {
        match class {
            VerdictClass::PortReuse => self.port_reuse += 1,
            VerdictClass::SnapshotLag => self.snapshot_lag += 1,
            VerdictClass::StaleMatch => self.stale_match += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.port_reuse + self.snapshot_lag + self.stale_match
    }
}

/// State dropped to stay within `EngineConfig::max_flows`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvictionCounts {
    /// Flow states (live entries, history and timeline of one 5-tuple).
    pub flows: u64,
    /// Agent-map keys held by the evicted flows (a key goes with its flow).
    pub map_keys: u64,
    /// Pending traces emitted before their after-window closed.
    pub traces: u64,
    /// Lost/map-recreated markers dropped from the global marker ring.
    pub markers: u64,
}

impl EvictionCounts {
    pub fn total(&self) -> u64 {
        self.flows + self.map_keys + self.traces + self.markers
    }
}
