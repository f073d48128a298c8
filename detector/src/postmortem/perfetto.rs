//! The race as Chrome trace-event JSON (the "JSON Object Format" of the Trace Event Format
//! document, which Perfetto's UI and chrome://tracing open): one process per race, one thread
//! track per kernel entry with a complete event (`X`) for its lifetime, a track for the
//! agent's deletes and one for denied packets (instant events, `i`), and a flow (`s` → `f`)
//! from the race's delete to the first denied packet. Timestamps are µs of the kernel's
//! CLOCK_MONOTONIC, as in the trace file.

use serde_json::{Value, json};

use super::timeline::{EntryRole, RaceTimeline};
use super::trace_file::TraceDocument;

const PID: u64 = 1;
const AGENT_TID: u64 = 1;
const DROPS_TID: u64 = 2;
const FIRST_ENTRY_TID: u64 = 10;
const FLOW_ID: u64 = 1;

/// `ms` relative to the delete as µs of the kernel clock.
fn us(delete_ns: u64, ms: f64) -> f64 {
    delete_ns as f64 / 1e3 + ms * 1e3
}

fn thread_name(tid: u64, name: &str, sort: u64) -> [Value; 2] {
    [
        json!({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "ts": 0,
               "args": {"name": name}}),
        json!({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid, "ts": 0,
               "args": {"sort_index": sort}}),
    ]
}

/// The trace-event document of one race.
pub fn race_trace_events(doc: &TraceDocument) -> Value {
    let t = RaceTimeline::build(doc);
    let v = &doc.trace.verdict;
    let d = v.delete_ts_ns;
    let mut ev: Vec<Value> = vec![json!({
        "ph": "M", "name": "process_name", "pid": PID, "tid": 0, "ts": 0,
        "args": {"name": format!("{} race {}", v.class, v.key.display())}
    })];
    ev.extend(thread_name(AGENT_TID, "agent map deletes", 0));
    ev.extend(thread_name(DROPS_TID, "denied packets", 1));
    for (i, e) in t.entries.iter().enumerate() {
        let tid = FIRST_ENTRY_TID + i as u64;
        let role = match e.role {
            EntryRole::Old => "old entry",
            EntryRole::Live => "live entry",
            EntryRole::Other => "other entry",
        };
        ev.extend(thread_name(
            tid,
            &format!("conntrack {role} {}", e.id),
            2 + i as u64,
        ));
        // An entry born before the window (or unknown) starts at the view's start.
        let start = e.born_ms.unwrap_or(t.start_ms).max(t.start_ms);
        let end = e.reaped.as_ref().map_or(t.end_ms, |r| r.0);
        ev.push(json!({
            "ph": "X", "cat": "conntrack", "name": role, "pid": PID, "tid": tid,
            "ts": us(d, start), "dur": ((end - start) * 1e3).max(0.0),
            "args": {
                "id": e.id.to_string(),
                "born": e.born_ms.map_or("before the detector saw it".to_string(), |b| format!("{b:.3} ms")),
                "reaped": e.reaped.as_ref().map_or("alive at window end".to_string(), |(r, why)| format!("{r:.3} ms ({why})")),
            }
        }));
        if let Some(x) = e.expiry_ms {
            ev.push(
                json!({"ph": "i", "s": "t", "cat": "conntrack", "name": "timeout as of the delete",
                           "pid": PID, "tid": tid, "ts": us(d, x)}),
            );
        }
        if let Some((r, why)) = &e.reaped {
            ev.push(
                json!({"ph": "i", "s": "t", "cat": "conntrack", "name": format!("reaped ({why})"),
                           "pid": PID, "tid": tid, "ts": us(d, *r)}),
            );
        }
    }
    for m in &t.deletes {
        ev.push(json!({
            "ph": "i", "s": "t", "cat": "agent",
            "name": if m.is_race { "delete (race)" } else { "delete" },
            "pid": PID, "tid": AGENT_TID, "ts": us(d, m.at_ms),
            "args": {"task": m.task, "map_id": m.map_id, "key": m.key, "result": m.result}
        }));
    }
    for m in &t.drops {
        ev.push(json!({
            "ph": "i", "s": "t", "cat": "drop", "name": format!("denied: {}", m.reason),
            "pid": PID, "tid": DROPS_TID, "ts": us(d, m.at_ms),
            "args": {"reason": m.reason, "first_denied": m.first}
        }));
    }
    if let Some(first) = t.drops.iter().find(|m| m.first) {
        ev.push(
            json!({"ph": "s", "cat": "race", "name": "delete → first denied", "id": FLOW_ID,
                       "pid": PID, "tid": AGENT_TID, "ts": us(d, 0.0)}),
        );
        ev.push(
            json!({"ph": "f", "bp": "e", "cat": "race", "name": "delete → first denied",
                       "id": FLOW_ID, "pid": PID, "tid": DROPS_TID, "ts": us(d, first.at_ms)}),
        );
    }
    json!({
        "traceEvents": ev,
        "displayTimeUnit": "ms",
        "otherData": {
            "class": v.class, "key": v.key.display(), "host": doc.host,
            "detection_latency_ns": doc.detection_latency_ns,
            "clock": "kernel CLOCK_MONOTONIC, µs"
        }
    })
}

/// Checks `doc` against the fields the Trace Event Format document requires of each event
/// phase used here. Returns every problem found (empty: valid).
pub fn check_trace_events(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(events) = doc.get("traceEvents").and_then(Value::as_array) else {
        return vec!["no traceEvents array (JSON Object Format)".into()];
    };
    if let Some(unit) = doc.get("displayTimeUnit")
        && !matches!(unit.as_str(), Some("ms" | "ns"))
    {
        problems.push(format!(
            "displayTimeUnit must be \"ms\" or \"ns\", is {unit}"
        ));
    }
    let mut flow_starts = Vec::new();
    let mut flow_ends = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let mut bad = |what: String| problems.push(format!("event {i}: {what}: {e}"));
        let Some(ph) = e.get("ph").and_then(Value::as_str) else {
            bad("no ph".into());
            continue;
        };
        if !e.get("name").is_some_and(Value::is_string) {
            bad("name is not a string".into());
        }
        for f in ["pid", "tid"] {
            if !e.get(f).is_some_and(Value::is_u64) {
                bad(format!("{f} is not an integer"));
            }
        }
        // ts: a number of microseconds.
        if !e.get("ts").is_some_and(Value::is_number) {
            bad("ts is not a number".into());
        }
        if ph != "M" && !e.get("cat").is_some_and(Value::is_string) {
            bad("cat is not a string".into());
        }
        if let Some(args) = e.get("args")
            && !args.is_object()
        {
            bad("args is not an object".into());
        }
        match ph {
            "X" => {
                if !e
                    .get("dur")
                    .and_then(Value::as_f64)
                    .is_some_and(|d| d >= 0.0)
                {
                    bad("X without a non-negative dur".into());
                }
            }
            "i" | "I" => {
                if let Some(s) = e.get("s")
                    && !matches!(s.as_str(), Some("g" | "p" | "t"))
                {
                    bad(format!("instant scope s must be g, p or t, is {s}"));
                }
            }
            "s" | "t" | "f" => {
                let Some(id) = e.get("id").filter(|id| id.is_u64() || id.is_string()) else {
                    bad("flow event without id".into());
                    continue;
                };
                if let Some(bp) = e.get("bp")
                    && bp.as_str() != Some("e")
                {
                    bad(format!("flow binding point bp must be \"e\", is {bp}"));
                }
                let key = (e["cat"].clone(), e["name"].clone(), id.clone());
                match ph {
                    "s" => flow_starts.push((key, e["ts"].as_f64())),
                    "f" => flow_ends.push((key, e["ts"].as_f64())),
                    _ => {}
                }
            }
            "M" => {
                let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
                if !matches!(
                    name,
                    "process_name"
                        | "process_labels"
                        | "process_sort_index"
                        | "thread_name"
                        | "thread_sort_index"
                ) {
                    bad(format!("unknown metadata event {name}"));
                }
                if !e.get("args").is_some_and(Value::is_object) {
                    bad("metadata without args".into());
                }
            }
            other => bad(format!("phase {other} is not one this exporter writes")),
        }
    }
    // Each flow: one start, then one end with the same cat, name and id, not earlier.
    for (key, ts) in &flow_ends {
        match flow_starts.iter().find(|(k, _)| k == key) {
            None => problems.push(format!("flow end {key:?} without a start")),
            Some((_, start)) if start > ts => {
                problems.push(format!("flow {key:?} ends before it starts"))
            }
            _ => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::super::trace_file::tests::fixture;
    use super::*;

    #[test]
    fn export_of_the_lab_race_is_valid_trace_event_json() {
        let out = race_trace_events(&fixture());
        let problems = check_trace_events(&out);
        assert!(problems.is_empty(), "{problems:#?}");
        let events = out["traceEvents"].as_array().unwrap();
        let count = |ph: &str| events.iter().filter(|e| e["ph"] == ph).count();
        assert_eq!(count("X"), 3, "one lifetime per kernel entry");
        let tids: std::collections::BTreeSet<_> = events
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| e["tid"].as_u64().unwrap())
            .collect();
        assert_eq!(tids.len(), 3, "one track per entry");
        assert_eq!((count("s"), count("f")), (1, 1));
        let drops: Vec<_> = events.iter().filter(|e| e["cat"] == "drop").collect();
        assert_eq!(drops.len(), 4);
        let race_delete = events
            .iter()
            .find(|e| e["name"] == "delete (race)")
            .unwrap();
        // µs of the kernel clock: the delete at 1036781864847 ns.
        assert!((race_delete["ts"].as_f64().unwrap() - 1_036_781_864.847).abs() < 1e-3);
        let flow_end = events.iter().find(|e| e["ph"] == "f").unwrap();
        assert_eq!(
            flow_end["ts"], drops[0]["ts"],
            "the flow ends on the first denied packet"
        );
    }

    #[test]
    fn the_check_finds_broken_events() {
        let mut out = race_trace_events(&fixture());
        let events = out["traceEvents"].as_array_mut().unwrap();
        let x = events.iter().position(|e| e["ph"] == "X").unwrap();
        events[x].as_object_mut().unwrap().remove("dur");
        let i = events.iter().position(|e| e["ph"] == "i").unwrap();
        events[i]["s"] = "x".into();
        let f = events.iter().position(|e| e["ph"] == "f").unwrap();
        events[f].as_object_mut().unwrap().remove("id");
        events[0]["pid"] = "one".into();
        let problems = check_trace_events(&out);
        assert_eq!(problems.len(), 4, "{problems:#?}");
    }
}
