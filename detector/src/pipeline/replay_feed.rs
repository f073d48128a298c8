//! Feeding a recording to a [`Detector`] in the order the live run fed its own: start-up
//! snapshots before the first event, each delete with its kernel view, losses and clock
//! changes where the stream has them. Verdicts and traces come out through the detector's
//! sinks as they did live.

use std::io::{BufRead, Write};

use anyhow::Result;

use super::dispatch::Detector;
use super::replay::{Recorded, ReplayError, RunStart, apply_view, parse_line};
use super::startup::{self, Preexisting};
use crate::clock::WallClock;
use crate::record::Event;
use crate::snapshot::CtSnapshotEntry;

/// What a replay counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayCounts {
    /// Verdict lines in the recording.
    pub verdicts_recorded: u64,
    /// Verdicts the replay decided.
    pub verdicts_replayed: u64,
}

/// Start-up state read before the first event: fed to the engine all at once, as `run` does.
#[derive(Default)]
struct Startup {
    /// In the order the live run fed them: it interleaves entries and keys, and the
    /// engine's event numbers (timelines' `seq`) follow that order.
    items: Vec<StartupItem>,
    dump_ns: u64,
    loaded: bool,
}

enum StartupItem {
    Entry(CtSnapshotEntry),
    Key(u32, Vec<u8>),
}

impl Startup {
    /// Feeds the start-up snapshots to the engine before the first event, once.
    fn load<W: Write>(&mut self, d: &mut Detector<W>) {
        if self.loaded {
            return;
        }
        self.loaded = true;
        let mut pre = Preexisting::new(d.agent_netns, self.dump_ns);
        let layout = d.map.layout.key;
        for item in std::mem::take(&mut self.items) {
            match item {
                StartupItem::Entry(e) => pre.feed(&mut d.engine, e),
                StartupItem::Key(map_id, key) => {
                    startup::load_map_keys(&mut d.engine, map_id, layout, [key]);
                }
            }
        }
        pre.seal();
        d.pre = pre;
    }
}

/// Replays the NDJSON `input` (what `detector run --json` printed). `make` builds the
/// detector from the recording's `run_start` line. A last line cut short (a run killed while
/// writing) is a warning; any other unreadable line is an error naming it.
pub fn replay<R: BufRead, W: Write>(
    input: R,
    make: impl FnOnce(&RunStart) -> Result<Detector<W>>,
) -> Result<ReplayCounts> {
    let mut lines = input.lines().enumerate().peekable();
    let mut make = Some(make);
    let mut det: Option<Detector<W>> = None;
    let mut startup = Startup::default();
    let mut hz = 250;
    let mut counts = ReplayCounts::default();
    while let Some((i, line)) = lines.next() {
        let err = |problem: String| ReplayError {
            line: i + 1,
            problem,
        };
        let text = line.map_err(|e| err(format!("unreadable: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed = match parse_line(&text, hz) {
            Ok(p) => p,
            Err(problem) if lines.peek().is_none() && !text.trim_end().ends_with('}') => {
                crate::note!(
                    "detector replay: warning: line {} is truncated ({problem}); ignored",
                    i + 1
                );
                break;
            }
            Err(problem) => return Err(err(problem).into()),
        };
        let Some((rec, drop_reason)) = parsed else {
            continue;
        };
        if let Recorded::RunStart(start) = &rec {
            let Some(make) = make.take() else {
                return Err(err("a second `run_start`: one recording per replay".into()).into());
            };
            hz = start.hz;
            startup.dump_ns = start.dump_ns;
            let d = det.insert(make(start)?);
            // The replay's own output is a recording too: of the settings it judged with.
            let mut line: serde_json::Value = serde_json::from_str(&text)?;
            let cfg = d.engine.config();
            line["engine"] = serde_json::json!({
                "max_flows": cfg.max_flows,
                "snapshot_lag_window_ns": cfg.snapshot_lag_window_ns,
                "before_window_ns": cfg.before_window_ns,
                "after_window_ns": cfg.after_window_ns,
            });
            d.recording(&|| line.to_string())?;
            continue;
        }
        let Some(d) = det.as_mut() else {
            return Err(err(
                "no `run_start` line before this record: not a recording of \
                 `detector run --json` (or one made before replay existed)"
                    .into(),
            )
            .into());
        };
        match rec {
            Recorded::RunStart(_) => {}
            Recorded::StartupEntry { dump_ns, entry } => {
                d.recording(&|| text.clone())?;
                startup.dump_ns = dump_ns;
                startup.items.push(StartupItem::Entry(entry));
            }
            Recorded::StartupKey { map_id, key } => {
                d.recording(&|| text.clone())?;
                startup.items.push(StartupItem::Key(map_id, key));
            }
            Recorded::Verdict(_) => counts.verdicts_recorded += 1,
            Recorded::DeleteKernelView(_) => {
                return Err(
                    err("a `delete_kernel_view` with no `agent_delete` before it".into()).into(),
                );
            }
            Recorded::Event(mut ev) => {
                startup.load(d);
                if let (Event::PacketDrop(p), Some(name)) = (&ev, drop_reason) {
                    d.drop_reasons.insert(p.reason, name);
                }
                // The kernel view the live run wrote right after the delete's own line.
                if let Event::MapDelete(del) = &mut ev
                    && let Some((_, Ok(next))) = lines.peek()
                    && let Ok(Some((Recorded::DeleteKernelView(k), _))) = parse_line(next, hz)
                    && k.ts_ns == del.ts_ns
                    && k.map_id == del.map_id
                {
                    apply_view(del, &k);
                    lines.next();
                }
                d.input(ev)?;
            }
            Recorded::Lost { ts_ns, count } => {
                startup.load(d);
                d.lost(count, ts_ns)?;
            }
            Recorded::ConntrackFill { ts_ns, change } => {
                startup.load(d);
                d.conntrack_fill_changed(change, ts_ns)?;
            }
            Recorded::WallClock { ts_ns, offset_ns } => {
                d.set_wall(WallClock::from_offset(offset_ns), ts_ns)?;
            }
            Recorded::MapRecreated { ts_ns, map } => {
                startup.load(d);
                let old = std::mem::replace(&mut d.map, *map);
                d.map_recreated(&old, ts_ns)?;
            }
        }
    }
    let Some(mut d) = det else {
        anyhow::bail!("no `run_start` line: nothing to replay");
    };
    startup.load(&mut d);
    d.finish_engine()?;
    d.out.console.flush();
    counts.verdicts_replayed = d.counts.races;
    Ok(counts)
}
