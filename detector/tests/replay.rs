//! `detector replay` on recordings of `detector run --json` kept as fixtures: each replay
//! reproduces the recorded verdicts one for one, a changed `--snapshot-lag-window` changes the
//! classification as the rule says, and bad input is a clear error naming its line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

const DETECTOR: &str = env!("CARGO_BIN_EXE_detector");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/replay")
        .join(name)
}

/// A directory of its own for each replay (tests run in parallel, often on one fixture).
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("detector-replay-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn replay(input: &str, stdin: Option<&str>, args: &[&str], name: &str) -> Output {
    let dir = scratch(name);
    let mut child = Command::new(DETECTOR)
        .arg("replay")
        .arg(input)
        .arg("--trace-dir")
        .arg(dir.join("traces"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    let mut out = child.wait_with_output().unwrap();
    out.stdout = with_full_timelines(&out.stdout);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The replay's stdout with each verdict line's timeline as its trace file holds it. The line
/// carries only the race's story (the previous entry's destroy, the live entry's birth, the
/// delete) and how many events the full timeline has; the full timeline goes to the trace
/// file. Checks that the story is drawn from the trace's timeline and that the count is its
/// length, then puts the full timeline back, so that the recordings (made when the line
/// carried the full timeline) are compared whole.
fn with_full_timelines(stdout: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(stdout);
    let mut out = String::new();
    for line in text.lines() {
        let parsed = serde_json::from_str::<Value>(line).ok();
        let Some(mut v) = parsed.filter(|v| v["type"] == "verdict") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let path = v["trace_file"].as_str().unwrap().to_string();
        let doc: Value = serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("trace {path}: {e}")),
        )
        .unwrap();
        let full = doc["trace"]["verdict"]["timeline"]
            .as_array()
            .unwrap()
            .clone();
        let story = v["verdict"]["timeline"].as_array().unwrap();
        assert_eq!(v["timeline_events"], full.len(), "{line}");
        assert!(story.len() < full.len() || story == &full, "{line}");
        assert!(
            story.iter().all(|e| full.contains(e)),
            "the line's story is not from the trace's timeline: {line}"
        );
        assert!(
            story.iter().any(|e| e["event"] == "agent_delete"
                && e["ts_ns"] == v["verdict"]["delete_ts_ns"]),
            "the story lacks the delete: {line}"
        );
        v["verdict"]["timeline"] = full.into();
        v.as_object_mut().unwrap().remove("timeline_events");
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// The verdict lines of an NDJSON text, without the two fields that belong to the live run
/// rather than to its records: how long it took to see the race, and where its trace went.
fn verdicts(ndjson: &str) -> Vec<Value> {
    ndjson
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "verdict")
        .map(|mut v| {
            let o = v.as_object_mut().unwrap();
            o.remove("detection_latency_ns");
            o.remove("trace_file");
            v
        })
        .collect()
}

fn replayed_json(name: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = replay(fixture(name).to_str().unwrap(), None, &all, name);
    assert!(
        out.status.success(),
        "replay of {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    verdicts(&String::from_utf8(out.stdout).unwrap())
}

fn recorded(name: &str) -> Vec<Value> {
    verdicts(&std::fs::read_to_string(fixture(name)).unwrap())
}

/// The replay's verdicts equal the recording's, one for one and in order.
fn reproduces(name: &str) -> Vec<Value> {
    let want = recorded(name);
    let got = replayed_json(name, &[]);
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: verdicts replayed vs recorded"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "{name}: verdict {i} differs");
    }
    want
}

#[test]
fn legacy_lab_recording_replays_to_its_races() {
    let v = reproduces("legacy-lab.ndjson");
    assert!(!v.is_empty(), "the legacy lab recording holds races");
    assert!(v.iter().all(|v| v["verdict"]["class"] == "port-reuse"));
}

#[test]
fn fixed_lab_recording_replays_to_no_race() {
    assert!(reproduces("fixed-lab.ndjson").is_empty());
    // It did judge deletes: the recording has them.
    let text = std::fs::read_to_string(fixture("fixed-lab.ndjson")).unwrap();
    assert!(text.contains(r#""type":"agent_delete""#));
}

#[test]
fn lost_records_flag_the_verdicts_whose_story_spans_them() {
    let text = std::fs::read_to_string(fixture("lost-events.ndjson")).unwrap();
    assert!(
        text.contains(r#""type":"lost""#),
        "the fixture carries a loss"
    );
    let v = reproduces("lost-events.ndjson");
    let flagged = v
        .iter()
        .filter(|v| v["verdict"]["maybe_incomplete"] == true)
        .count();
    assert!(flagged > 0 && flagged < v.len(), "{flagged} of {}", v.len());
    // The same races without the loss are not flagged.
    assert!(
        replayed_json("legacy-lab.ndjson", &[])
            .iter()
            .all(|v| v["verdict"]["maybe_incomplete"] == false)
    );
}

#[test]
fn snapshot_lag_window_reclassifies_as_the_rule_says() {
    let want = recorded("legacy-lab.ndjson");
    for (window_s, flag) in [(0.1, "0.1"), (1.0, "1")] {
        let got = replayed_json("legacy-lab.ndjson", &["--snapshot-lag-window", flag]);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            let age_ns = w["verdict"]["delete_ts_ns"].as_u64().unwrap()
                - w["verdict"]["live"]["born_ns"].as_u64().unwrap();
            // An entry born longer than the window before the delete is a stale match, with no
            // predecessor named; a younger one keeps the recorded class.
            if age_ns as f64 > window_s * 1e9 {
                assert_eq!(g["verdict"]["class"], "stale-match", "window {flag}");
                assert!(g["verdict"]["old"].is_null());
            } else {
                assert_eq!(g, w, "window {flag}");
            }
        }
    }
    // The lab's entries are about 150 ms old at the delete: 0.1 s reclassifies every one.
    let narrow = replayed_json("legacy-lab.ndjson", &["--snapshot-lag-window", "0.1"]);
    assert!(
        narrow
            .iter()
            .all(|v| v["verdict"]["class"] == "stale-match")
    );
}

#[test]
fn readable_output_shows_each_race_at_its_recorded_time() {
    let out = replay(
        fixture("legacy-lab.ndjson").to_str().unwrap(),
        None,
        &[],
        "readable",
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let races: Vec<&str> = text.lines().filter(|l| l.contains(" RACE ")).collect();
    let want = recorded("legacy-lab.ndjson");
    assert_eq!(races.len(), want.len());
    for (line, v) in races.iter().zip(&want) {
        let time = v["time"].as_str().unwrap();
        assert!(line.starts_with(&time[11..26]), "{line} vs {time}");
        // A replay tells no live detection latency.
        assert!(!line.contains("detected"), "{line}");
        // The race's instants, each gap as recorded: the lab agent's own dump reaped the
        // expired entry.
        let i = &v["verdict"]["instants"];
        let ms = |f: &str| format!("{:.3} ms", i[f].as_i64().unwrap() as f64 / 1e6);
        let told = format!(
            "previous entry expired, reaped {} later by the agent itself (ct-snapshot/{}), \
             tuple reused {} later, key deleted {} later",
            ms("expiry_to_reap_ns"),
            v["verdict"]["agent"]["pid"],
            ms("reap_to_reuse_ns"),
            ms("reuse_to_delete_ns"),
        );
        assert!(line.contains(&told), "{line}\nlacks: {told}");
    }
}

#[test]
fn stdin_is_read_with_a_dash() {
    let text = std::fs::read_to_string(fixture("legacy-lab.ndjson")).unwrap();
    let out = replay("-", Some(&text), &["--json"], "stdin");
    assert!(out.status.success());
    assert_eq!(
        verdicts(&String::from_utf8(out.stdout).unwrap()),
        recorded("legacy-lab.ndjson")
    );
}

#[test]
fn bad_input_names_the_line_and_fails() {
    let text = std::fs::read_to_string(fixture("legacy-lab.ndjson")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(3, "{\"type\":\"lost\",\"ts_ns\":\"soon\",\"count\":1}");
    let out = replay("-", Some(&lines.join("\n")), &["--json"], "bad");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4") && err.contains("ts_ns"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    lines.remove(3);
    lines.insert(5, "not json at all");
    let out = replay("-", Some(&lines.join("\n")), &[], "bad-json");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 6") && err.contains("not JSON"), "{err}");

    // No `run_start`: not a recording replay can judge.
    let out = replay("-", Some(lines[1]), &[], "no-start");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run_start"));

    let out = replay("/nonexistent/recording", None, &[], "missing");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/recording"));
}

#[test]
fn a_truncated_last_line_is_a_warning() {
    let text = std::fs::read_to_string(fixture("legacy-lab.ndjson")).unwrap();
    // Cut the recording in the middle of its last verdict line, as a killed run leaves it.
    let last_verdict = text.rfind(r#"{"type":"verdict""#).unwrap();
    let cut = &text[..last_verdict + 200];
    let out = replay("-", Some(cut), &["--json"], "truncated");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"));
    // Every verdict was decided before the cut (the cut line is the last one's printout).
    assert_eq!(
        verdicts(&String::from_utf8(out.stdout).unwrap()),
        recorded("legacy-lab.ndjson")
    );
}

/// A recording of one delete the kernel never indexed an entry for, of a key the start-up
/// snapshots hold (with the flow's entry when `with_entry`).
fn startup_recording(with_entry: bool) -> String {
    let text = std::fs::read_to_string(fixture("legacy-lab.ndjson")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let start = lines[0].clone();
    assert_eq!(start["type"], "run_start");
    let mut delete = lines
        .iter()
        .find(|l| l["type"] == "agent_delete")
        .unwrap()
        .clone();
    delete["kernel_view"] = "absent".into();
    for f in ["entry_id", "entry_born_ns", "entry_timeout_left_ms"] {
        delete[f] = Value::Null;
    }
    let key = &delete["key"];
    let (src, dst) = (key["src"].clone(), key["dst"].clone());
    let (sport, dport) = (key["sport"].clone(), key["dport"].clone());
    let entry = serde_json::json!({
        "type": "startup_entry", "dump_ns": start["ts_ns"], "id": 7, "proto": 6,
        "orig": {"src": src, "sport": sport, "dst": dst, "dport": dport},
        "reply": {"src": dst, "sport": dport, "dst": src, "dport": sport},
        "status": 0, "timeout_s": 100,
    });
    let map_key = serde_json::json!({
        "type": "startup_key", "map_id": delete["map_id"], "key_hex": delete["key_hex"],
    });
    let mut out = vec![start];
    if with_entry {
        out.push(entry);
    }
    out.extend([map_key, delete]);
    out.iter().map(|v| format!("{v}\n")).collect()
}

#[test]
fn startup_snapshot_lines_judge_deletes_the_kernel_never_indexed() {
    // The snapshot says the flow's entry is alive: the shadow judges the delete a race.
    let out = replay("-", Some(&startup_recording(true)), &["--json"], "startup");
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v = verdicts(&stdout);
    assert_eq!(v.len(), 1, "{stdout}");
    assert_eq!(v[0]["verdict"]["decided_by"], "shadow");
    // Born before the detector started: no birth known, so not a reuse.
    assert_eq!(v[0]["verdict"]["class"], "stale-match");
    // The replay's output is itself a recording, with the start-up lines.
    for t in ["run_start", "startup_entry", "startup_key"] {
        assert!(stdout.contains(&format!(r#""type":"{t}""#)), "{t}");
    }
    // Without the entry nothing was alive: a rightful delete.
    let out = replay(
        "-",
        Some(&startup_recording(false)),
        &["--json"],
        "no-entry",
    );
    assert!(out.status.success());
    assert!(verdicts(&String::from_utf8(out.stdout).unwrap()).is_empty());
}

#[test]
fn a_replay_of_a_replay_gives_the_same_verdicts() {
    let first = replay(
        fixture("lost-events.ndjson").to_str().unwrap(),
        None,
        &["--json"],
        "first",
    );
    assert!(first.status.success());
    let text = String::from_utf8(first.stdout).unwrap();
    let second = replay("-", Some(&text), &["--json"], "second");
    assert!(second.status.success());
    let again = verdicts(&String::from_utf8(second.stdout).unwrap());
    assert_eq!(again, verdicts(&text));
    assert_eq!(again, recorded("lost-events.ndjson"));
}
