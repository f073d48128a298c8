//! `detector replay`: judges again what `detector run --json` recorded, through the same
//! dispatch and engine, with the judging flags given here (or the recording's own), and
//! prints the verdicts as `run` would. No kernel, no privileges.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::clock::WallClock;
use crate::engine::{Engine, EngineConfig};
use crate::pipeline::ct_full::FullWindows;
use crate::pipeline::dispatch::{Detector, DispatchCounts, Outputs};
use crate::pipeline::replay::RunStart;
use crate::pipeline::replay_feed::replay;
use crate::pipeline::startup::Preexisting;
use crate::report::console::Console;
use crate::report::render::TimeBase;
use crate::report::trace_file::{self, TraceDir, TraceFiles};
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

pub fn run(args: ReplayArgs) -> Result<()> {
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("opening the recording {}", args.input))?,
        )
    };
    let stdout = std::io::stdout();
    let make = |start: &RunStart| -> Result<Detector<_>> {
        Ok(Detector {
            engine: Engine::new(engine_config(&args, start)),
            time: TimeBase {
                wall: WallClock::from_offset(start.wall_offset_ns),
                hz: start.hz,
            },
            map: start.map.clone(),
            counts: DispatchCounts::default(),
            // Learnt from the drops' own lines as they come.
            drop_reasons: HashMap::new(),
            pre: Preexisting::new(start.agent_netns, start.dump_ns),
            pending_traces: HashMap::new(),
            agent_netns: start.agent_netns,
            metrics: Arc::new(Metrics::new()),
            backend: "replay",
            event_counters: Default::default(),
            // Filled from the recording's `conntrack_fill` lines.
            ct_full: FullWindows::default(),
            pods: None,
            out: Outputs {
                console: Console::new(std::io::BufWriter::new(stdout.lock()), args.json),
                traces: TraceFiles::new(
                    TraceDir::create(&args.trace_dir)?,
                    trace_file::hostname(),
                    &crate::clock::now_iso(),
                    crate::report::trace_writer::TraceWriter::start(
                        &args.trace_dir,
                        crate::report::trace_writer::WriterLimits::default(),
                        None,
                    )?,
                ),
                others: Vec::new(),
            },
            replaying: true,
        })
    };
    let counts =
        replay(BufReader::new(input), make).with_context(|| format!("replaying {}", args.input))?;
    crate::note!(
        "detector replay: {} verdict(s) replayed ({} in the recording); traces in {}",
        counts.verdicts_replayed,
        counts.verdicts_recorded,
        args.trace_dir.display()
    );
    Ok(())
}
