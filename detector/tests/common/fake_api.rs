//! Pieces of a fake Kubernetes API server over real HTTP on 127.0.0.1, for the client tests:
//! JSON answers, pods, a kubeconfig pointing at it, and the port-forward upgrade as the real
//! one speaks it (websocket, `v4.channel.k8s.io`: data channel 0 and error channel 1, each
//! message prefixed by its channel byte, the first one of each carrying the port in 2
//! little-endian bytes), bridged to a real TCP backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A running pod on `node`.
pub fn pod(ns: &str, name: &str, node: &str) -> Value {
    pod_in_phase(ns, name, node, "Running")
}

pub fn pod_in_phase(ns: &str, name: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "resourceVersion": "7"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": phase, "podIP": "10.0.0.9"}
    })
}

pub fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"},
        "items": items})
}

pub fn not_found() -> Value {
    json!({"kind": "Status", "code": 404})
}

/// Answers with `body` and closes the connection.
pub async fn respond(s: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    s.shutdown().await.ok();
}

pub async fn respond_json(s: &mut TcpStream, status: &str, body: &Value) {
    respond(s, status, "application/json", &body.to_string()).await;
}

/// The request head, peeked (left unread for the websocket handshake).
pub async fn peek_head(s: &TcpStream) -> String {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = s.peek(&mut buf).await.unwrap();
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..end + 4]).to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Reads the peeked head off the connection (for a plain request).
pub async fn consume_head(s: &mut TcpStream, head: &str) {
    let mut discard = vec![0u8; head.len()];
    s.read_exact(&mut discard).await.unwrap();
}

/// The pod name and query of a port-forward request to `namespace`, if `path` is one.
pub fn portforward_target<'a>(path: &'a str, namespace: &str) -> Option<(&'a str, &'a str)> {
    path.strip_prefix(&format!("/api/v1/namespaces/{namespace}/pods/"))
        .and_then(|rest| rest.split_once("/portforward?"))
}

/// The API server's side of a port-forward of `port`: the websocket upgrade with the v4
/// channel protocol, then bytes between data channel 0 and a TCP connection to `backend`.
#[allow(
    clippy::result_large_err,
    reason = "the handshake callback's error type is tungstenite's"
)]
pub async fn port_forward(s: TcpStream, backend: SocketAddr, port: u16) {
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
    let port = port.to_le_bytes();
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

/// A kubeconfig in `dir` for the API server on 127.0.0.1:`port`, with a bearer token.
pub fn kubeconfig(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: \
             http://127.0.0.1:{port}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    \
             user: t\ncurrent-context: t\nusers:\n- name: t\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    path
}

/// A client command that reaches only the fake API server (no proxy, no in-cluster config).
pub fn client(bin: impl AsRef<std::ffi::OsStr>, kubeconfig: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy");
    c
}
