//! Privileged: without `--netns`, each delete is judged in the network namespace of the task
//! that makes it (read in the kernel at the delete). The flows live in a test namespace the
//! detector was not told about: a cleanup deleting from inside that namespace has its wrongful
//! deletes reported as races; one deleting from another namespace, where the flow has no
//! entry, is flagged as unjudged (naming both namespaces), counted, and never rightful.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::bpfmap::AgentMap;
use common::{Detector, RaceWorld, connect_from, in_netns, of_type, privileged};
use detector::npa::{Layout, NpaKey};

const LISTEN: &str = "127.0.0.1:19497";

/// The value of `counter` in the running detector's /metrics.
fn capacity_metric(counter: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(LISTEN).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let name = format!("detector_capacity_overflow_total{{counter=\"{counter}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}

/// Deletes `key` from a thread inside network namespace `ns`, as an agent living there would.
fn delete_in(ns: &str, map: AgentMap, key: NpaKey) -> (AgentMap, i64) {
    in_netns(ns, move || {
        let r = map.delete(&key);
        (map, r)
    })
}

#[test]
fn deletes_are_judged_in_the_deleting_tasks_namespace() {
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
    // No --netns: the detector runs in the host's namespace, the flows' entries are in the
    // server's.
    let det = Detector::watching(
        &map,
        None,
        &traces,
        &["--trace-after", "0.5", "--listen", LISTEN],
    );
    let server_netns = ns.inode(&ns.server);
    let host_netns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32
    };

    // A: live; its key deleted by a cleanup running in the server's namespace.
    let a = connect_from(&ns.client, server);
    let ka = common::client_key(a.local_addr().unwrap().port(), server, Some(5));
    map.insert(&ka, 1);
    // B: live; its key deleted by a cleanup running in the host's namespace, which holds no
    // entry of the flow.
    let b = connect_from(&ns.client, server);
    let kb = common::client_key(b.local_addr().unwrap().port(), server, Some(5));
    map.insert(&kb, 2);
    sleep(Duration::from_millis(50));
    let (map, ra) = delete_in(&ns.server, map, ka.clone());
    assert_eq!(ra, 0);
    assert_eq!(map.delete(&kb), 0);

    sleep(Duration::from_millis(1500)); // the metrics are refreshed every second
    assert_eq!(capacity_metric("unjudged_other_netns"), 1);
    let (events, stderr) = det.stop();

    let deletes = of_type(&events, "agent_delete");
    let judged_in = |p: u16| {
        deletes
            .iter()
            .find(|d| d["key"]["sport"] == p)
            .map(|d| d["judged_netns"].clone())
            .unwrap_or_else(|| panic!("no delete of sport {p}: {stderr}"))
    };
    assert_eq!(judged_in(ka.sport), server_netns, "{deletes:#?}");
    assert_eq!(judged_in(kb.sport), host_netns, "{deletes:#?}");

    // A is a race, decided by the kernel in the server's namespace.
    let verdicts = of_type(&events, "verdict");
    assert_eq!(verdicts.len(), 1, "{verdicts:#?}\n{stderr}");
    let v = &verdicts[0]["verdict"];
    assert_eq!(v["key"]["sport"], ka.sport, "{v:#}");
    assert_eq!(v["decided_by"], "kernel", "{v:#}");

    // B is unjudged, naming both namespaces; counted, never rightful.
    let unjudged = of_type(&events, "unjudged");
    assert_eq!(unjudged.len(), 1, "{unjudged:#?}\n{stderr}");
    let u = unjudged[0];
    assert_eq!(u["key"]["sport"], kb.sport, "{u:#}");
    assert_eq!(u["reason"], "live-in-other-netns", "{u:#}");
    assert_eq!(u["judged_netns"], host_netns, "{u:#}");
    assert_eq!(u["live_netns"], server_netns, "{u:#}");
    let s = of_type(&events, "summary")[0];
    let d = &s["engine"]["deletes"];
    assert_eq!(d["unjudged_other_netns"], 1, "{s:#}");
    assert_eq!(d["rightful"], 0, "{s:#}");
    assert_eq!(s["maybe_incomplete"], true, "{s:#}");
    assert!(
        stderr.contains("1 unjudged deletes (1 with a live entry only in another netns)"),
        "exit line: {stderr}"
    );
    assert_eq!(
        stderr
            .matches("found no entry in the namespace it was judged in")
            .count(),
        1,
        "warned once: {stderr}"
    );
    drop((a, b));
    let _ = std::fs::remove_dir_all(&traces);
}
