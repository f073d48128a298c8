//! Privileged: while the kernel conntrack table of the judged namespace is full (its
//! nf_conntrack_count reached nf_conntrack_max), new flows are not tracked, so a verdict in
//! that time is flagged `maybe_incomplete`, the deletes made in it are counted (/metrics, the
//! exit line) and the summary is `maybe_incomplete`; a verdict before it is not flagged.
//!
//! nf_conntrack_max is global (read-only in other namespaces), so this lowers the host's limit
//! for a few seconds, to what the test's namespace holds, and restores it on every exit path.
//! Its own test binary: no other test of this suite runs while the limit is low.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::faults::{metric, metrics};
use common::{
    Detector, NetnsPair, RaceWorld, client_key, connect_from, of_type, privileged, run_ok,
};
use detector::npa::Layout;

const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The host's nf_conntrack_max, lowered; the old value is written back on drop.
struct LoweredLimit(String);

impl LoweredLimit {
    fn to(limit: u64) -> Self {
        let old = std::fs::read_to_string(MAX).unwrap();
        std::fs::write(MAX, limit.to_string()).unwrap();
        Self(old.trim().to_string())
    }
}

impl Drop for LoweredLimit {
    fn drop(&mut self) {
        std::fs::write(MAX, &self.0).unwrap();
    }
}

#[test]
fn verdicts_while_the_conntrack_table_is_full_are_flagged() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let RaceWorld {
        ns,
        fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, 60);
    let listen = "127.0.0.1:19495";
    let det = Detector::run(&[
        "--map-pin",
        map.pin.to_str().unwrap(),
        "--netns",
        &NetnsPair::path(&ns.server),
        "--trace-dir",
        traces.to_str().unwrap(),
        "--watermark-ms",
        "5",
        "--trace-after",
        "0.5",
        "--max-entries",
        "4096",
        "--listen",
        listen,
    ]);
    let before = connect_from(&ns.client, server);
    let during = connect_from(&ns.client, server);
    let k_before = client_key(before.local_addr().unwrap().port(), server, None);
    let k_during = client_key(during.local_addr().unwrap().port(), server, None);
    map.insert(&k_before, 1);
    map.insert(&k_during, 1);
    sleep(Duration::from_millis(300));
    // With room in the table: a race, not flagged.
    assert_eq!(map.delete(&k_before), 0);
    sleep(Duration::from_millis(500));
    let count: u64 = run_ok(
        "ip",
        &[
            "netns",
            "exec",
            &ns.server,
            "cat",
            "/proc/sys/net/netfilter/nf_conntrack_count",
        ],
    )
    .trim()
    .parse()
    .unwrap();
    assert!(count >= 2, "both flows are tracked: {count}");
    {
        let _full = LoweredLimit::to(count);
        assert!(
            det.wait_for("conntrack table is full", Duration::from_secs(3)),
            "the full table is noticed"
        );
        assert_eq!(map.delete(&k_during), 0);
        sleep(Duration::from_millis(300));
    }
    assert!(
        det.wait_for("has room again", Duration::from_secs(3)),
        "and its end"
    );
    sleep(Duration::from_millis(800));
    let text = metrics(listen);
    let (events, stderr) = det.stop();
    let _ = std::fs::remove_dir_all(&traces);
    let verdicts = of_type(&events, "verdict");
    let flagged = |k: &detector::npa::NpaKey| {
        let v = verdicts
            .iter()
            .find(|v| v["verdict"]["key"]["sport"] == k.sport)
            .unwrap_or_else(|| panic!("no verdict for {}: {stderr}", k.sport));
        v["verdict"]["maybe_incomplete"] == true
    };
    assert!(
        !flagged(&k_before),
        "a race with room in the table: {stderr}"
    );
    assert!(flagged(&k_during), "a race while it was full: {stderr}");
    assert_eq!(
        metric(
            &text,
            "detector_capacity_overflow_total{counter=\"conntrack_full\"}"
        ),
        1,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "detector_capacity_overflow_total{counter=\"conntrack_full_deletes\"}"
        ),
        1,
        "{text}"
    );
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["maybe_incomplete"], true, "{summary:#}");
    assert_eq!(summary["conntrack_full_deletes"], 1, "{summary:#}");
    assert!(
        stderr.contains("kernel conntrack table full 1 time(s) (1 deletes in it)")
            && stderr.contains("MAYBE INCOMPLETE"),
        "{stderr}"
    );
    // A replay of the run flags the same verdict: the windows are recorded.
    let recording = fs.dir.with_extension("ndjson");
    let lines: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    std::fs::write(&recording, lines.join("\n") + "\n").unwrap();
    let replayed = std::process::Command::new(common::DETECTOR)
        .args(["replay", "--json", "--trace-dir"])
        .arg(&traces)
        .arg(&recording)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&recording);
    let _ = std::fs::remove_dir_all(&traces);
    let out = String::from_utf8_lossy(&replayed.stdout);
    let flagged_in_replay: Vec<bool> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "verdict")
        .map(|v| v["verdict"]["maybe_incomplete"] == true)
        .collect();
    assert_eq!(
        flagged_in_replay,
        vec![false, true],
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    drop((before, during));
}
