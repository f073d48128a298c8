//! The HTTP server in-process on an ephemeral port, over real TCP: metrics text, readiness,
//! the bearer token, replay on connect, NDJSON/text/SSE framing, and a client too slow to keep
//! up (it gets a `lagged` marker; publishing never waits for it).

use std::net::SocketAddr;
use std::sync::Arc;

use detector::engine::VerdictClass;
use detector::serve::metrics::Metrics;
use detector::serve::stream::{Hub, Item};
use detector::serve::{router, spawn};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Server {
    addr: SocketAddr,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

async fn server(token: Option<&str>, replay: usize, backlog: usize) -> Server {
    let hub = Arc::new(Hub::new(replay, 0, backlog));
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    spawn(
        listener,
        router(hub.clone(), metrics.clone(), token.map(str::to_string)),
    );
    Server { addr, hub, metrics }
}

/// An HTTP/1.0 request (the server then delimits a stream by closing, no chunking): the status,
/// the header block, and the body still to read.
async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        if l == "\r\n" || l.is_empty() {
            break;
        }
        head.push_str(&l);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    (status, head, r)
}

async fn get_body(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let (status, _, mut r) = get(addr, path, headers).await;
    let mut body = String::new();
    r.read_to_string(&mut body).await.unwrap();
    (status, body)
}

async fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).await.unwrap();
    l.trim_end_matches('\n').to_string()
}

fn race(i: usize) -> Item {
    Item {
        json: serde_json::json!({"type": "verdict", "n": i}).to_string(),
        text: format!("12:00:00.{i:06} RACE port-reuse  tcp 10.0.0.1:{i} -> 10.0.0.2:80"),
    }
}

/// Parses OpenMetrics text: every sample line is `name{labels} value`; returns the samples.
fn samples(text: &str) -> Vec<(String, f64)> {
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l}"));
            (name.to_string(), v)
        })
        .collect()
}

fn sample(s: &[(String, f64)], name: &str) -> Option<f64> {
    s.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

#[tokio::test]
async fn metrics_parse_and_carry_the_counters() {
    let s = server(None, 10, 64).await;
    s.metrics.event("ct_new", "tracepoint");
    s.metrics.event("ct_new", "tracepoint");
    s.metrics.verdict(VerdictClass::PortReuse, 5_000_000);
    s.metrics.snapshot("conntrack", 0.25);
    let (status, head, mut r) = get(s.addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let mut text = String::new();
    r.read_to_string(&mut text).await.unwrap();
    let all = samples(&text);
    assert_eq!(
        sample(
            &all,
            "detector_events_total{kind=\"ct_new\",backend=\"tracepoint\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&all, "detector_verdicts_total{class=\"port-reuse\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&all, "detector_verdicts_total{class=\"stale-match\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&all, "detector_verdict_latency_seconds_count"), Some(1.0));
    assert_eq!(
        sample(&all, "detector_verdict_latency_seconds_bucket{le=\"0.0064\"}"),
        Some(1.0),
        "5 ms falls in the 6.4 ms bucket"
    );
    assert_eq!(
        sample(
            &all,
            "detector_snapshot_duration_seconds{snapshot=\"conntrack\"}"
        ),
        Some(0.25)
    );
    assert_eq!(sample(&all, "detector_ready"), Some(0.0));
    assert_eq!(sample(&all, "detector_rightful_deletes_total"), Some(0.0));
    for family in [
        "detector_events ",
        "detector_events_lost ",
        "detector_verdicts ",
        "detector_rightful_deletes ",
        "detector_shadow_entries ",
        "detector_shadow_evictions ",
        "detector_snapshot_duration_seconds ",
        "detector_verdict_latency_seconds ",
        "detector_ready ",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}")),
            "{family} declared: {text}"
        );
    }
}

#[tokio::test]
async fn readyz_turns_200_when_ready_and_healthz_is_always_200() {
    let s = server(None, 10, 64).await;
    assert_eq!(get_body(s.addr, "/healthz", &[]).await.0, 200);
    let (status, body) = get_body(s.addr, "/readyz", &[]).await;
    assert_eq!(status, 503, "{body}");
    s.metrics.set_ready(true);
    assert_eq!(get_body(s.addr, "/readyz", &[]).await.0, 200);
    assert_eq!(get_body(s.addr, "/nope", &[]).await.0, 404);
}

#[tokio::test]
async fn the_token_guards_everything_but_the_probes() {
    let s = server(Some("s3cret"), 10, 64).await;
    s.metrics.set_ready(true);
    for path in ["/metrics", "/v1/races", "/v1/events"] {
        let (status, body) = get_body(s.addr, path, &[]).await;
        assert_eq!(status, 401, "{path} without a token");
        assert!(body.contains("Authorization: Bearer"), "{body}");
        let (status, _) =
            get_body(s.addr, path, &[("Authorization", "Bearer wrong")]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = get_body(s.addr, path, &[("Authorization", "s3cret")]).await;
        assert_eq!(status, 401, "{path} without the Bearer scheme");
    }
    let (status, _) =
        get_body(s.addr, "/metrics", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200);
    let (status, _, _) = get(s.addr, "/v1/races", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(status, 200);
    assert_eq!(get_body(s.addr, "/healthz", &[]).await.0, 200);
    assert_eq!(get_body(s.addr, "/readyz", &[]).await.0, 200);
}

#[tokio::test]
async fn a_client_gets_the_last_n_races_then_live_ones_as_ndjson() {
    let s = server(None, 3, 64).await;
    for i in 1..=5 {
        s.hub.races.publish(race(i));
    }
    let (status, head, mut r) = get(s.addr, "/v1/races", &[]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("content-type: application/x-ndjson"),
        "{head}"
    );
    for want in 3..=5 {
        let v: serde_json::Value = serde_json::from_str(&line(&mut r).await).unwrap();
        assert_eq!(v["n"], want, "replay of the last 3");
    }
    s.hub.races.publish(race(6));
    let v: serde_json::Value = serde_json::from_str(&line(&mut r).await).unwrap();
    assert_eq!(v["n"], 6, "then live");
}

#[tokio::test]
async fn readable_lines_with_format_text() {
    let s = server(None, 3, 64).await;
    s.hub.races.publish(race(7));
    let (status, head, mut r) = get(s.addr, "/v1/races?format=text", &[]).await;
    assert_eq!(status, 200);
    assert!(head.to_lowercase().contains("content-type: text/plain"), "{head}");
    assert_eq!(
        line(&mut r).await,
        "12:00:00.000007 RACE port-reuse  tcp 10.0.0.1:7 -> 10.0.0.2:80"
    );
}

#[tokio::test]
async fn server_sent_events_when_asked_for() {
    let s = server(None, 3, 64).await;
    s.hub.races.publish(race(1));
    let (status, head, mut r) =
        get(s.addr, "/v1/races", &[("Accept", "text/event-stream")]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("content-type: text/event-stream"),
        "{head}"
    );
    assert_eq!(line(&mut r).await, "event: race");
    assert_eq!(
        line(&mut r).await,
        format!("data: {}", race(1).json),
        "one data line per record"
    );
    assert_eq!(line(&mut r).await, "", "a blank line ends the event");
    s.hub.events.publish(race(2));
    let (_, _, mut e) = get(s.addr, "/v1/events", &[("Accept", "text/event-stream")]).await;
    s.hub.events.publish(race(3));
    assert_eq!(line(&mut e).await, "event: event");
    assert_eq!(
        line(&mut e).await,
        format!("data: {}", race(3).json),
        "/v1/events replays nothing: live only"
    );
}

/// A client that stops reading: publishing goes on at full speed (the loop below finishes
/// while the client has read nothing), and the client, once it reads again, gets a `lagged`
/// marker for what it missed; what it got plus what it missed is everything, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_gets_a_lagged_marker_and_never_blocks_publishing() {
    let s = server(None, 0, 64).await;
    let (status, _, mut r) = get(s.addr, "/v1/events", &[]).await;
    assert_eq!(status, 200);
    // ~40 MB, far more than the socket buffers hold.
    let pad = "x".repeat(2000);
    let total = 20_000usize;
    for i in 0..total {
        s.hub.events.publish(Item {
            json: serde_json::json!({"type": "ct_new", "n": i, "pad": pad}).to_string(),
            text: String::new(),
        });
        if i % 64 == 0 {
            // Let the server task run, as the detector's loop does between records.
            tokio::task::yield_now().await;
        }
    }
    let mut got = 0u64;
    let mut missed = 0u64;
    let mut markers = 0;
    let mut last: Option<u64> = None;
    loop {
        let l = line(&mut r).await;
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["type"] == "lagged" {
            markers += 1;
            missed += v["missed"].as_u64().unwrap();
            continue;
        }
        let n = v["n"].as_u64().unwrap();
        assert!(last.is_none_or(|p| n > p), "in order");
        last = Some(n);
        got += 1;
        if n as usize == total - 1 {
            break;
        }
    }
    assert!(markers >= 1, "a lagged marker (got {got} of {total})");
    assert_eq!(got + missed, total as u64, "received + missed = published");
    let text = s.metrics.encode();
    assert!(
        text.contains(&format!(
            "detector_stream_lagged_total{{stream=\"events\"}} {missed}\n"
        )),
        "{text}"
    );
}
