//! Privileged: `detector lab` reproduces the race with each cleanup of the emulated agent and
//! the detector catches exactly the wrongful deletes; the fixed cleanup makes none; `validate`
//! says so with its exit code; nothing is left behind.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{DETECTOR, privileged};
use serde_json::Value;

/// Labs time real traffic against real timeouts: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The pid of the last `detector lab` run: the lab names its namespaces and bpffs after it, so
/// the leftover check looks at this run's only (other labs may be running on the machine).
static LAST_LAB: AtomicU32 = AtomicU32::new(0);

fn lab(cmd: &str, args: &[&str]) -> (Option<i32>, Value, String) {
    let traces = std::env::temp_dir().join(format!("detector-lab-test-{}", std::process::id()));
    let out = Command::new(DETECTOR)
        .arg(cmd)
        .arg("--json")
        .arg("--trace-dir")
        .arg(&traces)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run detector lab");
    LAST_LAB.store(out.id(), Ordering::SeqCst);
    let out = out.wait_with_output().expect("wait for detector lab");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("lab report: {e}\n{stderr}"));
    let _ = std::fs::remove_dir_all(&traces);
    (out.status.code(), report, stderr)
}

fn assert_nothing_left() {
    let pid = LAST_LAB.load(Ordering::SeqCst);
    let ours = format!("lab-{pid}-");
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.starts_with(&ours)),
        "namespaces left: {netns:?}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&format!("/detector-lab-{pid}/")),
        "bpffs left mounted"
    );
}

/// The detector's verdicts are exactly the emulator's wrongful deletes: same keys, the
/// detector's kernel timestamp inside the emulator's bracket around the very syscall, and each
/// followed by a reply the reproducer never got (on that flow's port).
fn assert_races_match(report: &Value, stderr: &str) {
    let verdicts = report["verdicts"].as_array().unwrap();
    let truth: Vec<&Value> = report["ground_truth"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["live"] == true)
        .collect();
    assert!(
        truth.len() >= 20,
        "at least 20 races: {} ({stderr})",
        truth.len()
    );
    assert_eq!(
        verdicts.len(),
        truth.len(),
        "one verdict per wrongful delete\n{stderr}"
    );
    for g in &truth {
        let v = verdicts
            .iter()
            .find(|v| {
                let k = &v["verdict"]["key"];
                k["sport"] == g["key"]["sport"]
                    && k["dport"] == g["key"]["dport"]
                    && k["src"] == g["key"]["src"]
                    && (g["ts_ns"].as_u64().unwrap()..=g["end_ns"].as_u64().unwrap())
                        .contains(&v["verdict"]["delete_ts_ns"].as_u64().unwrap())
            })
            .unwrap_or_else(|| panic!("no verdict for {g:#}"));
        assert_eq!(v["verdict"]["class"], "port-reuse", "{v:#}");
    }
    assert_eq!(
        report["reproducer"]["failed"],
        truth.len(),
        "each race cost a reply"
    );
    let mut failed: Vec<u64> = report["reproducer"]["failed_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    let mut raced: Vec<u64> = truth
        .iter()
        .map(|g| g["key"]["sport"].as_u64().unwrap())
        .collect();
    failed.sort();
    raced.sort();
    assert_eq!(failed, raced, "the failed requests are the raced flows'");
    assert_eq!(report["events_lost"], 0);
}

/// Runs `detector lab` with `args` and checks that every race was caught, nothing more.
fn races_caught(args: &[&str]) {
    if !privileged() {
        return;
    }
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (code, report, stderr) = lab("lab", args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_races_match(&report, &stderr);
    assert_nothing_left();
}

#[test]
fn legacy_cleanup_races_are_caught() {
    races_caught(&["--mode", "legacy", "--ports", "8", "--cycles", "3"]);
}

/// NPA before v1.3.7: 20-byte keys, 1-byte values.
#[test]
fn legacy_cleanup_races_are_caught_with_the_old_layout() {
    races_caught(&[
        "--mode", "legacy", "--layout", "v4-20/1", "--ports", "8", "--cycles", "3",
    ]);
}

/// The first cycle only copies the map.
#[test]
fn two_phase_cleanup_races_are_caught() {
    races_caught(&["--mode", "two-phase", "--ports", "8", "--cycles", "4"]);
}

#[test]
fn fixed_cleanup_makes_no_race_and_validate_passes() {
    if !privileged() {
        return;
    }
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (code, report, stderr) = lab(
        "validate",
        &["--mode", "fixed", "--ports", "200", "--cycles", "10"],
    );
    assert!(
        report["reproducer"]["reuses"].as_u64().unwrap() >= 2000,
        "{}",
        report["reproducer"]
    );
    assert_eq!(report["verdicts"].as_array().unwrap().len(), 0, "{stderr}");
    assert_eq!(report["wrongful_deletes"], 0);
    // The fixed cleanup still deletes the keys of flows that really ended (the idle port):
    // the detector saw those deletes and judged them rightful.
    assert!(
        report["cleanup_deletes"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    assert_eq!(report["reproducer"]["failed"], 0);
    assert_eq!(report["events_lost"], 0);
    assert_eq!(
        code,
        Some(0),
        "validate passes on the fixed cleanup\n{stderr}"
    );
    assert_nothing_left();
}

#[test]
fn validate_fails_on_the_legacy_cleanup() {
    if !privileged() {
        return;
    }
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (code, report, stderr) = lab(
        "validate",
        &["--mode", "legacy", "--ports", "2", "--cycles", "1"],
    );
    assert!(
        !report["verdicts"].as_array().unwrap().is_empty(),
        "{stderr}"
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_nothing_left();
}

/// Flows reset before the cleanup deletes their keys (conntrack CLOSE) are closed-flow
/// deletes, apart from the races: every wrongful delete of the ground truth is one or the
/// other, by the port's kind.
#[test]
fn reset_flows_are_closed_flow_deletes_not_races() {
    if !privileged() {
        return;
    }
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (code, report, stderr) = lab(
        "lab",
        &[
            "--mode",
            "legacy",
            "--ports",
            "8",
            "--idle-ports",
            "1",
            "--reset-ports",
            "3",
            "--cycles",
            "3",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    // Ports 42000..42007 are reused, 42008 idle, 42009..42011 reset.
    let is_reset = |p: &Value| (42_009..=42_011).contains(&p.as_u64().unwrap());
    let truth: Vec<&Value> = report["ground_truth"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["live"] == true)
        .collect();
    let (truth_closed, truth_races): (Vec<&Value>, Vec<&Value>) =
        truth.iter().partition(|g| is_reset(&g["key"]["sport"]));
    let closed = report["closed_flow_deletes"].as_array().unwrap();
    let verdicts = report["verdicts"].as_array().unwrap();
    assert!(
        !truth_closed.is_empty(),
        "reset flows' keys were deleted: {stderr}"
    );
    assert_eq!(closed.len(), truth_closed.len(), "{closed:#?}\n{stderr}");
    for c in closed {
        let c = &c["closed_flow_delete"];
        assert!(is_reset(&c["key"]["sport"]), "{c:#}");
        assert_eq!(c["tcp_state"], "CLOSE", "{c:#}");
    }
    assert_eq!(verdicts.len(), truth_races.len(), "{stderr}");
    assert!(
        verdicts
            .iter()
            .all(|v| !is_reset(&v["verdict"]["key"]["sport"])),
        "no race on a reset port"
    );
    assert_eq!(
        report["races_confirmed"],
        verdicts.len(),
        "every race cost a reply"
    );
    assert_eq!(report["reproducer"]["failed"], verdicts.len());
    assert_nothing_left();
}
