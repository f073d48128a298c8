//! `detector cluster-verdict` against a fake API server over real HTTP (kubeconfig, bearer
//! token): exit 1 when it serves race Events, 0 when it serves none (closed-flow deletes apart)
//! and the reproducer's log shows reused ports, 1 when no port was reused. With `--from
//! detectors`, the races come from each node's real detector HTTP server reached through the
//! fake API server's port-forward (tests/common/fake_api.rs): 1 when a detector streams a race
//! of the window, 0 when none does, 1 when a node's detector is not running.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{DETECTOR, fake_api};
use detector::engine::Stats;
use detector::http;
use detector::http::stream::{Hub, Item};
use detector::kernel::CounterSnapshot;
use detector::telemetry::metrics::Metrics;
use serde_json::{Value, json};

fn race_event(node: &str, class: &str, count: i32) -> Value {
    let now = jiff::Timestamp::now().to_string();
    json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"namespace": "race-lab", "name": format!("web.{node}{class}")},
        "involvedObject": {"kind": "Pod", "namespace": "race-lab", "name": "web"},
        "reason": "ConntrackCacheRace", "type": "Warning", "count": count,
        "message": format!("conntrack cache race ({class}): the network policy agent deleted ..."),
        "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": "detector", "host": node}, "reportingInstance": node
    })
}

fn serve(events: Vec<Value>, log: String) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s: TcpStream = s.unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let (ctype, body) = if path.starts_with("/api/v1/events?")
                && path.contains("fieldSelector=reason%3DConntrackCacheRace")
            {
                let list = json!({"apiVersion": "v1", "kind": "EventList",
                    "metadata": {"resourceVersion": "3"}, "items": events});
                ("application/json", list.to_string())
            } else if path.starts_with("/api/v1/namespaces/race-lab/pods?")
                && path.contains("labelSelector=app.kubernetes.io%2Fname%3Drace-reproducer")
            {
                let list = json!({"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": "3"}, "items": [{
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"namespace": "race-lab", "name": "race-reproducer-1"},
                    "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]}}]});
                ("application/json", list.to_string())
            } else if path.starts_with("/api/v1/namespaces/race-lab/pods/race-reproducer-1/log") {
                ("text/plain", log.clone())
            } else {
                (
                    "application/json",
                    json!({"kind": "Status", "code": 404}).to_string(),
                )
            };
            let status = if body.contains("\"code\":404") {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn verdict(tag: &str, events: Vec<Value>, log: &str) -> (i32, String) {
    let port = serve(events, log.to_string());
    let dir: PathBuf =
        std::env::temp_dir().join(format!("detector-cluster-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: \
             http://127.0.0.1:{port}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    \
             user: t\ncurrent-context: t\nusers:\n- name: t\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let out = Command::new(DETECTOR)
        .args(["cluster-verdict", "--duration", "0"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), text)
}

const CYCLES: &str = "{\"event\": \"start\"}\n\
    {\"event\": \"cycle\", \"cycle\": 0, \"reused\": 4, \"failed\": 0}\n\
    {\"event\": \"cycle\", \"cycle\": 1, \"reused\": 3, \"failed\": 0}\n";

#[test]
fn races_fail_the_cluster_and_their_nodes_are_named() {
    let (code, text) = verdict(
        "legacy",
        vec![
            race_event("node-a", "port-reuse", 3),
            race_event("node-b", "port-reuse", 1),
            race_event("node-b", "closed-flow", 5),
        ],
        CYCLES,
    );
    assert_eq!(code, 1, "{text}");
    let row = |node: &str| {
        text.lines()
            .find(|l| l.starts_with(node))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>())
    };
    assert_eq!(row("node-a"), Some(vec!["3", "0"]), "{text}");
    assert_eq!(row("node-b"), Some(vec!["1", "5"]), "{text}");
    assert!(
        text.contains("2 cycles, 7 ports reused; races: 4"),
        "{text}"
    );
    assert!(text.contains("FAIL (races happened)"), "{text}");
}

#[test]
fn no_race_with_reused_ports_passes_closed_flow_deletes_apart() {
    let (code, text) = verdict(
        "fixed",
        vec![race_event("node-b", "closed-flow", 2)],
        CYCLES,
    );
    assert_eq!(code, 0, "{text}");
    let node_b = text.lines().find(|l| l.starts_with("node-b")).unwrap_or("");
    assert_eq!(
        node_b.split_whitespace().collect::<Vec<_>>(),
        ["node-b", "0", "2"],
        "{text}"
    );
    assert!(text.contains("races: 0"), "{text}");
    assert!(text.contains("PASS"), "{text}");
}

#[test]
fn no_reused_port_proves_nothing() {
    let (code, text) = verdict("idle", vec![], "{\"event\": \"cycle\", \"reused\": 0}\n");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no port was reused"), "{text}");
}

/// A node's detector behind the fake API server's port-forward: a real detector HTTP server
/// over its own hub and metrics.
struct NodeDetector {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
}

async fn node_detector() -> NodeDetector {
    let hub = Arc::new(Hub::new(10, 0, 64));
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    http::spawn(listener, http::router(hub.clone(), metrics.clone(), None));
    NodeDetector { hub, metrics, addr }
}

/// A race on a detector's stream, as `detector run` publishes it, decided at `time`.
fn race_item(time: jiff::Timestamp, class: &str) -> Item {
    Item {
        json: json!({"type": "verdict", "ts_ns": 1, "time": format!("{time:.6}"),
            "verdict": {"class": class, "kind": "wrongful_delete"}})
        .to_string(),
        text: format!("RACE {class}"),
    }
}

/// The fake API server of a cluster whose detector pods are `detectors` (name, node, phase,
/// backend); returns its port and the pods port-forwarded to.
async fn detectors_api(
    detectors: Vec<(&'static str, &'static str, &'static str, SocketAddr)>,
    log: &'static str,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = api.local_addr().unwrap().port();
    let forwards = Arc::new(Mutex::new(Vec::new()));
    let f2 = forwards.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = api.accept().await.unwrap();
            let detectors = detectors.clone();
            let forwards = f2.clone();
            tokio::spawn(async move {
                let head = fake_api::peek_head(&s).await;
                let line = head.lines().next().unwrap().to_string();
                let path = line.split_whitespace().nth(1).unwrap().to_string();
                if let Some((name, query)) = fake_api::portforward_target(&path, "detector") {
                    let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
                    assert_eq!(params, ["ports=9477"], "{line}");
                    let (_, _, _, backend) =
                        *detectors.iter().find(|d| d.0 == name).expect("a known pod");
                    forwards.lock().unwrap().push(name.to_string());
                    return fake_api::port_forward(s, backend, 9477).await;
                }
                fake_api::consume_head(&mut s, &head).await;
                if let Some(query) = path.strip_prefix("/api/v1/namespaces/detector/pods?") {
                    assert!(
                        query.contains("labelSelector=app.kubernetes.io%2Fname%3Ddetector"),
                        "{query}"
                    );
                    let items = detectors
                        .iter()
                        .map(|(name, node, phase, _)| {
                            fake_api::pod_in_phase("detector", name, node, phase)
                        })
                        .collect();
                    let list = fake_api::pod_list(items);
                    return fake_api::respond_json(&mut s, "200 OK", &list).await;
                }
                if path.starts_with("/api/v1/namespaces/race-lab/pods?") {
                    let list = fake_api::pod_list(vec![fake_api::pod(
                        "race-lab",
                        "race-reproducer-1",
                        "node-a",
                    )]);
                    return fake_api::respond_json(&mut s, "200 OK", &list).await;
                }
                if path.starts_with("/api/v1/namespaces/race-lab/pods/race-reproducer-1/log") {
                    return fake_api::respond(&mut s, "200 OK", "text/plain", log).await;
                }
                fake_api::respond_json(&mut s, "404 Not Found", &fake_api::not_found()).await;
            });
        }
    });
    (port, forwards)
}

/// What happens on a node while the verdict watches it.
#[derive(Clone, Copy)]
struct During {
    races: u64,
    closed_flow: u64,
}

/// `cluster-verdict --from detectors --duration 6` against nodes a and b (and a pending pod on
/// node c when `pending`): once the client streams from both, `during` happens on each; an
/// older race (before the window) sits in node b's replay ring from the start.
async fn verdict_from_detectors(
    tag: &str,
    during: [During; 2],
    pending: bool,
) -> (i32, String, Vec<String>) {
    let nodes = [node_detector().await, node_detector().await];
    let old = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(120);
    nodes[1].hub.races.publish(race_item(old, "port-reuse"));
    let mut pods = vec![
        ("detector-aaaaa", "node-a", "Running", nodes[0].addr),
        ("detector-bbbbb", "node-b", "Running", nodes[1].addr),
    ];
    if pending {
        pods.push(("detector-ccccc", "node-c", "Pending", nodes[0].addr));
    }
    let (port, forwards) = detectors_api(pods, CYCLES).await;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("detector-cluster-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = fake_api::client(DETECTOR, &fake_api::kubeconfig(&dir, port));
    cmd.args(["cluster-verdict", "--from", "detectors", "--duration", "6"]);
    let run = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while nodes.iter().any(|n| n.hub.races.clients() == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the verdict did not stream from both detectors within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for (n, d) in nodes.iter().zip(during) {
        for _ in 0..d.races {
            n.hub
                .races
                .publish(race_item(jiff::Timestamp::now(), "port-reuse"));
        }
        let mut stats = Stats::default();
        stats.deletes.closed_flow = d.closed_flow;
        n.metrics.update(&stats, &CounterSnapshot::default());
    }
    let out = run.await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- cluster-verdict --from detectors ({tag}):\n{text}");
    let mut forwarded = forwards.lock().unwrap().clone();
    forwarded.sort();
    forwarded.dedup();
    (out.status.code().unwrap(), text, forwarded)
}

/// The NODE row's RACES, CLOSED-FLOW and LOST columns.
fn detector_row(text: &str, node: &str) -> Vec<String> {
    text.lines()
        .find(|l| l.starts_with(node))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(3)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_races_fail_a_legacy_cluster_through_the_port_forward() {
    let (code, text, forwarded) = verdict_from_detectors(
        "det-legacy",
        [
            During {
                races: 0,
                closed_flow: 2,
            },
            During {
                races: 2,
                closed_flow: 0,
            },
        ],
        false,
    )
    .await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(forwarded, ["detector-aaaaa", "detector-bbbbb"], "{text}");
    assert_eq!(detector_row(&text, "node-a"), ["0", "2", "0"], "{text}");
    // The race from before the window, replayed on connect, is not counted.
    assert_eq!(detector_row(&text, "node-b"), ["2", "0", "0"], "{text}");
    assert!(text.contains("detector-bbbbb (port-reuse 2)"), "{text}");
    assert!(text.contains("7 ports reused; races: 2"), "{text}");
    assert!(text.contains("FAIL (races happened)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_without_races_pass_a_fixed_cluster_closed_flow_deletes_apart() {
    let (code, text, forwarded) = verdict_from_detectors(
        "det-fixed",
        [
            During {
                races: 0,
                closed_flow: 3,
            },
            During {
                races: 0,
                closed_flow: 1,
            },
        ],
        false,
    )
    .await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(forwarded, ["detector-aaaaa", "detector-bbbbb"], "{text}");
    assert_eq!(detector_row(&text, "node-a"), ["0", "3", "0"], "{text}");
    assert_eq!(detector_row(&text, "node-b"), ["0", "1", "0"], "{text}");
    assert!(text.contains("races: 0"), "{text}");
    assert!(text.contains("PASS"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_detector_is_not_running_fails_the_cluster() {
    let quiet = During {
        races: 0,
        closed_flow: 0,
    };
    let (code, text, _) = verdict_from_detectors("det-pending", [quiet, quiet], true).await;
    assert_eq!(code, 1, "{text}");
    let node_c = text.lines().find(|l| l.starts_with("node-c")).unwrap_or("");
    assert!(node_c.contains("NOT WATCHED: pod is Pending"), "{text}");
    assert!(text.contains("was not watched"), "{text}");
}
