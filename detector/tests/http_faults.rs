//! Privileged: clients of the HTTP server never stop detection. A thousand idle connections
//! meet the connection cap (the ones beyond it are answered 503 and counted); a detector left
//! with no descriptors (its RLIMIT_NOFILE lowered under it while idle connections hold the
//! last ones) backs off accepting and counts the trace it cannot write. In both, /metrics
//! answers again once the clients go, and races are reported throughout.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::faults::{RaceLab, Tmpfs, free_addr, get, metric, trace_writes, wait_for};
use common::{Detector, of_type, privileged};

/// `detector_http_limits_total{result="<result>"}` from a /metrics body.
fn http_limit(text: &str, result: &str) -> u64 {
    metric(
        text,
        &format!("detector_http_limits_total{{result=\"{result}\"}}"),
    )
}

/// /metrics once it answers 200 again (within 20 s).
fn metrics_when_back(addr: &str) -> String {
    let mut body = None;
    let back = wait_for(20, || {
        body = get(addr, "/metrics").ok().filter(|(code, _)| *code == 200);
        body.is_some()
    });
    assert!(back, "/metrics did not answer again");
    body.unwrap().1
}

/// What a connection that sent nothing got so far.
#[derive(Debug, PartialEq)]
enum Reply {
    /// Nothing yet: the server holds it open.
    Held,
    Refused503,
    Other(String),
}

fn reply_of(s: &mut TcpStream) -> Reply {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Reply::Held,
        Ok(n) if buf[..n].starts_with(b"HTTP/1.1 503") => Reply::Refused503,
        Ok(n) => Reply::Other(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) => Reply::Other(e.to_string()),
    }
}

/// Raises this process's descriptor limit to at least 4096 (a thousand client sockets; root
/// may raise the hard limit too).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own; no other memory.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_max = lim.rlim_max.max(4096);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// 1,000 idle connections against the default cap of 256: exactly 744 are answered 503 (and
/// a /metrics request while they are held, too), every refusal is counted, /metrics answers
/// once they close, and the detector reports a race afterwards.
#[test]
fn a_thousand_idle_connections_meet_the_cap_and_detection_goes_on() {
    if !privileged() {
        return;
    }
    const CLIENTS: usize = 1000;
    const CAP: usize = 256;
    assert!(raise_nofile() > CLIENTS as u64 + 64, "descriptor limit");
    let mut lab = RaceLab::new();
    let fs = Tmpfs::mount("4m");
    let listen = free_addr();
    let args = lab.args(&fs.dir, &listen);
    let det = Detector::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let s = TcpStream::connect(&listen).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Every refusal is written at once; wait until the count stops changing.
    let mut replies: Vec<Reply> = idle.iter().map(|_| Reply::Held).collect();
    let mut refused = 0;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_millis(700) {
        std::thread::sleep(Duration::from_millis(100));
        for (s, r) in idle.iter_mut().zip(replies.iter_mut()) {
            if *r == Reply::Held {
                *r = reply_of(s);
            }
        }
        let now = replies.iter().filter(|r| **r == Reply::Refused503).count();
        if now != refused {
            refused = now;
            stable_since = Instant::now();
        }
    }
    let held = replies.iter().filter(|r| **r == Reply::Held).count();
    let other: Vec<&Reply> = replies
        .iter()
        .filter(|r| matches!(r, Reply::Other(_)))
        .collect();
    assert!(
        t0.elapsed() < Duration::from_secs(9),
        "classified before the server's 10 s header timeout could close held connections"
    );
    assert_eq!(other, Vec::<&Reply>::new(), "only held or 503");
    assert_eq!(
        (held, refused),
        (CAP, CLIENTS - CAP),
        "the cap holds {CAP}, the rest get 503"
    );
    let (code, body) =
        get(&listen, "/metrics").unwrap_or_else(|e| panic!("/metrics while full: {e}"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    idle.clear();
    let text = metrics_when_back(&listen);
    assert_eq!(
        http_limit(&text, "connections_refused"),
        (CLIENTS - CAP + 1) as u64,
        "{text}"
    );
    assert_eq!(http_limit(&text, "accept_errors"), 0, "{text}");
    let port = lab.race();
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 1),
        "the race's trace is written"
    );
    let (events, stderr) = det.stop();
    let verdicts = of_type(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "{stderr}");
    assert_eq!(verdicts[0]["verdict"]["key"]["sport"], port);
}

/// The detector's open descriptors (their numbers).
fn open_fds(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Sets `pid`'s soft RLIMIT_NOFILE so that exactly `free` descriptor numbers are left.
fn leave_free_descriptors(pid: u32, free: u64) -> libc::rlimit {
    let fds = open_fds(pid);
    let mut limit = free;
    while limit - fds.iter().filter(|&&fd| fd < limit).count() as u64 != free {
        limit += 1;
    }
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads `new` and writes `old`, both ours; the pid is our own child.
    unsafe {
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: limit,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0
        );
    }
    old
}

/// Out of descriptors (EMFILE): idle connections take the detector's last free descriptors,
/// so accepting fails (counted, backed off) and a race's trace cannot be written (counted);
/// the race is still reported, and once the connections close /metrics answers and the next
/// trace is written, under the same low limit.
#[test]
fn running_out_of_descriptors_is_counted_and_detection_goes_on() {
    if !privileged() {
        return;
    }
    const FREE: u64 = 4;
    let mut lab = RaceLab::new();
    let fs = Tmpfs::mount("4m");
    let listen = free_addr();
    let args = lab.args(&fs.dir, &listen);
    let det = Detector::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut ports = vec![lab.race()];
    assert!(wait_for(10, || trace_writes(&listen, "written") == 1));
    leave_free_descriptors(det.pid(), FREE);
    // FREE of these are accepted and take the last descriptors; the rest wait in the backlog.
    let idle: Vec<TcpStream> = (0..3 * FREE)
        .map(|_| TcpStream::connect(&listen).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        open_fds(det.pid()).len() as u64 >= FREE,
        "the detector still runs"
    );
    ports.push(lab.race());
    // The trace window (0.2 s), a write, its retry 50 ms later.
    std::thread::sleep(Duration::from_millis(1500));
    drop(idle);
    let text = metrics_when_back(&listen);
    assert!(http_limit(&text, "accept_errors") > 0, "{text}");
    assert_eq!(
        metric(&text, "detector_trace_writes_total{result=\"failed\"}"),
        1,
        "the trace written without descriptors: {text}"
    );
    ports.push(lab.race());
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 2),
        "a trace is written once descriptors are free"
    );
    let (events, stderr) = det.stop();
    let raced: Vec<u16> = of_type(&events, "verdict")
        .iter()
        .map(|v| v["verdict"]["key"]["sport"].as_u64().unwrap() as u16)
        .collect();
    assert_eq!(raced, ports, "every race reported\n{stderr}");
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["races"], 3, "{summary:#}");
    assert_eq!(summary["trace_writes"]["failed"], 1, "{summary:#}");
    assert!(
        stderr.contains("Too many open files"),
        "the warnings name the cause: {stderr}"
    );
    assert!(stderr.contains("HTTP accept failed"), "{stderr}");
    assert!(
        stderr.contains("trace files not written: 1 failed"),
        "the exit line counts it: {stderr}"
    );
}
