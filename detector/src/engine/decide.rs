//! Deciding a delete, and assembling traces when their window closes.

use super::flow_id::{FlowId, NO_EVENT};
use super::race_instants::RaceInstants;
use super::verdict::{self, DeleteEvent, Unjudged, UnjudgedReason};
use super::{
    AgentDelete, ClosedFlowDelete, DecidedBy, DeleteResult, Engine, KernelView, LiveEntry, Output,
    Pending, RaceConfirmation, TimelineEvent, TimelineKind, Trace, Verdict, VerdictKind,
};

impl Engine {
    /// Whether records may have been lost within `[start, end]`.
    fn lost_between(&self, start: u64, end: u64) -> bool {
        self.lost_horizon_ns.is_some_and(|h| h >= start)
            || self.markers.iter().any(|m| {
                matches!(m.what, TimelineKind::Lost { .. }) && m.ts_ns >= start && m.ts_ns <= end
            })
    }

    /// The recorded events of `fids`, merged with `extra`, de-duplicated and sorted, and
    /// whether events from `since_ns` on may be missing (pushed out of the flight recorder,
    /// or beyond `timeline_len` for a flow).
    fn timeline_of(
        &self,
        fids: &[FlowId],
        extra: &[TimelineEvent],
        since_ns: u64,
    ) -> (Vec<TimelineEvent>, bool) {
        let heads: Vec<(FlowId, u64)> = fids
            .iter()
            .filter_map(|f| self.flows.get(f).map(|s| (f.clone(), s.last_event)))
            .collect();
        let (mut events, capped) = self.recorder.extract(&heads, self.cfg.timeline_len);
        events.extend(extra.iter().cloned());
        events.sort_by_key(|e| (e.ts_ns, e.seq));
        events.dedup_by_key(|e| e.seq);
        (events, capped || self.recorder.lost_since(since_ns))
    }

    pub(super) fn on_delete(&mut self, d: AgentDelete, out: &mut Vec<Output>) {
        let (fid, src_is_lo) = FlowId::oriented_key(&d.key);
        let ev = TimelineEvent {
            seq: self.next_seq(),
            ts_ns: d.ts_ns,
            what: TimelineKind::AgentDelete(Box::new(DeleteEvent {
                task: d.task.clone(),
                map_id: d.map_id,
                key: d.key.clone(),
                result: d.result,
                kernel_view: d.kernel_view,
            })),
        };
        let idx = self.recorder.next_index();
        let flow = self.flow_mut(fid.clone());
        let prev = std::mem::replace(&mut flow.last_event, idx);
        // Only a successful delete removes the key; the others leave the map as it was.
        let key_known = match d.result {
            DeleteResult::Deleted => flow.take_key(&d.key, src_is_lo),
            _ => flow.key_mut(&d.key, src_is_lo).map(|k| k.clone()),
        };
        let key_inserted_ns = key_known.as_ref().and_then(|k| k.inserted_ns());
        let known = key_known.is_some() || flow.has_kernel_state();
        if matches!(d.result, DeleteResult::Deleted) && key_known.is_some() {
            self.map_keys -= 1;
        }
        self.recorder
            .record(ev, [Some(fid.clone()), None], [prev, NO_EVENT]);
        let flow = self.flow_mut(fid.clone());
        match d.result {
            DeleteResult::Deleted => {}
            DeleteResult::NotFound => {
                self.stats.deletes.not_found += 1;
                return;
            }
            DeleteResult::Error(_) => {
                self.stats.deletes.error += 1;
                return;
            }
        }
        // Copied out so that the flow's borrow of `self` ends here.
        let shadow_live = flow.youngest_live().cloned();
        let live_entries: Vec<_> = flow.live.to_vec();
        let last_destroyed = flow.last_destroyed.as_deref().copied();
        let n_live = live_entries.len();
        let by_id = |id: u64| live_entries.iter().find(|e| e.id == id).cloned();

        let mut notes = Vec::new();
        if !d.key.owner_is_endpoint() {
            self.stats.owner_not_endpoint += 1;
            notes.push(format!(
                "owner {} is neither end of the key; NPA always uses one of them",
                d.key.owner
            ));
        }
        let mut expired_not_reaped = false;
        let decision = match d.kernel_view {
            Some(KernelView::Live {
                entry_id,
                born_ns,
                timeout_left_ns,
                tcp_state: Some(tcp_state),
            }) if tcp_state.carries_no_packets() => {
                self.stats.deletes.closed_flow += 1;
                out.push(Output::ClosedFlowDelete(ClosedFlowDelete {
                    key: d.key,
                    map_id: d.map_id,
                    agent: d.task,
                    delete_ts_ns: d.ts_ns,
                    entry_id,
                    born_ns,
                    timeout_left_ns,
                    tcp_state,
                }));
                return;
            }
            Some(KernelView::Live {
                entry_id,
                born_ns,
                timeout_left_ns,
                ..
            }) => {
                let in_shadow = by_id(entry_id);
                if shadow_live.is_none() {
                    self.stats.kernel_overrode_shadow += 1;
                    notes.push(
                        "the shadow held no live entry (insert record lost or late); the kernel \
                         view decided"
                            .to_string(),
                    );
                } else if in_shadow.is_none() {
                    notes.push(format!(
                        "the kernel names entry {entry_id:#x}, which the shadow does not hold"
                    ));
                }
                Some((
                    LiveEntry {
                        id: entry_id,
                        // 0 is what the kernel side reports when it does not know the birth.
                        born_ns: (born_ns != 0).then_some(born_ns),
                        netns: in_shadow.as_ref().map(|e| e.netns),
                        orig: in_shadow.as_ref().map(|e| e.orig(&fid)),
                        reply: in_shadow.as_ref().map(|e| e.reply(&fid)),
                        timeout_left_ns: Some(timeout_left_ns),
                    },
                    DecidedBy::Kernel,
                ))
            }
            Some(KernelView::ExpiredNotReaped { .. }) => {
                expired_not_reaped = true;
                if shadow_live.is_some() {
                    self.stats.kernel_overrode_shadow += 1;
                }
                None
            }
            Some(KernelView::Absent) => {
                if shadow_live.is_some() {
                    self.stats.kernel_overrode_shadow += 1;
                }
                None
            }
            None => shadow_live.map(|e| {
                (
                    LiveEntry {
                        id: e.id,
                        born_ns: e.born_ns(),
                        netns: Some(e.netns),
                        orig: Some(e.orig(&fid)),
                        reply: Some(e.reply(&fid)),
                        timeout_left_ns: None,
                    },
                    DecidedBy::Shadow,
                )
            }),
        };

        let Some((live, decided_by)) = decision else {
            let shadow_evicted =
                self.evicted_live_overflowed || self.evicted_live.get(&fid).is_some();
            let kernel_absent = matches!(d.kernel_view, Some(KernelView::Absent));
            // The kernel looked in one namespace only; a live entry of the flow elsewhere
            // means the agent's conntrack may be there, and the delete a race.
            let elsewhere = d.judged_netns.filter(|_| kernel_absent).and_then(|judged| {
                live_entries
                    .iter()
                    .filter(|e| e.netns != judged)
                    .max_by_key(|e| e.born_ns())
                    .map(|e| (judged, e.netns))
            });
            if let Some((judged, live_netns)) = elsewhere {
                let c = &mut self.stats.deletes;
                c.unjudged += 1;
                c.unjudged_other_netns += 1;
                out.push(Output::Unjudged(Unjudged {
                    ts_ns: d.ts_ns,
                    key: d.key.clone(),
                    reason: UnjudgedReason::LiveInOtherNetns,
                    judged_netns: Some(judged),
                    live_netns: Some(live_netns),
                }));
                return;
            }
            let c = &mut self.stats.deletes;
            if !expired_not_reaped && (shadow_evicted || kernel_absent && self.kernel_tables_full) {
                // The state that would show a live entry was lost to a bound: never rightful.
                c.unjudged += 1;
                let reason = if shadow_evicted {
                    c.unjudged_shadow_evicted += 1;
                    UnjudgedReason::ShadowEvicted
                } else {
                    c.unjudged_kernel_table_full += 1;
                    UnjudgedReason::KernelTableFull
                };
                out.push(Output::Unjudged(Unjudged {
                    ts_ns: d.ts_ns,
                    key: d.key.clone(),
                    reason,
                    judged_netns: None,
                    live_netns: None,
                }));
                return;
            }
            if expired_not_reaped {
                c.rightful += 1;
                c.rightful_expired_not_reaped += 1;
            } else if known {
                c.rightful += 1;
            } else {
                c.unseen += 1;
            }
            return;
        };

        if n_live > 1 {
            notes.push(format!(
                "{n_live} live entries match the key (several netns); the youngest is reported"
            ));
        }
        let (class, mut old) = verdict::classify(
            d.ts_ns,
            live.id,
            live.born_ns,
            last_destroyed.as_ref(),
            self.cfg.snapshot_lag_window_ns,
        );
        if let Some(o) = old.as_mut() {
            o.reaped_by = o.reaped_by.map(|r| r.seen_from(d.task.pid));
        }
        let instants = old
            .as_ref()
            .map(|o| RaceInstants::new(o, live.born_ns, d.ts_ns));
        let reuse_gap_ns = old.zip(live.born_ns).and_then(|(o, born)| {
            i64::try_from(born)
                .ok()?
                .checked_sub(i64::try_from(o.destroyed_ns).ok()?)
        });
        let story_start_ns = [
            old.and_then(|o| o.born_ns),
            live.born_ns,
            Some(d.ts_ns.saturating_sub(self.cfg.before_window_ns)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(0);

        let mut fids = vec![fid];
        if let (Some(orig), Some(reply)) = (live.orig, live.reply) {
            let ((first, _), dnat) = FlowId::of_entry(&orig, &reply);
            fids.extend([Some(first), dnat].into_iter().flatten());
        }
        fids.sort();
        fids.dedup();
        let (timeline, timeline_truncated) = self.timeline_of(&fids, &[], story_start_ns);

        let v = Verdict {
            kind: VerdictKind::LiveEntryDelete,
            class,
            decided_by,
            key: d.key,
            layout: d.layout,
            map_id: d.map_id,
            agent: d.task,
            delete_ts_ns: d.ts_ns,
            live,
            old,
            key_inserted_ns,
            reuse_gap_ns,
            delete_lag_ns: live.born_ns.map(|b| d.ts_ns.saturating_sub(b)),
            instants,
            delete_to_denied_ns: None,
            first_denied: None,
            maybe_incomplete: self.lost_between(story_start_ns, d.ts_ns),
            notes,
            timeline,
            timeline_truncated,
        };
        self.stats.deletes.live += 1;
        self.stats.verdicts.count(class);
        match decided_by {
            DecidedBy::Kernel => self.stats.verdicts.decided_by_kernel += 1,
            DecidedBy::Shadow => self.stats.verdicts.decided_by_shadow += 1,
        }
        out.push(Output::Verdict(v.clone()));
        self.pending.push_back(Pending {
            verdict: v,
            flows: fids,
            story_start_ns,
        });
        if self.pending.len() > self.cfg.max_flows.max(1)
            && let Some(p) = self.pending.pop_front()
        {
            self.stats.evictions.traces += 1;
            self.emit_trace(p, out);
        }
    }

    /// Emits the traces whose after-window has closed.
    pub(super) fn flush_ready(&mut self, out: &mut Vec<Output>) {
        let after = self.cfg.after_window_ns;
        let mut i = 0;
        while i < self.pending.len() {
            let ready = self.pending[i].verdict.delete_ts_ns.saturating_add(after) <= self.now_ns;
            if ready && let Some(p) = self.pending.remove(i) {
                self.emit_trace(p, out);
            } else {
                i += 1;
            }
        }
    }

    pub(super) fn emit_trace(&mut self, p: Pending, out: &mut Vec<Output>) {
        let Pending {
            mut verdict,
            flows,
            story_start_ns,
        } = p;
        let delete = verdict.delete_ts_ns;
        let start = delete.saturating_sub(self.cfg.before_window_ns);
        let end = delete.saturating_add(self.cfg.after_window_ns);
        let (mut timeline, timeline_truncated) = self.timeline_of(&flows, &verdict.timeline, start);
        let markers = self
            .markers
            .iter()
            .filter(|m| m.ts_ns >= start && m.ts_ns <= end);
        timeline.extend(markers.cloned());
        timeline.retain(|e| e.ts_ns >= start && e.ts_ns <= end);
        timeline.sort_by_key(|e| (e.ts_ns, e.seq));
        timeline.dedup_by_key(|e| e.seq);
        // A loss reported after the verdict went out can still concern its story.
        verdict.maybe_incomplete |= self.lost_between(story_start_ns, delete);
        let after_window_incomplete = self.lost_between(delete.saturating_add(1), end);
        let confirmed = verdict.first_denied.is_some();
        if !confirmed {
            self.stats.verdicts.unconfirmed += 1;
            out.push(Output::RaceConfirmation(RaceConfirmation {
                confirmed: false,
                class: verdict.class,
                key: verdict.key.clone(),
                delete_ts_ns: delete,
                live_entry_id: verdict.live.id,
                delete_to_denied_ns: None,
                first_denied: None,
                after_window_ns: self.cfg.after_window_ns,
                maybe_incomplete: after_window_incomplete || self.now_ns < end,
            }));
        }
        self.stats.traces_emitted += 1;
        out.push(Output::TraceReady(Trace {
            verdict,
            window_start_ns: start,
            window_end_ns: end,
            timeline,
            after_window_incomplete,
            confirmed,
            timeline_truncated,
        }));
    }
}
