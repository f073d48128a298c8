//! Pod IP -> namespace/pod/node, from a watch on this node's pods.
//!
//! The watch is narrowed by the API server itself (`fieldSelector=spec.nodeName=NODE`), so a
//! DaemonSet pod only ever holds its own node's pods. Host-network pods share the node's
//! address and are left out: an address names a pod only when it is the pod's own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Serialize;

use crate::npa::NpaKey;

/// A pod an address of a race belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRef {
    pub ip: IpAddr,
    pub namespace: String,
    pub pod: String,
    pub node: Option<String>,
    /// For the Event's involved object; not part of verdicts.
    #[serde(skip)]
    pub uid: Option<String>,
}

/// The addresses of the pods on this node, shared between the watcher and the detector loop.
#[derive(Debug, Clone, Default)]
pub struct PodIndex {
    by_ip: Arc<RwLock<HashMap<IpAddr, PodRef>>>,
}

/// The pod's own addresses (none for host-network pods or pods without an address yet).
pub fn pod_refs(pod: &Pod) -> Vec<PodRef> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status.pod_ip.as_ref().and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips.into_iter()
        .map(|ip| PodRef {
            ip,
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            uid: pod.metadata.uid.clone(),
        })
        .collect()
}

fn same_pod(r: &PodRef, pod: &Pod) -> bool {
    r.uid == pod.metadata.uid
        && Some(&r.namespace) == pod.metadata.namespace.as_ref()
        && Some(&r.pod) == pod.metadata.name.as_ref()
}

impl PodIndex {
    pub fn lookup(&self, ip: IpAddr) -> Option<PodRef> {
        self.read().get(&ip).cloned()
    }

    /// The pods at either end of a key, source first.
    pub fn for_key(&self, key: &NpaKey) -> Vec<PodRef> {
        let map = self.read();
        let mut out: Vec<PodRef> = Vec::new();
        for ip in [key.src, key.dst] {
            if let Some(p) = map.get(&ip)
                && !out.iter().any(|o| o.ip == ip)
            {
                out.push(p.clone());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<IpAddr, PodRef>> {
        self.by_ip.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<IpAddr, PodRef>> {
        self.by_ip.write().unwrap_or_else(|e| e.into_inner())
    }

    fn upsert(map: &mut HashMap<IpAddr, PodRef>, pod: &Pod) {
        // An update may have changed the addresses: drop the pod's old ones first.
        map.retain(|_, r| !same_pod(r, pod));
        for r in pod_refs(pod) {
            map.insert(r.ip, r);
        }
    }

    /// Applies one watcher event. A re-list (`Init` .. `InitDone`) is collected in `relist`
    /// and swapped in whole at its end, so lookups never see a half-built index.
    pub fn apply(&self, relist: &mut Option<HashMap<IpAddr, PodRef>>, ev: watcher::Event<Pod>) {
        match ev {
            watcher::Event::Init => *relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(m) = relist.as_mut() {
                    Self::upsert(m, &pod);
                }
            }
            watcher::Event::InitDone => {
                if let Some(m) = relist.take() {
                    *self.write() = m;
                }
            }
            watcher::Event::Apply(pod) => Self::upsert(&mut self.write(), &pod),
            watcher::Event::Delete(pod) => self.write().retain(|_, r| !same_pod(r, &pod)),
        }
    }
}

/// The watcher's settings: only the pods scheduled on `node`.
pub fn watch_config(node: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("spec.nodeName={node}"))
}

/// Keeps `index` in step with the pods of `node` until the process ends. Errors are logged and
/// retried with backoff (the API server may restart; the index keeps its last state).
pub async fn watch_pods(client: Client, node: String, index: PodIndex) {
    let api: Api<Pod> = Api::all(client);
    let stream = watcher(api, watch_config(&node)).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut relist = None;
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => index.apply(&mut relist, ev),
            Ok(None) => break,
            Err(e) => tracing::warn!("watching the pods of node {node}: {e}; retrying"),
        }
    }
}
