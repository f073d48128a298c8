//! The client reaching a detector by itself: from a kubeconfig it finds the detector pod of a
//! node (named, or the node of a named pod) and port-forwards to it through the API server.
//!
//! The API server here is the test's own, over real HTTP on 127.0.0.1: it answers the pod
//! reads and lists (filtering by the field selector as the real one does) and the
//! port-forward upgrade as the real one speaks it (websocket, `v4.channel.k8s.io`: data
//! channel 0 and error channel 1, each message prefixed by its channel byte, the first one of
//! each carrying the port in 2 little-endian bytes). Behind it the forwarded port is a real
//! detector HTTP server with trace files and a race on its stream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::DETECTOR;
use detector::http::stream::{Hub, Item};
use detector::http::{router_with_traces, spawn};
use detector::telemetry::metrics::Metrics;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/traces");
const PORT: u16 = 9477;

#[derive(Default)]
struct Seen {
    /// Request lines of the plain requests.
    requests: Vec<String>,
    /// Pods port-forwarded to.
    forwards: Vec<String>,
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": "7"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9"}
    })
}

async fn respond(s: &mut TcpStream, status: &str, body: &Value) {
    let b = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        b.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b.as_bytes()).await.unwrap();
    s.shutdown().await.ok();
}

/// The request head, peeked (left unread for the websocket handshake).
async fn peek_head(s: &TcpStream) -> String {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = s.peek(&mut buf).await.unwrap();
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..end + 4]).to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn api_conn(mut s: TcpStream, seen: Arc<Mutex<Seen>>, backend: SocketAddr) {
    let head = peek_head(&s).await;
    let line = head.lines().next().unwrap().to_string();
    let path = line.split_whitespace().nth(1).unwrap().to_string();
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/detector/pods/")
        && let Some((name, query)) = rest.split_once("/portforward?")
    {
        let params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        assert_eq!(params, [format!("ports={PORT}")], "{line}");
        seen.lock().unwrap().forwards.push(name.to_string());
        port_forward(s, backend).await;
        return;
    }
    let mut discard = vec![0u8; head.len()];
    s.read_exact(&mut discard).await.unwrap();
    seen.lock().unwrap().requests.push(line.clone());
    if path == "/api/v1/namespaces/apps/pods/web-1" {
        return respond(&mut s, "200 OK", &pod("apps", "web-1", "node-b")).await;
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
        let list = json!({"apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "7"}, "items": items});
        return respond(&mut s, "200 OK", &list).await;
    }
    respond(
        &mut s,
        "404 Not Found",
        &json!({"kind": "Status", "code": 404}),
    )
    .await;
}

/// The API server's side of a port-forward: the websocket upgrade with the v4 channel
/// protocol, then bytes between data channel 0 and a TCP connection to `backend`.
#[allow(
    clippy::result_large_err,
    reason = "the handshake callback's error type is tungstenite's"
)]
async fn port_forward(s: TcpStream, backend: SocketAddr) {
    let ws = tokio_tungstenite::accept_hdr_async(s, |req: &Request, mut resp: Response| {
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(offered.contains("v4.channel.k8s.io"), "offered {offered:?}");
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            "v4.channel.k8s.io".parse().unwrap(),
        );
        Ok(resp)
    })
    .await
    .unwrap();
    let (mut ws_tx, mut ws_rx) = ws.split();
    let port = PORT.to_le_bytes();
    ws_tx
        .send(Message::binary(vec![0, port[0], port[1]]))
        .await
        .unwrap();
    ws_tx
        .send(Message::binary(vec![1, port[0], port[1]]))
        .await
        .unwrap();
    let (mut be_rx, mut be_tx) = TcpStream::connect(backend).await.unwrap().into_split();
    let to_backend = async move {
        while let Some(Ok(m)) = ws_rx.next().await {
            match m {
                Message::Binary(b) if b.first() == Some(&0) => {
                    if be_tx.write_all(&b[1..]).await.is_err() {
                        break;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        be_tx.shutdown().await.ok();
    };
    let from_backend = async move {
        let mut buf = vec![0u8; 16384];
        loop {
            let n = be_rx.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut m = vec![0u8];
            m.extend_from_slice(&buf[..n]);
            if ws_tx.send(Message::binary(m)).await.is_err() {
                return;
            }
        }
        ws_tx.close().await.ok();
    };
    tokio::join!(to_backend, from_backend);
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
    Cluster {
        seen,
        hub,
        kubeconfig,
        dir,
    }
}

fn client(bin: &Path, kubeconfig: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_the_port_forward_of_the_nodes_detector() {
    let c = cluster("pull").await;
    let out = c.dir.join("traces");
    let mut cmd = client(DETECTOR.as_ref(), &c.kubeconfig);
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
