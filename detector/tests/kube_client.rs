//! The client reaching a detector by itself: from a kubeconfig it finds the detector pod of a
//! node (named, or the node of a named pod) and port-forwards to it through the API server.
//!
//! The API server here is the test's own, over real HTTP on 127.0.0.1: it answers the pod
//! reads and lists (filtering by the field selector as the real one does) and the
//! port-forward upgrade as the real one speaks it (tests/common/fake_api.rs). Behind it the
//! forwarded port is a real detector HTTP server with trace files and a race on its stream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use common::DETECTOR;
use common::fake_api::{
    client, consume_head, kubeconfig, peek_head, pod, pod_list, port_forward, portforward_target,
    respond_json,
};
use detector::http::stream::{Hub, Item};
use detector::http::{router_with_traces, spawn};
use detector::telemetry::metrics::Metrics;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/traces");
const PORT: u16 = 9477;

#[derive(Default)]
struct Seen {
    /// Request lines of the plain requests.
    requests: Vec<String>,
    /// Pods port-forwarded to.
    forwards: Vec<String>,
}

async fn api_conn(mut s: TcpStream, seen: Arc<Mutex<Seen>>, backend: SocketAddr) {
    let head = peek_head(&s).await;
    let line = head.lines().next().unwrap().to_string();
    let path = line.split_whitespace().nth(1).unwrap().to_string();
    if let Some((name, query)) = portforward_target(&path, "detector") {
        let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(params, [format!("ports={PORT}")], "{line}");
        seen.lock().unwrap().forwards.push(name.to_string());
        port_forward(s, backend, PORT).await;
        return;
    }
    consume_head(&mut s, &head).await;
    seen.lock().unwrap().requests.push(line.clone());
    if path == "/api/v1/namespaces/apps/pods/web-1" {
        return respond_json(&mut s, "200 OK", &pod("apps", "web-1", "node-b")).await;
    }
    if let Some(query) = path.strip_prefix("/api/v1/namespaces/detector/pods?") {
        // The selector the client must send; the field selector filters as the server does.
        assert!(
            query.contains("labelSelector=app.kubernetes.io%2Fname%3Ddetector"),
            "{query}"
        );
        let items: Vec<Value> = [("detector-aaaaa", "node-a"), ("detector-bbbbb", "node-b")]
            .iter()
            .filter(|(_, node)| query.contains(&format!("fieldSelector=spec.nodeName%3D{node}")))
            .map(|(name, node)| pod("detector", name, node))
            .collect();
        return respond_json(&mut s, "200 OK", &pod_list(items)).await;
    }
    respond_json(&mut s, "404 Not Found", &common::fake_api::not_found()).await;
}

struct Cluster {
    seen: Arc<Mutex<Seen>>,
    hub: Arc<Hub>,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

async fn cluster(tag: &str) -> Cluster {
    let hub = Arc::new(Hub::new(10, 0, 64));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    spawn(
        listener,
        router_with_traces(
            hub.clone(),
            Arc::new(Metrics::new()),
            None,
            Some(PathBuf::from(FIXTURES)),
        ),
    );
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = api.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = api.accept().await.unwrap();
            tokio::spawn(api_conn(s, s2.clone(), backend));
        }
    });
    let dir =
        std::env::temp_dir().join(format!("detector-kube-client-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = kubeconfig(&dir, port);
    Cluster {
        seen,
        hub,
        kubeconfig,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_the_port_forward_of_the_nodes_detector() {
    let c = cluster("pull").await;
    let out = c.dir.join("traces");
    let mut cmd = client(DETECTOR, &c.kubeconfig);
    cmd.args(["traces", "pull", "--node", "node-b", "--out"])
        .arg(&out);
    let done = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{err}");
    let mut want: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.sort();
    let mut got: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, want, "{err}");
    for n in &want {
        assert_eq!(
            std::fs::read(out.join(n)).unwrap(),
            std::fs::read(Path::new(FIXTURES).join(n)).unwrap()
        );
    }
    let seen = c.seen.lock().unwrap();
    // The listing and each file, each through its own forward, all to node-b's detector.
    assert_eq!(seen.forwards.len(), want.len() + 1, "{:?}", seen.forwards);
    assert!(
        seen.forwards.iter().all(|p| p == "detector-bbbbb"),
        "{:?}",
        seen.forwards
    );
    drop(seen);
    std::fs::remove_dir_all(&c.dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_through_the_port_forward_of_a_pods_node() {
    let c = cluster("watch").await;
    c.hub.races.publish(Item {
        json: json!({"type": "verdict", "n": 42}).to_string(),
        text: "12:00:00.000042 RACE port-reuse".into(),
    });
    // Installed as a kubectl plugin: the same binary under the name kubectl runs.
    let plugin = c.dir.join("kubectl-detector");
    std::os::unix::fs::symlink(AsRef::<Path>::as_ref(&DETECTOR), &plugin).unwrap();
    let mut child = client(&plugin, &c.kubeconfig)
        .args(["watch", "--pod", "apps/web-1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        BufReader::new(stdout).read_line(&mut l).unwrap();
        l
    });
    let line = tokio::time::timeout(std::time::Duration::from_secs(30), line)
        .await
        .expect("no race through the port-forward in 30 s")
        .unwrap();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let v: Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?} {err}"));
    assert_eq!(v["n"], 42, "{status}: {err}");
    assert!(
        err.contains("node node-b: pod detector/detector-bbbbb"),
        "{err}"
    );
    let seen = c.seen.lock().unwrap();
    assert!(
        seen.requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces/apps/pods/web-1 ")),
        "{:?}",
        seen.requests
    );
    assert_eq!(seen.forwards, vec!["detector-bbbbb".to_string()]);
    drop(seen);
    std::fs::remove_dir_all(&c.dir).unwrap();
}
