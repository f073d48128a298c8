//! Privileged: a trace directory that fails under a running detector never stops detection.
//! The directory is a tmpfs this test mounts and fills or remounts read-only mid-run; races
//! made after that are still reported on stdout, each failed write is counted in /metrics, in
//! the summary and on the exit line, and no temporary file is left behind. One batch delete
//! of the keys of one flow for several owners writes one trace file per race.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use common::faults::{RaceLab, Tmpfs, free_addr, names_in, race_files, trace_writes, wait_for};
use common::{Detector, of_type, privileged};
use serde_json::Value;

/// The verdicts' flow ports, in output order.
fn raced_ports(events: &[Value]) -> Vec<u16> {
    of_type(events, "verdict")
        .iter()
        .map(|v| v["verdict"]["key"]["sport"].as_u64().unwrap() as u16)
        .collect()
}

/// Names `write_atomic` gives its temporary files.
fn temporaries(dir: &std::path::Path) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// A full trace directory mid-run: the writes fail (ENOSPC) and are counted, later races are
/// still reported, and once space is back traces and the summary are written again.
#[test]
fn a_full_trace_directory_is_counted_and_detection_goes_on() {
    if !privileged() {
        return;
    }
    let mut lab = RaceLab::new();
    let fs = Tmpfs::mount("1m");
    let listen = free_addr();
    let args = lab.args(&fs.dir, &listen);
    let det = Detector::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut ports = vec![lab.race()];
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 1),
        "the first trace is written"
    );
    let filler = fs.fill();
    for _ in 0..3 {
        ports.push(lab.race());
    }
    assert!(
        wait_for(10, || trace_writes(&listen, "failed") == 3),
        "three writes fail on the full disk: failed {}",
        trace_writes(&listen, "failed")
    );
    assert_eq!(trace_writes(&listen, "written"), 1);
    assert!(
        temporaries(&fs.dir).is_empty(),
        "a failed write leaves no temporary file: {:?}",
        names_in(&fs.dir)
    );
    // Space comes back: the next race's trace is written again.
    std::fs::remove_file(filler).unwrap();
    ports.push(lab.race());
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 2),
        "a trace is written once there is space"
    );
    let (events, stderr) = det.stop();
    assert_eq!(
        raced_ports(&events),
        ports,
        "every race reported, before and after the disk filled\n{stderr}"
    );
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["races"], 5, "{summary:#}");
    assert_eq!(summary["traces_written"], 2, "{summary:#}");
    assert_eq!(summary["trace_writes"]["failed"], 3, "{summary:#}");
    assert!(
        stderr.contains("No space left on device"),
        "the warning names the cause: {stderr}"
    );
    assert!(
        stderr.contains(
            "trace files not written: 3 failed, 0 dropped (queue full); summary file written"
        ),
        "the exit line counts the failures: {stderr}"
    );
    assert!(stderr.contains("5 race(s) (2 traces written)"), "{stderr}");
    assert_eq!(race_files(&fs.dir).len(), 2, "{:?}", names_in(&fs.dir));
    assert!(temporaries(&fs.dir).is_empty(), "{:?}", names_in(&fs.dir));
    assert_eq!(
        names_in(&fs.dir)
            .iter()
            .filter(|n| n.starts_with("summary-"))
            .count(),
        1,
        "the summary file: {:?}",
        names_in(&fs.dir)
    );
}

/// A trace directory remounted read-only mid-run: the writes fail and are counted, later races
/// are still reported, and the summary that cannot be written is counted on the exit line.
#[test]
fn a_read_only_trace_directory_is_counted_and_detection_goes_on() {
    if !privileged() {
        return;
    }
    let mut lab = RaceLab::new();
    let fs = Tmpfs::mount("4m");
    let listen = free_addr();
    let args = lab.args(&fs.dir, &listen);
    let det = Detector::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut ports = vec![lab.race()];
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 1),
        "the first trace is written"
    );
    fs.set_read_only(true);
    for _ in 0..2 {
        ports.push(lab.race());
    }
    assert!(
        wait_for(10, || trace_writes(&listen, "failed") == 2),
        "two writes fail on the read-only directory: failed {}",
        trace_writes(&listen, "failed")
    );
    // One more race after the failures: still reported.
    ports.push(lab.race());
    assert!(wait_for(10, || trace_writes(&listen, "failed") == 3));
    let (events, stderr) = det.stop();
    fs.set_read_only(false);
    assert_eq!(raced_ports(&events), ports, "every race reported\n{stderr}");
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["races"], 4, "{summary:#}");
    assert_eq!(summary["traces_written"], 1, "{summary:#}");
    assert_eq!(summary["trace_writes"]["failed"], 3, "{summary:#}");
    assert!(
        stderr.contains("Read-only file system"),
        "the warning names the cause: {stderr}"
    );
    // Three traces and the summary file.
    assert!(
        stderr.contains(
            "trace files not written: 4 failed, 0 dropped (queue full); summary file NOT written"
        ),
        "the exit line counts the failures and the summary: {stderr}"
    );
    assert_eq!(race_files(&fs.dir).len(), 1, "{:?}", names_in(&fs.dir));
    assert!(temporaries(&fs.dir).is_empty(), "{:?}", names_in(&fs.dir));
    assert!(
        !names_in(&fs.dir).iter().any(|n| n.starts_with("summary-")),
        "{:?}",
        names_in(&fs.dir)
    );
}

/// One BPF_MAP_DELETE_BATCH of the keys of one live flow for three owners (both pods, and one
/// pod on a second host veth): same 5-tuple, one delete instant. Each key is a race with a
/// trace file of its own, and the summary's count is the number of files.
#[test]
fn colliding_keys_of_one_batch_get_one_trace_file_per_race() {
    if !privileged() {
        return;
    }
    let mut lab = RaceLab::new();
    let fs = Tmpfs::mount("4m");
    let listen = free_addr();
    let args = lab.args(&fs.dir, &listen);
    let det = Detector::run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let server_owned = lab.live_key(None, 5);
    let client_owned = detector::npa::NpaKey {
        owner: lab.ns.client_ip.parse().unwrap(),
        ifindex: Some(6),
        ..server_owned.clone()
    };
    let second_veth = detector::npa::NpaKey {
        ifindex: Some(7),
        ..server_owned.clone()
    };
    let keys = [server_owned, client_owned, second_veth];
    for k in &keys {
        lab.map.insert(k, 1);
    }
    let (rc, count) = lab.map.delete_batch(&keys);
    assert_eq!((rc, count), (0, 3), "BPF_MAP_DELETE_BATCH");
    assert!(
        wait_for(10, || trace_writes(&listen, "written") == 3),
        "three traces written: {}",
        trace_writes(&listen, "written")
    );
    let (events, stderr) = det.stop();
    let verdicts = of_type(&events, "verdict");
    assert_eq!(verdicts.len(), 3, "one race per key\n{stderr}");
    let files = race_files(&fs.dir);
    assert_eq!(files.len(), 3, "one file per race: {files:?}");
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["races"], 3, "{summary:#}");
    assert_eq!(summary["traces_written"], files.len(), "{summary:#}");
    // Each verdict names its own file, and each file holds its own key.
    let mut named: Vec<String> = verdicts
        .iter()
        .map(|v| {
            let p = v["trace_file"].as_str().unwrap();
            p.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    named.sort();
    assert_eq!(named, files);
    let mut owners: Vec<(String, u64)> = files
        .iter()
        .map(|f| {
            let doc: Value =
                serde_json::from_str(&std::fs::read_to_string(fs.dir.join(f)).unwrap()).unwrap();
            let k = &doc["trace"]["verdict"]["key"];
            (
                k["owner"].as_str().unwrap().to_string(),
                k["ifindex"].as_u64().unwrap(),
            )
        })
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        [
            ("10.77.0.1".to_string(), 5),
            ("10.77.0.1".to_string(), 7),
            ("10.77.0.2".to_string(), 6)
        ]
    );
}
