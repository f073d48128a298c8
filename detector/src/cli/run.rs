//! `detector run`: the detector proper. Kernel conntrack events and the agent's map deletes go
//! through the reorder buffer into the correlation engine; races are printed live and written
//! as trace files; a summary is written at exit. This file holds the command line and starts
//! the HTTP server and Kubernetes; the pipeline's steps are in `crate::pipeline::run`.

use std::path::PathBuf;

use anyhow::Result;

use super::ProbeArgs;
use crate::engine::EngineConfig;
use crate::http::{RunServices, ServeArgs};
use crate::k8s::KubeArgs;
use crate::npa::Layout;
use crate::npa::target::{MapBy, MapSpec};
use crate::pipeline::run::RunOptions;
use crate::report::console::widen_stdout_pipe;
use crate::report::trace_writer::WriterLimits;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// The agent's conntrack map by pin path; only that pin: while nothing is pinned there the
    /// detector waits for it, it never looks a map up by name instead. With none of
    /// --map-pin/--map-id/--map-name: NPA's pin (`/sys/fs/bpf/globals/aws/maps/
    /// global_aws_conntrack_map`) when it exists, else a map named `aws_conntrack_map`.
    #[arg(long, value_name = "PATH")]
    pub map_pin: Option<PathBuf>,
    /// The agent's conntrack map by id (overrides --map-pin and --map-name; not followed
    /// across agent restarts).
    #[arg(long, value_name = "ID")]
    pub map_id: Option<u32>,
    /// The agent's conntrack map by name (the newest hash/LRU-hash map of a known layout with
    /// that name), when no --map-pin is given.
    #[arg(long, value_name = "NAME")]
    pub map_name: Option<String>,
    /// Key/value layout instead of detecting it from the map's sizes: `<key>/<value>` with key
    /// v4-20, v4-24, v6-56 or v6-60 and value 1 or 16 (e.g. v4-24/16).
    #[arg(long, value_name = "LAYOUT")]
    pub layout: Option<Layout>,
    /// NDJSON: one object per event and per verdict, then a summary.
    #[arg(long)]
    pub json: bool,
    /// Directory for per-race trace files and the run summary.
    #[arg(long, default_value = "detector-traces", value_name = "DIR")]
    pub trace_dir: PathBuf,
    /// Flight-recorder window before each delete in a trace file, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = super::bounds::window_secs)]
    pub trace_before: f64,
    /// Window after each delete (to catch the denied reply), in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS", value_parser = super::bounds::window_secs)]
    pub trace_after: f64,
    /// A live entry born at most this long before the delete, with no predecessor, is
    /// `snapshot-lag`; older ones are `stale-match` (seconds; NPA's cleanup period is 300 s).
    #[arg(long, default_value_t = 300.0, value_name = "SECS", value_parser = super::bounds::lag_window_secs)]
    pub snapshot_lag_window: f64,
    /// Flows and keys each tracked at most (NPA's map holds 524288).
    #[arg(long, default_value_t = 524_288, value_name = "N", value_parser = super::bounds::table_entries)]
    pub max_flows: usize,
    /// The agent's network namespace, as a path (/run/netns/NAME, /proc/PID/ns/net): its
    /// conntrack entries judge the deletes, and only its events are observed. Default: the
    /// detector's own namespace (the node's).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<String>,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = super::bounds::duration_secs)]
    pub duration: Option<f64>,
    /// How long to hold events to put them in kernel-timestamp order, in ms. Records reach
    /// the ring buffer microseconds after their timestamp, so 2 ms keeps late records rare
    /// (counted in the summary's `reorder.late`) while verdicts wait little.
    #[arg(long, default_value_t = 2, value_name = "MS", value_parser = super::bounds::watermark_ms)]
    pub watermark_ms: u64,
    /// Race trace files kept at most in --trace-dir, oldest removed first (0: no limit).
    #[arg(long, default_value_t = 1000, value_name = "N",
          value_parser = super::bounds::trace_max_files)]
    pub trace_max_files: usize,
    /// MiB of race trace files kept at most in --trace-dir, oldest removed first (0: no limit).
    #[arg(long, default_value_t = 256, value_name = "MIB",
          value_parser = super::bounds::trace_max_mib)]
    pub trace_max_mib: u64,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
}

fn secs_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

pub async fn run(args: RunArgs) -> Result<()> {
    widen_stdout_pipe();
    // The agent's namespace: its conntrack entries judge the deletes, and the start-up
    // snapshot is taken in it, so it must be a path (a bare inode cannot be entered).
    if let Some(s) = &args.netns
        && s.parse::<u32>().is_ok()
    {
        anyhow::bail!(
            "--netns {s}: `run` needs the namespace as a path (/run/netns/NAME or \
             /proc/PID/ns/net) to take the start-up conntrack snapshot in it"
        );
    }
    // The server first: /healthz answers and /readyz says 503 while the probes attach.
    let mut services = RunServices::new(args.serve.replay as usize);
    services.trace_dir = Some(args.trace_dir.clone());
    if let Some(addr) = args.serve.start(&mut services).await? {
        crate::note!(
            "detector: serving http://{addr} (/metrics, /v1/races, /v1/events, /v1/traces, /healthz, /readyz)"
        );
    }
    services.kube = args.kube.start(services.metrics.clone()).await?;
    let agent_netns =
        super::trace::netns_inode(args.netns.as_deref().unwrap_or("/proc/self/ns/net"))?;
    // Filter conntrack events to the agent's namespace only when one was named; by default
    // every namespace is observed (pods' entries show in timelines) and deletes are judged by
    // the detector's own namespace, the node's.
    let netns_filter = if args.netns.is_some() { agent_netns } else { 0 };
    let mut settings = args.probe.settings(netns_filter, true);
    // Drops are worth reporting for as long as a trace can still name them.
    settings.drop_watch_ms = (args.trace_after.max(0.0) * 1000.0).ceil() as u32 + 1000;
    let opts = RunOptions {
        spec: MapSpec {
            by: MapBy::from_flags(args.map_id, args.map_pin, args.map_name),
            layout: args.layout,
        },
        netns_path: args.netns,
        agent_netns,
        trace_dir: args.trace_dir,
        trace_limits: WriterLimits {
            max_files: args.trace_max_files,
            max_bytes: args.trace_max_mib << 20,
            ..WriterLimits::default()
        },
        settings,
        engine: EngineConfig {
            max_flows: args.max_flows,
            snapshot_lag_window_ns: secs_ns(args.snapshot_lag_window),
            before_window_ns: secs_ns(args.trace_before),
            after_window_ns: secs_ns(args.trace_after),
            ..EngineConfig::default()
        },
        json: args.json,
        duration: args.duration,
        watermark_ms: args.watermark_ms,
    };
    crate::pipeline::run::run(opts, services).await
}
