//! The HTTP server in-process on an ephemeral port, over real TCP: metrics text, readiness,
//! the bearer token, replay on connect, NDJSON/text/SSE framing, and a client too slow to keep
//! up (it gets a `lagged` marker; publishing never waits for it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::SocketAddr;
use std::sync::Arc;

use detector::engine::VerdictClass;
use detector::http::stream::{Hub, Item};
use detector::http::{router, spawn};
use detector::telemetry::metrics::Metrics;
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
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {text}"
    );
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
    assert_eq!(
        sample(&all, "detector_verdict_latency_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &all,
            "detector_verdict_latency_seconds_bucket{le=\"0.0064\"}"
        ),
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
        let (status, _) = get_body(s.addr, path, &[("Authorization", "Bearer wrong")]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = get_body(s.addr, path, &[("Authorization", "s3cret")]).await;
        assert_eq!(status, 401, "{path} without the Bearer scheme");
    }
    let (status, _) = get_body(s.addr, "/metrics", &[("Authorization", "Bearer s3cret")]).await;
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
        head.to_lowercase()
            .contains("content-type: application/x-ndjson"),
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
    assert!(
        head.to_lowercase().contains("content-type: text/plain"),
        "{head}"
    );
    assert_eq!(
        line(&mut r).await,
        "12:00:00.000007 RACE port-reuse  tcp 10.0.0.1:7 -> 10.0.0.2:80"
    );
}

#[tokio::test]
async fn server_sent_events_when_asked_for() {
    let s = server(None, 3, 64).await;
    s.hub.races.publish(race(1));
    let (status, head, mut r) = get(s.addr, "/v1/races", &[("Accept", "text/event-stream")]).await;
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase()
            .contains("content-type: text/event-stream"),
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

// `detector watch` (the binary) against the in-process server.

const DETECTOR: &str = env!("CARGO_BIN_EXE_detector");

fn watch(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(DETECTOR)
        .arg("watch")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start detector watch")
}

async fn child_line(r: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(30), r.next_line())
        .await
        .expect("a line from detector watch")
        .unwrap()
        .expect("detector watch ended")
}

/// Stops a running `detector watch`; returns what it said on stderr.
async fn kill_for_stderr(mut w: tokio::process::Child) -> String {
    w.start_kill().unwrap();
    let o = w.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_replay_and_live_races_and_after_a_reconnect_skips_what_it_showed() {
    let s = server(None, 10, 64).await;
    s.hub.races.publish(race(1));
    s.hub.races.publish(race(2));
    let url = format!("http://{}", s.addr);
    let mut w = watch(&["--json", "--url", &url]);
    let mut out = BufReader::new(w.stdout.take().unwrap()).lines();
    assert_eq!(child_line(&mut out).await, race(1).json);
    assert_eq!(child_line(&mut out).await, race(2).json);
    // The detector restarts its streams: watch reconnects, gets the replay again, shows only
    // what is new.
    s.hub.close_clients();
    s.hub.races.publish(race(3));
    assert_eq!(child_line(&mut out).await, race(3).json);
    s.hub.races.publish(race(4));
    assert_eq!(child_line(&mut out).await, race(4).json);
    let err = kill_for_stderr(w).await;
    assert!(
        err.contains(&format!(
            "the detector at {url}/v1/races closed the stream; reconnecting in 1 s"
        )),
        "{err}"
    );
    assert!(err.contains("reconnected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_readable_lines_by_default() {
    let s = server(None, 10, 64).await;
    s.hub.races.publish(race(5));
    let mut w = watch(&["--url", &format!("http://{}", s.addr)]);
    let mut out = BufReader::new(w.stdout.take().unwrap()).lines();
    assert_eq!(child_line(&mut out).await, race(5).text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_follows_the_event_stream() {
    let s = server(None, 10, 64).await;
    let mut w = watch(&["--events", "--json", "--url", &format!("http://{}", s.addr)]);
    let mut out = BufReader::new(w.stdout.take().unwrap()).lines();
    // Live only: publish until the client is there.
    let item = |i| Item {
        json: serde_json::json!({"type": "ct_new", "n": i}).to_string(),
        text: String::new(),
    };
    while s.hub.events.clients() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.hub.events.publish(item(1));
    assert_eq!(child_line(&mut out).await, item(1).json);
}

fn one_error_line(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_says_to_pass_the_token_on_401_and_streams_with_it() {
    let s = server(Some("tok-123"), 10, 64).await;
    s.hub.races.publish(race(8));
    let url = format!("http://{}", s.addr);
    let o = watch(&["--url", &url]).wait_with_output().await.unwrap();
    let err = one_error_line(&o);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");
    let dir = std::env::temp_dir().join(format!("detector-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "nope\n").unwrap();
    let o = watch(&["--url", &url, "--token-file", bad.to_str().unwrap()])
        .wait_with_output()
        .await
        .unwrap();
    let err = one_error_line(&o);
    assert!(err.contains("the token was refused"), "{err}");
    let good = dir.join("good");
    std::fs::write(&good, "tok-123\n").unwrap();
    let mut w = watch(&["--url", &url, "--token-file", good.to_str().unwrap()]);
    let mut out = BufReader::new(w.stdout.take().unwrap()).lines();
    assert_eq!(child_line(&mut out).await, race(8).text);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_names_the_url_and_the_fix_when_nothing_listens() {
    // A port that was just free: nothing listens on it now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let o = watch(&["--url", &url]).wait_with_output().await.unwrap();
    let err = one_error_line(&o);
    assert!(err.contains(&format!("{url}/v1/races")), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(
        err.contains("--listen") && err.contains("port-forward"),
        "{err}"
    );
    let o = watch(&["--url", "ftp://x"])
        .wait_with_output()
        .await
        .unwrap();
    let err = one_error_line(&o);
    assert!(err.contains("--url ftp://x"), "{err}");
}

/// A fake detector on an ephemeral port: each connection's request is read, then `respond`
/// writes what it likes (or nothing) on it.
async fn fake_server<F, Fut>(respond: F) -> String
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            tokio::spawn(respond(tcp));
        }
    });
    url
}

const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_fails_naming_the_limit_on_a_line_that_never_ends() {
    let url = fake_server(|mut tcp| async move {
        tcp.write_all(STREAM_HEAD).await.unwrap();
        // One line, no newline, for as long as the client reads.
        let chunk = vec![b'x'; 64 << 10];
        while tcp.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let o = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        watch(&["--json", "--url", &url]).wait_with_output(),
    )
    .await
    .expect("watch ends on its own")
    .unwrap();
    let err = one_error_line(&o);
    assert!(
        err.contains(&format!("{url}/v1/races")) && err.contains("longer than 1048576 bytes"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "nothing printed of the endless line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_up_on_a_silent_server_naming_the_url_and_the_timeout() {
    // Accepts and never answers; answers the headers and then sends nothing.
    let hold = |tcp: TcpStream| async move {
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        drop(tcp);
    };
    let mute = fake_server(hold).await;
    let headers_only = fake_server(move |mut tcp| async move {
        tcp.write_all(STREAM_HEAD).await.unwrap();
        hold(tcp).await;
    })
    .await;
    for (url, what) in [(mute, "no response"), (headers_only, "nothing")] {
        let t0 = std::time::Instant::now();
        let o = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            watch(&["--timeout", "2", "--url", &url]).wait_with_output(),
        )
        .await
        .expect("watch gives up on its own")
        .unwrap();
        let waited = t0.elapsed();
        let err = one_error_line(&o);
        assert!(
            err.contains(&format!(
                "{what} from {url}/v1/races?format=text for 2 s (--timeout)"
            )),
            "{err}"
        );
        assert!(
            waited >= std::time::Duration::from_secs(2),
            "gave up after {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_quiet_detector_outlasts_its_timeout_on_keepalives() {
    let s = server(None, 10, 64).await;
    let mut w = watch(&[
        "--json",
        "--timeout",
        "2",
        "--url",
        &format!("http://{}", s.addr),
    ]);
    let mut out = BufReader::new(w.stdout.take().unwrap()).lines();
    while s.hub.races.clients() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Three timeouts with no record: the keep-alive lines (every second) keep it connected,
    // and none of them is printed.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    s.hub.races.publish(race(9));
    assert_eq!(child_line(&mut out).await, race(9).json);
    let err = kill_for_stderr(w).await;
    assert!(
        !err.contains("--timeout") && !err.contains("reconnect"),
        "{err}"
    );
}

#[tokio::test]
async fn a_keepalive_out_of_range_is_refused_with_the_range() {
    let s = server(None, 10, 64).await;
    let (code, body) = get_body(s.addr, "/v1/races?keepalive=0", &[]).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("from 1 to 3600"), "{body}");
}
