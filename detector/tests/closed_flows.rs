//! Privileged: the TCP state read in the kernel at the agent's delete separates a closed
//! connection's key (reset: conntrack CLOSE) from a live one's. The closed one is a
//! closed-flow delete, never a race; the live one is a race, and once its denied reply is
//! dropped the race is confirmed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::Write;
use std::thread::sleep;
use std::time::Duration;

use common::{Detector, NetnsPair, RaceWorld, connect_from, of_type, privileged, reset};
use detector::npa::{Layout, NpaKey};
use serde_json::Value;

fn key(sport: u16, server: std::net::SocketAddr) -> NpaKey {
    common::client_key(sport, server, Some(5))
}

#[test]
fn reset_flow_is_a_closed_flow_delete_and_a_live_flow_a_race() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let RaceWorld {
        ns,
        fs: _fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, 30);
    let netns = NetnsPair::path(&ns.server);
    let det = Detector::watching(&map, Some(&netns), &traces, &["--trace-after", "1"]);

    // C: closed with a reset; its entry stays in CLOSE (10 s by default) when the key goes.
    let c = connect_from(&ns.client, server);
    let kc = key(c.local_addr().unwrap().port(), server);
    map.insert(&kc, 1);
    reset(c);
    sleep(Duration::from_millis(100));
    assert_eq!(map.delete(&kc), 0);

    // E: ESTABLISHED; its key is deleted, then the policy denies its reply.
    let e = connect_from(&ns.client, server);
    let ke = key(e.local_addr().unwrap().port(), server);
    map.insert(&ke, 2);
    sleep(Duration::from_millis(50));
    assert_eq!(map.delete(&ke), 0);
    ns.exec_ok(
        &ns.server,
        "nft",
        &[&format!(
            "add chain inet dt out {{ type filter hook output priority 0; policy accept; }}; \
             add rule inet dt out tcp sport {} tcp dport {} drop",
            server.port(),
            ke.sport
        )],
    );
    (&e).write_all(b"y").unwrap();

    sleep(Duration::from_millis(2000)); // past the after-window
    let (events, stderr) = det.stop();

    let closed = of_type(&events, "closed_flow_delete");
    assert_eq!(
        closed.len(),
        1,
        "one closed-flow delete: {closed:#?}\n{stderr}"
    );
    let cf = &closed[0]["closed_flow_delete"];
    assert_eq!(cf["key"]["sport"], kc.sport, "{cf:#}");
    assert_eq!(cf["tcp_state"], "CLOSE", "{cf:#}");
    assert!(cf["timeout_left_ns"].as_i64().unwrap() > 0, "{cf:#}");

    let verdicts = of_type(&events, "verdict");
    assert_eq!(
        verdicts.len(),
        1,
        "only E is a race: {verdicts:#?}\n{stderr}"
    );
    assert_eq!(verdicts[0]["verdict"]["key"]["sport"], ke.sport);

    // E's denied reply confirms its race, with the delay and the drop reason.
    let confirmed = of_type(&events, "race_confirmed");
    assert_eq!(confirmed.len(), 1, "{confirmed:#?}\n{stderr}");
    let rc = &confirmed[0]["race_confirmation"];
    assert_eq!(rc["key"]["sport"], ke.sport, "{rc:#}");
    assert_eq!(rc["confirmed"], true);
    assert_eq!(rc["delete_ts_ns"], verdicts[0]["verdict"]["delete_ts_ns"]);
    assert_eq!(rc["first_denied"]["reason"], "NETFILTER_DROP", "{rc:#}");
    assert_eq!(
        rc["first_denied"]["tuple"]["sport"],
        server.port(),
        "the reply"
    );
    let delay = rc["delete_to_denied_ns"].as_u64().unwrap();
    assert!(delay > 0 && delay < 1_000_000_000, "{rc:#}");
    assert!(of_type(&events, "race_unconfirmed").is_empty());
    eprintln!("confirmed record: {}", confirmed[0]);
    // Its trace file says so too.
    let trace_files: Vec<_> = std::fs::read_dir(&traces)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("race-")
        })
        .collect();
    assert_eq!(trace_files.len(), 1, "{trace_files:?}");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_files[0]).unwrap()).unwrap();
    assert_eq!(doc["trace"]["confirmed"], true);
    assert_eq!(doc["trace"]["verdict"]["delete_to_denied_ns"], delay);

    let deletes = of_type(&events, "agent_delete");
    let state_of = |p: u16| {
        deletes
            .iter()
            .find(|d| d["key"]["sport"] == p)
            .map(|d| d["entry_tcp_state"].clone())
    };
    assert_eq!(state_of(kc.sport), Some(Value::from("CLOSE")));
    assert_eq!(state_of(ke.sport), Some(Value::from("ESTABLISHED")));

    let summary = of_type(&events, "summary");
    let s = summary.first().expect("summary");
    assert_eq!(s["races"], 1, "{s:#}");
    assert_eq!(s["engine"]["deletes"]["closed_flow"], 1, "{s:#}");
    assert!(
        stderr.contains("1 closed-flow deletes"),
        "exit line counts them: {stderr}"
    );
    drop(e);
    let _ = std::fs::remove_dir_all(&traces);
}
