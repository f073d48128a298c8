//! kube's testing convention: a mock tower service behind `kube::Client`, asserting the exact
//! requests the detector makes and what it does with the answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use super::enrich::{self, PodIndex, PodRef};
use super::events::{self, Limiter, RaceNotice};
use crate::telemetry::metrics::Metrics;

type Mock = Handle<Request<Body>, Response<Body>>;

fn mock() -> (Client, Mock) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

fn pod(ns: &str, name: &str, uid: &str, ip: &str, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "node-a", "hostNetwork": host_network,
                 "containers": [{"name": "c", "image": "x"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

async fn next(handle: &mut Mock) -> (Request<Body>, SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(30), handle.next_request())
        .await
        .expect("the client made no request")
        .expect("the client went away")
}

fn respond(send: SendResponse<Response<Body>>, status: StatusCode, body: Vec<u8>) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(body))
            .unwrap(),
    );
}

fn query(req: &Request<Body>) -> String {
    req.uri().query().unwrap_or("").to_string()
}

/// One query parameter, exactly as sent (still percent-encoded).
fn param<'a>(q: &'a str, name: &str) -> Option<&'a str> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

#[tokio::test]
async fn pod_watch_lists_and_watches_only_this_nodes_pods_and_indexes_their_addresses() {
    let (client, mut handle) = mock();
    let index = PodIndex::default();
    let task = tokio::spawn(enrich::watch_pods(client, "node-a".into(), index.clone()));

    // 1. The initial list, narrowed by the API server to this node's pods.
    let (req, send) = next(&mut handle).await;
    println!("list:  {} {}", req.method(), req.uri());
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/pods");
    let q = query(&req);
    assert_eq!(
        param(&q, "fieldSelector"),
        Some("spec.nodeName%3Dnode-a"),
        "{q}"
    );
    assert_eq!(param(&q, "watch"), None, "{q}");
    let list = json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "100"},
        "items": [
            pod("default", "client", "uid-1", "10.0.1.2", false),
            pod("shop", "server", "uid-2", "10.0.2.2", false),
            // Host network: the node's own address names no pod.
            pod("kube-system", "aws-node", "uid-3", "192.168.1.10", true),
        ]
    });
    respond(send, StatusCode::OK, serde_json::to_vec(&list).unwrap());

    // 2. The watch from the list's version, with the same selector.
    let (req, send) = next(&mut handle).await;
    println!("watch: {} {}", req.method(), req.uri());
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/api/v1/pods");
    let q = query(&req);
    assert_eq!(param(&q, "watch"), Some("true"), "{q}");
    assert_eq!(
        param(&q, "fieldSelector"),
        Some("spec.nodeName%3Dnode-a"),
        "{q}"
    );
    assert_eq!(param(&q, "resourceVersion"), Some("100"), "{q}");
    let mut added = pod("shop", "cart", "uid-4", "10.0.3.3", false);
    added["metadata"]["resourceVersion"] = json!("101");
    let mut deleted = pod("shop", "server", "uid-2", "10.0.2.2", false);
    deleted["metadata"]["resourceVersion"] = json!("102");
    let body = format!(
        "{}\n{}\n",
        json!({"type": "ADDED", "object": added}),
        json!({"type": "DELETED", "object": deleted})
    );
    respond(send, StatusCode::OK, body.into_bytes());

    // 3. The watch ended; the next one resumes after the last event. Every event of the
    // previous watch has been applied by now (one at a time, before the stream is polled on).
    let (req, _send) = next(&mut handle).await;
    let q = query(&req);
    assert!(
        q.contains("watch=true") && q.contains("resourceVersion=102"),
        "{q}"
    );

    let client_pod = index.lookup("10.0.1.2".parse().unwrap()).expect("client");
    assert_eq!(
        client_pod,
        PodRef {
            ip: "10.0.1.2".parse().unwrap(),
            namespace: "default".into(),
            pod: "client".into(),
            node: Some("node-a".into()),
            uid: Some("uid-1".into()),
        }
    );
    assert_eq!(
        index.lookup("10.0.3.3".parse().unwrap()).map(|p| p.pod),
        Some("cart".into())
    );
    assert!(
        index.lookup("10.0.2.2".parse().unwrap()).is_none(),
        "deleted pod"
    );
    assert!(
        index.lookup("192.168.1.10".parse().unwrap()).is_none(),
        "host network"
    );
    assert_eq!(index.len(), 2);

    // The enrichment a verdict gets: both ends of its key that are pods, source first.
    let key = crate::npa::NpaKey {
        src: "10.0.3.3".parse().unwrap(),
        sport: 42000,
        dst: "10.0.1.2".parse().unwrap(),
        dport: 8080,
        proto: 6,
        owner: "10.0.1.2".parse().unwrap(),
        ifindex: None,
    };
    let pods = index.for_key(&key);
    assert_eq!(
        serde_json::to_value(&pods).unwrap(),
        json!([
            {"ip": "10.0.3.3", "namespace": "shop", "pod": "cart", "node": "node-a"},
            {"ip": "10.0.1.2", "namespace": "default", "pod": "client", "node": "node-a"},
        ])
    );
    task.abort();
}

fn pod_ref(ns: &str, name: &str, uid: &str, ip: &str) -> PodRef {
    PodRef {
        ip: ip.parse().unwrap(),
        namespace: ns.into(),
        pod: name.into(),
        node: Some("node-a".into()),
        uid: Some(uid.into()),
    }
}

fn notice(class: &'static str, pods: Vec<PodRef>) -> RaceNotice {
    RaceNotice {
        class,
        flow: "tcp 10.0.1.2:42000 -> 10.0.2.2:8080".into(),
        deleted_by: "aws-network-po/812".into(),
        trace_file: "/var/lib/detector/race-1-port-reuse.json".into(),
        pods,
    }
}

/// Reads one Event creation, checks its request line, answers 201, returns the body.
async fn event_request(handle: &mut Mock, ns: &str) -> Value {
    let (req, send) = next(handle).await;
    assert_eq!(req.method(), Method::POST);
    assert_eq!(req.uri().path(), format!("/api/v1/namespaces/{ns}/events"));
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    println!("event: POST {} {body}", ns);
    respond(send, StatusCode::CREATED, bytes.to_vec());
    body
}

#[tokio::test]
async fn each_race_makes_one_warning_event_per_pod_deduplicated_per_pod_and_class() {
    let (client, mut handle) = mock();
    let metrics = Arc::new(Metrics::new());
    let sender = events::spawn(
        client,
        "node-a".into(),
        Duration::from_secs(3600),
        metrics.clone(),
    );
    let cli = pod_ref("default", "client", "uid-1", "10.0.1.2");
    let srv = pod_ref("shop", "server", "uid-2", "10.0.2.2");
    sender.send(notice("port-reuse", vec![cli.clone(), srv.clone()]));
    // The same race class on the same pods within the interval: folded, no request.
    sender.send(notice("port-reuse", vec![cli.clone(), srv.clone()]));
    // Another class on the client pod: an Event of its own.
    sender.send(notice("snapshot-lag", vec![cli.clone()]));

    let first = event_request(&mut handle, "default").await;
    assert_eq!(
        first["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "name": "client", "namespace": "default",
               "uid": "uid-1"})
    );
    assert_eq!(first["reason"], "ConntrackCacheRace");
    assert_eq!(first["type"], "Warning");
    assert_eq!(first["count"], 1);
    assert_eq!(first["metadata"]["generateName"], "client.");
    assert_eq!(first["metadata"]["namespace"], "default");
    assert_eq!(
        first["source"],
        json!({"component": "detector", "host": "node-a"})
    );
    assert_eq!(first["reportingComponent"], "detector");
    let msg = first["message"].as_str().unwrap();
    assert!(
        msg.starts_with("conntrack cache race (port-reuse)"),
        "{msg}"
    );
    assert!(msg.contains("tcp 10.0.1.2:42000 -> 10.0.2.2:8080"), "{msg}");
    assert!(msg.contains("aws-network-po/812"), "{msg}");
    assert!(msg.contains("race-1-port-reuse.json"), "{msg}");
    assert!(first["firstTimestamp"].is_string() && first["lastTimestamp"].is_string());

    let second = event_request(&mut handle, "shop").await;
    assert_eq!(second["involvedObject"]["name"], "server");
    assert_eq!(second["involvedObject"]["uid"], "uid-2");

    // The duplicate made no request: the next one is the other class's.
    let third = event_request(&mut handle, "default").await;
    assert_eq!(third["involvedObject"]["name"], "client");
    assert!(
        third["message"]
            .as_str()
            .unwrap()
            .starts_with("conntrack cache race (snapshot-lag)"),
        "{third}"
    );

    // One more, so the third's outcome is counted when its request shows.
    sender.send(notice("stale-match", vec![srv.clone()]));
    let fourth = event_request(&mut handle, "shop").await;
    assert_eq!(fourth["involvedObject"]["name"], "server");
    let text = metrics.encode();
    assert!(
        text.contains("detector_kube_events_total{result=\"created\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("detector_kube_events_total{result=\"suppressed\"} 2\n"),
        "{text}"
    );
}

#[test]
fn limiter_folds_races_within_the_interval_and_reports_them_with_the_next_event() {
    let mut l = Limiter::new(Duration::from_secs(60));
    let p = pod_ref("default", "client", "uid-1", "10.0.1.2");
    let q = pod_ref("default", "other", "uid-9", "10.0.1.9");
    let t0 = Instant::now();
    assert_eq!(l.admit(&p, "port-reuse", t0), Some(0));
    assert_eq!(
        l.admit(&p, "port-reuse", t0 + Duration::from_secs(10)),
        None
    );
    assert_eq!(
        l.admit(&p, "port-reuse", t0 + Duration::from_secs(59)),
        None
    );
    assert_eq!(l.admit(&q, "port-reuse", t0), Some(0), "other pod");
    assert_eq!(l.admit(&p, "stale-match", t0), Some(0), "other class");
    assert_eq!(
        l.admit(&p, "port-reuse", t0 + Duration::from_secs(61)),
        Some(2),
        "two folded"
    );
    assert_eq!(
        l.admit(&p, "port-reuse", t0 + Duration::from_secs(62)),
        None
    );
}

#[test]
fn folded_races_are_counted_in_the_event() {
    let p = pod_ref("default", "client", "uid-1", "10.0.1.2");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    );
    let ev = events::race_event(&notice("port-reuse", vec![p.clone()]), &p, "node-a", 4, now);
    assert_eq!(ev.count, Some(5));
    assert!(
        ev.message
            .unwrap()
            .ends_with("(4 more race(s) of this class on this pod since the last Event)")
    );
}
