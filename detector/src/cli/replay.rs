//! `detector replay`: judges again what `detector run --json` recorded, through the same
//! dispatch and engine, with the judging flags given here (or the recording's own), and
//! prints the verdicts as `run` would. No kernel, no privileges.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::clock::WallClock;
use crate::engine::{Engine, EngineConfig};
use crate::pipeline::dispatch::{Detector, DispatchCounts, Outputs};
use crate::pipeline::replay::{Recorded, ReplayError, RunStart, apply_view, parse_line};
use crate::pipeline::startup::{self, Preexisting};
use crate::record::Event;
use crate::report::console::Console;
use crate::report::render::TimeBase;
use crate::report::trace_file::{self, TraceDir, TraceFiles};
use crate::snapshot::CtSnapshotEntry;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The recording (`detector run --json > FILE`), or `-` for stdin.
    #[arg(value_name = "FILE|-")]
    pub input: String,
    /// NDJSON: one object per event and per verdict, as `run --json` prints them.
    #[arg(long)]
    pub json: bool,
    /// Directory for the replay's per-race trace files.
    #[arg(long, default_value = "detector-replay-traces", value_name = "DIR")]
    pub trace_dir: PathBuf,
    /// Flight-recorder window before each delete, seconds (default: the recording's).
    #[arg(long, value_name = "SECS")]
    pub trace_before: Option<f64>,
    /// Window after each delete, seconds (default: the recording's).
    #[arg(long, value_name = "SECS")]
    pub trace_after: Option<f64>,
    /// Snapshot-lag window, seconds (default: the recording's).
    #[arg(long, value_name = "SECS")]
    pub snapshot_lag_window: Option<f64>,
    /// Flows and keys each tracked at most (default: the recording's).
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,
}

fn secs_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

fn engine_config(args: &ReplayArgs, rec: &RunStart) -> EngineConfig {
    let d = EngineConfig::default();
    let pick = |flag: Option<f64>, recorded: Option<u64>, default: u64| {
        flag.map(secs_ns).or(recorded).unwrap_or(default)
    };
    EngineConfig {
        max_flows: args.max_flows.or(rec.max_flows).unwrap_or(d.max_flows),
        snapshot_lag_window_ns: pick(
            args.snapshot_lag_window,
            rec.snapshot_lag_window_ns,
            d.snapshot_lag_window_ns,
        ),
        before_window_ns: pick(args.trace_before, rec.before_window_ns, d.before_window_ns),
        after_window_ns: pick(args.trace_after, rec.after_window_ns, d.after_window_ns),
        ..d
    }
}

/// Start-up state read before the first event: fed to the engine all at once, as `run` does.
#[derive(Default)]
struct Startup {
    entries: Vec<CtSnapshotEntry>,
    dump_ns: Option<u64>,
    keys: Vec<(u32, Vec<u8>)>,
    loaded: bool,
}

pub fn run(args: ReplayArgs) -> Result<()> {
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("opening the recording {}", args.input))?,
        )
    };
    let mut lines = BufReader::new(input).lines().enumerate().peekable();
    let mut det: Option<Detector<_>> = None;
    let mut startup = Startup::default();
    let mut hz = 250;
    let mut verdicts_recorded = 0u64;
    let stdout = std::io::stdout();
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
            // A run stopped mid-write leaves a partial last line.
            Err(problem) if lines.peek().is_none() && !text.ends_with('}') => {
                eprintln!(
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
        if let Recorded::RunStart(start) = rec {
            if det.is_some() {
                return Err(err("a second `run_start`: one recording per replay".into()).into());
            }
            hz = start.hz;
            let traces = TraceDir::create(&args.trace_dir)?;
            det = Some(Detector {
                engine: Engine::new(engine_config(&args, &start)),
                time: TimeBase {
                    wall: WallClock::from_offset(start.wall_offset_ns),
                    hz: start.hz,
                },
                map: start.map.clone(),
                counts: DispatchCounts::default(),
                drop_reasons: HashMap::new(),
                pre: Preexisting::new(start.agent_netns, start.dump_ns),
                pending_traces: HashMap::new(),
                agent_netns: start.agent_netns,
                metrics: Arc::new(Metrics::new()),
                backend: "replay",
                pods: None,
                out: Outputs {
                    console: Console::new(std::io::BufWriter::new(stdout.lock()), args.json),
                    traces: TraceFiles::new(
                        traces,
                        trace_file::hostname(),
                        &crate::clock::now_iso(),
                    ),
                    others: Vec::new(),
                },
                replaying: true,
            });
            startup.dump_ns = Some(start.dump_ns);
            continue;
        }
        let Some(d) = det.as_mut() else {
            return Err(err(
                "no `run_start` line before this record: not a recording of `detector run --json` \
                 (or one made before replay existed)"
                    .into(),
            )
            .into());
        };
        match rec {
            Recorded::RunStart(_) => {}
            Recorded::StartupEntry { dump_ns, entry } => {
                startup.dump_ns = Some(dump_ns);
                startup.entries.push(entry);
            }
            Recorded::StartupKey { map_id, key } => startup.keys.push((map_id, key)),
            Recorded::Verdict(_) => verdicts_recorded += 1,
            Recorded::DeleteKernelView(_) => {
                return Err(
                    err("a `delete_kernel_view` with no `agent_delete` before it".into()).into(),
                );
            }
            other => {
                load_startup(d, &mut startup);
                match other {
                    Recorded::Event(mut ev) => {
                        if let (Event::PacketDrop(p), Some(name)) = (&ev, drop_reason) {
                            d.drop_reasons.insert(p.reason, name);
                        }
                        if let Event::MapDelete(del) = &mut ev
                            && let Some((_, Ok(next))) = lines.peek()
                            && let Ok(Some((Recorded::DeleteKernelView(k), _))) =
                                parse_line(next, hz)
                            && k.ts_ns == del.ts_ns
                            && k.map_id == del.map_id
                        {
                            apply_view(del, &k);
                            lines.next();
                        }
                        d.input(ev)?;
                    }
                    Recorded::Lost { ts_ns, count } => d.lost(count, ts_ns)?,
                    Recorded::WallClock { ts_ns, offset_ns } => {
                        d.set_wall(WallClock::from_offset(offset_ns), ts_ns)?;
                    }
                    Recorded::MapRecreated { ts_ns, map } => {
                        let old = std::mem::replace(&mut d.map, *map);
                        d.map_recreated(&old, ts_ns)?;
                    }
                    _ => {}
                }
            }
        }
    }
    let Some(mut d) = det else {
        bail!("{}: no `run_start` line: nothing to replay", args.input);
    };
    load_startup(&mut d, &mut startup);
    d.finish_engine()?;
    d.out.console.flush();
    eprintln!(
        "detector replay: {} verdict(s) replayed ({} in the recording); traces in {}",
        d.counts.races,
        verdicts_recorded,
        d.out.traces.dir.dir().display()
    );
    Ok(())
}

/// Feeds the start-up snapshots to the engine before the first event, once.
fn load_startup<W: std::io::Write>(d: &mut Detector<W>, s: &mut Startup) {
    if s.loaded {
        return;
    }
    s.loaded = true;
    let dump_ns = s.dump_ns.unwrap_or(0);
    d.pre = startup::load_conntrack(
        &mut d.engine,
        std::mem::take(&mut s.entries),
        d.agent_netns,
        dump_ns,
    );
    for (map_id, key) in std::mem::take(&mut s.keys) {
        startup::load_map_keys(&mut d.engine, map_id, d.map.layout.key, vec![key]);
    }
}
