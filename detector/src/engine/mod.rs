//! Correlation engine: decides whether each agent delete removed the key of a live flow, and
//! explains it. Pure: inputs in, outputs out; no I/O, no clocks (time comes only from the
//! inputs' kernel timestamps).
//!
//! # API
//!
//! ```text
//! let mut engine = Engine::new(EngineConfig::default());
//! for input in inputs {                       // in kernel-timestamp order (reorder buffer)
//!     for out in engine.push(input) {         // or engine.push_into(input, &mut outs)
//!         match out {
//!             Output::Verdict(v) => ...,      // at the harmful delete
//!             Output::TraceReady(t) => ...,   // after_window_ns later
//!         }
//!     }
//! }
//! let rest = engine.finish();                 // pending traces at shutdown
//! let counters: &Stats = engine.stats();
//! ```
//! Feed [`Input::Tick`] periodically so traces are emitted while the node is quiet. At
//! start-up, seed the shadows with [`Input::CtExisting`] and [`Input::MapExisting`].
//!
//! # Decision
//!
//! A successful delete of key K is a `live-entry-delete` [`Verdict`] iff a confirmed,
//! unexpired kernel entry existed for K's flow at the delete:
//! * with a [`KernelView`] (read in the kernel at the delete) that view decides;
//! * without one the shadow decides. It cannot see per-packet timeout refreshes, so it holds
//!   every confirmed, not yet destroyed entry as live.
//!
//! K matches an entry the way NPA's cleanup matches them: K's 5-tuple equals the entry's
//! original tuple, or `orig.src:sport -> reply.src:sport` when the reply comes from another
//! address (DNAT). Either direction of K matches (the datapath may have keyed the flow from
//! the reply side). The owner should be one end of K; when it is not, the verdict says so
//! but matching goes on. Keys carry no netns, so entries of every netns match; if several
//! are live the youngest is reported and the verdict notes the count. (NPA itself dumps only
//! its own netns; this choice errs towards reporting.)
//!
//! Classes ([`VerdictClass`]): stale-match when the live entry is older than
//! `snapshot_lag_window_ns` or predates the detector; else port-reuse when an earlier entry
//! of the flow was destroyed; else snapshot-lag.
//!
//! Deletes that removed nothing (ENOENT) or failed are counted, never verdicts. A delete
//! while the flow was gone, or only expired and not yet reaped, is rightful; one of a key the
//! engine knew nothing about is counted as unseen.
//!
//! # Bounds
//! Flows are kept in one table of at most `max_flows` flows, least recently touched first
//! out; a flow holds its kernel entries and the agent-map keys that name it, so an evicted
//! flow takes its keys along (counted as evicted keys); timelines come from one flight
//! recorder of `recorder_len` events (all flows) and show at most `timeline_len` events per
//! flow; pending traces are capped at `max_flows`; global markers (lost records, map
//! re-creations) at `max_markers`. Every eviction is counted in [`Stats::evictions`].
//!
//! # Ordering
//! Inputs should arrive in timestamp order (the caller's reorder buffer). A slightly late
//! input is still placed in timelines by its timestamp and counted in
//! [`Stats::out_of_order`]; a destroy that arrives before its own insert does not resurrect
//! the entry. A record arriving after the delete it should have preceded cannot change the
//! verdict already emitted.

mod decide;
mod few;
mod flow_id;
mod input;
mod lru;
mod race_instants;
mod recorder;
mod shadow;
mod stats;
mod verdict;

#[cfg(test)]
mod closed_flow_tests;
#[cfg(test)]
mod confirmation_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use smallvec::SmallVec;

use serde::Serialize;

use flow_id::{FlowId, NO_EVENT};
use lru::LruMap;
use recorder::Recorder;
use shadow::{AgentKey, FlowState, KEntry, insert_sorted};

pub use input::{AgentDelete, DeleteResult, Input, KernelView};
pub use race_instants::{Comm, RaceInstants, ReapedBy};
pub use stats::{DeleteCounts, EvictionCounts, InputCounts, Stats, VerdictCounts};
pub use verdict::{
    ClosedFlowDelete, DecidedBy, DeleteEvent, DeniedPacket, LiveEntry, OldEntry, Output,
    RaceConfirmation, TimelineEvent, TimelineKind, Trace, Unjudged, UnjudgedReason, Verdict,
    VerdictClass, VerdictKind,
};

use crate::npa::NpaKey;
use crate::record::{DestroyReason, FlowTuple};

const NS_PER_SEC: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineConfig {
    /// Bound on flow states (a flow's kernel entries and agent-map keys together). Default
    /// 524 288: NPA's `aws_conntrack_map` has `max_entries = 512 * 1024`, so a full map still
    /// fits.
    pub max_flows: usize,
    /// A live entry younger than this at the delete was created after the agent took its
    /// copy of the map, so its delete is a race (snapshot-lag / port-reuse); an older one
    /// should have been in the agent's dump (stale-match). Default 300 s: NPA's
    /// `conntrack-cache-cleanup-period` default, and the agent copies the map one period
    /// before the cleanup run that deletes.
    pub snapshot_lag_window_ns: u64,
    /// How much of a flow's history before the delete a trace shows. Default 30 s.
    pub before_window_ns: u64,
    /// How long after the delete a trace waits for the denial. Default 5 s.
    pub after_window_ns: u64,
    /// Events a timeline shows per flow. Default 32.
    pub timeline_len: usize,
    /// Events kept in the flight recorder, all flows together (the source of timelines).
    /// Default 32768 (a few MiB).
    pub recorder_len: usize,
    /// Global markers (lost records, map re-creations) kept. Default 4096.
    pub max_markers: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_flows: 512 * 1024,
            snapshot_lag_window_ns: 300 * NS_PER_SEC,
            before_window_ns: 30 * NS_PER_SEC,
            after_window_ns: 5 * NS_PER_SEC,
            timeline_len: 32,
            recorder_len: 32 * 1024,
            max_markers: 4096,
        }
    }
}

/// Evicted live flows remembered at least, however small `max_flows` is (a few hundred KiB).
const MIN_EVICTED_REMEMBERED: usize = 4096;

/// How a destroyed entry ended.
struct DestroyedAs {
    reason: DestroyReason,
    expiry_ns: Option<u64>,
    reaped_by: ReapedBy,
}

/// A verdict waiting for its after-window to close.
struct Pending {
    verdict: Verdict,
    /// Flow ids whose timelines (and drops) belong to the verdict.
    flows: Vec<FlowId>,
    /// Where the verdict's story starts, for the lost-record check.
    story_start_ns: u64,
}

pub struct Engine {
    cfg: EngineConfig,
    /// Every tracked flow: its kernel entries, agent-map keys and timeline head.
    flows: LruMap<FlowId, FlowState>,
    /// Agent-map keys held in `flows`.
    map_keys: u64,
    recorder: Recorder,
    /// Lost-record and map-recreation markers, sorted by timestamp.
    markers: VecDeque<TimelineEvent>,
    /// Newest lost-record marker pushed out of `markers`: a window starting before it may
    /// contain losses the engine no longer remembers, so it is flagged to be safe.
    lost_horizon_ns: Option<u64>,
    pending: VecDeque<Pending>,
    /// Highest timestamp seen.
    now_ns: u64,
    seq: u64,
    stats: Stats,
    /// Flows whose state was evicted while they had a live entry: a later delete of their key
    /// cannot be judged from the shadow (bounded like the flows themselves).
    evicted_live: LruMap<FlowId, ()>,
    /// `evicted_live` itself overflowed: any flow may have lost its live state.
    evicted_live_overflowed: bool,
    /// The kernel's tables of live entries overflowed (seen_full / flows_full): a delete the
    /// kernel saw as absent may concern an entry it could not index.
    kernel_tables_full: bool,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            flows: LruMap::new(cfg.max_flows),
            map_keys: 0,
            recorder: Recorder::new(cfg.recorder_len),
            markers: VecDeque::new(),
            lost_horizon_ns: None,
            pending: VecDeque::new(),
            now_ns: 0,
            seq: 0,
            stats: Stats::default(),
            evicted_live: LruMap::new(cfg.max_flows.max(MIN_EVICTED_REMEMBERED)),
            evicted_live_overflowed: false,
            kernel_tables_full: false,
            cfg,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Tells the engine the kernel's tables of live entries overflowed: from now on a delete
    /// the kernel saw as absent is unjudged, not rightful.
    pub fn note_kernel_tables_full(&mut self) {
        self.kernel_tables_full = true;
    }

    /// Feeds one input; returns what it caused.
    pub fn push(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        self.push_into(input, &mut out);
        out
    }

    /// Feeds one input, appending what it caused to `out`.
    pub fn push_into(&mut self, input: Input, out: &mut Vec<Output>) {
        self.stats.inputs.count(&input);
        if let Some(ts) = input.ts_ns() {
            if ts < self.now_ns && !matches!(input, Input::Tick { .. }) {
                self.stats.out_of_order += 1;
            }
            self.now_ns = self.now_ns.max(ts);
        }
        match input {
            Input::CtNew {
                ts_ns,
                id,
                netns,
                orig,
                reply,
            } => {
                let what = TimelineKind::CtNew {
                    id,
                    netns,
                    orig,
                    reply,
                };
                self.on_ct_new(ts_ns, Some(ts_ns), (id, netns, orig, reply), what);
            }
            Input::CtExisting {
                id,
                netns,
                orig,
                reply,
            } => {
                let what = TimelineKind::CtExisting {
                    id,
                    netns,
                    orig,
                    reply,
                };
                self.on_ct_new(self.now_ns, None, (id, netns, orig, reply), what);
            }
            Input::CtDestroy {
                ts_ns,
                id,
                netns,
                orig,
                reply,
                born_ns,
                reason,
                expiry_ns,
                reaped_by,
            } => {
                // Only an entry that had timed out has an expiry before its reap.
                let expired = reason == DestroyReason::Expired;
                let end = DestroyedAs {
                    reason,
                    expiry_ns: expiry_ns.filter(|_| expired),
                    reaped_by,
                };
                self.on_ct_destroy(ts_ns, id, netns, &orig, &reply, born_ns, end);
            }
            Input::MapExisting { map_id, key } => {
                let what = TimelineKind::MapExisting {
                    map_id,
                    key: key.clone(),
                };
                self.on_map_key(self.now_ns, map_id, key, None, what);
            }
            Input::AgentInsert { ts_ns, map_id, key } => {
                let what = TimelineKind::AgentInsert {
                    map_id,
                    key: key.clone(),
                };
                self.on_map_key(ts_ns, map_id, key, Some(ts_ns), what);
            }
            Input::AgentDelete(d) => self.on_delete(d, out),
            Input::PacketDrop {
                ts_ns,
                netns,
                tuple,
                reason,
            } => self.on_drop(ts_ns, netns, tuple, reason, out),
            Input::Lost { ts_ns, count } => {
                self.stats.lost_records += count;
                let seq = self.next_seq();
                self.push_marker(TimelineEvent {
                    seq,
                    ts_ns,
                    what: TimelineKind::Lost { count },
                });
            }
            Input::MapRecreated {
                ts_ns,
                old_id,
                new_id,
            } => {
                // The agent restarted: keys of the old map are gone with it. The kernel table
                // is untouched, so its shadow stays.
                let mut dropped = 0;
                for flow in self.flows.values_mut() {
                    let before = flow.keys.len();
                    flow.keys.retain(|k| k.map_id != old_id);
                    dropped += before - flow.keys.len();
                }
                self.map_keys -= dropped as u64;
                let seq = self.next_seq();
                self.push_marker(TimelineEvent {
                    seq,
                    ts_ns,
                    what: TimelineKind::MapRecreated { old_id, new_id },
                });
            }
            Input::Tick { .. } => {}
        }
        self.flush_ready(out);
        self.stats.flows_tracked = self.flows.len() as u64;
        self.stats.map_keys_tracked = self.map_keys;
        self.stats.timeline_events_pushed_out = self.recorder.pushed_out();
    }

    /// Emits every pending trace now (at shutdown), whether or not its window has closed.
    pub fn finish(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(p) = self.pending.pop_front() {
            self.emit_trace(p, &mut out);
        }
        out
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The state of flow `id`, created if needed (possibly evicting the stalest flow).
    fn flow_mut(&mut self, id: FlowId) -> &mut FlowState {
        let (flow, evicted) = self.flows.get_or_insert_with(id, FlowState::default);
        if let Some((evicted_id, evicted_state)) = evicted {
            self.stats.evictions.flows += 1;
            let keys = evicted_state.keys.len() as u64;
            self.stats.evictions.map_keys += keys;
            self.map_keys -= keys;
            if !evicted_state.live.is_empty() {
                let (_, forgotten) = self.evicted_live.get_or_insert_with(evicted_id, || ());
                self.evicted_live_overflowed |= forgotten.is_some();
            }
        }
        flow
    }

    /// A confirmed entry (`CtNew`, born at `born_ns`) or one found at start-up (`CtExisting`,
    /// birth unknown).
    fn on_ct_new(
        &mut self,
        ts_ns: u64,
        born_ns: Option<u64>,
        (id, netns, orig, reply): (u64, u32, FlowTuple, FlowTuple),
        what: TimelineKind,
    ) {
        let ev = TimelineEvent {
            seq: self.next_seq(),
            ts_ns,
            what,
        };
        let ((first, orig_src_is_lo), dnat) = FlowId::of_entry(&orig, &reply);
        let fids = [Some(first), dnat];
        let idx = self.recorder.next_index();
        let mut prev = [NO_EVENT; 2];
        let mut implicit = 0;
        for (j, fid) in fids.iter().enumerate() {
            let Some(fid) = fid else { continue };
            let flow = self.flow_mut(fid.clone());
            prev[j] = std::mem::replace(&mut flow.last_event, idx);
            // Its destroy was processed first (late insert record): do not resurrect it.
            if flow.last_destroyed.as_ref().is_some_and(|d| d.id == id) {
                continue;
            }
            if let Some(known) = flow.live.iter_mut().find(|e| e.id == id) {
                // Seen before (snapshot, then its NEW): keep whatever birth is known.
                known.learn_birth(born_ns);
                continue;
            }
            // One netns cannot hold two entries of one flow, so a live one there ended
            // without its destroy reaching us.
            let superseded: SmallVec<[(u64, Option<u64>); 1]> = flow
                .live
                .iter()
                .filter(|e| e.netns == netns)
                .map(|e| (e.id, e.born_ns()))
                .collect();
            for (old_id, old_born) in superseded {
                implicit += 1;
                flow.note_destroyed(OldEntry {
                    id: old_id,
                    born_ns: old_born,
                    netns,
                    destroyed_ns: ts_ns,
                    reason: None,
                    expiry_ns: None,
                    reaped_by: None,
                });
            }
            let under_orig = (j == 0).then_some(orig_src_is_lo);
            flow.live
                .push(KEntry::new(id, netns, born_ns, (&orig, &reply), under_orig));
        }
        self.recorder.record(ev, fids, prev);
        self.stats.implicit_destroys += implicit;
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ct_destroy(
        &mut self,
        ts_ns: u64,
        id: u64,
        netns: u32,
        orig: &FlowTuple,
        reply: &FlowTuple,
        born_ns: Option<u64>,
        end: DestroyedAs,
    ) {
        let reason = end.reason;
        let ev = TimelineEvent {
            seq: self.next_seq(),
            ts_ns,
            what: TimelineKind::CtDestroy {
                id,
                netns,
                born_ns,
                reason,
            },
        };
        let ((first, _), dnat) = FlowId::of_entry(orig, reply);
        let fids = [Some(first), dnat];
        let idx = self.recorder.next_index();
        let mut prev = [NO_EVENT; 2];
        for (j, fid) in fids.iter().enumerate() {
            let Some(fid) = fid else { continue };
            let flow = self.flow_mut(fid.clone());
            prev[j] = std::mem::replace(&mut flow.last_event, idx);
            let born = born_ns.or_else(|| {
                flow.live
                    .iter()
                    .find(|e| e.id == id)
                    .and_then(KEntry::born_ns)
            });
            flow.note_destroyed(OldEntry {
                id,
                born_ns: born,
                netns,
                destroyed_ns: ts_ns,
                reason: Some(reason),
                expiry_ns: end.expiry_ns,
                reaped_by: Some(end.reaped_by),
            });
        }
        self.recorder.record(ev, fids, prev);
    }

    fn on_map_key(
        &mut self,
        ts_ns: u64,
        map_id: u32,
        key: NpaKey,
        inserted_ns: Option<u64>,
        what: TimelineKind,
    ) {
        let (fid, src_is_lo) = FlowId::oriented_key(&key);
        let idx = self.recorder.next_index();
        // The flow is touched as well, as a key of it is a reason to keep its state.
        let flow = self.flow_mut(fid.clone());
        let prev = std::mem::replace(&mut flow.last_event, idx);
        match flow.key_mut(&key, src_is_lo) {
            Some(known) => known.learn_insert(map_id, inserted_ns),
            None => {
                flow.keys
                    .push(AgentKey::new(&key, src_is_lo, map_id, inserted_ns));
                self.map_keys += 1;
            }
        }
        let ev = TimelineEvent {
            seq: self.next_seq(),
            ts_ns,
            what,
        };
        self.recorder
            .record(ev, [Some(fid), None], [prev, NO_EVENT]);
    }

    fn on_drop(
        &mut self,
        ts_ns: u64,
        netns: u32,
        tuple: FlowTuple,
        reason: String,
        out: &mut Vec<Output>,
    ) {
        let fid = FlowId::of_tuple(&tuple);
        let seq = self.next_seq();
        let after = self.cfg.after_window_ns;
        for p in self.pending.iter_mut() {
            let v = &mut p.verdict;
            let in_window =
                ts_ns >= v.delete_ts_ns && ts_ns <= v.delete_ts_ns.saturating_add(after);
            if in_window && v.first_denied.is_none() && p.flows.contains(&fid) {
                v.delete_to_denied_ns = Some(ts_ns - v.delete_ts_ns);
                v.first_denied = Some(DeniedPacket {
                    ts_ns,
                    netns,
                    tuple,
                    reason: reason.clone(),
                });
                self.stats.verdicts.confirmed += 1;
                out.push(Output::RaceConfirmation(RaceConfirmation {
                    confirmed: true,
                    class: v.class,
                    key: v.key.clone(),
                    delete_ts_ns: v.delete_ts_ns,
                    live_entry_id: v.live.id,
                    delete_to_denied_ns: v.delete_to_denied_ns,
                    first_denied: v.first_denied.clone(),
                    after_window_ns: after,
                    maybe_incomplete: false,
                }));
            }
        }
        // Drops of flows the engine knows nothing about (scans, policy denials of new flows)
        // would only crowd out useful state, so they are not given a flow of their own.
        if let Some(flow) = self.flows.get_mut(&fid) {
            let idx = self.recorder.next_index();
            let prev = std::mem::replace(&mut flow.last_event, idx);
            self.recorder.record(
                TimelineEvent {
                    seq,
                    ts_ns,
                    what: TimelineKind::PacketDrop {
                        netns,
                        tuple,
                        reason,
                    },
                },
                [Some(fid), None],
                [prev, NO_EVENT],
            );
        }
    }

    fn push_marker(&mut self, ev: TimelineEvent) {
        insert_sorted(&mut self.markers, ev);
        while self.markers.len() > self.cfg.max_markers.max(1) {
            if let Some(old) = self.markers.pop_front() {
                self.stats.evictions.markers += 1;
                if matches!(old.what, TimelineKind::Lost { .. }) {
                    self.lost_horizon_ns = Some(self.lost_horizon_ns.unwrap_or(0).max(old.ts_ns));
                }
            }
        }
    }
}
