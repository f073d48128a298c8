//! Dispatch: each reordered record becomes engine input (after start-up reconciliation), and
//! each engine output goes to every [`Sink`]. Metrics are counted here, at the points where
//! records come in and verdicts go out, since they count every record (also those no output
//! shows) and are not an output of their own.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use serde_json::json;

use super::ct_full::{Change, FullWindows};
use super::startup::Preexisting;
use crate::clock;
use crate::engine::{AgentDelete, DeleteResult, Engine, Input, KernelView, Output, UnjudgedReason};
use crate::k8s::{PodIndex, PodRef};
use crate::npa::NpaKey;
use crate::npa::target::AgentMap;
use crate::record::{CtKind, DeleteView, Event, MapDeleteRecord, MapOp, Source};
use crate::report::closed_flow::{closed_flow_json, closed_flow_text};
use crate::report::confirmation::{confirmation_json, confirmation_text};
use crate::report::console::Console;
use crate::report::render::{self, TimeBase};
use crate::report::trace_file::TraceFiles;
use crate::report::verdict::{story_timeline, verdict_json, verdict_text};
use crate::report::{ConfirmationOut, Record, Sink, TextTo, TraceOut, VerdictOut};
use crate::telemetry::metrics::{EventCounters, Metrics};

/// Where `detector run` sends what it finds: stdout, the trace files, and any other sinks
/// (the HTTP hub, Kubernetes Events).
pub struct Outputs<W: Write> {
    pub console: Console<W>,
    pub traces: TraceFiles,
    pub others: Vec<Box<dyn Sink + Send>>,
}

impl<W: Write> Outputs<W> {
    fn each(&mut self, mut f: impl FnMut(&mut dyn Sink) -> Result<()>) -> Result<()> {
        f(&mut self.console)?;
        f(&mut self.traces)?;
        for s in &mut self.others {
            f(s.as_mut())?;
        }
        Ok(())
    }

    pub fn event(&mut self, r: &Record<'_>) -> Result<()> {
        self.each(|s| s.event(r))
    }

    pub fn finish(&mut self, summary: &serde_json::Value) -> Result<()> {
        self.each(|s| s.finish(summary))
    }
}

/// What the run counts besides the engine.
#[derive(Debug, Default, Clone, Copy)]
pub struct DispatchCounts {
    pub races: u64,
    /// Deletes whose key did not decode with the map's layout.
    pub undecodable_keys: u64,
    /// Drop records of socket teardown (not network denials), not reported.
    pub drops_ignored: u64,
}

/// The detector between the reorder buffer and the outputs: the engine and everything the
/// event loop mutates, so steps can take it whole.
pub struct Detector<W: Write> {
    pub engine: Engine,
    pub time: TimeBase,
    pub map: AgentMap,
    pub counts: DispatchCounts,
    /// `enum skb_drop_reason` names from BTF, without the SKB_DROP_REASON_ prefix.
    pub drop_reasons: HashMap<u32, String>,
    /// Entries of the start-up snapshot still believed alive.
    pub pre: Preexisting,
    /// What the trace file of a verdict adds to the engine's trace (detection latency, pods),
    /// kept until the trace is ready, by delete.
    pub pending_traces: HashMap<(u64, String), (u64, Vec<PodRef>)>,
    /// The agent's network namespace (inode): its entries judge the deletes.
    pub agent_netns: u32,
    pub metrics: Arc<Metrics>,
    /// The backend's name, a label of the events counter.
    pub backend: &'static str,
    /// The events counter per record kind, so counting a record takes no lookup.
    pub event_counters: EventCounters,
    /// The pods on this node, when Kubernetes enrichment is on.
    pub pods: Option<PodIndex>,
    pub out: Outputs<W>,
    /// Replaying a recording: there is no live clock to measure detection latency against.
    pub replaying: bool,
    /// When the judged namespace's kernel conntrack table was full.
    pub ct_full: FullWindows,
}

/// The NDJSON `type` of a record, for the events counter.
fn kind_of(ev: &Event) -> &'static str {
    match ev {
        Event::Ct(c) => c.kind.name(),
        Event::MapDelete(_) => "agent_delete",
        Event::PacketDrop(_) => "packet_drop",
        Event::MapWrite(_) => "map_write",
    }
}

impl<W: Write> Detector<W> {
    /// Sends one record to the sinks, rendered only by those that show it.
    fn record(
        &mut self,
        text_to: TextTo,
        json: &dyn Fn() -> String,
        text: &dyn Fn() -> String,
    ) -> Result<()> {
        self.out.event(&Record::new(text_to, json, text))
    }

    /// Converts one reordered event into engine input, and shows it where wanted.
    pub fn input(&mut self, ev: Event) -> Result<()> {
        self.event_counters
            .inc(&self.metrics, kind_of(&ev), self.backend);
        let u = self.time;
        match ev {
            Event::Ct(mut c) => {
                self.record(
                    TextTo::Nowhere,
                    &|| render::json_line(&Event::Ct(c.clone()), &u),
                    &|| render::text_line(&Event::Ct(c.clone()), &u),
                )?;
                match c.kind {
                    CtKind::New => {
                        // The skb-based insert probe reports an entry from the snapshot when it
                        // first sees a packet of it: that is the same entry, not a new one.
                        // (Confirm-based probes never report old entries.)
                        let first_seen = matches!(
                            c.source,
                            Source::NetDevQueue | Source::ConsumeSkb | Source::KfreeSkb
                        );
                        if let Some((id, until)) = self.pre.get(c.netns, &c.orig)
                            && first_seen
                            && c.ts_ns < until
                        {
                            self.pre.alias.insert(c.id, id);
                            return Ok(());
                        }
                    }
                    CtKind::Destroy => {
                        if let Some(id) = self.pre.alias.remove(&c.id) {
                            c.id = id;
                            self.pre.remove(c.netns, &c.orig);
                        } else if c.born_ns == 0
                            && let Some(id) = self.pre.remove(c.netns, &c.orig)
                        {
                            // Destroyed before any packet of it was seen.
                            c.id = id;
                        }
                    }
                }
                let input = Input::from(&c);
                self.push(input)
            }
            Event::MapWrite(w) => {
                let key = NpaKey::decode(self.map.layout.key, &w.key);
                self.record(
                    TextTo::Nowhere,
                    &|| render::write_json(&w, key.as_ref().ok(), &u).to_string(),
                    &|| render::text_line(&Event::MapWrite(w.clone()), &u),
                )?;
                // The datapath's inserts/updates date the key; the agent's own writes (through
                // bpf(2)) and deletes are already covered by the syscall probes.
                match key {
                    Ok(key) if w.op == MapOp::Update && !w.from_syscall => {
                        self.push(Input::AgentInsert {
                            ts_ns: w.ts_ns,
                            map_id: w.map_id,
                            key,
                        })
                    }
                    _ => Ok(()),
                }
            }
            Event::PacketDrop(p) => {
                let reason = self.drop_reasons.get(&p.reason).cloned();
                // Buffers freed because a socket closed are not packets the network denied.
                if matches!(reason.as_deref(), Some("QUEUE_PURGE" | "SOCKET_CLOSE")) {
                    self.counts.drops_ignored += 1;
                    return Ok(());
                }
                self.record(
                    TextTo::Stdout,
                    &|| render::drop_json(&p, reason.as_deref(), &u).to_string(),
                    &|| render::drop_text(&p, reason.as_deref(), &u),
                )?;
                let input = Input::PacketDrop {
                    ts_ns: p.ts_ns,
                    // The drop probe does not read the packet's namespace; the engine matches
                    // drops by tuple.
                    netns: 0,
                    tuple: p.tuple,
                    reason: reason.unwrap_or_else(|| format!("reason {}", p.reason)),
                };
                self.push(input)
            }
            Event::MapDelete(d) => {
                if self.ct_full.note_delete(d.ts_ns) {
                    self.metrics
                        .capacity_total("conntrack_full_deletes", self.ct_full.deletes);
                }
                let key = NpaKey::decode(self.map.layout.key, &d.key);
                self.record(
                    TextTo::Nowhere,
                    &|| render::delete_json(&d, key.as_ref().ok(), &u).to_string(),
                    &|| render::delete_text(&d, key.as_ref().ok(), &u),
                )?;
                // What the delete line leaves out but judging it again needs (`detector
                // replay`): the kernel entry's identity and state at the delete.
                self.recording(&|| render::delete_view_json(&d).to_string())?;
                match key {
                    Ok(key) => {
                        let input = Input::AgentDelete(self.agent_delete(&d, key));
                        self.push(input)
                    }
                    Err(e) => {
                        self.counts.undecodable_keys += 1;
                        self.metrics
                            .capacity_total("undecodable_keys", self.counts.undecodable_keys);
                        tracing::warn!(
                            "map {} delete of an undecodable key {} ({e}); wrong --layout?",
                            d.map_id,
                            render::hex(&d.key)
                        );
                        Ok(())
                    }
                }
            }
        }
    }

    /// A line only machines read (NDJSON), recorded so that `detector replay` can judge the
    /// run again: start-up state, losses, kernel views, clock changes.
    pub fn recording(&mut self, json: &dyn Fn() -> String) -> Result<()> {
        self.record(TextTo::Nowhere, json, &String::new)
    }

    /// The kernel counted `count` records it could not deliver since `since_ns`.
    pub fn lost(&mut self, count: u64, since_ns: u64) -> Result<()> {
        self.recording(&|| json!({"type": "lost", "ts_ns": since_ns, "count": count}).to_string())?;
        self.push(Input::Lost {
            ts_ns: since_ns,
            count,
        })
    }

    /// The judged namespace's conntrack table was found full, or with room again: flag what
    /// follows, count it, and record it so that a replay flags the same verdicts.
    pub fn conntrack_fill_changed(&mut self, change: Change, now_ns: u64) -> Result<()> {
        self.ct_full.apply(change, now_ns);
        let line = match change {
            Change::Filled { fill, since_ns } => {
                json!({"type": "conntrack_fill", "ts_ns": now_ns, "full": true,
                       "since_ns": since_ns, "count": fill.count, "max": fill.max})
            }
            Change::Emptied { fill, lasted_ns } => {
                json!({"type": "conntrack_fill", "ts_ns": now_ns, "full": false,
                       "lasted_ns": lasted_ns, "count": fill.count, "max": fill.max})
            }
        };
        self.metrics
            .capacity_total("conntrack_full", self.ct_full.windows);
        self.recording(&|| line.to_string())
    }

    /// The wall clock was measured again (it follows NTP steps and suspend).
    pub fn set_wall(&mut self, wall: crate::clock::WallClock, now_ns: u64) -> Result<()> {
        if wall.offset_ns() != self.time.wall.offset_ns() {
            self.recording(&|| {
                json!({"type": "wall_clock", "ts_ns": now_ns,
                       "offset_ns": wall.offset_ns().to_string()})
                .to_string()
            })?;
        }
        self.time.wall = wall;
        Ok(())
    }

    fn agent_delete(&self, d: &MapDeleteRecord, key: NpaKey) -> AgentDelete {
        let ns = |j: i32| self.time.jiffies_ms(j as i64) * 1_000_000;
        let kernel_id = d.entry_id();
        let aliased = kernel_id.and_then(|id| self.pre.alias.get(&id).copied());
        let entry_id = aliased.or(kernel_id).unwrap_or(0);
        // For an entry from the snapshot the kernel's "birth" is only when it first saw it.
        let born_ns = if aliased.is_some() { 0 } else { d.ct_born_ns };
        let kernel_view = match d.view {
            DeleteView::Unknown => None,
            // Never indexed in the kernel, but alive per the snapshot: the shadow decides.
            DeleteView::Absent if self.pre.key_matches(&key, d.ts_ns) => None,
            DeleteView::Absent => Some(KernelView::Absent),
            DeleteView::Live => Some(KernelView::Live {
                entry_id,
                born_ns,
                timeout_left_ns: ns(d.ct_timeout_left_jiffies),
                tcp_state: d.ct_tcp_state,
            }),
            DeleteView::Expired => Some(KernelView::ExpiredNotReaped {
                entry_id,
                born_ns,
                expired_for_ns: (-ns(d.ct_timeout_left_jiffies)).max(0) as u64,
            }),
        };
        AgentDelete {
            ts_ns: d.ts_ns,
            task: d.task.clone(),
            map_id: d.map_id,
            key,
            layout: self.map.layout,
            result: DeleteResult::from_ret(d.ret),
            kernel_view,
            judged_netns: (d.judged_netns != 0).then_some(d.judged_netns),
        }
    }

    /// The agent re-created its map and the probes now watch the new one: tell the sinks and
    /// the engine.
    pub fn map_recreated(&mut self, old: &AgentMap, now_ns: u64) -> Result<()> {
        let new = self.map.clone();
        let u = self.time;
        let text = format!(
            "detector: the agent re-created its map: now watching map {} (was {})",
            new.id, old.id
        );
        self.record(
            TextTo::Stderr,
            &|| {
                json!({"type": "map_recreated", "ts_ns": now_ns, "time": u.wall.iso(now_ns),
                       "old_id": old.id, "new_id": new.id, "map": new})
                .to_string()
            },
            &|| text.clone(),
        )?;
        self.push(Input::MapRecreated {
            ts_ns: now_ns,
            old_id: old.id,
            new_id: new.id,
        })
    }

    /// Whether the kernel conntrack table was full within a trace's window before the delete
    /// at `delete_ts_ns` (a flow of the story may have gone untracked).
    fn in_full_conntrack(&self, delete_ts_ns: u64) -> bool {
        let before = self.engine.config().before_window_ns;
        self.ct_full
            .overlaps(delete_ts_ns.saturating_sub(before), delete_ts_ns)
    }

    pub fn push(&mut self, input: Input) -> Result<()> {
        for o in self.engine.push(input) {
            self.output(o)?;
        }
        Ok(())
    }

    /// The engine's last outputs, at the end of the run.
    pub fn finish_engine(&mut self) -> Result<()> {
        for o in self.engine.finish() {
            self.output(o)?;
        }
        Ok(())
    }

    fn output(&mut self, o: Output) -> Result<()> {
        match o {
            Output::Unjudged(u) => {
                let wall = self.time.wall.iso(u.ts_ns);
                let netns = match (u.judged_netns, u.live_netns) {
                    (Some(judged), Some(live)) => {
                        format!(" (judged in netns {judged}, live entry in netns {live})")
                    }
                    _ => String::new(),
                };
                // Loudly, once: the first such delete (the count includes it).
                if u.reason == UnjudgedReason::LiveInOtherNetns
                    && self.engine.stats().deletes.unjudged_other_netns == 1
                {
                    tracing::warn!(
                        "a delete of {} found no entry in the namespace it was judged in, but a \
                         live one in another{netns}: if the agent's conntrack lives there, \
                         judge there with --netns; such deletes are counted as unjudged \
                         (unjudged_other_netns), never rightful",
                        u.key
                    );
                }
                self.record(
                    TextTo::Stderr,
                    &|| {
                        serde_json::json!({
                            "type": "unjudged",
                            "ts": wall,
                            "key": u.key,
                            "reason": u.reason,
                            "why": u.reason.describe(),
                            "judged_netns": u.judged_netns,
                            "live_netns": u.live_netns,
                            "maybe_incomplete": true,
                        })
                        .to_string()
                    },
                    &|| {
                        format!(
                            "UNJUDGED delete of {} at {wall}: {}{netns} (not counted as rightful)",
                            u.key,
                            u.reason.describe()
                        )
                    },
                )?;
            }
            Output::Verdict(mut v) => {
                self.counts.races += 1;
                v.maybe_incomplete |= self.in_full_conntrack(v.delete_ts_ns);
                // The delete (kernel time) to this verdict: what a live watcher waits.
                let latency = if self.replaying {
                    0
                } else {
                    clock::monotonic_ns().saturating_sub(v.delete_ts_ns)
                };
                self.metrics.verdict(v.class, latency);
                // Pod names, when Kubernetes is on: outside the engine, on the way out.
                let pods = self
                    .pods
                    .as_ref()
                    .map(|p| p.for_key(&v.key))
                    .unwrap_or_default();
                self.pending_traces
                    .insert((v.delete_ts_ns, v.key.to_string()), (latency, pods.clone()));
                let trace_file =
                    self.out
                        .traces
                        .dir
                        .name_verdict(v.delete_ts_ns, v.class.name(), &v.key);
                // The line and the streams carry the race's story; the trace file, written
                // off the event loop, has the full timeline.
                let timeline_events = v.timeline.len();
                v.timeline = story_timeline(&v);
                let json = verdict_json(
                    &v,
                    timeline_events,
                    latency,
                    &pods,
                    trace_file.clone(),
                    &self.time,
                )?;
                let mut text = verdict_text(&v, latency, &pods, &self.time);
                if self.replaying
                    && let Some(i) = text.rfind(" (detected ")
                {
                    // A replay has no live detection latency to tell.
                    text.truncate(i);
                }
                let out = VerdictOut {
                    verdict: &v,
                    latency_ns: latency,
                    pods: &pods,
                    trace_file: &trace_file,
                    json: &json,
                    text: &text,
                };
                self.out.each(|s| s.verdict(&out))?;
            }
            Output::ClosedFlowDelete(c) => {
                let u = self.time;
                let json = closed_flow_json(&c, &u)?;
                self.record(TextTo::Stdout, &|| json.clone(), &|| {
                    closed_flow_text(&c, &u)
                })?;
            }
            Output::RaceConfirmation(c) => {
                self.metrics.confirmation(c.confirmed);
                let json = confirmation_json(&c, &self.time)?;
                let text = confirmation_text(&c, &self.time);
                let out = ConfirmationOut {
                    confirmation: &c,
                    json: &json,
                    text: &text,
                };
                self.out.each(|s| s.confirmation(&out))?;
            }
            Output::TraceReady(mut t) => {
                t.verdict.maybe_incomplete |= self.in_full_conntrack(t.verdict.delete_ts_ns);
                let (latency, pods) = self
                    .pending_traces
                    .remove(&(t.verdict.delete_ts_ns, t.verdict.key.to_string()))
                    .unzip();
                let wall = self.time.wall;
                let trace = TraceOut {
                    trace: &t,
                    latency_ns: latency,
                    pods: pods.as_deref(),
                    wall: &wall,
                };
                self.out.each(|s| s.trace(&trace))?;
                // Noted only when queued: a dropped trace is counted and warned about instead.
                let Some(path) = self.out.traces.last_queued().map(|p| p.to_path_buf()) else {
                    return Ok(());
                };
                let u = self.time;
                self.record(
                    TextTo::Stderr,
                    &|| {
                        json!({"type": "trace_written", "ts_ns": t.verdict.delete_ts_ns,
                               "time": u.wall.iso(t.verdict.delete_ts_ns),
                               "path": path})
                        .to_string()
                    },
                    &|| format!("detector: trace written: {}", path.display()),
                )?;
            }
        }
        Ok(())
    }
}
