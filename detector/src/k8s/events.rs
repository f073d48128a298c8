//! A Kubernetes Event (core/v1) on each pod a race affects, so `kubectl describe pod` shows it.
//!
//! Deduplicated and rate limited per pod and class: at most one Event per `--event-interval`;
//! races in between are counted and the next Event says how many were folded into it. Events
//! are sent from their own task through a bounded queue: a slow API server never holds up the
//! detector (a full queue drops the notice and counts it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::enrich::PodRef;
use crate::telemetry::metrics::Metrics;

/// The Event's reason (one word, as Kubernetes wants it).
pub const REASON: &str = "ConntrackCacheRace";
/// Who reports the Events.
pub const COMPONENT: &str = "detector";

/// What an Event needs to know of a race.
#[derive(Debug, Clone)]
pub struct RaceNotice {
    pub class: &'static str,
    /// `tcp 10.0.0.1:42000 -> 10.0.0.2:8080`
    pub flow: String,
    /// `comm/pid` of the deleting task.
    pub deleted_by: String,
    pub trace_file: String,
    pub pods: Vec<PodRef>,
}

/// One Event per pod and class per interval.
pub struct Limiter {
    interval: Duration,
    /// (namespace, pod, class) -> when the last Event was sent, races folded since.
    last: HashMap<(String, String, &'static str), (Instant, u64)>,
}

impl Limiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// `Some(folded)` when an Event may be sent now (`folded`: races suppressed since the
    /// last one), `None` when this race is folded into the next.
    pub fn admit(&mut self, pod: &PodRef, class: &'static str, now: Instant) -> Option<u64> {
        // Forget pods whose interval has long passed, so the table stays small.
        if self.last.len() > 4096 {
            let keep = self.interval;
            self.last
                .retain(|_, (t, n)| *n > 0 || now.duration_since(*t) < keep);
        }
        let k = (pod.namespace.clone(), pod.pod.clone(), class);
        match self.last.get_mut(&k) {
            Some((t, n)) if now.duration_since(*t) < self.interval => {
                *n += 1;
                None
            }
            Some((t, n)) => {
                let folded = *n;
                *t = now;
                *n = 0;
                Some(folded)
            }
            None => {
                self.last.insert(k, (now, 0));
                Some(0)
            }
        }
    }
}

/// The Event for one race on one pod.
pub fn race_event(n: &RaceNotice, pod: &PodRef, node: &str, folded: u64, now: Time) -> Event {
    let mut message = format!(
        "conntrack cache race ({}): the network policy agent ({}) deleted the key of live \
         flow {} ({} is this pod); its replies can now be denied by policy. \
         Trace: {}",
        n.class, n.deleted_by, n.flow, pod.ip, n.trace_file
    );
    if folded > 0 {
        message.push_str(&format!(
            " ({folded} more race(s) of this class on this pod since the last Event)"
        ));
    }
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.pod)),
            namespace: Some(pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.pod.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: pod.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(REASON.into()),
        message: Some(message),
        type_: Some("Warning".into()),
        action: Some("Delete".into()),
        count: Some(i32::try_from(folded + 1).unwrap_or(i32::MAX)),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.into()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.into()),
        ..Event::default()
    }
}

/// The detector loop's end of the Event queue.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::Sender<RaceNotice>,
    metrics: Arc<Metrics>,
}

impl EventSender {
    /// Queues a race; never waits.
    pub fn send(&self, n: RaceNotice) {
        if n.pods.is_empty() {
            return;
        }
        if self.tx.try_send(n).is_err() {
            self.metrics.kube_event("dropped");
            tracing::warn!("Kubernetes Event queue full: a race's Event was dropped");
        }
    }
}

/// Starts the task that creates the Events.
pub fn spawn(
    client: Client,
    node: String,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> EventSender {
    let (tx, mut rx) = mpsc::channel::<RaceNotice>(1024);
    let m = metrics.clone();
    tokio::spawn(async move {
        let mut limiter = Limiter::new(interval);
        while let Some(n) = rx.recv().await {
            for pod in &n.pods {
                let Some(folded) = limiter.admit(pod, n.class, Instant::now()) else {
                    m.kube_event("suppressed");
                    continue;
                };
                let now = Time(k8s_openapi::jiff::Timestamp::now());
                let ev = race_event(&n, pod, &node, folded, now);
                let api: Api<Event> = Api::namespaced(client.clone(), &pod.namespace);
                match api.create(&PostParams::default(), &ev).await {
                    Ok(_) => m.kube_event("created"),
                    Err(e) => {
                        m.kube_event("failed");
                        tracing::warn!(
                            "creating an Event on pod {}/{}: {e} (the service account needs \
                             `create` on events)",
                            pod.namespace,
                            pod.pod
                        );
                    }
                }
            }
        }
    });
    EventSender { tx, metrics }
}
