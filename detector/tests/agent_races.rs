//! Privileged: an NPA-layout LRU map, pinned in a bpffs the test mounts, holds keys for real
//! TCP connections in namespaces the test creates; the test deletes keys as NPA's cleanup
//! would, some rightfully (the flow expired and was reaped), some wrongfully (the flow is live,
//! including a genuine port reuse). `detector run` must report exactly the wrongful ones, with
//! the right class, and write trace files that parse and match.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::{
    Detector, NetnsPair, RaceWorld, connect_from, connect_from_port, privileged, reset,
    start_echo_server,
};
use detector::npa::{Layout, NpaKey};
use serde_json::Value;

fn key(sport: u16, server: std::net::SocketAddr, layout: Layout) -> NpaKey {
    common::client_key(sport, server, layout.key.has_ifindex().then_some(5))
}

/// `detector run` on the test's map and server namespace.
fn start(map: &AgentMap, ns: &NetnsPair, traces: &std::path::Path, after: &str) -> Detector {
    let netns = NetnsPair::path(&ns.server);
    Detector::watching(map, Some(&netns), traces, &["--trace-after", after])
}

/// `detector replay` of the run's own recording reproduces its verdicts one for one (all but
/// the live run's detection latency and trace path).
fn assert_replays(events: &[Value]) {
    use std::io::Write;
    let comparable = |v: &Value| {
        let mut v = v.clone();
        let o = v.as_object_mut().unwrap();
        o.remove("detection_latency_ns");
        o.remove("trace_file");
        v
    };
    let recording: String = events.iter().map(|e| format!("{e}\n")).collect();
    let dir = std::env::temp_dir().join(format!("agent-races-replay-{}", unique_name()));
    let mut child = std::process::Command::new(common::DETECTOR)
        .args(["replay", "-", "--json", "--trace-dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(recording.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "verdict")
        .map(|v| comparable(&v))
        .collect();
    let recorded: Vec<Value> = verdicts(events).into_iter().map(comparable).collect();
    assert_eq!(
        replayed, recorded,
        "replayed verdicts differ from the run's"
    );
}

fn verdicts(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["type"] == "verdict").collect()
}

fn run_scenario(layout: &str) {
    let layout: Layout = layout.parse().unwrap();
    let RaceWorld {
        ns,
        fs: _fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, 2);
    let det = start(&map, &ns, &traces, "0.5");

    // B: a flow that ends (expires, and a dump reaps it) before the cleanup deletes its key.
    let b = connect_from(&ns.client, server);
    let kb = key(b.local_addr().unwrap().port(), server, layout);
    map.insert(&kb, 1);
    // D: a flow from a fixed port whose entry expires, then the port is reused.
    let port_d = 41_000 + (std::process::id() % 1000) as u16;
    let d1 = connect_from_port(&ns.client, ns.client_ip, port_d, server);
    let kd = key(port_d, server, layout);
    map.insert(&kd, 1);

    sleep(Duration::from_millis(3000)); // past the 2 s established timeout
    ns.exec_ok(&ns.server, "conntrack", &["-L"]); // reaps B's and D's expired entries

    // Rightful: B is gone from the kernel.
    assert_eq!(map.delete(&kb), 0);
    // Port reuse: D's port is taken again by a new connection (same 5-tuple) before the
    // cleanup, working from its stale copy, deletes D's key.
    reset(d1);
    let d2 = connect_from_port(&ns.client, ns.client_ip, port_d, server);
    map.insert(&kd, 2);
    assert_eq!(map.delete(&kd), 0);
    // A: a live flow whose key is deleted shortly after it started (snapshot lag).
    let a = connect_from(&ns.client, server);
    let ka = key(a.local_addr().unwrap().port(), server, layout);
    map.insert(&ka, 3);
    sleep(Duration::from_millis(50));
    assert_eq!(map.delete(&ka), 0);
    // A delete of a key that is not there: ENOENT, not a race.
    assert_eq!(map.delete(&ka), -(libc::ENOENT as i64));
    // The policy now denies A's replies (here an nft drop in the server's output path stands
    // in for NPA's TC program): the next reply is the race's victim.
    ns.exec_ok(
        &ns.server,
        "nft",
        &[&format!(
            "add chain inet dt out {{ type filter hook output priority 0; policy accept; }}; \
             add rule inet dt out tcp sport {} tcp dport {} drop",
            server.port(),
            ka.sport
        )],
    );
    {
        use std::io::Write;
        (&a).write_all(b"y").unwrap();
    }

    sleep(Duration::from_millis(1500)); // trace windows close
    let (events, stderr) = det.stop();
    assert_replays(&events);

    let v = verdicts(&events);
    assert_eq!(
        v.len(),
        2,
        "exactly the two wrongful deletes: {v:#?}\n{stderr}"
    );
    let by_port = |p: u16| {
        v.iter()
            .find(|x| x["verdict"]["key"]["sport"] == p)
            .unwrap_or_else(|| panic!("no verdict for sport {p}: {v:#?}"))
    };
    let va = by_port(ka.sport);
    assert_eq!(va["verdict"]["class"], "snapshot-lag", "{va:#}");
    assert_eq!(va["verdict"]["decided_by"], "kernel");
    // The denied reply is reported and named in A's trace.
    let drops: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "packet_drop")
        .collect();
    assert!(
        !drops.is_empty(),
        "the dropped reply was reported: {stderr}"
    );
    assert!(
        drops.iter().all(|d| {
            let (s, p) = (&d["tuple"]["sport"], &d["tuple"]["dport"]);
            (*s == server.port() && *p == ka.sport) || (*s == ka.sport && *p == server.port())
        }),
        "only the watched flow's drops (either direction): {drops:#?}"
    );
    // The first is the denied reply (server -> client).
    assert_eq!(drops[0]["tuple"]["sport"], server.port());
    assert_eq!(drops[0]["reason"], "NETFILTER_DROP", "{:#}", drops[0]);
    let vd = by_port(port_d);
    assert_eq!(vd["verdict"]["class"], "port-reuse", "{vd:#}");
    assert!(vd["verdict"]["old"]["reason"] == "expired", "{vd:#}");
    assert!(vd["verdict"]["reuse_gap_ns"].is_i64() || vd["verdict"]["reuse_gap_ns"].is_u64());
    assert!(
        v.iter().all(|x| x["verdict"]["key"]["sport"] != kb.sport),
        "rightful delete reported"
    );
    for x in &v {
        assert!(x["time"].is_string() && x["ts_ns"].is_u64());
        assert!(x["detection_latency_ns"].as_u64().unwrap() > 0);
        assert_eq!(x["verdict"]["agent"]["pid"], std::process::id());
    }

    // The agent_delete events carry the kernel's view at the delete.
    let deletes: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent_delete")
        .collect();
    assert_eq!(deletes.len(), 4, "{deletes:#?}");
    let view = |p: u16, ret: i64| {
        deletes
            .iter()
            .find(|d| d["key"]["sport"] == p && d["ret"] == ret)
            .map(|d| d["kernel_view"].clone())
    };
    assert_eq!(view(kb.sport, 0), Some(Value::from("absent")));
    assert_eq!(view(port_d, 0), Some(Value::from("live")));
    assert_eq!(view(ka.sport, 0), Some(Value::from("live")));

    // Trace files: one per race, parseable, matching the verdicts.
    let mut files: Vec<_> = std::fs::read_dir(&traces)
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
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        assert_eq!(doc["schema_version"], 1);
        let t = &doc["trace"];
        let sport = t["verdict"]["key"]["sport"].as_u64().unwrap() as u16;
        let live = by_port(sport);
        assert_eq!(t["verdict"]["class"], live["verdict"]["class"]);
        assert_eq!(
            t["verdict"]["delete_ts_ns"],
            live["verdict"]["delete_ts_ns"]
        );
        let kinds: Vec<&str> = t["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"ct_new") && kinds.contains(&"agent_delete"),
            "{kinds:?}"
        );
        if sport == port_d {
            assert!(
                kinds.contains(&"ct_destroy"),
                "port reuse shows the old entry's end: {kinds:?}"
            );
        }
        assert!(
            t["verdict"]["delete_time"].is_string(),
            "wall time next to kernel time"
        );
    }
    let summary = events
        .iter()
        .find(|e| e["type"] == "summary")
        .expect("summary");
    assert_eq!(summary["races"], 2);
    assert!(
        summary["engine"]["deletes"]["rightful"].as_u64().unwrap() >= 1,
        "{summary:#}"
    );
    let lost: u64 = summary["kernel"]["lost"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(lost, 0);
    drop((a, b, d2));
    // Kept for inspection when DETECTOR_KEEP_TRACES is set (the closing note quotes one).
    if std::env::var_os("DETECTOR_KEEP_TRACES").is_some() {
        eprintln!("traces kept in {}", traces.display());
    } else {
        let _ = std::fs::remove_dir_all(&traces);
    }
}

/// NPA v1.3.7+ with the #610 value: 24-byte keys, 16-byte values.
#[test]
fn wrongful_deletes_are_races_v4_24() {
    if !privileged() {
        return;
    }
    run_scenario("v4-24/16");
}

/// NPA before v1.3.7: 20-byte keys, 1-byte values.
#[test]
fn wrongful_deletes_are_races_v4_20() {
    if !privileged() {
        return;
    }
    run_scenario("v4-20/1");
}

/// A batch delete is judged key by key: the key of a live flow is a race, the key of a flow
/// the kernel never had is not.
#[test]
fn batch_deletes_are_judged_key_by_key() {
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
    let det = start(&map, &ns, &traces, "0.2");
    let e = connect_from(&ns.client, server);
    let ke = key(e.local_addr().unwrap().port(), server, layout);
    let ghost = key(9, server, layout); // no such connection
    map.insert(&ke, 1);
    map.insert(&ghost, 1);
    let (rc, count) = map.delete_batch(&[ghost.clone(), ke.clone()]);
    assert_eq!((rc, count), (0, 2), "BPF_MAP_DELETE_BATCH");
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    assert_replays(&events);
    let deletes: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent_delete")
        .collect();
    assert_eq!(
        deletes.len(),
        2,
        "one record per key: {deletes:#?}\n{stderr}"
    );
    assert!(deletes.iter().all(|d| d["cmd"] == 27));
    let v = verdicts(&events);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0]["verdict"]["key"]["sport"], ke.sport);
    assert_eq!(v[0]["verdict"]["class"], "snapshot-lag");
    let summary = events.iter().find(|e| e["type"] == "summary").unwrap();
    assert_eq!(summary["kernel"]["batch_deletes"], 1);
    assert_eq!(summary["kernel"]["batch_truncated"], 0);
    drop(e);
    let _ = std::fs::remove_dir_all(&traces);
}

/// A batch delete far beyond one page of keys is judged key by key, every key: 2,000 keys of
/// live flows deleted in one BPF_MAP_DELETE_BATCH are 2,000 races, none truncated.
#[test]
fn a_batch_of_2000_live_keys_is_2000_races() {
    if !privileged() {
        return;
    }
    const N: usize = 2000;
    let layout: Layout = "v4-24/16".parse().unwrap();
    let RaceWorld {
        ns,
        fs: _fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, 30);
    let det = start(&map, &ns, &traces, "0.2");
    let streams: Vec<_> = (0..N).map(|_| connect_from(&ns.client, server)).collect();
    let keys: Vec<NpaKey> = streams
        .iter()
        .map(|s| key(s.local_addr().unwrap().port(), server, layout))
        .collect();
    for k in &keys {
        map.insert(k, 1);
    }
    let (rc, count) = map.delete_batch(&keys);
    assert_eq!((rc, count), (0, N as u32), "BPF_MAP_DELETE_BATCH");
    sleep(Duration::from_millis(1500));
    let (events, stderr) = det.stop();
    let deletes = events
        .iter()
        .filter(|e| e["type"] == "agent_delete")
        .count();
    assert_eq!(deletes, N, "one record per key\n{stderr}");
    let v = verdicts(&events);
    assert_eq!(v.len(), N, "every live key is a race\n{stderr}");
    let summary = events.iter().find(|e| e["type"] == "summary").unwrap();
    assert_eq!(summary["kernel"]["batch_deletes"], 1);
    assert_eq!(summary["kernel"]["batch_truncated"], 0);
    assert_eq!(
        summary["kernel"]["lost"][3], 0,
        "no agent delete record lost"
    );
    assert!(
        stderr.contains("batch_truncated 0,"),
        "the exit line accounts for truncation: {stderr}"
    );
    drop(streams);
    let _ = std::fs::remove_dir_all(&traces);
}

/// Flows that existed before the detector started are known from the ctnetlink snapshot: a
/// delete of an idle one (never seen by the kernel probes) and of one that has sent a packet
/// since (first seen then) are both races of class stale-match, and the latter is not taken
/// for a new entry.
#[test]
fn flows_from_before_the_start_are_known() {
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
    } = RaceWorld::new(layout, 60);
    let idle = connect_from(&ns.client, server);
    let busy = connect_from(&ns.client, server);
    let k_idle = key(idle.local_addr().unwrap().port(), server, layout);
    let k_busy = key(busy.local_addr().unwrap().port(), server, layout);
    map.insert(&k_idle, 1);
    map.insert(&k_busy, 1);
    let det = start(&map, &ns, &traces, "0.2");
    {
        use std::io::{Read, Write};
        (&busy).write_all(b"z").unwrap();
        let mut b = [0u8; 1];
        (&busy).read_exact(&mut b).unwrap();
    }
    sleep(Duration::from_millis(100));
    assert_eq!(map.delete(&k_idle), 0);
    assert_eq!(map.delete(&k_busy), 0);
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    assert_replays(&events);
    assert!(stderr.contains("2 keys now"), "map snapshot: {stderr}");
    assert!(
        stderr.contains("(2 entries now)"),
        "conntrack snapshot: {stderr}"
    );
    let v = verdicts(&events);
    assert_eq!(v.len(), 2, "{v:#?}\n{stderr}");
    // Only the skb-based insert probe (tracepoint backend) sees an old entry again when it
    // sends a packet; the confirm-based backends never report it, so the shadow decides both.
    let summary = events.iter().find(|e| e["type"] == "summary").unwrap();
    let busy_by = if summary["backend"] == "tracepoint" {
        "kernel"
    } else {
        "shadow"
    };
    for (k, by) in [(&k_idle, "shadow"), (&k_busy, busy_by)] {
        let x = v
            .iter()
            .find(|x| x["verdict"]["key"]["sport"] == k.sport)
            .unwrap_or_else(|| panic!("no verdict for {k}: {v:#?}"));
        assert_eq!(x["verdict"]["class"], "stale-match", "{x:#}");
        assert_eq!(x["verdict"]["decided_by"], by, "{x:#}");
        assert!(x["verdict"]["old"].is_null(), "not a port reuse: {x:#}");
    }
    drop((idle, busy));
    let _ = std::fs::remove_dir_all(&traces);
}

/// When the agent restarts and re-creates its map (a new id at the same pin), the detector
/// follows it without a restart.
#[test]
fn follows_a_recreated_map() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let ns = NetnsPair::new(60);
    let fs = Bpffs::mount();
    let pin = fs.dir.join("aws_conntrack_map");
    let name = unique_name();
    let first = AgentMap::create(layout, &pin, &name);
    let server = start_echo_server(&ns.server, ns.server_ip);
    let traces = fs.dir.with_extension("traces");
    let det = start(&first, &ns, &traces, "0.2");
    // The agent restarts: its old map goes away, a new one is pinned in its place.
    std::fs::remove_file(&pin).unwrap();
    drop(first);
    let second = AgentMap::create(layout, &pin, &name);
    sleep(Duration::from_millis(2500)); // the detector re-resolves the pin every second
    let c = connect_from(&ns.client, server);
    let k = key(c.local_addr().unwrap().port(), server, layout);
    second.insert(&k, 1);
    assert_eq!(second.delete(&k), 0);
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    assert_replays(&events);
    let moved = events
        .iter()
        .find(|e| e["type"] == "map_recreated")
        .unwrap_or_else(|| panic!("no map_recreated event: {stderr}"));
    let v = verdicts(&events);
    assert_eq!(v.len(), 1, "{v:#?}\n{stderr}");
    assert_eq!(v[0]["verdict"]["map_id"], moved["new_id"]);
    assert_ne!(moved["new_id"], moved["old_id"]);
    drop(c);
    let _ = std::fs::remove_dir_all(&traces);
}

/// IPv6 keys (NPA's 60-byte layout): the kernel decodes the 16-byte addresses of the key and
/// judges the delete of a live flow's key a race.
#[test]
fn ipv6_keys_are_judged_in_the_kernel() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v6-60/16".parse().unwrap();
    let ns = NetnsPair::new(60);
    let fs = Bpffs::mount();
    let map = AgentMap::create(layout, &fs.dir.join("aws_conntrack_map"), &unique_name());
    let server = start_echo_server(&ns.server, "fd77::1");
    let traces = fs.dir.with_extension("traces");
    let det = start(&map, &ns, &traces, "0.2");
    let c = connect_from(&ns.client, server);
    let k = NpaKey {
        src: "fd77::2".parse().unwrap(),
        sport: c.local_addr().unwrap().port(),
        dst: server.ip(),
        dport: server.port(),
        proto: 6,
        owner: server.ip(),
        ifindex: Some(5),
    };
    map.insert(&k, 1);
    assert_eq!(map.delete(&k), 0);
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    assert_replays(&events);
    let d: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent_delete")
        .collect();
    assert_eq!(d.len(), 1, "{stderr}");
    assert_eq!(d[0]["kernel_view"], "live", "{:#}", d[0]);
    assert_eq!(d[0]["key"]["src"], "fd77::2");
    let v = verdicts(&events);
    assert_eq!(v.len(), 1, "{v:#?}\n{stderr}");
    assert_eq!(v[0]["verdict"]["class"], "snapshot-lag");
    assert_eq!(v[0]["verdict"]["live"]["orig"]["src"], "fd77::2");
    drop(c);
    let _ = std::fs::remove_dir_all(&traces);
}
