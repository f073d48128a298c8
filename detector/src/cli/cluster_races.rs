//! `detector cluster-verdict --from detectors`: every node's races read from its detector
//! rather than from Events. Each running detector pod is reached through the API server's
//! port-forward (as `watch --node` reaches one); over the window its `/v1/races` stream is read
//! and its `/metrics` scraped at both ends for what the stream does not carry: closed-flow
//! deletes (never races) and records the kernel could not deliver (a race may hide in them).
//!
//! Unlike Events (one per pod and `--event-interval`, posted only with `--kube`), the stream
//! has every race as the detector decided it, and a detector that could not be watched for
//! the whole window fails the run instead of passing as a node with no race.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

use super::forward::{DetectorPods, forward_to_pod};
use super::remote::{Remote, read_token};

/// Where the detectors are and how to talk to them.
#[derive(Debug, Clone, clap::Args)]
pub struct DetectorsArgs {
    /// The detector pods (`--from detectors`).
    #[command(flatten)]
    pub detectors: DetectorPods,
    /// File holding the bearer token of the detectors' --token-file (`--from detectors`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// One node's detector over the window.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DetectorTally {
    pub pod: String,
    /// Races on its stream decided inside the window, by class.
    pub classes: BTreeMap<String, u64>,
    /// Closed-flow deletes in the window (its `detector_closed_flow_deletes_total`).
    pub closed_flow: u64,
    /// Kernel records lost in the window (its `detector_events_lost_total`).
    pub lost: u64,
    /// Races this client missed because it read too slowly (`lagged` markers).
    pub missed: u64,
    /// Why this detector's window is not complete (not running, unreachable, restarted).
    pub error: Option<String>,
}

impl DetectorTally {
    pub fn races(&self) -> u64 {
        self.classes.values().sum()
    }

    /// True when the window was seen whole: every race would have been counted.
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.lost == 0 && self.missed == 0
    }
}

/// Adds one line of a `/v1/races` stream: verdicts decided at or after `since` (the stream
/// replays earlier ones on connect), and `lagged` markers. Confirmations are not races.
pub fn count_line(line: &str, since: &jiff::Timestamp, t: &mut DetectorTally) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    match v["type"].as_str() {
        Some("verdict") => {
            // A time that does not parse is counted: a race is never dropped by doubt.
            let before = v["time"]
                .as_str()
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                .is_some_and(|ts| ts < *since);
            if !before {
                let class = v["verdict"]["class"].as_str().unwrap_or("unknown");
                *t.classes.entry(class.to_string()).or_default() += 1;
            }
        }
        Some("lagged") => t.missed += v["missed"].as_u64().unwrap_or(1),
        _ => {}
    }
}

/// The sum of a counter's samples (every label set) in a Prometheus text exposition.
pub fn counter_sum(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Counters are whole numbers, exported as such.
        .map(|v| v.max(0.0) as u64)
        .sum()
}

const CLOSED_FLOW: &str = "detector_closed_flow_deletes_total";
const LOST: &str = "detector_events_lost_total";

/// Watches one detector (already forwarded to `url`) until `until`.
async fn watch_one(
    url: String,
    token: Option<String>,
    since: jiff::Timestamp,
    until: tokio::time::Instant,
    mut t: DetectorTally,
) -> DetectorTally {
    let result: Result<()> = async {
        let remote = Remote::new(&url, token)?;
        let before = String::from_utf8_lossy(&remote.get("/metrics").await?).into_owned();
        remote
            .stream_until("/v1/races", until, |l| count_line(l, &since, &mut t))
            .await?;
        let after = String::from_utf8_lossy(&remote.get("/metrics").await?).into_owned();
        for (name, field) in [(CLOSED_FLOW, &mut t.closed_flow), (LOST, &mut t.lost)] {
            let (b, a) = (counter_sum(&before, name), counter_sum(&after, name));
            *field = a.checked_sub(b).with_context(|| {
                format!("{name} went down ({b} -> {a}): the detector restarted in the window")
            })?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        t.error = Some(format!("{e:#}"));
    }
    t
}

/// Every detector pod's tally over `duration`, by node. Pods that are not running are listed
/// with that as their error.
pub async fn gather(
    client: Client,
    args: &DetectorsArgs,
    since: jiff::Timestamp,
    duration: Duration,
) -> Result<BTreeMap<String, DetectorTally>> {
    let token = read_token(args.token_file.as_deref())?;
    let pods: Api<Pod> = Api::namespaced(client, &args.detectors.detector_namespace);
    let list = pods
        .list(&ListParams::default().labels(&args.detectors.detector_selector))
        .await
        .with_context(|| {
            format!(
                "listing the detector pods ({}) in namespace {}",
                args.detectors.detector_selector, args.detectors.detector_namespace
            )
        })?;
    let until = tokio::time::Instant::now() + duration;
    let mut out = BTreeMap::new();
    let mut watching = Vec::new();
    for p in list.items {
        let name = p.metadata.name.unwrap_or_default();
        let node = p
            .spec
            .and_then(|s| s.node_name)
            .unwrap_or_else(|| format!("(unscheduled {name})"));
        let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
        let mut t = DetectorTally {
            pod: name.clone(),
            ..DetectorTally::default()
        };
        if phase != "Running" {
            t.error = Some(format!("pod is {}", phase_or_unknown(&phase)));
            out.insert(node, t);
            continue;
        }
        match forward_to_pod(pods.clone(), name, args.detectors.detector_port).await {
            Ok(url) => watching.push((
                node,
                tokio::spawn(watch_one(url, token.clone(), since, until, t)),
            )),
            Err(e) => {
                t.error = Some(format!("port-forward: {e:#}"));
                out.insert(node, t);
            }
        }
    }
    crate::note!(
        "detector cluster-verdict: watching {} detector(s) in namespace {} for {} s",
        watching.len(),
        args.detectors.detector_namespace,
        duration.as_secs()
    );
    for (node, task) in watching {
        let t = task.await.context("a detector's watch task failed")?;
        out.insert(node, t);
    }
    Ok(out)
}

fn phase_or_unknown(phase: &str) -> &str {
    if phase.is_empty() { "unknown" } else { phase }
}

/// The per-node table; returns (races, whether every detector's window was complete).
pub fn print_table(nodes: &BTreeMap<String, DetectorTally>) -> (u64, bool) {
    println!(
        "{:<32} {:>6} {:>12} {:>6}  DETECTOR",
        "NODE", "RACES", "CLOSED-FLOW", "LOST"
    );
    for (node, t) in nodes {
        let mut note = t.pod.clone();
        if !t.classes.is_empty() {
            let classes: Vec<String> = t.classes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            note.push_str(&format!(" ({})", classes.join(", ")));
        }
        if t.missed > 0 {
            note.push_str(&format!("; {} race(s) missed by this client", t.missed));
        }
        if let Some(e) = &t.error {
            note.push_str(&format!("; NOT WATCHED: {e}"));
        }
        println!(
            "{node:<32} {:>6} {:>12} {:>6}  {note}",
            t.races(),
            t.closed_flow,
            t.lost
        );
    }
    (
        nodes.values().map(DetectorTally::races).sum(),
        !nodes.is_empty() && nodes.values().all(DetectorTally::complete),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

    use super::*;

    #[test]
    fn verdicts_of_the_window_count_by_class_and_replayed_ones_do_not() {
        let since: jiff::Timestamp = "2026-12-01T02:00:00Z".parse().unwrap();
        let mut t = DetectorTally::default();
        for l in [
            r#"{"type":"verdict","ts_ns":1,"time":"2026-12-01T01:59:59.000001Z","verdict":{"class":"port-reuse"}}"#,
            r#"{"type":"verdict","ts_ns":2,"time":"2026-12-01T02:00:01.000001Z","verdict":{"class":"port-reuse"}}"#,
            r#"{"type":"verdict","ts_ns":3,"time":"2026-12-01T02:00:02Z","verdict":{"class":"snapshot-lag"}}"#,
            r#"{"type":"verdict","ts_ns":4,"verdict":{"class":"port-reuse"}}"#,
            r#"{"type":"confirmation","ts_ns":5,"time":"2026-12-01T02:00:03Z"}"#,
            r#"{"type":"lagged","missed":3}"#,
            "not json",
        ] {
            count_line(l, &since, &mut t);
        }
        assert_eq!(t.classes.get("port-reuse"), Some(&2));
        assert_eq!(t.classes.get("snapshot-lag"), Some(&1));
        assert_eq!(t.races(), 3);
        assert_eq!(t.missed, 3);
        assert!(!t.complete());
    }

    #[test]
    fn counter_sums_every_label_set_of_that_name_only() {
        let text = "# HELP detector_events_lost_total x\n\
                    detector_events_lost_total{kind=\"ct_new\"} 5\n\
                    detector_events_lost_total{kind=\"agent_delete\"} 2\n\
                    detector_events_lost_totalx 100\n\
                    detector_closed_flow_deletes_total 7\n";
        assert_eq!(counter_sum(text, LOST), 7);
        assert_eq!(counter_sum(text, CLOSED_FLOW), 7);
        assert_eq!(counter_sum(text, "detector_missing_total"), 0);
    }
}
