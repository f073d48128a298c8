//! `/v1/traces` over real TCP and `detector traces pull`: the listing names exactly the
//! detector's trace files (newest first, with class and size), a file comes back byte for
//! byte, names outside the listing (traversal, hidden temporaries, links) are refused, the
//! token guards it like the streams, and the pull command fetches every trace once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::DETECTOR;
use detector::http::stream::Hub;
use detector::http::{router_with_traces, spawn};
use detector::telemetry::metrics::Metrics;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/traces");

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("detector-traces-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A trace directory as a run leaves it: the lab's race traces (older first), a summary, an
/// unfinished temporary and a link out of the directory (neither may be served).
fn trace_dir(tag: &str) -> (PathBuf, Vec<String>) {
    let dir = scratch(tag);
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let base = SystemTime::now() - Duration::from_secs(600);
    for (i, n) in names.iter().enumerate() {
        std::fs::copy(Path::new(FIXTURES).join(n), dir.join(n)).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(n))
            .unwrap();
        f.set_modified(base + Duration::from_secs(i as u64 * 10))
            .unwrap();
    }
    std::fs::write(
        dir.join("summary-2026-11-30T210000Z.json"),
        b"{\"kind\":\"summary\"}",
    )
    .unwrap();
    names.push("summary-2026-11-30T210000Z.json".into());
    std::fs::write(dir.join(".race-9-port-reuse-a.1-b.2.json.tmp-1"), b"{").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("race-9-port-reuse-a.1-b.2.json"))
        .unwrap();
    (dir, names)
}

async fn serve(dir: &Path, token: Option<&str>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn(
        listener,
        router_with_traces(
            Arc::new(Hub::new(10, 0, 64)),
            Arc::new(Metrics::new()),
            token.map(str::to_string),
            Some(dir.to_path_buf()),
        ),
    );
    addr
}

/// HTTP/1.0 GET (the curl of the issue): status and body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, raw[split + 4..].to_vec())
}

#[tokio::test]
async fn listing_and_files_are_exactly_the_trace_files() {
    let (dir, names) = trace_dir("listed");
    let addr = serve(&dir, Some("s3cret")).await;

    assert_eq!(get(addr, "/v1/traces", None).await.0, 401);
    assert_eq!(get(addr, "/v1/traces", Some("wrong")).await.0, 401);
    let (code, body) = get(addr, "/v1/traces", Some("s3cret")).await;
    assert_eq!(code, 200);
    let list: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let listed: Vec<&str> = list.iter().map(|e| e["name"].as_str().unwrap()).collect();
    // Newest first: the summary (written now), then the race traces newest to oldest.
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.reverse();
    assert_eq!(listed, want);
    for e in &list {
        let name = e["name"].as_str().unwrap();
        let on_disk = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(e["size"].as_u64().unwrap(), on_disk.len() as u64);
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
        let class = e["class"].as_str().unwrap();
        if name.starts_with("race-") {
            assert_eq!(class, "port-reuse", "{e}");
            let doc: Value = serde_json::from_slice(&on_disk).unwrap();
            assert_eq!(doc["trace"]["verdict"]["class"].as_str().unwrap(), class);
        } else {
            assert_eq!(class, "summary");
        }
        let (code, file) = get(addr, &format!("/v1/traces/{name}"), Some("s3cret")).await;
        assert_eq!(code, 200, "{name}");
        assert_eq!(file, on_disk, "{name} differs");
    }
    assert_eq!(
        get(addr, &format!("/v1/traces/{}", listed[0]), None)
            .await
            .0,
        401
    );
    for bad in [
        "/v1/traces/..%2F..%2Fetc%2Fpasswd",
        "/v1/traces/../../etc/passwd",
        "/v1/traces/.race-9-port-reuse-a.1-b.2.json.tmp-1",
        "/v1/traces/race-9-port-reuse-a.1-b.2.json",
        "/v1/traces/race-0-none.json",
    ] {
        let (code, body) = get(addr, bad, Some("s3cret")).await;
        assert_eq!(code, 404, "{bad}: {}", String::from_utf8_lossy(&body));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn pull_fetches_every_trace_once() {
    let (dir, names) = trace_dir("served");
    let addr = serve(&dir, Some("s3cret")).await;
    let out = scratch("pulled");
    let token = out.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let dest = out.join("traces");
    let pull = || {
        let dest = dest.clone();
        let token = token.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new(DETECTOR)
                    .args(["traces", "pull", "--url", &format!("http://{addr}")])
                    .arg("--token-file")
                    .arg(&token)
                    .arg("--out")
                    .arg(&dest)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let first = pull().await;
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains(&format!("fetched {}", names.len())), "{err}");
    let mut got: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    got.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(got, want);
    for n in &names {
        assert_eq!(
            std::fs::read(dest.join(n)).unwrap(),
            std::fs::read(dir.join(n)).unwrap()
        );
    }
    let again = pull().await;
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        err.contains(&format!("fetched 0 (0 bytes), {} already", names.len())),
        "{err}"
    );

    // Without the token the command says what is missing.
    let refused = tokio::task::spawn_blocking(move || {
        Command::new(DETECTOR)
            .args(["traces", "list", "--url", &format!("http://{addr}")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}
