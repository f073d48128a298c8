//! Privileged: bounds that leave deletes unjudged never turn them into rightful ones. A live
//! flow from before the start whose state the engine evicted (`--max-flows`), and live flows
//! the kernel's tables could not index (`--max-entries`), are reported as unjudged, counted in
//! /metrics and on the exit line, and the summary carries `maybe_incomplete`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::faults::{metric, metrics};
use common::{Detector, NetnsPair, RaceWorld, connect_from, of_type, privileged};
use detector::npa::{Layout, NpaKey};

fn key(sport: u16, server: std::net::SocketAddr) -> NpaKey {
    common::client_key(sport, server, None)
}

/// A pre-existing, idle ESTABLISHED flow whose state the engine evicts (`--max-flows 8`, then
/// more flows) is deleted: the delete is unjudged (shadow evicted), not rightful.
#[test]
fn delete_of_an_evicted_preexisting_live_flow_is_unjudged() {
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
    let k_idle = key(idle.local_addr().unwrap().port(), server);
    map.insert(&k_idle, 1);
    let det = Detector::run(&[
        "--map-pin",
        map.pin.to_str().unwrap(),
        "--netns",
        &NetnsPair::path(&ns.server),
        "--trace-dir",
        traces.to_str().unwrap(),
        "--watermark-ms",
        "5",
        "--max-flows",
        "8",
    ]);
    // Enough new flows to push the idle one's state out of an 8-flow table.
    let others: Vec<_> = (0..24).map(|_| connect_from(&ns.client, server)).collect();
    sleep(Duration::from_millis(300));
    assert_eq!(map.delete(&k_idle), 0);
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    let unjudged = of_type(&events, "unjudged");
    assert_eq!(unjudged.len(), 1, "{unjudged:#?}\n{stderr}");
    assert_eq!(unjudged[0]["reason"], "shadow-evicted");
    assert_eq!(unjudged[0]["key"]["sport"], k_idle.sport);
    let summary = of_type(&events, "summary")[0];
    assert_eq!(summary["engine"]["deletes"]["rightful"], 0, "{summary:#}");
    assert_eq!(summary["engine"]["deletes"]["unjudged"], 1);
    assert_eq!(summary["maybe_incomplete"], true);
    assert!(stderr.contains("1 unjudged deletes"), "{stderr}");
    assert!(stderr.contains("MAYBE INCOMPLETE"), "{stderr}");
    drop((idle, others));
    let _ = std::fs::remove_dir_all(&traces);
}

/// `--max-entries 16` with 100 live flows: the kernel's tables overflow; every delete of a live
/// flow is a race or unjudged (none rightful), and the counters are in /metrics.
#[test]
fn full_kernel_tables_flag_deletes_and_export_counters() {
    if !privileged() {
        return;
    }
    const N: usize = 100;
    let layout: Layout = "v4-24/16".parse().unwrap();
    let RaceWorld {
        ns,
        fs: _fs,
        map,
        server,
        traces,
    } = RaceWorld::new(layout, 60);
    let listen = "127.0.0.1:19493";
    let det = Detector::run(&[
        "--map-pin",
        map.pin.to_str().unwrap(),
        "--netns",
        &NetnsPair::path(&ns.server),
        "--trace-dir",
        traces.to_str().unwrap(),
        "--watermark-ms",
        "5",
        "--max-entries",
        "16",
        "--listen",
        listen,
    ]);
    let streams: Vec<_> = (0..N).map(|_| connect_from(&ns.client, server)).collect();
    let keys: Vec<NpaKey> = streams
        .iter()
        .map(|s| key(s.local_addr().unwrap().port(), server))
        .collect();
    for k in &keys {
        map.insert(k, 1);
    }
    // Let the detector notice the overflow (it reads the kernel counters every 100 ms).
    sleep(Duration::from_millis(1500));
    for k in &keys {
        assert_eq!(map.delete(k), 0);
    }
    sleep(Duration::from_millis(1500));
    let text = metrics(listen);
    let (events, stderr) = det.stop();
    let races = of_type(&events, "verdict").len();
    let unjudged = of_type(&events, "unjudged").len();
    let summary = of_type(&events, "summary")[0];
    assert_eq!(
        races + unjudged,
        N,
        "every live delete is a race or unjudged\n{stderr}"
    );
    assert!(unjudged > 0, "the overflow must show\n{stderr}");
    assert_eq!(summary["engine"]["deletes"]["rightful"], 0, "{summary:#}");
    assert_eq!(summary["maybe_incomplete"], true);
    let full = metric(
        &text,
        "detector_capacity_overflow_total{counter=\"flows_full\"}",
    ) + metric(
        &text,
        "detector_capacity_overflow_total{counter=\"seen_full\"}",
    );
    assert!(full > 0, "{text}");
    assert!(
        metric(
            &text,
            "detector_capacity_overflow_total{counter=\"unjudged_kernel_table_full\"}"
        ) > 0,
        "{text}"
    );
    assert!(stderr.contains("MAYBE INCOMPLETE"), "{stderr}");
    assert!(
        stderr.contains("kernel tables hold 16 live conntrack entries (--max-entries;")
            && stderr.contains("B per entry")
            && stderr.contains("MiB of kernel memory"),
        "the start-up line names the tables' size and cost: {stderr}"
    );
    drop(streams);
    let _ = std::fs::remove_dir_all(&traces);
}

/// The kernel maps of a process: (max_entries, map_flags, memlock) of each map fd.
fn maps_of(pid: u32) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(text) = std::fs::read_to_string(f.unwrap().path()) else {
            continue;
        };
        if !text.contains("map_type:") {
            continue;
        }
        let field = |name: &str| -> u64 {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim();
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                None => v.parse().unwrap(),
            }
        };
        out.push((
            field("max_entries:"),
            field("map_flags:"),
            field("memlock:"),
        ));
    }
    out
}

/// Without --max-entries the tables hold the node's nf_conntrack_max (the init namespace's
/// value, the same in every namespace), and on 6.1+ they take memory only as they fill: the
/// idle detector's maps cost about their buckets and the ring buffer.
#[test]
fn default_tables_follow_nf_conntrack_max_and_allocate_as_they_fill() {
    if !privileged() {
        return;
    }
    let node_max: u64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let layout: Layout = "v4-24/16".parse().unwrap();
    let fs = Bpffs::mount();
    let map = AgentMap::create(layout, &fs.dir.join("aws_conntrack_map"), &unique_name());
    let traces = fs.dir.with_extension("traces");
    let det = Detector::run(&[
        "--map-pin",
        map.pin.to_str().unwrap(),
        "--trace-dir",
        traces.to_str().unwrap(),
        "--listen",
        "off",
    ]);
    let maps = maps_of(det.pid());
    let (_, stderr) = det.stop();
    let _ = std::fs::remove_dir_all(&traces);
    assert!(
        stderr.contains(&format!(
            "kernel tables hold {node_max} live conntrack entries (the node's nf_conntrack_max;"
        )),
        "{stderr}"
    );
    let seen = maps.iter().find(|m| m.0 == node_max).unwrap();
    let flows = maps.iter().find(|m| m.0 == 2 * node_max).unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if detector::kernel::map_alloc::kernel_allows_no_prealloc(Some(&release)) {
        assert_eq!((seen.1, flows.1), (1, 1), "BPF_F_NO_PREALLOC: {maps:?}");
        assert!(stderr.contains("allocated as they fill"), "{stderr}");
        // Idle: little more than 16 B of buckets per entry of each table.
        assert!(seen.2 < 20 * node_max.next_power_of_two(), "{maps:?}");
        assert!(
            flows.2 < 20 * (2 * node_max).next_power_of_two(),
            "{maps:?}"
        );
    } else {
        assert_eq!(
            (seen.1, flows.1),
            (0, 0),
            "preallocated before 6.1: {maps:?}"
        );
        assert!(stderr.contains("preallocated"), "{stderr}");
    }
}
