//! `detector run`: the detector proper. Kernel conntrack events and the agent's map deletes go
//! through the reorder buffer into the correlation engine; races are printed live and written
//! as trace files; a summary is written at exit.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use super::ProbeArgs;
use crate::clock::{self, WallClock};
use crate::engine::{
    AgentDelete, DeleteResult, Engine, EngineConfig, Input, KernelView, Output, Verdict,
};
use crate::npa::target::{self, AgentMap, MapSpec, NPA_NAME, NPA_PIN};
use crate::npa::{Layout, NpaKey};
use crate::pipeline::event_loop::{Step, Stream};
use std::collections::HashMap;

use crate::http::stream::Item;
use crate::http::{Live, ServeArgs};
use crate::k8s::{KubeArgs, PodRef, RaceNotice};
use crate::kernel::{CounterSnapshot, Probe};
use crate::record::{
    CtKind, DeleteView, Event, FlowTuple, MapDeleteRecord, MapOp, PackedTuple, Source,
};
use crate::report::render::{self, Units};
use crate::report::trace_file::{self, TraceDir, json_with_wall_times};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// The agent's conntrack map by pin path (used when it exists).
    #[arg(long, default_value = NPA_PIN, value_name = "PATH")]
    pub map_pin: PathBuf,
    /// The agent's conntrack map by id (overrides --map-pin and --map-name; not followed
    /// across agent restarts).
    #[arg(long, value_name = "ID")]
    pub map_id: Option<u32>,
    /// The agent's conntrack map by name, when the pin path does not exist.
    #[arg(long, default_value = NPA_NAME, value_name = "NAME")]
    pub map_name: String,
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
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub trace_before: f64,
    /// Window after each delete (to catch the denied reply), in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub trace_after: f64,
    /// A live entry born at most this long before the delete, with no predecessor, is
    /// `snapshot-lag`; older ones are `stale-match` (seconds; NPA's cleanup period is 300 s).
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    pub snapshot_lag_window: f64,
    /// Flows and keys each tracked at most (NPA's map holds 524288).
    #[arg(long, default_value_t = 524_288, value_name = "N")]
    pub max_flows: usize,
    /// The agent's network namespace, as a path (/run/netns/NAME, /proc/PID/ns/net): its
    /// conntrack entries judge the deletes, and only its events are observed. Default: the
    /// detector's own namespace (the node's).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<String>,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// How long to hold events to put them in kernel-timestamp order, in ms. Records reach
    /// the ring buffer microseconds after their timestamp, so 2 ms keeps late records rare
    /// (counted in the summary's `reorder.late`) while verdicts wait little.
    #[arg(long, default_value_t = 2, value_name = "MS")]
    pub watermark_ms: u64,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
}

fn secs_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

/// Everything the loop mutates, so helpers can take it whole.
struct State {
    engine: Engine,
    units: Units,
    map: AgentMap,
    traces: TraceDir,
    host: String,
    json: bool,
    verdicts: u64,
    undecodable_keys: u64,
    last_trace: Option<PathBuf>,
    /// `enum skb_drop_reason` names from BTF, without the SKB_DROP_REASON_ prefix.
    drop_reasons: HashMap<u32, String>,
    /// Entries of the start-up snapshot still believed alive.
    pre: Preexisting,
    /// Drop records of socket teardown (not network denials), not reported.
    drops_ignored: u64,
    /// What the trace file of a verdict adds to the engine's trace (detection latency, pods),
    /// kept until the trace is ready, by delete.
    pending_traces: HashMap<(u64, String), (u64, Vec<PodRef>)>,
    /// The agent's network namespace (inode): its entries judge the deletes.
    agent_netns: u32,
    /// HTTP streams, metrics and Kubernetes.
    live: Live,
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

/// ` pods ns/a -> ns/b` for readable race lines.
fn pods_suffix(pods: &[PodRef]) -> String {
    if pods.is_empty() {
        return String::new();
    }
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.pod))
        .collect();
    format!("  pods {}", names.join(", "))
}

/// Conntrack entries that existed when the detector started (ctnetlink snapshot).
///
/// The kernel side only learns an entry at its NEW, so for these it knows no birth, and the
/// tracepoint backend reports each one as NEW when it first sees a packet of it. Both are
/// reconciled here: that first NEW is recognised as the pre-existing entry (its id aliased to
/// the snapshot's, so the engine sees one entry), and a delete the kernel judged `absent`
/// because it never indexed the entry is left to the engine's shadow while the snapshot's
/// timeout says the entry is still alive.
///
/// Kept for the whole run (entries can live for days), so it is lean: the entries sorted by
/// packed original tuple in one vector (24 bytes each for IPv4; it never grows), and a hash
/// map only for NPA's DNAT form of the few entries that have one.
struct Preexisting {
    /// The agent's namespace, where the snapshot was taken.
    netns: u32,
    /// Monotonic ns of the dump: the snapshot's timeouts count from it.
    dump_ns: u64,
    /// Sorted by `orig` once the snapshot is in ([`Preexisting::seal`]).
    live: Vec<PreEntry>,
    /// DNAT form (`orig.src:sport -> reply.src:sport`, direction-free) -> monotonic ns its
    /// entry's snapshot timeout runs out.
    dnat: FastMap<FlowTuple, u64>,
    /// Kernel entry id -> engine id of the same pre-existing entry.
    alias: FastMap<u64, u64>,
}

struct PreEntry {
    orig: PackedTuple,
    /// ctnetlink's id of the entry.
    id: u32,
    /// Seconds of timeout left at the dump; [`GONE`] set once the entry is destroyed.
    timeout_s: u32,
}

/// Marks a [`PreEntry`] whose entry ended (no timeout is anywhere near 2^31 s).
const GONE: u32 = 1 << 31;

/// Hash maps with foldhash: seeded per process (see the engine's `LruMap` on hash flooding),
/// several times faster than SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One name for both directions of a flow.
fn canonical(t: FlowTuple) -> FlowTuple {
    t.min(t.reversed())
}

impl Preexisting {
    fn new(netns: u32, dump_ns: u64) -> Self {
        Self {
            netns,
            dump_ns,
            live: Vec::new(),
            dnat: FastMap::default(),
            alias: FastMap::default(),
        }
    }

    fn until(&self, timeout_s: u32) -> u64 {
        self.dump_ns + u64::from(timeout_s) * 1_000_000_000
    }

    /// The engine id of snapshot entry `id`.
    fn engine_id(id: u32) -> u64 {
        (1 << 63) | u64::from(id)
    }

    fn insert(&mut self, orig: FlowTuple, reply: FlowTuple, id: u32, timeout_s: u32) {
        self.live.push(PreEntry {
            orig: PackedTuple::of(&orig),
            id,
            timeout_s: timeout_s.min(GONE - 1),
        });
        if reply.src != orig.dst {
            let dnat = FlowTuple {
                dst: reply.src,
                dport: reply.sport,
                ..orig
            };
            self.dnat.insert(canonical(dnat), self.until(timeout_s));
        }
    }

    /// Sorts the entries for lookups, once the snapshot is in. (A tuple is in one netns's
    /// table at most once, so there are no duplicates to worry about.)
    fn seal(&mut self) {
        self.live.sort_unstable_by(|a, b| a.orig.cmp(&b.orig));
        self.live.shrink_to_fit();
    }

    fn find(&self, netns: u32, orig: &FlowTuple) -> Option<usize> {
        if netns != self.netns || self.live.is_empty() {
            return None;
        }
        let p = PackedTuple::of(orig);
        let i = self.live.binary_search_by(|e| e.orig.cmp(&p)).ok()?;
        (self.live[i].timeout_s & GONE == 0).then_some(i)
    }

    /// The snapshot entry of `netns` with original tuple `orig`, if still held: its engine
    /// id and the monotonic ns its snapshot timeout runs out.
    fn get(&self, netns: u32, orig: &FlowTuple) -> Option<(u64, u64)> {
        let e = &self.live[self.find(netns, orig)?];
        Some((Self::engine_id(e.id), self.until(e.timeout_s)))
    }

    fn remove(&mut self, netns: u32, orig: &FlowTuple) -> Option<u64> {
        let i = self.find(netns, orig)?;
        // Its DNAT form, if any, is left to run out with its snapshot timeout.
        let e = &mut self.live[i];
        e.timeout_s |= GONE;
        Some(Self::engine_id(e.id))
    }

    /// A key whose flow is a snapshot entry whose timeout has not run out.
    fn key_matches(&self, key: &NpaKey, now_ns: u64) -> bool {
        let t = FlowTuple {
            proto: key.proto,
            src: key.src,
            sport: key.sport,
            dst: key.dst,
            dport: key.dport,
        };
        // Either direction of the key may be the entry's original tuple.
        [t, t.reversed()].iter().any(|o| {
            self.get(self.netns, o)
                .is_some_and(|(_, until)| now_ns < until)
        }) || self
            .dnat
            .get(&canonical(t))
            .is_some_and(|&until| now_ns < until)
    }
}

impl State {
    /// Prints one record's NDJSON (with --json) and streams it to /v1/events clients; renders
    /// nothing when neither wants it.
    fn record(
        &self,
        out: &mut impl Write,
        json: impl FnOnce() -> String,
        text: impl FnOnce() -> String,
    ) -> Result<()> {
        let stream = self.live.events_wanted();
        if !self.json && !stream {
            return Ok(());
        }
        let line = json();
        if self.json {
            writeln!(out, "{line}")?;
        }
        if stream {
            self.live.publish_event(line, text());
        }
        Ok(())
    }

    /// Converts one reordered event into engine input, and prints it in JSON mode.
    fn input(&mut self, ev: Event, out: &mut impl Write) -> Result<()> {
        self.live.count_event(kind_of(&ev));
        match ev {
            Event::Ct(mut c) => {
                let u = self.units;
                self.record(
                    out,
                    || render::json_line(&Event::Ct(c.clone()), &u),
                    || render::text_line(&Event::Ct(c.clone()), &u),
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
                self.push(input, out)
            }
            Event::MapWrite(w) => {
                let key = NpaKey::decode(self.map.layout.key, &w.key);
                let u = self.units;
                self.record(
                    out,
                    || render::write_json(&w, key.as_ref().ok(), &u).to_string(),
                    || render::text_line(&Event::MapWrite(w.clone()), &u),
                )?;
                // The datapath's inserts/updates date the key; the agent's own writes (through
                // bpf(2)) and deletes are already covered by the syscall probes.
                match key {
                    Ok(key) if w.op == MapOp::Update && !w.from_syscall => self.push(
                        Input::AgentInsert {
                            ts_ns: w.ts_ns,
                            map_id: w.map_id,
                            key,
                        },
                        out,
                    ),
                    _ => Ok(()),
                }
            }
            Event::PacketDrop(p) => {
                let reason = self.drop_reasons.get(&p.reason).cloned();
                // Buffers freed because a socket closed are not packets the network denied.
                if matches!(reason.as_deref(), Some("QUEUE_PURGE" | "SOCKET_CLOSE")) {
                    self.drops_ignored += 1;
                    return Ok(());
                }
                let u = self.units;
                if !self.json {
                    writeln!(out, "{}", render::drop_text(&p, reason.as_deref(), &u))?;
                }
                self.record(
                    out,
                    || render::drop_json(&p, reason.as_deref(), &u).to_string(),
                    || render::drop_text(&p, reason.as_deref(), &u),
                )?;
                let input = Input::PacketDrop {
                    ts_ns: p.ts_ns,
                    // The drop probe does not read the packet's namespace; the engine matches
                    // drops by tuple.
                    netns: 0,
                    tuple: p.tuple,
                    reason: reason.unwrap_or_else(|| format!("reason {}", p.reason)),
                };
                self.push(input, out)
            }
            Event::MapDelete(d) => {
                let key = NpaKey::decode(self.map.layout.key, &d.key);
                let u = self.units;
                self.record(
                    out,
                    || render::delete_json(&d, key.as_ref().ok(), &u).to_string(),
                    || render::delete_text(&d, key.as_ref().ok(), &u),
                )?;
                match key {
                    Ok(key) => {
                        let input = Input::AgentDelete(self.agent_delete(&d, key));
                        self.push(input, out)
                    }
                    Err(e) => {
                        self.undecodable_keys += 1;
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

    fn agent_delete(&self, d: &MapDeleteRecord, key: NpaKey) -> AgentDelete {
        let ns = |j: i32| self.units.jiffies_ms(j as i64) * 1_000_000;
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
        }
    }

    fn push(&mut self, input: Input, out: &mut impl Write) -> Result<()> {
        for o in self.engine.push(input) {
            self.output(o, out)?;
        }
        Ok(())
    }

    fn output(&mut self, o: Output, out: &mut impl Write) -> Result<()> {
        match o {
            Output::Verdict(v) => {
                self.verdicts += 1;
                // The delete (kernel time) to this verdict: what a live watcher waits.
                let latency = clock::monotonic_ns().saturating_sub(v.delete_ts_ns);
                // Pod names, when Kubernetes is on: outside the engine, on the way out.
                let pods = self.live.pods(&v);
                self.pending_traces
                    .insert((v.delete_ts_ns, v.key.to_string()), (latency, pods.clone()));
                let trace_file = self.traces.path_for(v.delete_ts_ns, v.class.name(), &v.key);
                // `time` and the verdict's own wall times are added after its `ts_ns`.
                let line = json_with_wall_times(
                    &VerdictLine {
                        kind: "verdict",
                        ts_ns: v.delete_ts_ns,
                        trace_file: trace_file.clone(),
                        detection_latency_ns: latency,
                        verdict: VerdictBody {
                            verdict: &v,
                            pods: &pods,
                        },
                    },
                    &self.units.wall,
                )?;
                let text = format!(
                    "{}{} (detected {:.1} ms after the delete)",
                    race_line(&v, &self.units),
                    pods_suffix(&pods),
                    latency as f64 / 1e6
                );
                writeln!(out, "{}", if self.json { &line } else { &text })?;
                let flow = crate::record::FlowTuple {
                    proto: v.key.proto,
                    src: v.key.src,
                    sport: v.key.sport,
                    dst: v.key.dst,
                    dport: v.key.dport,
                };
                let notice = RaceNotice {
                    class: v.class.name(),
                    flow: format!("{} {flow}", crate::record::proto_name(v.key.proto)),
                    deleted_by: format!("{}/{}", v.agent.comm, v.agent.pid),
                    trace_file: trace_file.display().to_string(),
                    pods,
                };
                self.live
                    .race(&v, latency, Item { json: line, text }, notice);
            }
            Output::TraceReady(t) => {
                let (latency, pods) = self
                    .pending_traces
                    .remove(&(t.verdict.delete_ts_ns, t.verdict.key.to_string()))
                    .unzip();
                let path = self.traces.write_enriched(
                    &t,
                    latency,
                    &self.units.wall,
                    &self.host,
                    pods.as_deref(),
                )?;
                if !self.json {
                    eprintln!("detector: trace written: {}", path.display());
                }
                let u = self.units;
                self.record(
                    out,
                    || {
                        json!({"type": "trace_written", "ts_ns": t.verdict.delete_ts_ns,
                               "time": u.wall.iso(t.verdict.delete_ts_ns),
                               "path": path})
                        .to_string()
                    },
                    || format!("detector: trace written: {}", path.display()),
                )?;
                self.last_trace = Some(path);
            }
        }
        Ok(())
    }
}

/// A verdict on the NDJSON stream.
#[derive(serde::Serialize)]
struct VerdictLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ns: u64,
    trace_file: PathBuf,
    detection_latency_ns: u64,
    verdict: VerdictBody<'a>,
}

/// The verdict with its pods, when Kubernetes enrichment named any (an optional field of the
/// verdict object: docs/trace-schema.md).
#[derive(serde::Serialize)]
struct VerdictBody<'a> {
    #[serde(flatten)]
    verdict: &'a Verdict,
    #[serde(skip_serializing_if = "<[PodRef]>::is_empty")]
    pods: &'a [PodRef],
}

/// Gives a piped stdout room for a burst of verdicts (each NDJSON line carries its timeline,
/// about 9 KB), so that a reader (the lab, a container runtime's log pipe) that is a little slow
/// does not block the event loop on a full 64 KiB pipe. Best effort: 1 MiB is the default
/// pipe-max-size, and a failure leaves the pipe as it was.
fn widen_stdout_pipe() {
    use std::os::fd::AsRawFd;
    let fd = std::io::stdout().as_raw_fd();
    // SAFETY: fstat and fcntl on our own stdout, with a zeroed stat buffer they fill.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
}

/// One readable line per race.
pub fn race_line(v: &Verdict, u: &Units) -> String {
    let time = u.wall.iso(v.delete_ts_ns);
    let ms = |ns: i128| format!("{:.3} ms", ns as f64 / 1e6);
    let mut s = format!(
        "{} RACE {}  {} {}  owner {}  deleted by {}/{} while entry {:016x} was live",
        time.get(11..26).unwrap_or(&time),
        v.class.name(),
        crate::record::proto_name(v.key.proto),
        crate::record::FlowTuple {
            proto: v.key.proto,
            src: v.key.src,
            sport: v.key.sport,
            dst: v.key.dst,
            dport: v.key.dport,
        },
        v.key.owner,
        v.agent.comm,
        v.agent.pid,
        v.live.id,
    );
    if let Some(left) = v.live.timeout_left_ns {
        s.push_str(&format!(" ({:.1} s left)", left as f64 / 1e9));
    }
    if let Some(lag) = v.delete_lag_ns {
        s.push_str(&format!("; born {} before the delete", ms(lag as i128)));
    }
    if let Some(gap) = v.reuse_gap_ns {
        s.push_str(&format!(
            "; previous entry ended {} before it",
            ms(gap as i128)
        ));
    }
    if v.maybe_incomplete {
        s.push_str("; MAY BE INCOMPLETE (events lost)");
    }
    s.push_str(&format!(" [decided by {:?}]", v.decided_by).to_lowercase());
    s
}

pub async fn run(args: RunArgs) -> Result<()> {
    widen_stdout_pipe();
    let spec = MapSpec {
        id: args.map_id,
        pin: args.map_pin.clone(),
        name: args.map_name.clone(),
        layout: args.layout,
    };
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
    let mut live = Live::new(args.serve.replay);
    if let Some(addr) = args.serve.start(&mut live).await? {
        eprintln!(
            "detector: serving http://{addr} (/metrics, /v1/races, /v1/events, /healthz, /readyz)"
        );
    }
    live.kube = args.kube.start(live.metrics.clone()).await?;
    let netns_path = args.netns.clone();
    let agent_netns =
        super::trace::netns_inode(netns_path.as_deref().unwrap_or("/proc/self/ns/net"))?;
    // Filter conntrack events to the agent's namespace only when one was named; by default
    // every namespace is observed (pods' entries show in timelines) and deletes are judged by
    // the detector's own namespace, the node's.
    let netns = if netns_path.is_some() { agent_netns } else { 0 };
    let map = target::resolve(&spec)?;
    let traces = TraceDir::create(&args.trace_dir)?;
    let mut settings = args.probe.settings(netns, true);
    // Drops are worth reporting for as long as a trace can still name them.
    settings.drop_watch_ms = (args.trace_after.max(0.0) * 1000.0).ceil() as u32 + 1000;
    let mut probe = Probe::open(&settings)?;
    let (backend, _) = probe.choose(settings.backend)?;
    live.backend = backend.name();
    probe.set_target(map.id, target::target_map(map.layout.key, agent_netns))?;
    probe.attach(backend)?;
    let no_writes = probe.attach_agent(backend)?;
    let writes_hook = probe.writes_hook().unwrap_or("none");
    let reader = probe.take_reader()?;
    let hz = clock::kernel_hz().unwrap_or_else(|| {
        tracing::warn!("could not measure the kernel's HZ from /proc/timer_list; assuming 250");
        250
    });
    let started = clock::now_iso();
    let mut st = State {
        engine: Engine::new(EngineConfig {
            max_flows: args.max_flows,
            snapshot_lag_window_ns: secs_ns(args.snapshot_lag_window),
            before_window_ns: secs_ns(args.trace_before),
            after_window_ns: secs_ns(args.trace_after),
            ..EngineConfig::default()
        }),
        units: Units {
            wall: WallClock::measure(),
            hz,
        },
        map: map.clone(),
        traces,
        host: trace_file::hostname(),
        json: args.json,
        verdicts: 0,
        undecodable_keys: 0,
        last_trace: None,
        drop_reasons: probe
            .kernel_btf()
            .map(|b| b.enum_values("skb_drop_reason"))
            .unwrap_or_default()
            .into_iter()
            .map(|(v, n)| (v, n.trim_start_matches("SKB_DROP_REASON_").to_string()))
            .collect(),
        pre: Preexisting::new(agent_netns, 0),
        drops_ignored: 0,
        pending_traces: HashMap::new(),
        agent_netns,
        live,
    };
    // Every program is loaded: the parsed BTF is no longer needed.
    probe.release_btf();
    // Start-up snapshot of the kernel table, taken after the probes are attached so that no
    // entry slips between the dump and the first event. (A dump also evicts entries that have
    // already expired: those come through as DESTROY events.)
    let dump_ns = clock::monotonic_ns();
    let table = crate::snapshot::dump(netns_path.as_deref().map(std::path::Path::new))
        .context("start-up snapshot of the kernel conntrack table")?;
    st.live.metrics.snapshot(
        "conntrack",
        clock::monotonic_ns().saturating_sub(dump_ns) as f64 / 1e9,
    );
    let n_entries = table.len();
    // Consumed here so that neither snapshot outlives the start-up.
    st.pre = Preexisting::new(agent_netns, dump_ns);
    for e in table {
        st.pre.insert(e.orig, e.reply, e.id, e.timeout_s);
        st.engine.push(Input::CtExisting {
            id: Preexisting::engine_id(e.id),
            netns: agent_netns,
            orig: e.orig,
            reply: e.reply,
        });
    }
    st.pre.seal();
    // Start-up snapshot of the map, so deletes of keys inserted before we started are known.
    let keys_ns = clock::monotonic_ns();
    let snapshot = target::keys(&map)?;
    st.live.metrics.snapshot(
        "map",
        clock::monotonic_ns().saturating_sub(keys_ns) as f64 / 1e9,
    );
    let n_keys = snapshot.len();
    for k in snapshot {
        if let Ok(key) = NpaKey::decode(map.layout.key, &k) {
            st.engine.push(Input::MapExisting {
                map_id: map.id,
                key,
            });
        }
    }
    super::trim_heap();
    eprintln!(
        "detector: watching map {} `{}` (found by {}, layout {}, {} keys now) and conntrack \
         ({} entries now) with the {backend} backend; traces in {}; Ctrl-C to stop",
        map.id,
        map.name,
        map.found_by,
        map.layout,
        n_keys,
        n_entries,
        st.traces.dir().display()
    );
    let holders = target::holders(map.id);
    eprintln!(
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
    match &no_writes {
        Some(why) => eprintln!(
            "detector: datapath writes to the map are not observable ({why}); deletes are \
             judged by the kernel's conntrack entry at the delete"
        ),
        None => eprintln!(
            "detector: datapath writes to the map are observed ({writes_hook} on \
             htab_lru_map_update_elem/htab_lru_map_delete_elem)"
        ),
    }
    // Probes attached and both start-up snapshots taken.
    st.live.metrics.set_ready(true);

    let mut stream = Stream::new(reader, args.watermark_ms, args.duration)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut ready = Vec::new();
    loop {
        let step = stream.next(&mut ready).await?;
        // Released records first: the tick's time is after all of them.
        for ev in ready.drain(..) {
            st.input(ev, &mut out)?;
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
                    st.push(
                        Input::Lost {
                            ts_ns: since_ns,
                            count,
                        },
                        &mut out,
                    )?;
                }
                st.push(Input::Tick { now_ns }, &mut out)?;
                if second {
                    st.live
                        .metrics
                        .update(st.engine.stats(), &stream.reader.counters());
                    follow_map(&spec, &mut st, &mut probe, now_ns, &mut out)?;
                    // Keep wall time true across NTP steps and suspend.
                    st.units.wall = WallClock::measure();
                }
            }
        }
        out.flush().ok();
    }
    stream.finish(&mut ready);
    for ev in ready.drain(..) {
        st.input(ev, &mut out)?;
    }
    for o in st.engine.finish() {
        st.output(o, &mut out)?;
    }
    let reader = &stream.reader;
    let kernel = reader.counters();
    st.live.metrics.update(st.engine.stats(), &kernel);
    let summary = summary(
        &st,
        reader.undecodable,
        &kernel,
        &stream.reorder_stats(),
        &started,
        backend.name(),
    );
    if args.json {
        writeln!(out, "{summary}")?;
    }
    out.flush().ok();
    st.live.shutdown().await;
    let path = st
        .traces
        .dir()
        .join(format!("summary-{}.json", started.replace([':', '.'], "")));
    trace_file::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    let stats = st.engine.stats();
    eprintln!(
        "detector: {} race(s) ({} traces written), {} rightful deletes, {} deletes of unknown \
         keys; events lost in kernel: {}; summary: {}",
        st.verdicts,
        st.traces.written(),
        stats.deletes.rightful,
        stats.deletes.unseen,
        kernel.lost_total(),
        path.display()
    );
    Ok(())
}

/// Re-resolves the map by pin or name; when the agent re-created it, watch the new one.
fn follow_map(
    spec: &MapSpec,
    st: &mut State,
    probe: &mut Probe,
    now_ns: u64,
    out: &mut impl Write,
) -> Result<()> {
    if spec.id.is_some() {
        return Ok(());
    }
    let Ok(new) = target::resolve(spec) else {
        return Ok(()); // the agent is restarting; keep the old target until a new map shows
    };
    if new.id == st.map.id {
        return Ok(());
    }
    let old = std::mem::replace(&mut st.map, new.clone());
    tracing::info!(
        "agent map re-created: id {} -> {} (layout {})",
        old.id,
        new.id,
        new.layout
    );
    probe.set_target(new.id, target::target_map(new.layout.key, st.agent_netns))?;
    probe.remove_target(old.id)?;
    let text = format!(
        "detector: the agent re-created its map: now watching map {} (was {})",
        new.id, old.id
    );
    if !st.json {
        eprintln!("{text}");
    }
    let u = st.units;
    st.record(
        out,
        || {
            json!({"type": "map_recreated", "ts_ns": now_ns, "time": u.wall.iso(now_ns),
                   "old_id": old.id, "new_id": new.id, "map": new})
            .to_string()
        },
        || text.clone(),
    )?;
    st.push(
        Input::MapRecreated {
            ts_ns: now_ns,
            old_id: old.id,
            new_id: new.id,
        },
        out,
    )
}

fn summary(
    st: &State,
    undecodable_records: u64,
    kernel: &CounterSnapshot,
    reorder: &crate::pipeline::reorder::ReorderStats,
    started: &str,
    backend: &str,
) -> serde_json::Value {
    json!({
        "type": "summary",
        "schema_version": trace_file::TRACE_SCHEMA_VERSION,
        "started_at": started,
        "ended_at": clock::now_iso(),
        "host": st.host,
        "backend": backend,
        "map": st.map,
        "races": st.verdicts,
        "traces_written": st.traces.written(),
        "undecodable_keys": st.undecodable_keys,
        "undecodable_records": undecodable_records,
        "socket_teardown_drops_ignored": st.drops_ignored,
        "engine": st.engine.stats(),
        "kernel": kernel,
        "reorder": reorder,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, sp: u16, d: &str, dp: u16) -> FlowTuple {
        FlowTuple {
            proto: 17,
            src: s.parse().unwrap(),
            sport: sp,
            dst: d.parse().unwrap(),
            dport: dp,
        }
    }

    fn key(t: &FlowTuple) -> NpaKey {
        NpaKey {
            src: t.src,
            sport: t.sport,
            dst: t.dst,
            dport: t.dport,
            proto: t.proto,
            owner: t.src,
            ifindex: None,
        }
    }

    #[test]
    fn preexisting_entries_are_found_matched_and_removed() {
        const S: u64 = 1_000_000_000;
        let mut p = Preexisting::new(7, 100 * S);
        let a = t("10.0.0.1", 1000, "10.0.0.2", 53);
        let b = t("fd00::1", 2000, "fd00::2", 53);
        let vip = t("10.0.0.1", 3000, "172.20.0.10", 80);
        let backend = t("10.0.1.9", 8080, "10.0.0.1", 3000);
        for (i, o) in [a, b].iter().enumerate() {
            p.insert(*o, o.reversed(), i as u32 + 1, 60);
        }
        p.insert(vip, backend, 3, 10);
        p.seal();
        assert_eq!(p.get(7, &a), Some(((1 << 63) | 1, 160 * S)));
        assert_eq!(p.get(7, &b), Some(((1 << 63) | 2, 160 * S)));
        assert_eq!(p.get(8, &a), None, "another netns");
        assert_eq!(p.get(7, &a.reversed()), None, "by original tuple only");
        // Keys match either direction, and the DNAT form, until the timeout runs out.
        assert!(p.key_matches(&key(&a.reversed()), 159 * S));
        assert!(!p.key_matches(&key(&a), 160 * S));
        let dnat = t("10.0.0.1", 3000, "10.0.1.9", 8080);
        assert!(p.key_matches(&key(&dnat), 105 * S));
        assert!(!p.key_matches(&key(&dnat), 110 * S));
        assert_eq!(p.remove(7, &a), Some((1 << 63) | 1));
        assert_eq!(p.remove(7, &a), None);
        assert_eq!(p.get(7, &a), None);
        assert!(!p.key_matches(&key(&a), 101 * S));
        assert!(p.key_matches(&key(&b), 101 * S));
    }
}
