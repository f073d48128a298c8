//! Kubernetes: pod names for the addresses of races (a watch on this node's pods) and an Event
//! on each affected pod. Everything here is outside the engine: verdicts are enriched on
//! their way out.

pub mod enrich;
pub mod events;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Client;

use crate::telemetry::metrics::Metrics;
pub use enrich::{PodIndex, PodRef};
pub use events::{EventSender, RaceNotice};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeMode {
    /// On when KUBERNETES_SERVICE_HOST is set (running in a pod), off otherwise.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The Kubernetes settings of `detector run`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Kubernetes enrichment (pod names in verdicts) and Events: `auto` is on in a pod
    /// (KUBERNETES_SERVICE_HOST set), with the in-cluster configuration.
    #[arg(long, value_enum, default_value = "auto")]
    pub kube: KubeMode,
    /// The node whose pods are watched (downward API spec.nodeName); needed when kube is on.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Create a Kubernetes Event on the affected pod(s) of each race.
    #[arg(long, value_enum, default_value = "on")]
    pub kube_events: OnOff,
    /// Minimum interval between Events for the same pod and race class, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub event_interval: u64,
}

/// Kubernetes at run time.
pub struct Kube {
    pub pods: PodIndex,
    pub events: Option<EventSender>,
    pub node: String,
}

impl KubeArgs {
    fn enabled(&self) -> bool {
        match self.kube {
            KubeMode::On => true,
            KubeMode::Off => false,
            KubeMode::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        }
    }

    /// Connects when enabled; fails with the cause and the fix when the API is not usable.
    pub async fn start(&self, metrics: Arc<Metrics>) -> Result<Option<Kube>> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(node) = self.node_name.clone().filter(|n| !n.is_empty()) else {
            bail!(
                "--kube is on but the node's name is unknown: pass --node-name or set NODE_NAME \
                 (downward API fieldRef spec.nodeName), or run with --kube off"
            );
        };
        let client = Client::try_default().await.context(
            "--kube on: no Kubernetes API configuration (in-cluster service account or \
             kubeconfig); run with --kube off outside a cluster",
        )?;
        let version = tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
            .await
            .map_err(|_| anyhow::anyhow!("no answer in 10 s"))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .context(
                "--kube on: the Kubernetes API server is not reachable (check the service \
                 account and network policy, or run with --kube off)",
            )?;
        tracing::info!(
            "Kubernetes API {}.{} reachable; watching the pods of node {node}",
            version.major,
            version.minor
        );
        Ok(Some(connect(
            client,
            node,
            self.kube_events == OnOff::On,
            Duration::from_secs(self.event_interval),
            metrics,
        )))
    }
}

/// Starts the pod watch (and the Event task) on `client`.
pub fn connect(
    client: Client,
    node: String,
    events: bool,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> Kube {
    let pods = PodIndex::default();
    tokio::spawn(enrich::watch_pods(
        client.clone(),
        node.clone(),
        pods.clone(),
    ));
    let events = events.then(|| events::spawn(client, node.clone(), interval, metrics));
    Kube { pods, events, node }
}

#[cfg(test)]
mod tests;
