//! `detector run` as named steps: resolve the agent's map, attach the probes, take both
//! start-up snapshots, run the event loop, and finish with the summary. The command line and
//! the HTTP server and Kubernetes start-up are the CLI's (`crate::cli::run`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::ct_full::{Change, FullWindows};
use super::dispatch::{Detector, DispatchCounts, Outputs};
use super::event_loop::{Step, Stream};
use super::map_follow::{MapWatch, follow_map, wait_for_map};
use super::startup::{self, Preexisting};
use crate::clock::{self, WallClock};
use crate::engine::{Engine, EngineConfig, Input};
use crate::http::RunServices;
use crate::http::sink::HubSink;
use crate::kernel::reader::Reader;
use crate::kernel::{Backend, Probe, ProbeSettings};
use crate::npa::map_keys;
use crate::npa::target::{self, AgentMap, MapSpec};
use crate::report::Sink;
use crate::report::console::{Console, STDOUT_BUFFER_BYTES};
use crate::report::kube_events::EventSink;
use crate::report::render::{TimeBase, hex};
use crate::report::summary::{RunCounts, RunInfo, TraceWriteCounts, capacity_line, summary};
use crate::report::trace_file::{self, TraceDir, TraceFiles};
use crate::report::trace_writer::{TraceWriter, WriteCounts, WriterLimits};
use crate::snapshot::fill::ConntrackFill;
use crate::snapshot::{CtSnapshotEntry, SnapshotError};

/// What `detector run` was asked to do, in the pipeline's terms.
pub struct RunOptions {
    pub spec: MapSpec,
    /// The agent's network namespace as a path, when one was named.
    pub netns_path: Option<String>,
    /// Its inode (the detector's own namespace when none was named).
    pub agent_netns: u32,
    pub trace_dir: PathBuf,
    /// The trace writer's queue and the directory's retention limits.
    pub trace_limits: WriterLimits,
    pub settings: ProbeSettings,
    pub engine: EngineConfig,
    pub json: bool,
    pub duration: Option<f64>,
    pub watermark_ms: u64,
}

/// The probes, attached and watching the map.
struct Attached {
    probe: Probe,
    backend: Backend,
    /// Why datapath writes to the map cannot be observed, if they cannot.
    no_writes: Option<String>,
    writes_hook: &'static str,
    /// Taken right after attaching, before the start-up snapshots.
    reader: Option<Reader>,
    /// The namespace the map's deletes are judged in (`--netns`); 0: each deleting task's own.
    judge_netns: u32,
}

/// Loads the programs, picks the backend and attaches everything to `map`.
fn attach_probes(settings: &ProbeSettings, map: &AgentMap, judge_netns: u32) -> Result<Attached> {
    let mut probe = Probe::open(settings)?;
    let (backend, _) = probe.choose(settings.backend)?;
    probe.set_target(map.id, target::target_map(map.layout.key, judge_netns))?;
    probe.attach(backend)?;
    let no_writes = probe.attach_agent(backend)?;
    let writes_hook = probe.writes_hook().unwrap_or("none");
    let reader = Some(probe.take_reader()?);
    Ok(Attached {
        probe,
        backend,
        no_writes,
        writes_hook,
        reader,
        judge_netns,
    })
}

/// `enum skb_drop_reason` names from the kernel's BTF, without the SKB_DROP_REASON_ prefix.
fn drop_reasons(probe: &Probe) -> HashMap<u32, String> {
    probe
        .kernel_btf()
        .map(|b| b.enum_values("skb_drop_reason"))
        .unwrap_or_default()
        .into_iter()
        .map(|(v, n)| (v, n.trim_start_matches("SKB_DROP_REASON_").to_string()))
        .collect()
}

/// How many entries and keys the start-up snapshots held.
struct Snapshots {
    entries: usize,
    keys: usize,
}

/// Start-up snapshots of the kernel table and of the map, taken after the probes are attached
/// so that no entry slips between the dump and the first event. (A dump also evicts entries
/// that have already expired: those come through as DESTROY events.) The kernel dumps its
/// table on another thread, a datagram's entries at a time, while this one reads the map's
/// keys (batched); then this one feeds the engine each batch of entries as it arrives and,
/// while none is waiting, a chunk of the keys, whose memory goes back as they go in. The dump
/// overlaps the key read and the engine's inserts, and the start-up peak holds neither the
/// whole table twice nor all the keys besides it. Consumed here so that neither snapshot
/// outlives the start-up.
fn take_snapshots<W: Write>(
    det: &mut Detector<W>,
    netns_path: Option<&str>,
) -> Result<(Snapshots, u64)> {
    use std::sync::mpsc::TryRecvError;
    let dump_ns = clock::monotonic_ns();
    // Bounded: a dump faster than the engine waits for it rather than piling up (freed
    // batches would stay in the allocator's arenas, in the steady RSS).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<CtSnapshotEntry>>(64);
    std::thread::scope(|s| -> Result<_> {
        let dump = std::thread::Builder::new()
            .name("ct-dump".into())
            .spawn_scoped(s, move || {
                crate::snapshot::dump_each(netns_path.map(Path::new), |chunk| {
                    tx.send(chunk).is_ok()
                })
                .map(|()| clock::monotonic_ns())
            })
            .map_err(SnapshotError::Thread)
            .context("start-up snapshot of the kernel conntrack table")?;
        let mut keys = map_keys::keys(&det.map)?;
        let keys_ns = clock::monotonic_ns();
        record_run_start(det, dump_ns)?;
        warn_if_keys_stopped(det, &keys);
        let n_keys = keys.len();
        let mut undecodable = 0;
        let mut pre = Preexisting::new(det.agent_netns, dump_ns);
        let mut entries = 0;
        loop {
            let chunk = match rx.try_recv() {
                Ok(chunk) => chunk,
                Err(TryRecvError::Empty) if !keys.is_empty() => {
                    undecodable += feed_keys(det, &mut keys)?;
                    continue;
                }
                Err(TryRecvError::Empty) => match rx.recv() {
                    Ok(chunk) => chunk,
                    Err(_) => break,
                },
                Err(TryRecvError::Disconnected) => break,
            };
            entries += chunk.len();
            for e in chunk {
                record_startup_entry(det, &e, dump_ns)?;
                pre.feed(&mut det.engine, e);
            }
        }
        while !keys.is_empty() {
            undecodable += feed_keys(det, &mut keys)?;
        }
        pre.seal();
        det.pre = pre;
        let dump_done = dump
            .join()
            .unwrap_or(Err(SnapshotError::ThreadPanicked))
            .context("start-up snapshot of the kernel conntrack table")?;
        det.metrics
            .snapshot("conntrack", dump_done.saturating_sub(dump_ns) as f64 / 1e9);
        det.metrics
            .snapshot("map", keys_ns.saturating_sub(dump_ns) as f64 / 1e9);
        if undecodable > 0 {
            tracing::warn!(
                "{undecodable} of the map's {n_keys} keys at start-up did not decode with layout \
                 {}; they are left out (wrong --layout?)",
                det.map.layout
            );
        }
        det.recording(&|| {
            serde_json::json!({"type": "startup_done", "startup_entries": entries,
                               "startup_keys": n_keys})
            .to_string()
        })?;
        Ok((
            Snapshots {
                entries,
                keys: n_keys,
            },
            undecodable,
        ))
    })
}

/// Keys fed to the engine at a time while the dump has no entries waiting: about 100 KiB.
const KEY_CHUNK: usize = 4096;

/// Says so when the start-up walk of the map's keys stopped before the end.
fn warn_if_keys_stopped<W: Write>(det: &Detector<W>, keys: &map_keys::KeySnapshot) {
    if let Some(e) = &keys.stopped {
        tracing::warn!(
            "reading the map's keys at start-up stopped after {} ({}): {e}; deletes of the keys \
             not read show as deletes of unknown keys (map {})",
            keys.len(),
            keys.method.label(),
            det.map.id
        );
    }
}

/// Records and feeds the engine the snapshot's last [`KEY_CHUNK`] keys, then forgets them;
/// returns how many of them did not decode with the map's layout.
fn feed_keys<W: Write>(det: &mut Detector<W>, keys: &mut map_keys::KeySnapshot) -> Result<u64> {
    let map_id = det.map.id;
    for k in keys.last(KEY_CHUNK) {
        det.recording(&|| {
            serde_json::json!({"type": "startup_key", "map_id": map_id, "key_hex": hex(k)})
                .to_string()
        })?;
    }
    let undecodable = startup::load_map_keys(
        &mut det.engine,
        map_id,
        det.map.layout.key,
        keys.last(KEY_CHUNK),
    );
    keys.forget_last(KEY_CHUNK);
    Ok(undecodable)
}

/// The recording's first line (`detector replay` reads it): what the run judged with (kernel
/// tick rate, wall clock, the agent's namespace and map, the engine's settings). The
/// conntrack snapshot's entries follow as they are dumped, one line each, then the map's keys
/// at start-up, then `startup_done` with both counts.
fn record_run_start<W: Write>(det: &mut Detector<W>, dump_ns: u64) -> Result<()> {
    let cfg = det.engine.config();
    let start = serde_json::json!({
        "type": "run_start",
        "ts_ns": dump_ns,
        "version": env!("CARGO_PKG_VERSION"),
        "hz": det.time.hz,
        "wall_offset_ns": det.time.wall.offset_ns().to_string(),
        "agent_netns": det.agent_netns,
        "map": det.map,
        "engine": {
            "max_flows": cfg.max_flows,
            "snapshot_lag_window_ns": cfg.snapshot_lag_window_ns,
            "before_window_ns": cfg.before_window_ns,
            "after_window_ns": cfg.after_window_ns,
        },
    })
    .to_string();
    det.recording(&|| start.clone())
}

fn record_startup_entry<W: Write>(
    det: &mut Detector<W>,
    e: &CtSnapshotEntry,
    dump_ns: u64,
) -> Result<()> {
    det.recording(&|| {
        serde_json::json!({
            "type": "startup_entry",
            "dump_ns": dump_ns,
            "id": e.id,
            "proto": e.orig.proto,
            "orig": endpoint(&e.orig),
            "reply": endpoint(&e.reply),
            "status": e.status,
            "timeout_s": e.timeout_s,
            "zone": e.zone,
            "mark": e.mark,
        })
        .to_string()
    })
}

/// A tuple as the stream writes one (`src`, `sport`, `dst`, `dport`).
pub fn endpoint(t: &crate::record::FlowTuple) -> serde_json::Value {
    serde_json::json!({"src": t.src.to_string(), "sport": t.sport,
                       "dst": t.dst.to_string(), "dport": t.dport})
}

/// The start-up lines on stderr: what is watched, by whom the map is held, whether writes
/// are observed.
fn announce(map: &AgentMap, a: &Attached, snap: &Snapshots, traces: &Path) {
    crate::note!(
        "detector: watching map {} `{}` (found by {}, layout {}, {} keys now) and conntrack \
         ({} entries now) with the {} backend; traces in {}; Ctrl-C to stop",
        map.id,
        map.name,
        map.found_by,
        map.layout,
        snap.keys,
        snap.entries,
        a.backend,
        traces.display()
    );
    let holders = target::holders(map.id);
    crate::note!(
        "detector: map {} is open in {}",
        map.id,
        if holders.is_empty() {
            "no process (only pinned)".to_string()
        } else {
            holders
                .iter()
                .map(|h| format!("{}/{} fd {}", h.comm, h.pid, h.fd))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    match &a.no_writes {
        Some(why) => crate::note!(
            "detector: datapath writes to the map are not observable ({why}); deletes are \
             judged by the kernel's conntrack entry at the delete"
        ),
        None => crate::note!(
            "detector: datapath writes to the map are observed ({} on \
             htab_lru_map_update_elem/htab_lru_map_delete_elem)",
            a.writes_hook
        ),
    }
}

/// The judged namespace's conntrack sysctls, to see when its table is full; None (and said)
/// when they cannot be opened.
fn open_conntrack_fill(netns: Option<&str>) -> Option<ConntrackFill> {
    ConntrackFill::open(netns.map(Path::new))
        .map_err(|e| {
            tracing::warn!(
                "cannot read nf_conntrack_count/nf_conntrack_max{} ({e}): a full conntrack table \
                 will not be noticed",
                netns.map(|n| format!(" in {n}")).unwrap_or_default()
            );
        })
        .ok()
}

fn say_conntrack_fill(change: Change) {
    match change {
        Change::Filled { fill, .. } => tracing::warn!(
            "the kernel conntrack table is full ({} entries, nf_conntrack_max {}): new flows \
             are not tracked; verdicts whose story reaches into this time are flagged \
             maybe_incomplete",
            fill.count,
            fill.max
        ),
        Change::Emptied { fill, lasted_ns } => tracing::warn!(
            "the kernel conntrack table has room again ({} of {}) after {:.1} s full",
            fill.count,
            fill.max,
            lasted_ns as f64 / 1e9
        ),
    }
}

/// Records the loop handles between turns of the tasks it shares its thread with (a quarter of
/// a stream client's backlog, `http::CLIENT_BACKLOG`).
const INPUTS_PER_TURN: usize = 1024;

/// Reads the ring until the duration ends or a signal stops it; returns the stream for its
/// final counters.
async fn event_loop<W: Write>(
    det: &mut Detector<W>,
    attached: &mut Attached,
    spec: &MapSpec,
    mut stream: Stream,
) -> Result<Stream> {
    let mut ready = Vec::new();
    let mut watch = MapWatch::default();
    loop {
        let step = stream.next(&mut ready).await?;
        // Released records first: the tick's time is after all of them. The HTTP server's
        // tasks share this thread: they get a turn every INPUTS_PER_TURN records, so a big
        // batch does not overrun the /v1/events clients' backlogs before they can drain.
        for (i, ev) in ready.drain(..).enumerate() {
            det.input(ev)?;
            if i % INPUTS_PER_TURN == INPUTS_PER_TURN - 1 {
                tokio::task::yield_now().await;
            }
        }
        match step {
            Step::Stop => break,
            Step::Events => {}
            Step::Tick {
                now_ns,
                second,
                losses,
            } => {
                // Losses first: they belong to windows the tick may close.
                if let Some((count, since_ns)) = losses {
                    let kernel = stream.reader.counters();
                    if kernel.seen_full + kernel.flows_full > 0 {
                        det.engine.note_kernel_tables_full();
                    }
                    det.lost(count, since_ns)?;
                }
                if let Some(change) = det.ct_full.check(now_ns) {
                    say_conntrack_fill(change);
                    det.conntrack_fill_changed(change, now_ns)?;
                }
                det.push(Input::Tick { now_ns })?;
                if second {
                    let kernel = stream.reader.counters();
                    det.metrics.update(det.engine.stats(), &kernel);
                    follow_map(
                        spec,
                        &mut watch,
                        det,
                        &mut attached.probe,
                        attached.judge_netns,
                        now_ns,
                    )?;
                    // Keep wall time true across NTP steps and suspend.
                    det.set_wall(WallClock::measure(), now_ns)?;
                }
            }
        }
        det.out.console.flush();
    }
    stream.finish(&mut ready);
    for ev in ready.drain(..) {
        det.input(ev)?;
    }
    det.finish_engine()?;
    Ok(stream)
}

pub async fn run(opts: RunOptions, mut services: RunServices) -> Result<()> {
    super::map_large_allocations();
    let deadline = opts
        .duration
        .map(|secs| std::time::Instant::now() + std::time::Duration::from_secs_f64(secs));
    let map = wait_for_map(&opts.spec, deadline).await?;
    let traces = TraceDir::create(&opts.trace_dir)?;
    let writer = TraceWriter::start(
        &opts.trace_dir,
        opts.trace_limits,
        Some(services.metrics.clone()),
    )
    .context("starting the trace writer thread")?;
    // With --netns every delete is judged in that namespace; without it each delete is
    // judged in its deleting task's namespace (the agent's, which its own dump reads).
    let judge_netns = if opts.netns_path.is_some() {
        opts.agent_netns
    } else {
        0
    };
    let mut attached = attach_probes(&opts.settings, &map, judge_netns)?;
    let sizing = crate::kernel::sizing::Sizing {
        max_entries: opts.settings.max_entries,
        sized_by: opts.settings.sized_by,
        preallocated: attached.probe.tables_preallocated(),
        ring_bytes: opts.settings.ring_bytes,
        node_max: crate::kernel::sizing::node_conntrack_max(),
    };
    let (tables, too_small) =
        crate::kernel::sizing::describe(&sizing, crate::kernel::sizing::possible_cpus());
    crate::note!("{tables}");
    if let Some(w) = too_small {
        tracing::warn!("{w}");
    }
    // Measured once, before load: the programs place conntrack deadlines with it.
    let hz = attached.probe.hz.unwrap_or_else(|| {
        tracing::warn!(
            "could not measure the kernel's HZ (/proc/timer_list, /boot/config-*); assuming \
             250 for displayed timeouts, and conntrack expiry instants are unknown"
        );
        250
    });
    let started = clock::now_iso();
    let mut others: Vec<Box<dyn Sink + Send>> = vec![Box::new(HubSink(services.hub.clone()))];
    let kube = services.kube.take();
    let (pods, events) = kube.map(|k| (Some(k.pods), k.events)).unwrap_or_default();
    if let Some(events) = events {
        others.push(Box::new(EventSink(events)));
    }
    let stdout = std::io::stdout();
    let mut det = Detector {
        engine: Engine::new(opts.engine),
        time: TimeBase {
            wall: WallClock::measure(),
            hz,
        },
        map: map.clone(),
        counts: DispatchCounts::default(),
        drop_reasons: drop_reasons(&attached.probe),
        pre: Preexisting::new(opts.agent_netns, 0),
        pending_traces: HashMap::new(),
        agent_netns: opts.agent_netns,
        metrics: services.metrics.clone(),
        backend: attached.backend.name(),
        event_counters: Default::default(),
        pods,
        out: Outputs {
            console: Console::new(
                std::io::BufWriter::with_capacity(STDOUT_BUFFER_BYTES, stdout.lock()),
                opts.json,
            ),
            traces: TraceFiles::new(traces, trace_file::hostname(), &started, writer),
            others,
        },
        replaying: false,
        ct_full: FullWindows::new(open_conntrack_fill(opts.netns_path.as_deref())),
    };
    // Every program is loaded: the parsed BTF is no longer needed, and its memory goes back to
    // the kernel before the snapshots fill the engine (else the start-up peak holds both).
    attached.probe.release_btf();
    super::trim_heap();
    let (snap, undecodable_startup_keys) = take_snapshots(&mut det, opts.netns_path.as_deref())?;
    det.metrics
        .capacity_total("undecodable_startup_keys", undecodable_startup_keys);
    super::trim_heap();
    // The signal handlers before the announcement: a Ctrl-C right after "Ctrl-C to stop" (or
    // a SIGINT once ready) must stop it cleanly, not kill it with its summary unwritten.
    let reader = attached
        .reader
        .take()
        .context("the ring buffer's reader was already taken")?;
    let stream = Stream::new(reader, opts.watermark_ms, opts.duration)?;
    announce(&map, &attached, &snap, det.out.traces.dir.dir());
    // Probes attached and both start-up snapshots taken.
    det.metrics.set_ready(true);

    let stream = event_loop(&mut det, &mut attached, &opts.spec, stream).await?;

    // Every trace queued is written (or counted as failed) before the counts are taken.
    det.out.traces.drain();
    let trace_counts = det.out.traces.counts();
    let trace_writes = TraceWriteCounts {
        failed: WriteCounts::get(&trace_counts.failed),
        dropped: WriteCounts::get(&trace_counts.dropped),
        removed: WriteCounts::get(&trace_counts.removed),
    };
    let kernel = stream.reader.counters();
    det.metrics.update(det.engine.stats(), &kernel);
    let counts = RunCounts {
        races: det.counts.races,
        traces_written: WriteCounts::get(&trace_counts.written),
        trace_writes,
        undecodable_keys: det.counts.undecodable_keys,
        undecodable_startup_keys,
        undecodable_records: stream.reader.undecodable,
        socket_teardown_drops_ignored: det.counts.drops_ignored,
        conntrack_full: det.ct_full.windows,
        conntrack_full_deletes: det.ct_full.deletes,
    };
    let ended = clock::now_iso();
    let info = RunInfo {
        started: &started,
        ended: &ended,
        host: det.out.traces.host(),
        backend: attached.backend.name(),
        map: &det.map,
    };
    let summary = summary(
        &info,
        &counts,
        det.engine.stats(),
        &kernel,
        &stream.reorder_stats(),
    );
    // stdout's summary line, then the streams end, then the summary file (as before the
    // split: a client sees the end of its stream only after the last line on stdout).
    det.out.console.finish(&summary)?;
    services.shutdown().await;
    det.out.traces.finish(&summary)?;
    for s in &mut det.out.others {
        s.finish(&summary)?;
    }
    let stats = det.engine.stats();
    // Trace files that did not make it to disk, on a line of their own.
    let lost_traces = WriteCounts::get(&det.out.traces.counts().failed) + trace_writes.dropped;
    if lost_traces > 0 || !det.out.traces.summary_written() {
        crate::note!(
            "detector: trace files not written: {} failed, {} dropped (queue full); summary \
             file {}",
            WriteCounts::get(&det.out.traces.counts().failed),
            trace_writes.dropped,
            if det.out.traces.summary_written() {
                "written"
            } else {
                "NOT written"
            }
        );
    }
    // Retention is not loss, but a user looking for a trace should know it may be gone.
    let removed = WriteCounts::get(&det.out.traces.counts().removed);
    crate::note!(
        "detector: {} race(s) ({} traces written{}), {} closed-flow deletes, {} rightful \
         deletes, {} deletes of unknown keys; events lost in kernel: {}; {}; summary: {}",
        counts.races,
        counts.traces_written,
        if removed > 0 {
            format!(", {removed} old ones removed by the directory's limits")
        } else {
            String::new()
        },
        stats.deletes.closed_flow,
        stats.deletes.rightful,
        stats.deletes.unseen,
        kernel.lost_total(),
        capacity_line(&kernel, stats, &counts),
        det.out.traces.summary_path().display(),
    );
    Ok(())
}
