//! Prometheus metrics of the detector (OpenMetrics text, which Prometheus scrapes as is).
//!
//! Counters the kernel or the engine already keep as totals (kernel losses, rightful deletes,
//! evictions) are mirrored by adding the difference since the last update, so the exported
//! counter never goes backwards and never double counts.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{Stats, VerdictClass};
use crate::kernel::CounterSnapshot;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindBackend {
    pub kind: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnapshotLabel {
    pub snapshot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabel {
    pub counter: String,
}

/// What the detector could not judge, by the bound that was hit: the kernel's counters and
/// the agent deletes whose key did not decode (live and in the start-up snapshot).
pub const CAPACITY_COUNTERS: [&str; 13] = [
    "unjudged_shadow_evicted",
    "unjudged_kernel_table_full",
    "unjudged_other_netns",
    "seen_full",
    "flows_full",
    "batch_truncated",
    "pending_full",
    "confirm_full",
    "read_failed",
    "undecodable_keys",
    "undecodable_startup_keys",
    "conntrack_full",
    "conntrack_full_deletes",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The event loop's handles on the events counter, one per record kind, fetched once: counting
/// a record is then one atomic add.
#[derive(Default)]
pub struct EventCounters(Vec<(&'static str, Counter)>);

impl EventCounters {
    pub fn inc(&mut self, metrics: &Metrics, kind: &'static str, backend: &'static str) {
        if let Some((_, c)) = self.0.iter().find(|(k, _)| *k == kind) {
            c.inc();
            return;
        }
        let c = metrics.event_counter(kind, backend);
        c.inc();
        self.0.push((kind, c));
    }
}

/// Totals already exported, for the counters mirrored from cumulative sources.
#[derive(Default)]
struct Mirrored {
    lost: [u64; detector_common::kind::COUNT as usize],
    rightful: u64,
    closed_flow: u64,
    stderr_lost: u64,
    evictions: [u64; 4],
    capacity: std::collections::HashMap<&'static str, u64>,
}

pub struct Metrics {
    registry: Registry,
    events: Family<KindBackend, Counter>,
    lost: Family<KindLabel, Counter>,
    verdicts: Family<ClassLabel, Counter>,
    rightful: Counter,
    closed_flow: Counter,
    stderr_lost: Counter,
    confirmed: Counter,
    unconfirmed: Counter,
    shadow_entries: Family<TableLabel, Gauge>,
    shadow_evictions: Family<TableLabel, Counter>,
    snapshot_duration: Family<SnapshotLabel, Gauge<f64, AtomicU64>>,
    latency: Histogram,
    ready: Gauge,
    lagged: Family<StreamLabel, Counter>,
    kube_events: Family<ResultLabel, Counter>,
    capacity: Family<CounterLabel, Counter>,
    /// Trace files by what became of them: written, failed, dropped, removed (retention).
    trace_writes: Family<ResultLabel, Counter>,
    /// The HTTP server's limits at work: connections and streams refused, accept errors,
    /// idle connections closed.
    http_limits: Family<ResultLabel, Counter>,
    mirrored: Mutex<Mirrored>,
}

/// Record kinds by the index the kernel counts losses under.
pub fn kind_name(index: usize) -> String {
    use detector_common::kind;
    match u8::try_from(index).unwrap_or(u8::MAX) {
        kind::CT_NEW => "ct_new".into(),
        kind::CT_DESTROY => "ct_destroy".into(),
        kind::MAP_DELETE => "agent_delete".into(),
        kind::PACKET_DROP => "packet_drop".into(),
        kind::MAP_WRITE => "map_write".into(),
        _ => format!("kind_{index}"),
    }
}

const TABLES: [&str; 4] = ["flows", "map_keys", "traces", "markers"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("detector");
        let events = Family::<KindBackend, Counter>::default();
        let lost = Family::<KindLabel, Counter>::default();
        let verdicts = Family::<ClassLabel, Counter>::default();
        let rightful = Counter::default();
        let closed_flow = Counter::default();
        let stderr_lost = Counter::default();
        let confirmed = Counter::default();
        let unconfirmed = Counter::default();
        let shadow_entries = Family::<TableLabel, Gauge>::default();
        let shadow_evictions = Family::<TableLabel, Counter>::default();
        let snapshot_duration = Family::<SnapshotLabel, Gauge<f64, AtomicU64>>::default();
        // 100 us to ~13 s: the watermark alone is 20 ms by default.
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let ready = Gauge::default();
        let lagged = Family::<StreamLabel, Counter>::default();
        let kube_events = Family::<ResultLabel, Counter>::default();
        let capacity = Family::<CounterLabel, Counter>::default();
        registry.register(
            "capacity_overflow",
            "Things not judged because a bound was hit: kernel tables full (seen_full, \
             flows_full, pending_full, confirm_full), batch keys beyond --max-batch-keys \
             (batch_truncated), failed kernel reads, agent keys that did not decode, agent deletes \
             left unjudged (unjudged_*)",
            capacity.clone(),
        );
        for c in CAPACITY_COUNTERS {
            let _ = capacity.get_or_create(&CounterLabel { counter: c.into() });
        }
        registry.register(
            "events",
            "Kernel records received, by kind and probe backend",
            events.clone(),
        );
        registry.register(
            "events_lost",
            "Records the kernel could not deliver (ring buffer full), by kind",
            lost.clone(),
        );
        registry.register("verdicts", "Races reported, by class", verdicts.clone());
        registry.register(
            "rightful_deletes",
            "Agent deletes of keys whose flow had really ended",
            rightful.clone(),
        );
        registry.register(
            "closed_flow_deletes",
            "Agent deletes of keys whose connection had closed (TCP CLOSE/TIME_WAIT): no race",
            closed_flow.clone(),
        );
        registry.register(
            "stderr_lines_lost",
            "Lines for people the detector could not write to stderr (a closed pipe): detection \
             went on without them",
            stderr_lost.clone(),
        );
        registry.register(
            "races_confirmed",
            "Races whose flow then had a packet denied (within the after-window)",
            confirmed.clone(),
        );
        registry.register(
            "races_unconfirmed",
            "Races whose after-window closed with no denied packet",
            unconfirmed.clone(),
        );
        registry.register(
            "shadow_entries",
            "Entries held in the engine's shadow tables",
            shadow_entries.clone(),
        );
        registry.register(
            "shadow_evictions",
            "Entries evicted from the engine's bounded tables",
            shadow_evictions.clone(),
        );
        registry.register(
            "snapshot_duration_seconds",
            "Duration of the start-up snapshots (conntrack dump, map keys)",
            snapshot_duration.clone(),
        );
        registry.register(
            "verdict_latency_seconds",
            "From the agent's delete (kernel time) to the verdict",
            latency.clone(),
        );
        registry.register(
            "ready",
            "1 once the probes are attached and the start-up snapshots are done",
            ready.clone(),
        );
        registry.register(
            "stream_lagged",
            "Records skipped for HTTP stream clients that read too slowly",
            lagged.clone(),
        );
        registry.register(
            "kube_events",
            "Kubernetes Events for races: created, suppressed (rate limit), failed, dropped",
            kube_events.clone(),
        );
        let trace_writes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "trace_writes",
            "Trace files: written, failed (disk full, read-only, no descriptors), dropped \
             (write queue full), removed (oldest, to stay within the directory's limits)",
            trace_writes.clone(),
        );
        for r in ["written", "failed", "dropped", "removed"] {
            let _ = trace_writes.get_or_create(&ResultLabel { result: r.into() });
        }
        let http_limits = Family::<ResultLabel, Counter>::default();
        registry.register(
            "http_limits",
            "HTTP server limits at work: connections_refused and streams_refused (503), \
             accept_errors (e.g. out of descriptors; accepting backs off), idle_closed",
            http_limits.clone(),
        );
        for r in [
            "connections_refused",
            "streams_refused",
            "accept_errors",
            "idle_closed",
        ] {
            let _ = http_limits.get_or_create(&ResultLabel { result: r.into() });
        }
        // Known label values exist from the start, so a query sees 0 rather than nothing.
        for c in [
            VerdictClass::PortReuse,
            VerdictClass::SnapshotLag,
            VerdictClass::StaleMatch,
        ] {
            let _ = verdicts.get_or_create(&ClassLabel {
                class: c.name().into(),
            });
        }
        for i in 1..=usize::from(detector_common::kind::MAP_WRITE) {
            let _ = lost.get_or_create(&KindLabel { kind: kind_name(i) });
        }
        for t in ["flows", "map_keys"] {
            let _ = shadow_entries.get_or_create(&TableLabel { table: t.into() });
        }
        for t in TABLES {
            let _ = shadow_evictions.get_or_create(&TableLabel { table: t.into() });
        }
        Self {
            registry,
            events,
            lost,
            verdicts,
            rightful,
            closed_flow,
            stderr_lost,
            confirmed,
            unconfirmed,
            shadow_entries,
            shadow_evictions,
            snapshot_duration,
            latency,
            ready,
            lagged,
            kube_events,
            capacity,
            trace_writes,
            http_limits,
            mirrored: Mutex::new(Mirrored::default()),
        }
    }

    pub fn event(&self, kind: &str, backend: &str) {
        self.event_counter(kind, backend).inc();
    }

    /// The events counter of one (kind, backend) pair, to keep: the family's lookup builds two
    /// label strings and takes a lock, too much for every record (see [`EventCounters`]).
    pub fn event_counter(&self, kind: &str, backend: &str) -> Counter {
        self.events
            .get_or_create(&KindBackend {
                kind: kind.into(),
                backend: backend.into(),
            })
            .clone()
    }

    pub fn verdict(&self, class: VerdictClass, latency_ns: u64) {
        self.verdicts
            .get_or_create(&ClassLabel {
                class: class.name().into(),
            })
            .inc();
        self.latency.observe(latency_ns as f64 / 1e9);
    }

    pub fn confirmation(&self, confirmed: bool) {
        if confirmed {
            self.confirmed.inc();
        } else {
            self.unconfirmed.inc();
        }
    }

    pub fn snapshot(&self, name: &str, seconds: f64) {
        self.snapshot_duration
            .get_or_create(&SnapshotLabel {
                snapshot: name.into(),
            })
            .set(seconds);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    pub fn lagged(&self, stream: &str, n: u64) {
        self.lagged
            .get_or_create(&StreamLabel {
                stream: stream.into(),
            })
            .inc_by(n);
    }

    pub fn kube_event(&self, result: &str) {
        self.kube_events
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Brings the capacity counter `name` (one of [`CAPACITY_COUNTERS`]) up to `total`.
    pub fn capacity_total(&self, name: &'static str, total: u64) {
        let mut m = self.mirrored.lock().unwrap_or_else(|e| e.into_inner());
        self.mirror_capacity(&mut m, name, total);
    }

    fn mirror_capacity(&self, m: &mut Mirrored, name: &'static str, total: u64) {
        let seen = m.capacity.entry(name).or_default();
        if total > *seen {
            self.capacity
                .get_or_create(&CounterLabel {
                    counter: name.into(),
                })
                .inc_by(total - *seen);
            *seen = total;
        }
    }

    /// One trace file written, failed, dropped or removed.
    pub fn trace_write(&self, result: &str) {
        self.trace_writes
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// One of the HTTP server's limits at work (see `http_limits`).
    pub fn http_limit(&self, result: &str) {
        self.http_limits
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Brings the mirrored counters and the gauges up to the engine's and the kernel's totals.
    pub fn update(&self, stats: &Stats, kernel: &CounterSnapshot) {
        let mut m = self.mirrored.lock().unwrap_or_else(|e| e.into_inner());
        for (name, total) in [
            ("seen_full", kernel.seen_full),
            ("flows_full", kernel.flows_full),
            ("batch_truncated", kernel.batch_truncated),
            ("pending_full", kernel.pending_full),
            ("confirm_full", kernel.confirm_full),
            ("read_failed", kernel.read_failed),
            (
                "unjudged_shadow_evicted",
                stats.deletes.unjudged_shadow_evicted,
            ),
            (
                "unjudged_kernel_table_full",
                stats.deletes.unjudged_kernel_table_full,
            ),
            ("unjudged_other_netns", stats.deletes.unjudged_other_netns),
        ] {
            self.mirror_capacity(&mut m, name, total);
        }
        for (i, (&now, seen)) in kernel.lost.iter().zip(m.lost.iter_mut()).enumerate() {
            if now > *seen {
                self.lost
                    .get_or_create(&KindLabel { kind: kind_name(i) })
                    .inc_by(now - *seen);
                *seen = now;
            }
        }
        let stderr_lost = crate::stderr::lost();
        if stderr_lost > m.stderr_lost {
            self.stderr_lost.inc_by(stderr_lost - m.stderr_lost);
            m.stderr_lost = stderr_lost;
        }
        if stats.deletes.rightful > m.rightful {
            self.rightful.inc_by(stats.deletes.rightful - m.rightful);
            m.rightful = stats.deletes.rightful;
        }
        if stats.deletes.closed_flow > m.closed_flow {
            self.closed_flow
                .inc_by(stats.deletes.closed_flow - m.closed_flow);
            m.closed_flow = stats.deletes.closed_flow;
        }
        let ev = &stats.evictions;
        for (i, now) in [ev.flows, ev.map_keys, ev.traces, ev.markers]
            .into_iter()
            .enumerate()
        {
            if now > m.evictions[i] {
                self.shadow_evictions
                    .get_or_create(&TableLabel {
                        table: TABLES[i].into(),
                    })
                    .inc_by(now - m.evictions[i]);
                m.evictions[i] = now;
            }
        }
        for (t, v) in [
            ("flows", stats.flows_tracked),
            ("map_keys", stats.map_keys_tracked),
        ] {
            self.shadow_entries
                .get_or_create(&TableLabel { table: t.into() })
                .set(v as i64);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_event_counters_count_in_the_family() {
        let m = Metrics::new();
        let mut c = EventCounters::default();
        for _ in 0..3 {
            c.inc(&m, "ct_new", "tracepoint");
        }
        c.inc(&m, "agent_delete", "tracepoint");
        m.event("ct_new", "tracepoint");
        let text = m.encode();
        assert!(
            text.contains("detector_events_total{kind=\"ct_new\",backend=\"tracepoint\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("detector_events_total{kind=\"agent_delete\",backend=\"tracepoint\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn mirrored_counters_add_only_the_difference() {
        let m = Metrics::new();
        let mut stats = Stats::default();
        let mut kernel = CounterSnapshot::default();
        stats.deletes.rightful = 3;
        kernel.lost[usize::from(detector_common::kind::CT_NEW)] = 5;
        m.update(&stats, &kernel);
        m.update(&stats, &kernel);
        stats.deletes.rightful = 4;
        stats.deletes.closed_flow = 2;
        m.update(&stats, &kernel);
        let text = m.encode();
        assert!(
            text.contains("detector_closed_flow_deletes_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("detector_rightful_deletes_total 4\n"),
            "{text}"
        );
        assert!(
            text.contains("detector_events_lost_total{kind=\"ct_new\"} 5\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn capacity_counters_are_exported_from_zero_and_mirrored() {
        let m = Metrics::new();
        let zero = m.encode();
        assert!(
            zero.contains("detector_capacity_overflow_total{counter=\"batch_truncated\"} 0\n"),
            "{zero}"
        );
        let stats = Stats::default();
        let kernel = CounterSnapshot {
            batch_truncated: 1968,
            flows_full: 2,
            ..CounterSnapshot::default()
        };
        m.update(&stats, &kernel);
        m.update(&stats, &kernel);
        m.capacity_total("undecodable_startup_keys", 7);
        m.capacity_total("undecodable_startup_keys", 7);
        let text = m.encode();
        for want in [
            "detector_capacity_overflow_total{counter=\"batch_truncated\"} 1968\n",
            "detector_capacity_overflow_total{counter=\"flows_full\"} 2\n",
            "detector_capacity_overflow_total{counter=\"undecodable_startup_keys\"} 7\n",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
    }
}
