//! Privileged: a port-reuse race names its four instants. Under a 2 s established timeout in
//! the test's namespace, a connection's entry times out (expiry), `conntrack -L` reaps it
//! (reap), a new connection takes the same 5-tuple (reuse) and the agent's cleanup deletes the
//! key (delete). The verdict, on the stream and in its trace file, orders them and names the
//! dump's task as the reaper.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{Detector, NetnsPair, RaceWorld, connect_from_port, of_type, privileged, reset};
use detector::npa::Layout;
use serde_json::Value;

const MS: i64 = 1_000_000;

fn u64_at(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {v:#}"))
}

fn i64_at(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} missing: {v:#}"))
}

#[test]
fn a_race_orders_expiry_reap_reuse_and_delete() {
    if !privileged() {
        return;
    }
    let established_timeout_s = 2;
    let layout: Layout = "v4-24/16".parse().unwrap();
    let RaceWorld {
        ns,
        fs: _fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, established_timeout_s);
    let netns = NetnsPair::path(&ns.server);
    let det = Detector::watching(&map, Some(&netns), &traces, &["--trace-after", "0.5"]);

    let port = 43_000 + (std::process::id() % 1000) as u16;
    let key = common::client_key(port, server, Some(5));
    let first = connect_from_port(&ns.client, ns.client_ip, port, server);
    map.insert(&key, 1);
    // Its last packet was the reply of the exchange above: it times out 2 s later, and
    // nothing reaps it until the dump a second after that.
    sleep(Duration::from_millis(3000));
    ns.exec_ok(&ns.server, "conntrack", &["-L"]);
    reset(first);
    let _second = connect_from_port(&ns.client, ns.client_ip, port, server);
    map.insert(&key, 2);
    sleep(Duration::from_millis(20));
    assert_eq!(map.delete(&key), 0);

    sleep(Duration::from_millis(1000)); // past the after-window: the trace is written
    let (events, stderr) = det.stop();
    let verdicts = of_type(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "{verdicts:#?}\n{stderr}");
    let v = &verdicts[0]["verdict"];
    assert_eq!(v["class"], "port-reuse", "{v:#}");
    let i = &v["instants"];
    eprintln!("instants: {i}");
    let (expiry, reap, reuse, delete) = (
        u64_at(i, "expiry_ns"),
        u64_at(i, "reap_ns"),
        u64_at(i, "reuse_ns"),
        u64_at(i, "delete_ns"),
    );
    assert!(
        expiry <= reap && reap <= reuse && reuse <= delete,
        "instants out of order: {i:#}"
    );
    assert_eq!(delete, u64_at(v, "delete_ts_ns"));
    assert_eq!(reap, u64_at(&v["old"], "destroyed_ns"));
    assert_eq!(reuse, u64_at(&v["live"], "born_ns"));
    // The gaps are the differences of the instants.
    assert_eq!(i64_at(i, "expiry_to_reap_ns"), (reap - expiry) as i64);
    assert_eq!(i64_at(i, "reap_to_reuse_ns"), (reuse - reap) as i64);
    assert_eq!(i64_at(i, "reuse_to_delete_ns"), (delete - reuse) as i64);
    // The expiry is the timeout's end, not the reap: about 2 s after the old entry's last
    // packet (its birth plus one exchange), and about a second before the dump. One jiffy
    // is at most 10 ms; the slack is for a loaded machine.
    let lived_to_expiry = (expiry - u64_at(&v["old"], "born_ns")) as i64;
    assert!(
        (i64::from(established_timeout_s) * 1000 * MS - 20 * MS
            ..i64::from(established_timeout_s) * 1000 * MS + 500 * MS)
            .contains(&lived_to_expiry),
        "expiry {lived_to_expiry} ns after the old entry's birth: {v:#}"
    );
    assert!(
        i64_at(i, "expiry_to_reap_ns") > 500 * MS,
        "reaped long after it expired: {i:#}"
    );
    // The dump reaped it, in its own task (the gc worker, had it passed first, is named so).
    let by = &i["reaped_by"];
    assert!(
        (by["by"] == "task" && by["comm"] == "conntrack") || by["by"] == "gc_worker",
        "reaper: {by:#}"
    );
    assert_eq!(v["old"]["reaped_by"], *by);
    assert_eq!(u64_at(&v["old"], "expiry_ns"), expiry);
    // The destroy record itself carries the expiry.
    let destroy = of_type(&events, "ct_destroy")
        .into_iter()
        .find(|d| d["orig"]["sport"] == port && u64_at(d, "ts_ns") == reap)
        .unwrap_or_else(|| panic!("no destroy at the reap: {stderr}"));
    assert_eq!(u64_at(destroy, "expiry_ns"), expiry);

    // The trace file carries the same instants.
    let trace_file = std::fs::read_dir(&traces)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("race-")
        })
        .expect("a trace file");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&trace_file).unwrap()).unwrap();
    let ti = &doc["trace"]["verdict"]["instants"];
    for field in [
        "expiry_ns",
        "reap_ns",
        "reuse_ns",
        "delete_ns",
        "expiry_to_reap_ns",
        "reaped_by",
    ] {
        assert_eq!(ti[field], i[field], "{field} in the trace file: {ti:#}");
    }
    let _ = std::fs::remove_dir_all(&traces);
}
