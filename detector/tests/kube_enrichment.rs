//! Privileged, end to end with a stand-in Kubernetes API server on loopback: `detector run
//! --kube on` lists and watches this node's pods, puts the pods of a real race's addresses in
//! its verdict (NDJSON and trace file), and creates a Warning Event on each affected pod.
//!
//! The API server here is the test's own (plain HTTP on 127.0.0.1, named by a kubeconfig): it
//! answers /version, the pod list and watch of the node, and records Event creations.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::{Detector, NetnsPair, connect_from, privileged, start_echo_server};
use detector::npa::{Layout, NpaKey};
use serde_json::{Value, json};

#[derive(Default)]
struct Seen {
    /// Request lines (method and URI).
    requests: Vec<String>,
    /// Bodies of Event creations, with their path.
    events: Vec<(String, Value)>,
}

fn pod(ns: &str, name: &str, uid: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": "5"},
        "spec": {"nodeName": "node-t", "containers": [{"name": "c", "image": "x"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn respond(s: &mut TcpStream, status: &str, body: &Value) {
    let b = body.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{b}",
        b.len()
    );
}

fn serve_one(mut s: TcpStream, seen: Arc<Mutex<Seen>>, client_ip: String, server_ip: String) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    let mut parts = line.split_whitespace();
    let (method, uri) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    seen.lock()
        .unwrap()
        .requests
        .push(format!("{method} {uri}"));
    let path = uri.split('?').next().unwrap_or("").to_string();
    match (method.as_str(), path.as_str()) {
        ("GET", "/version") => respond(
            &mut s,
            "200 OK",
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "x",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        ),
        ("GET", "/api/v1/pods") if uri.contains("watch=true") => {
            // An open watch with nothing to say; ends when the detector goes away.
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            );
            let _ = s.flush();
            let mut sink = [0u8; 64];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
        ("GET", "/api/v1/pods") => respond(
            &mut s,
            "200 OK",
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
                    "items": [pod("default", "client", "uid-c", &client_ip),
                              pod("shop", "server", "uid-s", &server_ip)]}),
        ),
        ("POST", p) if p.ends_with("/events") => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock().unwrap().events.push((p.to_string(), v.clone()));
            respond(&mut s, "201 Created", &v);
        }
        _ => respond(
            &mut s,
            "404 Not Found",
            &json!({"kind": "Status", "code": 404}),
        ),
    }
}

fn fake_api_server(client_ip: &str, server_ip: &str) -> (u16, Arc<Mutex<Seen>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let (c, s) = (client_ip.to_string(), server_ip.to_string());
    std::thread::spawn(move || {
        for conn in l.incoming().map_while(Result::ok) {
            let (seen, c, s) = (s2.clone(), c.clone(), s.clone());
            std::thread::spawn(move || serve_one(conn, seen, c, s));
        }
    });
    (port, seen)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_race_names_its_pods_and_makes_an_event_on_each() {
    if !privileged() {
        return;
    }
    let ns = NetnsPair::new(2);
    let (port, seen) = fake_api_server(ns.client_ip, ns.server_ip);
    let dir = std::env::temp_dir().join(format!("detector-kube-e2e-{}", std::process::id()));
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
    // SAFETY: the only test of this binary; set before any thread reads the environment.
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("KUBECONFIG", &kubeconfig) };

    let fs = Bpffs::mount();
    let layout: Layout = "v4-24/16".parse().unwrap();
    let map = AgentMap::create(layout, &fs.dir.join("aws_conntrack_map"), &unique_name());
    let server = start_echo_server(&ns.server, ns.server_ip);
    let traces = dir.join("traces");
    let netns = NetnsPair::path(&ns.server);
    let det = Detector::watching(
        &map,
        Some(&netns),
        &traces,
        &[
            "--trace-after",
            "0.5",
            "--listen",
            "off",
            "--kube",
            "on",
            "--node-name",
            "node-t",
        ],
    );
    // The watch follows the list once the index is built: from then on lookups see the pods.
    wait_for("the pod watch", || {
        seen.lock()
            .unwrap()
            .requests
            .iter()
            .any(|r| r.contains("watch=true"))
    });

    // A snapshot-lag race: a live flow's key deleted right after it started.
    let a = connect_from(&ns.client, server);
    let key = NpaKey {
        src: ns.client_ip.parse().unwrap(),
        sport: a.local_addr().unwrap().port(),
        dst: server.ip(),
        dport: server.port(),
        proto: 6,
        owner: server.ip(),
        ifindex: Some(5),
    };
    map.insert(&key, 1);
    sleep(Duration::from_millis(50));
    assert_eq!(map.delete(&key), 0);
    wait_for("two Events", || seen.lock().unwrap().events.len() >= 2);
    sleep(Duration::from_millis(1000)); // the trace window closes
    let (events, stderr) = det.stop();

    let seen = seen.lock().unwrap();
    let list = seen
        .requests
        .iter()
        .find(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .expect("a pod list");
    assert!(
        list.split(['?', '&'])
            .any(|kv| kv == "fieldSelector=spec.nodeName%3Dnode-t"),
        "{list}"
    );

    let verdicts: Vec<&Value> = events.iter().filter(|e| e["type"] == "verdict").collect();
    assert_eq!(verdicts.len(), 1, "{verdicts:#?}\n{stderr}");
    let v = verdicts[0];
    let pods = json!([
        {"ip": ns.client_ip, "namespace": "default", "pod": "client", "node": "node-t"},
        {"ip": ns.server_ip, "namespace": "shop", "pod": "server", "node": "node-t"},
    ]);
    assert_eq!(v["verdict"]["pods"], pods, "{v:#}");
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(v["trace_file"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(trace["trace"]["verdict"]["pods"], pods);

    assert_eq!(
        seen.events.len(),
        2,
        "one Event per pod: {:#?}",
        seen.events
    );
    for (path, ns_name, pod_name, uid) in [
        (
            "/api/v1/namespaces/default/events",
            "default",
            "client",
            "uid-c",
        ),
        ("/api/v1/namespaces/shop/events", "shop", "server", "uid-s"),
    ] {
        let (_, ev) = seen
            .events
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("no Event at {path}: {:#?}", seen.events));
        assert_eq!(
            ev["involvedObject"],
            json!({"apiVersion": "v1", "kind": "Pod", "namespace": ns_name,
                   "name": pod_name, "uid": uid})
        );
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["reason"], "ConntrackCacheRace");
        let msg = ev["message"].as_str().unwrap();
        assert!(msg.contains("(snapshot-lag)"), "{msg}");
        assert!(
            msg.contains(&format!("{}:{} -> {}", key.src, key.sport, server)),
            "{msg}"
        );
    }
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}
