//! `detector cluster-verdict`: the cluster form of `detector validate`. Over a duration it
//! gathers every node's races, from the detectors' `ConntrackCacheRace` Events (`--from
//! events`) or from each detector's `/v1/races` through the API server's port-forward
//! (`--from detectors`, cluster_races.rs), and the reproducer's cycles from its pods' logs,
//! and passes only if ports were reused and no race happened.
//!
//! Closed-flow deletes (the agent deleting the key of a flow that had already ended) are not
//! races of a live flow: an Event whose class names a closed flow (`closed` in the class, as
//! in `closed-flow`) is listed apart and does not fail the verdict.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::Client;
use kube::api::{Api, ListParams, LogParams};

use crate::k8s::events::REASON;

/// Where the races come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The `ConntrackCacheRace` Events the detectors post (`--kube`, at most one per pod and
    /// class per `--event-interval`, counts folded in).
    Events,
    /// Each detector's `/v1/races` stream and `/metrics`, through the API server's
    /// port-forward: every race, plus the closed-flow deletes and lost records of each node.
    Detectors,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterVerdictArgs {
    /// Seconds to watch the cluster run before judging it (the Events and logs of that window).
    #[arg(long, value_name = "SECS")]
    pub duration: u64,
    /// Where the races come from.
    #[arg(long, value_enum, default_value = "events")]
    pub from: Source,
    #[command(flatten)]
    pub detectors: super::cluster_races::DetectorsArgs,
    /// Namespace of the reproducer.
    #[arg(long, default_value = "race-lab", value_name = "NS")]
    pub reproducer_namespace: String,
    /// Label selector of the reproducer pods.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=race-reproducer",
        value_name = "SELECTOR"
    )]
    pub reproducer_selector: String,
}

/// Races of one node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeRaces {
    /// Race Events (each may fold several races: its `count`).
    pub races: u64,
    /// Closed-flow deletes, not counted against the run.
    pub closed_flow: u64,
}

/// The class in a race Event's message: `conntrack cache race (CLASS): ...`.
fn class_of(message: &str) -> &str {
    message
        .split_once("race (")
        .and_then(|(_, r)| r.split_once(')'))
        .map_or("unknown", |(c, _)| c)
}

/// Per-node races from the Events that fell inside the window (after `since`).
pub fn tally(events: &[Event], since: &jiff::Timestamp) -> BTreeMap<String, NodeRaces> {
    let mut nodes: BTreeMap<String, NodeRaces> = BTreeMap::new();
    for e in events {
        if e.reason.as_deref() != Some(REASON) {
            continue;
        }
        let last = e.last_timestamp.as_ref().map(|t| t.0);
        if last.is_some_and(|t| t < *since) {
            continue;
        }
        let node = e
            .reporting_instance
            .clone()
            .or_else(|| e.source.as_ref().and_then(|s| s.host.clone()))
            .unwrap_or_else(|| "unknown".into());
        let n = u64::try_from(e.count.unwrap_or(1).max(1)).unwrap_or(1);
        let entry = nodes.entry(node).or_default();
        if class_of(e.message.as_deref().unwrap_or("")).contains("closed") {
            entry.closed_flow += n;
        } else {
            entry.races += n;
        }
    }
    nodes
}

/// Cycles and reused ports in reproducer log lines (`{"event": "cycle", "reused": N, ...}`).
pub fn cycles(log: &str) -> (u64, u64) {
    let mut out = (0, 0);
    for l in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["event"] == "cycle" {
            out.0 += 1;
            out.1 += v["reused"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// Runs the verdict; true when the run passed.
pub async fn run(args: ClusterVerdictArgs) -> Result<bool> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (KUBECONFIG or ~/.kube/config)")?;
    // Event times have whole-second resolution: the window starts at the second before now
    // (for the detectors' races too, so both sources judge the same window).
    let since = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 1)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let duration = Duration::from_secs(args.duration);
    let (races, complete) = match args.from {
        Source::Events => {
            crate::note!(
                "detector cluster-verdict: watching for {} s (race Events of every node, \
                 reproducer {}/{})",
                args.duration,
                args.reproducer_namespace,
                args.reproducer_selector
            );
            tokio::time::sleep(duration).await;
            let events: Api<Event> = Api::all(client.clone());
            let listed = events
                .list(&ListParams::default().fields(&format!("reason={REASON}")))
                .await
                .context("listing the ConntrackCacheRace Events")?;
            let nodes = tally(&listed.items, &since);
            println!("{:<32} {:>6} {:>12}", "NODE", "RACES", "CLOSED-FLOW");
            for (node, n) in &nodes {
                println!("{node:<32} {:>6} {:>12}", n.races, n.closed_flow);
            }
            (nodes.values().map(|n| n.races).sum(), true)
        }
        Source::Detectors => {
            let nodes =
                super::cluster_races::gather(client.clone(), &args.detectors, since, duration)
                    .await?;
            super::cluster_races::print_table(&nodes)
        }
    };
    let cyc = reproducer_cycles(client, &args).await?;
    println!(
        "reproducer: {} cycles, {} ports reused; races: {races}",
        cyc.0, cyc.1
    );
    let pass = cyc.1 > 0 && races == 0 && complete;
    println!(
        "verdict: {}",
        if pass {
            "PASS (ports were reused and no race happened)"
        } else if races > 0 {
            "FAIL (races happened)"
        } else if !complete {
            "FAIL (a node's detector was not watched for the whole window, or lost records: \
             a race may have gone unseen)"
        } else {
            "FAIL (no port was reused: the run proves nothing)"
        }
    );
    Ok(pass)
}

/// Cycles and reused ports in the reproducer pods' logs of the window.
async fn reproducer_cycles(client: Client, args: &ClusterVerdictArgs) -> Result<(u64, u64)> {
    let pods: Api<Pod> = Api::namespaced(client, &args.reproducer_namespace);
    let mut cyc = (0u64, 0u64);
    for p in pods
        .list(&ListParams::default().labels(&args.reproducer_selector))
        .await
        .context("listing the reproducer pods")?
        .items
    {
        let Some(name) = p.metadata.name else {
            continue;
        };
        let lp = LogParams {
            since_seconds: Some(i64::try_from(args.duration.max(1)).unwrap_or(i64::MAX)),
            ..LogParams::default()
        };
        let log = pods
            .logs(&name, &lp)
            .await
            .with_context(|| format!("reading the log of reproducer pod {name}"))?;
        let (c, r) = cycles(&log);
        cyc.0 += c;
        cyc.1 += r;
    }
    Ok(cyc)
}
