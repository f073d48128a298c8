//! Privileged: the lab's emulated agent datapath behaves like NPA's for a pod whose policy
//! isolates both directions: an allowed new flow gets its key (with the pod's ifindex and a
//! `last_seen` stamped on every packet), a disallowed port is dropped, and once the key is
//! deleted the flow's next reply is dropped.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use aya::maps::{HashMap, Map, MapData};
use common::{in_netns, privileged};
use detector::lab::datapath::Datapath;
use detector::lab::topology::{self, SERVER_IP, Topology};
use detector::npa::{KeyLayout, Layout, NpaKey, NpaValue};

fn serve(ns: &str, port: u16) {
    let path = topology::netns_path(ns);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        testbed::netns::enter(&f).unwrap();
        let l = TcpListener::bind((SERVER_IP, port)).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    // `d`: answer late, so the key can be deleted between request and reply.
                    if b[0] == b'd' {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

fn keys(pin: &std::path::Path) -> Vec<(NpaKey, NpaValue)> {
    let m = Map::LruHashMap(MapData::from_pin(pin).unwrap());
    let h: HashMap<_, [u8; 24], [u8; 16]> = HashMap::try_from(m).unwrap();
    h.iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            (
                NpaKey::decode(KeyLayout::V4Ifindex, &k).unwrap(),
                NpaValue::decode(detector::npa::ValueLayout::LastSeen16, &v).unwrap(),
            )
        })
        .collect()
}

#[test]
fn datapath_inserts_stamps_and_denies() {
    if !privileged() {
        return;
    }
    let id = format!("t{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("detector-lab-{id}"));
    let topo = Topology::create(&id).unwrap();
    let layout: Layout = "v4-24/16".parse().unwrap();
    let dp = Datapath::attach(&topo.node, &dir, layout, 8080).unwrap();
    serve(&topo.server, 8080);
    serve(&topo.server, 8081);
    let to = |port| SocketAddr::new(SERVER_IP.parse().unwrap(), port);

    let client = topo.client.clone();
    let mut s = in_netns(&client, move || {
        TcpStream::connect_timeout(&to(8080), Duration::from_secs(3)).expect("allowed port")
    });
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut b = [0u8; 1];
    s.write_all(b"a").unwrap();
    s.read_exact(&mut b).expect("reply while the key exists");

    let k = keys(&dp.pin);
    assert_eq!(k.len(), 1, "one key for the flow: {k:?}");
    let (key, v1) = &k[0];
    assert_eq!(key.src.to_string(), topology::CLIENT_IP);
    assert_eq!(key.sport, s.local_addr().unwrap().port());
    assert_eq!(
        (key.dst.to_string().as_str(), key.dport, key.proto),
        (SERVER_IP, 8080, 6)
    );
    assert_eq!(
        key.owner.to_string(),
        SERVER_IP,
        "the server pod owns the ingress flow"
    );
    assert_eq!(key.ifindex, Some(dp.ifindex));
    assert_eq!(v1.val, 1);
    std::thread::sleep(Duration::from_millis(20));
    s.write_all(b"b").unwrap();
    s.read_exact(&mut b).unwrap();
    let (_, v2) = &keys(&dp.pin)[0];
    assert!(
        v2.last_seen_ns > v1.last_seen_ns,
        "last_seen stamped on every hit"
    );

    // A port the policy does not allow.
    let blocked = in_netns(&client, move || {
        TcpStream::connect_timeout(&to(8081), Duration::from_millis(800))
    });
    assert!(blocked.is_err(), "port 8081 is not allowed");

    // The cleanup deletes the key between a request and its reply (the race's window): the
    // reply is dropped. (A later request would re-create the key: ingress is allowed.)
    s.write_all(b"d").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let m = Map::LruHashMap(MapData::from_pin(&dp.pin).unwrap());
    let mut h: HashMap<_, [u8; 24], [u8; 16]> = HashMap::try_from(m).unwrap();
    let raw: [u8; 24] = key
        .encode(KeyLayout::V4Ifindex)
        .unwrap()
        .try_into()
        .unwrap();
    h.remove(&raw).unwrap();
    assert!(
        s.read_exact(&mut b).is_err(),
        "the reply is denied once the key is gone"
    );

    drop(s);
    drop(dp);
    let node = topo.node.clone();
    drop(topo);
    assert!(!topology::netns_path(&node).exists(), "namespaces removed");
    assert!(topology::leftovers().iter().all(|n| !n.contains(&id)));
    let _ = std::fs::remove_dir_all(&dir);
}
