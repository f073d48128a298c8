//! The layout model of one race's picture, pure and independent of rendering: which kernel
//! entries get a lane, where each instant falls on the time axis (ms relative to the delete),
//! and the axis's range and ticks. The HTML/SVG and Perfetto renderers both read it.

use std::collections::BTreeMap;

use super::trace_file::{TimelineEvent, TraceDocument};

/// What a kernel entry is to the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRole {
    /// The predecessor whose end made the tuple free for reuse (port-reuse).
    Old,
    /// The entry that was live when the agent deleted the key.
    Live,
    /// Another entry of the tuple inside the trace window (an earlier or later cycle).
    Other,
}

/// The lifetime of one conntrack entry of the tuple; times in ms relative to the delete.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryLane {
    pub id: u64,
    pub role: EntryRole,
    /// None: born before the detector saw it (snapshot) or unknown.
    pub born_ms: Option<f64>,
    /// When the kernel reaped it, and why (`expired`, `killed`); None: alive at window end.
    pub reaped: Option<(f64, String)>,
    /// Live entry only: the delete instant plus the timeout left then, i.e. when it would
    /// expire without further packets.
    pub expiry_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeleteMark {
    pub at_ms: f64,
    /// The delete the verdict is about (others are the agent's deletes of other cycles).
    pub is_race: bool,
    pub task: String,
    pub map_id: Option<u32>,
    pub key: String,
    pub result: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DropMark {
    pub at_ms: f64,
    pub reason: String,
    /// The verdict's first denied packet.
    pub first: bool,
}

/// One race laid out on a time axis in ms relative to the delete.
#[derive(Debug, Clone, PartialEq)]
pub struct RaceTimeline {
    pub start_ms: f64,
    pub end_ms: f64,
    pub entries: Vec<EntryLane>,
    pub deletes: Vec<DeleteMark>,
    pub drops: Vec<DropMark>,
    /// Old entry's reap to the live entry's birth.
    pub reuse_gap: Option<(f64, f64)>,
    /// Kernel records lost inside the window: (at, count).
    pub lost: Vec<(f64, Option<u64>)>,
    /// Events of the trace window left out because they are before `start_ms` (an earlier
    /// cycle of the same tuple).
    pub hidden_before: usize,
}

fn rel_ms(ns: u64, delete_ns: u64) -> f64 {
    (i128::from(ns) - i128::from(delete_ns)) as f64 / 1e6
}

impl RaceTimeline {
    pub fn build(doc: &TraceDocument) -> Self {
        let v = &doc.trace.verdict;
        let d = v.delete_ts_ns;
        let rel = |ns: u64| rel_ms(ns, d);

        // Entries by id, in order of first appearance.
        let mut order: Vec<u64> = Vec::new();
        let mut born: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        let mut reaped: BTreeMap<u64, (u64, String)> = BTreeMap::new();
        let see = |id: u64, order: &mut Vec<u64>| {
            if !order.contains(&id) {
                order.push(id);
            }
        };
        let mut deletes = Vec::new();
        let mut drops = Vec::new();
        let mut lost = Vec::new();
        for e in &doc.trace.timeline {
            match e {
                TimelineEvent::CtNew { ts_ns, id } => {
                    see(*id, &mut order);
                    born.insert(*id, Some(*ts_ns));
                }
                TimelineEvent::CtExisting { id, .. } => {
                    see(*id, &mut order);
                    born.entry(*id).or_insert(None);
                }
                TimelineEvent::CtDestroy {
                    ts_ns,
                    id,
                    born_ns,
                    reason,
                } => {
                    see(*id, &mut order);
                    let b = born.entry(*id).or_insert(None);
                    if b.is_none() {
                        *b = born_ns.filter(|n| *n != 0);
                    }
                    let why = reason.clone().unwrap_or_else(|| "reason unknown".into());
                    reaped.insert(*id, (*ts_ns, why));
                }
                TimelineEvent::AgentDelete {
                    ts_ns,
                    key,
                    map_id,
                    task,
                    result,
                } => deletes.push(DeleteMark {
                    at_ms: rel(*ts_ns),
                    is_race: *ts_ns == d && key.sport == v.key.sport && key.src == v.key.src,
                    task: task
                        .as_ref()
                        .map(|t| format!("{} (pid {}, tid {})", t.comm, t.pid, t.tid))
                        .unwrap_or_else(|| "unknown task".into()),
                    map_id: *map_id,
                    key: key.display(),
                    result: match result {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "—".into(),
                        other => other.to_string(),
                    },
                }),
                TimelineEvent::PacketDrop { ts_ns, reason } => drops.push(DropMark {
                    at_ms: rel(*ts_ns),
                    reason: reason.clone().unwrap_or_else(|| "reason unknown".into()),
                    first: v.first_denied.as_ref().is_some_and(|f| f.ts_ns == *ts_ns),
                }),
                TimelineEvent::Lost { ts_ns, count } => lost.push((rel(*ts_ns), *count)),
                _ => {}
            }
        }
        // The verdict's own view of the two entries fills in what the window lacks.
        if let Some(old) = &v.old {
            see(old.id, &mut order);
            let b = born.entry(old.id).or_insert(None);
            if b.is_none() {
                *b = old.born_ns.filter(|n| *n != 0);
            }
            if let Some(t) = old.destroyed_ns {
                reaped.entry(old.id).or_insert_with(|| {
                    (t, old.reason.clone().unwrap_or_else(|| "inferred".into()))
                });
            }
        }
        if let Some(live) = &v.live {
            see(live.id, &mut order);
            let b = born.entry(live.id).or_insert(None);
            if b.is_none() {
                *b = live.born_ns.filter(|n| *n != 0);
            }
        }
        if !deletes.iter().any(|m| m.is_race) {
            deletes.push(DeleteMark {
                at_ms: 0.0,
                is_race: true,
                task: v
                    .agent
                    .as_ref()
                    .map(|t| format!("{} (pid {}, tid {})", t.comm, t.pid, t.tid))
                    .unwrap_or_else(|| "unknown task".into()),
                map_id: v.map_id,
                key: v.key.display(),
                result: "deleted".into(),
            });
        }

        // The story: from the old entry's end (or the live entry's birth) to the last event
        // after the delete. Earlier cycles of the tuple stay out of the picture.
        let old_end = v.old.as_ref().and_then(|o| o.destroyed_ns).map(rel);
        let live_born = v.live.as_ref().and_then(|l| l.born_ns).filter(|n| *n != 0);
        let story_start = [old_end, live_born.map(rel), Some(0.0)]
            .into_iter()
            .flatten()
            .fold(0.0_f64, f64::min);
        let left = if story_start < 0.0 {
            story_start - (-story_start * 0.08).max(0.5)
        } else {
            -1.0
        };
        let live_expiry = v
            .live
            .as_ref()
            .and_then(|l| l.timeout_left_ns)
            .map(|t| t as f64 / 1e6);
        let mut entries: Vec<EntryLane> = order
            .iter()
            .map(|id| {
                let role = if v.live.as_ref().is_some_and(|l| l.id == *id) {
                    EntryRole::Live
                } else if v.old.as_ref().is_some_and(|o| o.id == *id) {
                    EntryRole::Old
                } else {
                    EntryRole::Other
                };
                EntryLane {
                    id: *id,
                    role,
                    born_ms: born.get(id).copied().flatten().map(rel),
                    reaped: reaped.get(id).map(|(t, why)| (rel(*t), why.clone())),
                    expiry_ms: if role == EntryRole::Live {
                        live_expiry
                    } else {
                        None
                    },
                }
            })
            .collect();
        let before = |t: f64| t < left;
        let n_entries = entries.len();
        entries.retain(|e| !e.reaped.as_ref().is_some_and(|(t, _)| before(*t)));
        let (n_del, n_drop) = (deletes.len(), drops.len());
        deletes.retain(|m| !before(m.at_ms));
        drops.retain(|m| !before(m.at_ms));
        let hidden_before =
            (n_entries - entries.len()) + (n_del - deletes.len()) + (n_drop - drops.len());
        // Unknown birth first, then by birth.
        entries.sort_by(|a, b| {
            a.born_ms
                .unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&b.born_ms.unwrap_or(f64::NEG_INFINITY))
        });

        let window_end = rel(doc.trace.window_end_ns);
        let last = entries
            .iter()
            .flat_map(|e| [e.born_ms, e.reaped.as_ref().map(|r| r.0), e.expiry_ms])
            .flatten()
            .chain(deletes.iter().map(|m| m.at_ms))
            .chain(drops.iter().map(|m| m.at_ms))
            .filter(|t| *t <= window_end.max(0.0))
            .fold(0.0_f64, f64::max);
        let right = if last > 0.0 { last * 1.04 } else { -left };

        let reuse_gap = match (old_end, live_born) {
            (Some(a), Some(b)) if v.class == "port-reuse" => Some((a, rel(b))),
            _ => None,
        };
        RaceTimeline {
            start_ms: left,
            end_ms: right,
            entries,
            deletes,
            drops,
            reuse_gap,
            lost,
            hidden_before,
        }
    }

    /// Where the delete sits across the axis (0..1). Each side of the delete has its own
    /// linear scale so a few milliseconds before it stay visible next to seconds after it.
    pub fn split(&self) -> f64 {
        let span = self.end_ms - self.start_ms;
        (-self.start_ms / span).clamp(0.3, 0.6)
    }

    /// Position of `ms` across the axis, 0 at `start_ms`, 1 at `end_ms`.
    pub fn fraction(&self, ms: f64) -> f64 {
        let s = self.split();
        let f = if ms < 0.0 {
            s * (1.0 - ms / self.start_ms)
        } else {
            s + (1.0 - s) * ms / self.end_ms
        };
        f.clamp(0.0, 1.0)
    }

    /// Tick values (ms) for each side of the delete, 0 included once.
    pub fn ticks(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let left_step = nice_step(-self.start_ms, (self.split() * 8.0).round().max(2.0));
        let right_step = nice_step(self.end_ms, ((1.0 - self.split()) * 8.0).round().max(2.0));
        let mut t = -left_step;
        while t >= self.start_ms {
            out.push(t);
            t -= left_step;
        }
        out.reverse();
        let mut t = 0.0;
        while t <= self.end_ms {
            out.push(t);
            t += right_step;
        }
        out
    }
}

/// A round step (1, 2 or 5 times a power of ten) that cuts `span` into about `count` parts.
pub fn nice_step(span: f64, count: f64) -> f64 {
    let raw = (span / count).max(1e-6);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::super::trace_file::tests::fixture;
    use super::*;

    #[test]
    fn lab_race_has_old_and_live_lanes_and_the_later_cycle() {
        let t = RaceTimeline::build(&fixture());
        let roles: Vec<_> = t.entries.iter().map(|e| e.role).collect();
        assert_eq!(roles, [EntryRole::Old, EntryRole::Live, EntryRole::Other]);
        let old = &t.entries[0];
        assert_eq!(old.born_ms, None, "old entry predates the detector");
        let (reap, why) = old.reaped.clone().unwrap();
        assert!((reap - -155.572_641).abs() < 1e-6, "{reap}");
        assert_eq!(why, "expired");
        let live = &t.entries[1];
        assert!((live.born_ms.unwrap() - -152.410_382).abs() < 1e-6);
        assert_eq!(live.expiry_ms, Some(1848.0));
        assert!(live.reaped.as_ref().unwrap().0 > 4000.0);
        let (a, b) = t.reuse_gap.unwrap();
        assert!(((b - a) - 3.162_259).abs() < 1e-6);
    }

    #[test]
    fn delete_drops_and_axis() {
        let t = RaceTimeline::build(&fixture());
        let race: Vec<_> = t.deletes.iter().filter(|d| d.is_race).collect();
        assert_eq!(race.len(), 1);
        assert_eq!(race[0].at_ms, 0.0);
        assert_eq!(race[0].map_id, Some(180));
        assert!(race[0].task.starts_with("detector (pid 24626"));
        assert_eq!(
            t.deletes.len(),
            2,
            "the next cycle's delete is in the window"
        );
        assert_eq!(t.drops.len(), 4);
        assert_eq!(t.drops.iter().filter(|d| d.first).count(), 1);
        assert!(t.drops.iter().all(|d| d.reason == "TC_INGRESS"));
        assert!(t.start_ms < -155.0 && t.start_ms > -200.0, "{}", t.start_ms);
        assert!(t.end_ms > 4890.0);
        assert_eq!(t.fraction(0.0), t.split());
        assert_eq!(t.fraction(t.start_ms), 0.0);
        assert!((t.fraction(t.end_ms) - 1.0).abs() < 1e-9);
        assert!(t.fraction(-152.0) > t.fraction(-155.0));
        let ticks = t.ticks();
        assert!(ticks.contains(&0.0));
        assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{ticks:?}");
    }

    #[test]
    fn earlier_cycles_are_left_out() {
        let doc = super::super::trace_file::TraceDocument::read(
            &super::super::trace_file::tests::fixture_dir()
                .join("race-1041673315047-port-reuse-10.78.1.2.42002-10.78.2.2.8080.json"),
        )
        .unwrap();
        let t = RaceTimeline::build(&doc);
        assert!(t.hidden_before >= 5, "{}", t.hidden_before);
        assert!(t.drops.iter().all(|d| d.at_ms > 0.0));
        assert_eq!(t.deletes.iter().filter(|d| d.is_race).count(), 1);
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(4900.0, 5.0), 1000.0);
        assert_eq!(nice_step(3.0, 3.0), 1.0);
    }
}
