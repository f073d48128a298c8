//! Privileged: the agent map's writes inside the kernel. The lab's emulated datapath (a TC
//! program) inserts the key of a new flow and stamps it on every packet; the test then deletes
//! the key from userspace. On backends with a hook in the hash-map code (kprobe, fentry on
//! `htab_lru_map_update_elem`/`htab_lru_map_delete_elem`, by the hook `--writes-hook` or
//! `DETECTOR_WRITES_HOOK` picks) `detector run` must report the datapath's insert with the
//! flow's exact key (and, with fentry, the userspace delete through the same function; kprobes
//! do not fire inside bpf(2)'s map operations); on the tracepoint
//! backend it must say that datapath writes are not observable, and report none.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::sleep;
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};
use common::{Detector, in_netns, privileged, start_echo_server_on};
use detector::lab::datapath::Datapath;
use detector::lab::topology::{self, CLIENT_IP, SERVER_IP, Topology};
use detector::npa::{KeyLayout, Layout, NpaKey};
use serde_json::Value;

const PORT: u16 = 8090;

#[test]
fn datapath_writes_are_seen() {
    if !privileged() {
        return;
    }
    // The lab's naming: the id is our pid, so a lab's `--cleanup` (which removes namespaces
    // of labs whose process is gone) leaves ours alone while we run.
    let id = std::process::id().to_string();
    let dir = std::env::temp_dir().join(format!("detector-mapwrites-{id}"));
    let topo = Topology::create(&id).unwrap();
    let layout: Layout = "v4-24/16".parse().unwrap();
    let dp = Datapath::attach(&topo.node, &dir, layout, PORT).unwrap();
    start_echo_server_on(&topo.server, SERVER_IP, PORT);
    let traces = dir.join("traces");
    let node = topology::netns_path(&topo.node);
    let det = Detector::run(&[
        "--map-pin",
        dp.pin.to_str().unwrap(),
        "--netns",
        node.to_str().unwrap(),
        "--trace-dir",
        traces.to_str().unwrap(),
        "--watermark-ms",
        "5",
    ]);

    let to = SocketAddr::new(SERVER_IP.parse().unwrap(), PORT);
    let mut s = in_netns(&topo.client, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("allowed port")
    });
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    s.write_all(b"a").unwrap();
    s.read_exact(&mut b).expect("reply");
    let sport = s.local_addr().unwrap().port();

    // The cleanup's delete, from userspace (bpf(2) BPF_MAP_DELETE_ELEM).
    let key = NpaKey {
        src: CLIENT_IP.parse().unwrap(),
        sport,
        dst: SERVER_IP.parse().unwrap(),
        dport: PORT,
        proto: 6,
        owner: SERVER_IP.parse().unwrap(),
        ifindex: Some(dp.ifindex),
    };
    let raw: [u8; 24] = key
        .encode(KeyLayout::V4Ifindex)
        .unwrap()
        .try_into()
        .unwrap();
    let m = Map::LruHashMap(MapData::from_pin(&dp.pin).unwrap());
    let mut h: HashMap<_, [u8; 24], [u8; 16]> = HashMap::try_from(m).unwrap();
    h.remove(&raw)
        .expect("the datapath inserted the flow's key");
    sleep(Duration::from_millis(300));
    let (events, stderr) = det.stop();
    // "... with the kprobe backend; traces in ..."
    let backend = stderr
        .split(" backend;")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .unwrap_or_default();

    let ours = |e: &Value| e["key"]["sport"] == sport && e["key"]["dport"] == PORT;
    let writes: Vec<&Value> = events.iter().filter(|e| e["type"] == "map_write").collect();
    match backend {
        "kprobe" | "fentry" => {
            // "... are observed (fentry on htab_lru_map_update_elem/...)"
            let hook = stderr
                .split("datapath writes to the map are observed (")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap_or_else(|| panic!("datapath writes not observed: {stderr}"));
            eprintln!("map writes hook: {hook}");
            if let Ok(want) = std::env::var("DETECTOR_WRITES_HOOK")
                && want != "auto"
            {
                assert_eq!(hook, want, "{stderr}");
            }
            let inserts: Vec<&Value> = writes
                .iter()
                .copied()
                .filter(|e| e["op"] == "update" && e["by"] == "datapath" && ours(e))
                .collect();
            assert!(
                !inserts.is_empty(),
                "the datapath's insert of sport {sport}: {writes:#?}\n{stderr}"
            );
            assert_eq!(inserts[0]["key"]["src"], CLIENT_IP);
            assert_eq!(inserts[0]["key"]["ifindex"], dp.ifindex);
            let deletes: Vec<&Value> = writes
                .iter()
                .copied()
                .filter(|e| e["op"] == "delete" && e["by"] == "userspace" && ours(e))
                .collect();
            if hook == "fentry" {
                assert_eq!(deletes.len(), 1, "the userspace delete: {writes:#?}");
                assert_eq!(deletes[0]["pid"], std::process::id());
                assert!(
                    deletes[0]["ts_ns"].as_u64() > inserts[0]["ts_ns"].as_u64(),
                    "delete after insert"
                );
            } else {
                // bpf(2) runs the map's operations with bpf_prog_active raised
                // (bpf_disable_instrumentation), which skips kprobe programs (fentry has its
                // own recursion guard): userspace writes are seen by the syscall probes only.
                assert!(deletes.is_empty(), "{writes:#?}");
            }
        }
        "tracepoint" => {
            assert!(
                stderr.contains("datapath writes to the map are not observable"),
                "{stderr}"
            );
            assert!(writes.is_empty(), "{writes:#?}");
        }
        other => panic!("unknown backend `{other}` in: {stderr}"),
    }
    // Either way the syscall probes saw the delete, with the flow live in the kernel.
    let delete = events
        .iter()
        .find(|e| e["type"] == "agent_delete" && e["key"]["sport"] == sport)
        .unwrap_or_else(|| panic!("agent_delete of sport {sport}: {events:#?}"));
    assert_eq!(delete["ret"], 0);
    assert_eq!(delete["kernel_view"], "live", "{delete:#}");

    drop(s);
    drop(dp);
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);
}
