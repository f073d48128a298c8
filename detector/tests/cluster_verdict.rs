//! `detector cluster-verdict` against a fake API server over real HTTP (kubeconfig, bearer
//! token): exit 1 when it serves race Events, 0 when it serves none (closed-flow deletes apart)
//! and the reproducer's log shows reused ports, 1 when no port was reused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;

use common::DETECTOR;
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
