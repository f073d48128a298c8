//! Privileged, end to end: `detector lab --listen` runs the detector with its HTTP server; the
//! races it catches arrive on `/v1/races` (and through `detector watch --json`) while the lab
//! runs, are counted in `/metrics`, and the stream ends cleanly with the detector, having
//! carried exactly the lab's verdicts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{DETECTOR, privileged};
use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HTTP/1.0 GET: the status and the body reader (the server closes at the end of the body).
fn get(addr: &str, path: &str) -> std::io::Result<(u16, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 || l == "\r\n" {
            break;
        }
    }
    Ok((code, r))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn lab_races_reach_the_stream_the_metrics_and_watch() {
    if !privileged() {
        return;
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let traces = std::env::temp_dir().join(format!("detector-lab-http-{}", std::process::id()));
    let mut lab = Command::new(DETECTOR)
        .args([
            "lab", "--json", "--ports", "4", "--cycles", "3", "--listen", &addr,
        ])
        .arg("--trace-dir")
        .arg(&traces)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start detector lab");
    let mut lab_out = lab.stdout.take().unwrap();
    let lab_report = std::thread::spawn(move || {
        let mut s = String::new();
        lab_out.read_to_string(&mut s).map(|_| s)
    });
    let mut lab_err = lab.stderr.take().unwrap();
    let lab_stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = lab_err.read_to_string(&mut s);
        s
    });

    // The detector child comes up: /readyz says 200 once its probes and snapshots are done.
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = get(&addr, "/readyz") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the lab's detector never became ready on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every event, live: conntrack entries and the agent's deletes come before a verdict.
    let (_, events) = get(&addr, "/v1/events").expect("GET /v1/events");
    let events_reader = std::thread::spawn(move || {
        let mut types = Vec::new();
        for l in events.lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&l).unwrap();
            let t = v["type"].as_str().unwrap().to_string();
            let done = t == "verdict";
            types.push(t);
            if done {
                break;
            }
        }
        types
    });

    // The race stream, read to its end in a thread.
    let (_, stream) = get(&addr, "/v1/races").expect("GET /v1/races");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for l in stream.lines().map_while(Result::ok) {
            let _ = tx.send(l.clone());
            all.push(l);
        }
        all
    });
    let mut watch = Command::new(DETECTOR)
        .args(["watch", "--json", "--url", &format!("http://{addr}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start detector watch");
    let watch_out = BufReader::new(watch.stdout.take().unwrap());
    let (wtx, wrx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in watch_out.lines().map_while(Result::ok) {
            if wtx.send(l).is_err() {
                break;
            }
        }
    });

    // A race arrives on the stream while the lab runs...
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a race on /v1/races while the lab runs");
    let v: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(v["type"], "verdict", "{v}");
    assert_eq!(v["verdict"]["class"], "port-reuse", "{v}");
    assert_eq!(v["verdict"]["key"]["dport"], 8080, "{v}");
    // ...and is counted in the metrics (the detector is still up: the lab has cycles to go).
    let (code, mut m) = get(&addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    let races = metric(&text, "detector_verdicts_total{class=\"port-reuse\"}").unwrap_or(0.0);
    assert!(races >= 1.0, "{text}");
    assert_eq!(metric(&text, "detector_ready"), Some(1.0), "{text}");
    assert!(
        metric(
            &text,
            "detector_events_total{kind=\"agent_delete\",backend=\"tracepoint\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "detector_verdict_latency_seconds_count"),
        Some(races),
        "{text}"
    );
    // `detector watch --json` shows the same race (replayed to it on connect, or live).
    let w = wrx
        .recv_timeout(Duration::from_secs(60))
        .expect("a race from detector watch");
    assert_eq!(w, first, "watch prints the stream's NDJSON as is");

    let types = events_reader.join().unwrap();
    for t in ["ct_new", "ct_destroy", "agent_delete", "verdict"] {
        assert!(types.iter().any(|x| x == t), "{t} on /v1/events: {types:?}");
    }

    let status = lab.wait().unwrap();
    let stderr = lab_stderr.join().unwrap();
    assert!(status.success(), "{stderr}");
    let report: Value = serde_json::from_str(&lab_report.join().unwrap().unwrap())
        .unwrap_or_else(|e| panic!("lab report: {e}\n{stderr}"));
    // The stream ended with the detector (a clean end, or the reader would still block) and
    // carried exactly the lab's verdicts.
    let streamed: Vec<Value> = reader
        .join()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let verdicts = report["verdicts"].as_array().unwrap();
    assert!(verdicts.len() >= 8, "{report}");
    // Each race is followed on the stream by its confirmation (a denied packet) or, once its
    // window closed with none, by an unconfirmed record.
    let (streamed, confirmations): (Vec<Value>, Vec<Value>) =
        streamed.into_iter().partition(|v| v["type"] == "verdict");
    assert!(
        confirmations
            .iter()
            .all(|c| c["type"] == "race_confirmed" || c["type"] == "race_unconfirmed"),
        "{confirmations:#?}"
    );
    let confirmed_ids = |want: &str| {
        let mut v: Vec<(u64, u64)> = confirmations
            .iter()
            .filter(|c| c["type"] == want)
            .map(|c| {
                let r = &c["race_confirmation"];
                (
                    r["delete_ts_ns"].as_u64().unwrap(),
                    r["key"]["sport"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let mut all_confirmations = confirmed_ids("race_confirmed");
    all_confirmations.extend(confirmed_ids("race_unconfirmed"));
    all_confirmations.sort();
    let ids = |vs: &[Value]| {
        let mut v: Vec<(u64, u64)> = vs
            .iter()
            .map(|v| {
                (
                    v["verdict"]["delete_ts_ns"].as_u64().unwrap(),
                    v["verdict"]["key"]["sport"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&streamed),
        ids(verdicts),
        "the stream carried every verdict"
    );
    assert_eq!(
        all_confirmations,
        ids(&streamed),
        "one confirmed or unconfirmed record per race"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = std::fs::remove_dir_all(&traces);
}
