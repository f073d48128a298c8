//! Reaching a cluster's detector without `kubectl port-forward`: find the detector pod on a
//! node (named, or the node of a named pod) through the kubeconfig's API server, and forward a
//! local loopback port to its HTTP server through the API server's port-forward (websocket,
//! `v4.channel.k8s.io`). The client commands then talk to `http://127.0.0.1:PORT` as to any
//! `--url`.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::net::TcpListener;

/// Where the detector pod is, for the commands that reach it through the API server.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeTarget {
    /// Reach the detector on this node through the kubeconfig's API server (port-forward).
    #[arg(long, value_name = "NODE", conflicts_with = "pod")]
    pub node: Option<String>,
    /// Reach the detector on the node of this pod (NAMESPACE/NAME).
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    #[command(flatten)]
    pub detectors: DetectorPods,
}

/// Which pods are the detectors and where they serve: the flags of every command that reaches
/// them through the API server (one node's, or all of them for `cluster-verdict`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DetectorPods {
    /// Namespace of the detector DaemonSet.
    #[arg(long, default_value = "detector", value_name = "NS")]
    pub detector_namespace: String,
    /// Label selector of the detector pods.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=detector",
        value_name = "SELECTOR"
    )]
    pub detector_selector: String,
    /// The detectors' HTTP port in their pods.
    #[arg(long, default_value_t = 9477, value_name = "PORT")]
    pub detector_port: u16,
}

impl KubeTarget {
    pub fn wanted(&self) -> bool {
        self.node.is_some() || self.pod.is_some()
    }

    /// The node to reach.
    async fn node(&self, client: &Client) -> Result<String> {
        if let Some(n) = &self.node {
            return Ok(n.clone());
        }
        let Some((ns, name)) = self.pod.as_deref().and_then(|p| p.split_once('/')) else {
            bail!("--pod wants NAMESPACE/NAME");
        };
        let pod = Api::<Pod>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .with_context(|| format!("--pod {ns}/{name}: cannot read it"))?;
        pod.spec
            .and_then(|s| s.node_name)
            .with_context(|| format!("--pod {ns}/{name} is not scheduled on a node yet"))
    }

    /// Finds the detector pod and serves a local port forwarded to it; returns its URL. The
    /// forwarder runs for the rest of the process.
    pub async fn forward(&self) -> Result<String> {
        let client = Client::try_default()
            .await
            .context("no Kubernetes configuration (KUBECONFIG or ~/.kube/config)")?;
        let node = self.node(&client).await?;
        let pods: Api<Pod> = Api::namespaced(client, &self.detectors.detector_namespace);
        let lp = ListParams::default()
            .labels(&self.detectors.detector_selector)
            .fields(&format!("spec.nodeName={node}"));
        let list = pods.list(&lp).await.with_context(|| {
            format!(
                "listing the detector pods ({}) in namespace {}",
                self.detectors.detector_selector, self.detectors.detector_namespace
            )
        })?;
        let running = list
            .items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        let Some(name) = running.and_then(|p| p.metadata.name) else {
            bail!(
                "no running detector pod ({}) on node {node} in namespace {}",
                self.detectors.detector_selector,
                self.detectors.detector_namespace
            );
        };
        crate::note!(
            "detector: node {node}: pod {}/{name}, port {} forwarded through the API server",
            self.detectors.detector_namespace,
            self.detectors.detector_port
        );
        forward_to_pod(pods, name, self.detectors.detector_port).await
    }
}

/// Serves a local loopback port forwarded to `port` of pod `name` (one port-forward per
/// local connection) for the rest of the process; returns its URL.
pub async fn forward_to_pod(pods: Api<Pod>, name: String, port: u16) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?;
    tracing::info!("forwarding {local} to pod {name}:{port}");
    tokio::spawn(serve(listener, pods, name, port));
    Ok(format!("http://{local}"))
}

/// One port-forward per local connection, bytes copied both ways until either side closes.
async fn serve(listener: TcpListener, pods: Api<Pod>, pod: String, port: u16) {
    loop {
        let Ok((mut local, _)) = listener.accept().await else {
            return;
        };
        let pods = pods.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let mut pf = match pods.portforward(&pod, &[port]).await {
                Ok(pf) => pf,
                Err(e) => {
                    tracing::warn!("port-forward to {pod}:{port}: {e}");
                    return;
                }
            };
            let Some(mut remote) = pf.take_stream(port) else {
                return;
            };
            if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                tracing::debug!("port-forward to {pod}:{port} ended: {e}");
            }
            drop(remote);
            let _ = pf.join().await;
        });
    }
}
