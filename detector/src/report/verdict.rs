//! A race for people and machines: its readable line and its NDJSON line.

use std::path::PathBuf;

use anyhow::Result;

use crate::engine::{RaceInstants, TimelineEvent, TimelineKind, Verdict};
use crate::k8s::{PodRef, RaceNotice};
use crate::record::{DestroyReason, FlowTuple, proto_name};
use crate::report::render::TimeBase;
use crate::report::trace_file::json_with_wall_times;

/// A verdict on the NDJSON stream.
#[derive(serde::Serialize)]
struct VerdictLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ns: u64,
    trace_file: PathBuf,
    /// How many events the verdict's full timeline has (it is in the trace file); the line's
    /// `verdict.timeline` is the race's story only ([`story_timeline`]).
    timeline_events: usize,
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

/// The events of a verdict's timeline that tell the race on the live line and the streams:
/// the predecessor's destroy (port-reuse), the live entry's birth (or its first sighting in
/// the start-up snapshot) and the delete, in time order. The full timeline (up to 32 events
/// per flow, about 8 KB as JSON) goes only to the trace file: serialising it on the event loop
/// for every verdict of a burst made each later verdict of the burst wait for it.
pub fn story_timeline(v: &Verdict) -> Vec<TimelineEvent> {
    let old_id = v.old.map(|o| o.id);
    let tells = |e: &TimelineEvent| match &e.what {
        TimelineKind::CtDestroy { id, .. } => Some(*id) == old_id,
        TimelineKind::CtNew { id, .. } | TimelineKind::CtExisting { id, .. } => *id == v.live.id,
        TimelineKind::AgentDelete(_) => e.ts_ns == v.delete_ts_ns,
        _ => false,
    };
    v.timeline.iter().filter(|e| tells(e)).cloned().collect()
}

/// The NDJSON line of a verdict whose `timeline` is already its story ([`story_timeline`]);
/// `timeline_events` counts the full timeline of the trace file. `time` and the verdict's
/// own wall times are added after its `ts_ns`.
pub fn verdict_json(
    v: &Verdict,
    timeline_events: usize,
    latency_ns: u64,
    pods: &[PodRef],
    trace_file: PathBuf,
    time: &TimeBase,
) -> Result<String> {
    json_with_wall_times(
        &VerdictLine {
            kind: "verdict",
            ts_ns: v.delete_ts_ns,
            trace_file,
            timeline_events,
            detection_latency_ns: latency_ns,
            verdict: VerdictBody { verdict: v, pods },
        },
        &time.wall,
    )
    .map_err(Into::into)
}

/// The readable line of a verdict seen live: the race, its pods, and how soon it was seen.
pub fn verdict_text(v: &Verdict, latency_ns: u64, pods: &[PodRef], time: &TimeBase) -> String {
    format!(
        "{}{} (detected {:.1} ms after the delete)",
        race_line(v, time),
        pods_suffix(pods),
        latency_ns as f64 / 1e6
    )
}

/// The flow of a verdict's key.
fn flow(v: &Verdict) -> FlowTuple {
    FlowTuple {
        proto: v.key.proto,
        src: v.key.src,
        sport: v.key.sport,
        dst: v.key.dst,
        dport: v.key.dport,
    }
}

/// What a Kubernetes Event says about a race.
pub fn notice(v: &Verdict, pods: &[PodRef], trace_file: &std::path::Path) -> RaceNotice {
    RaceNotice {
        class: v.class.name(),
        flow: format!("{} {}", proto_name(v.key.proto), flow(v)),
        deleted_by: format!("{}/{}", v.agent.comm, v.agent.pid),
        trace_file: trace_file.display().to_string(),
        pods: pods.to_vec(),
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

/// One readable line per race.
pub fn race_line(v: &Verdict, u: &TimeBase) -> String {
    let time = u.wall.iso(v.delete_ts_ns);
    let ms = |ns: i128| format!("{:.3} ms", ns as f64 / 1e6);
    let mut s = format!(
        "{} RACE {}  {} {}  owner {}  deleted by {}/{} while entry {:016x} was live",
        time.get(11..26).unwrap_or(&time),
        v.class.name(),
        proto_name(v.key.proto),
        flow(v),
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
    if let Some(i) = &v.instants {
        s.push_str(&format!(
            "; {}",
            instants_text(i, v.old.and_then(|o| o.reason))
        ));
    } else if let Some(gap) = v.reuse_gap_ns {
        s.push_str(&format!(
            "; previous entry reaped {} before it",
            ms(gap as i128)
        ));
    }
    if v.maybe_incomplete {
        s.push_str("; MAY BE INCOMPLETE (events lost)");
    }
    s.push_str(&format!(" [decided by {:?}]", v.decided_by).to_lowercase());
    s
}

/// A port-reuse race's instants in order, each with the gap since the one before:
/// `previous entry expired, reaped 169.000 ms later by the agent itself (npa/900), tuple
/// reused 0.120 ms later, key deleted 150.800 ms later`.
fn instants_text(i: &RaceInstants, reason: Option<DestroyReason>) -> String {
    let ms = |ns: Option<i64>| ns.map_or("?".into(), |n| format!("{:.3} ms", n as f64 / 1e6));
    let by = i
        .reaped_by
        .map(|r| format!(" by {}", r.describe()))
        .unwrap_or_default();
    let ended = match (i.expiry_ns, reason) {
        (Some(_), _) => format!(
            "previous entry expired, reaped {} later{by}",
            ms(i.expiry_to_reap_ns)
        ),
        (None, Some(DestroyReason::Expired)) => {
            format!("previous entry expired (when: tick length unknown), reaped{by}")
        }
        (None, Some(DestroyReason::Killed)) => {
            format!("previous entry killed before its timeout{by}")
        }
        (None, None) => "previous entry's end not seen (its destroy record was lost)".into(),
    };
    format!(
        "{ended}, tuple reused {} later, key deleted {} later",
        ms(i.reap_to_reuse_ns),
        ms(i.reuse_to_delete_ns)
    )
}
