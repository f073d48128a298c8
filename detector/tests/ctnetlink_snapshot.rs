//! Privileged: `detector::snapshot::dump` against the real conntrack tables of network
//! namespaces this test creates (and always deletes), checked against `conntrack -L`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

mod common;

use common::{run, run_ok};
use detector::record::FlowTuple;
use detector::snapshot::{self, CtSnapshotEntry, SnapshotError};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// `IPS_CONFIRMED` (1 << 3) of `enum ip_conntrack_status`.
const IPS_CONFIRMED: u32 = 1 << 3;

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// Runs a command in a namespace with nsenter (`ip netns exec` would remount /sys).
fn nsenter_ok(ns: &str, cmd: &str, args: &[&str]) -> String {
    let net = format!("--net={}", netns_path(ns).display());
    let mut all = vec![net.as_str(), cmd];
    all.extend_from_slice(args);
    run_ok("nsenter", &all)
}

/// Network namespaces that are deleted on drop, also when the test fails half-way.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) {
        run_ok("ip", &["netns", "add", &name]);
        self.0.push(name);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and with it the peer.
        for name in &self.0 {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (testbed's helper).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    testbed::netns::in_netns(&netns_path(ns), f).unwrap_or_else(|e| panic!("in {ns}: {e}"))
}

/// A connected pair: the client end, the server end, and the tuple of the client's SYN.
struct Conn {
    _client: TcpStream,
    _server: TcpStream,
    orig: FlowTuple,
}

/// Connects from namespace `ns` to `listener` (in another namespace or the same one) and
/// exchanges one byte each way, so the entry is established and confirmed.
fn connect(ns: &str, listener: &TcpListener) -> Conn {
    let to = listener.local_addr().unwrap();
    let mut client = in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect")
    });
    let (mut server, peer) = listener.accept().expect("accept");
    client.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    server.read_exact(&mut b).unwrap();
    server.write_all(b"y").unwrap();
    client.read_exact(&mut b).unwrap();
    let local = client.local_addr().unwrap();
    assert_eq!(local, peer);
    Conn {
        _client: client,
        _server: server,
        orig: FlowTuple {
            proto: libc::IPPROTO_TCP as u8,
            src: local.ip(),
            sport: local.port(),
            dst: to.ip(),
            dport: to.port(),
        },
    }
}

fn find<'a>(entries: &'a [CtSnapshotEntry], orig: &FlowTuple) -> Vec<&'a CtSnapshotEntry> {
    entries.iter().filter(|e| e.orig == *orig).collect()
}

/// The original tuple of a `conntrack -L` line: the first src=, dst=, sport= and dport=.
fn parse_conntrack_line(line: &str) -> Option<FlowTuple> {
    let mut words = line.split_whitespace();
    words.next()?; // protocol name
    let proto: u8 = words.next()?.parse().ok()?;
    let first = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    Some(FlowTuple {
        proto,
        src: first("src=")?.parse().ok()?,
        sport: first("sport=")?.parse().ok()?,
        dst: first("dst=")?.parse().ok()?,
        dport: first("dport=")?.parse().ok()?,
    })
}

const UDP_FLOWS: usize = 2000;
const UDP_PORT: u16 = 9;

static SEQ: AtomicU32 = AtomicU32::new(0);

#[test]
fn snapshot_dumps_exactly_the_namespace_it_entered() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("DETECTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("this test needs root (DETECTOR_REQUIRE_PRIVILEGED=1)");
        }
        eprintln!("skipped: needs root");
        return;
    }
    let id = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let server = format!("dtsnap-s-{id}");
    let client = format!("dtsnap-c-{id}");
    // Declared first, so dropped last: every socket below is closed before the deletion.
    let mut namespaces = Namespaces(Vec::new());
    namespaces.add(server.clone());
    namespaces.add(client.clone());
    run_ok(
        "ip",
        &[
            "link", "add", "vsnap-s", "netns", &server, "type", "veth", "peer", "name", "vsnap-c",
            "netns", &client,
        ],
    );
    for (ns, dev, ip) in [
        (&server, "vsnap-s", "10.78.0.1/24"),
        (&client, "vsnap-c", "10.78.0.2/24"),
    ] {
        run_ok("ip", &["-n", ns, "addr", "add", ip, "dev", dev]);
        run_ok("ip", &["-n", ns, "link", "set", dev, "up"]);
        run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
    }
    // Conntrack hooks are registered in a namespace only when a rule needs them. The client
    // gets them too, and a loopback connection of its own: an entry of another namespace
    // that the server's snapshot must not show.
    let ct_rule = "add table inet dt; \
         add chain inet dt in { type filter hook input priority 0; policy accept; }; \
         add rule inet dt in ct state new counter accept";
    nsenter_ok(&server, "nft", &[ct_rule]);
    nsenter_ok(&client, "nft", &[ct_rule]);

    let listener = in_netns(&server, || {
        TcpListener::bind(SocketAddr::new(IpAddr::V4(SERVER_IP), 0)).expect("bind in server")
    });
    let conns: Vec<Conn> = (0..3).map(|_| connect(&client, &listener)).collect();
    for c in &conns {
        assert_eq!(c.orig.src, IpAddr::V4(CLIENT_IP));
    }
    let lo_listener = in_netns(&client, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback in client")
    });
    let lo_conn = connect(&client, &lo_listener);
    // Enough UDP flows that the dump spans many datagrams (the kernel fills about 32 KiB each,
    // some 200 bytes an entry). Nothing listens on the port: each datagram still makes an
    // entry (UNREPLIED) in the server's table.
    let udp_flows = in_netns(&client, || {
        (0..UDP_FLOWS)
            .map(|_| {
                let s = UdpSocket::bind((CLIENT_IP, 0)).expect("bind udp");
                s.send_to(b"x", (SERVER_IP, UDP_PORT)).expect("send udp");
                FlowTuple {
                    proto: libc::IPPROTO_UDP as u8,
                    src: IpAddr::V4(CLIENT_IP),
                    sport: s.local_addr().unwrap().port(),
                    dst: IpAddr::V4(SERVER_IP),
                    dport: UDP_PORT,
                }
            })
            .collect::<Vec<_>>()
    });

    let server_dump = snapshot::dump(Some(&netns_path(&server))).expect("dump of the server");
    let client_dump = snapshot::dump(Some(&netns_path(&client))).expect("dump of the client");
    let own_dump = snapshot::dump(None).expect("dump of the test's own namespace");

    // The three connections, exactly, once each, with the reply direction reversed.
    for c in &conns {
        let found = find(&server_dump, &c.orig);
        assert_eq!(found.len(), 1, "{:?} in {server_dump:#?}", c.orig);
        let e = found[0];
        assert_eq!(e.reply, c.orig.reversed(), "{e:?}");
        assert_eq!(e.orig.proto, 6);
        assert!(e.status & IPS_CONFIRMED != 0, "{e:?}");
        assert!(e.timeout_s > 0, "{e:?}");
        assert_eq!(e.zone, 0);
        assert_eq!(e.mark, 0);
    }
    assert_eq!(
        server_dump.iter().filter(|e| e.orig.proto == 6).count(),
        3,
        "{server_dump:#?}"
    );
    // Every UDP flow, across the datagrams of the dump (a few could be lost on the veth).
    let udp: HashSet<FlowTuple> = server_dump
        .iter()
        .filter(|e| e.orig.proto == 17)
        .map(|e| e.orig)
        .collect();
    let sent: HashSet<FlowTuple> = udp_flows.iter().copied().collect();
    assert!(udp.is_subset(&sent), "UDP entries that were not sent");
    assert!(
        udp.len() * 100 >= sent.len() * 99,
        "only {} of {} UDP flows in the dump",
        udp.len(),
        sent.len()
    );
    // Nothing else happened in the server namespace.
    assert_eq!(server_dump.len(), 3 + udp.len(), "{server_dump:#?}");

    // The client's loopback entry is in its own namespace's dump, not in the server's.
    assert_eq!(
        find(&client_dump, &lo_conn.orig).len(),
        1,
        "{client_dump:#?}"
    );
    assert!(find(&server_dump, &lo_conn.orig).is_empty());
    assert!(
        server_dump
            .iter()
            .all(|e| !e.orig.src.is_loopback() && !e.orig.dst.is_loopback()),
        "{server_dump:#?}"
    );
    // The client tracked the same three flows, as entries of its own (other ids).
    for c in &conns {
        let theirs = find(&client_dump, &c.orig);
        assert_eq!(theirs.len(), 1, "{:?} in {client_dump:#?}", c.orig);
        assert!(server_dump.iter().all(|e| e.id != theirs[0].id));
    }
    // The test's own namespace has none of them.
    for orig in conns.iter().map(|c| &c.orig).chain([&lo_conn.orig]) {
        assert!(find(&own_dump, orig).is_empty(), "{orig:?} in the own dump");
    }

    // conntrack(8) sees the same table.
    let listed = nsenter_ok(&server, "conntrack", &["-L", "-p", "tcp"]);
    let lines: Vec<&str> = listed.lines().filter(|l| l.starts_with("tcp")).collect();
    let tcp_entries = server_dump.iter().filter(|e| e.orig.proto == 6).count();
    assert_eq!(lines.len(), tcp_entries, "conntrack -L:\n{listed}");
    for c in &conns {
        let sport = format!("sport={}", c.orig.sport);
        assert!(
            lines.iter().any(|l| l.contains(&sport)),
            "{sport} not in conntrack -L:\n{listed}"
        );
    }
    // And exactly the same original tuples, all protocols.
    let all = nsenter_ok(&server, "conntrack", &["-L"]);
    let theirs: HashSet<FlowTuple> = all.lines().filter_map(parse_conntrack_line).collect();
    let ours: HashSet<FlowTuple> = server_dump.iter().map(|e| e.orig).collect();
    assert_eq!(ours.len(), server_dump.len(), "an entry twice in the dump");
    assert_eq!(ours, theirs, "conntrack -L:\n{all}");
    drop(conns);
    drop(lo_conn);
}

#[test]
fn snapshot_errors_name_the_namespace() {
    // Needs no privileges: the namespace file is refused before any netlink traffic.
    let missing = PathBuf::from(format!("/run/netns/dtsnap-missing-{}", std::process::id()));
    match snapshot::dump(Some(&missing)) {
        Err(e @ SnapshotError::OpenNetns { .. }) => {
            assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        }
        other => panic!("expected OpenNetns, got {other:?}"),
    }
    // A file that is not a network namespace: setns(CLONE_NEWNET) refuses it.
    let not_netns = Path::new("/proc/self/ns/uts");
    match snapshot::dump(Some(not_netns)) {
        Err(e @ SnapshotError::EnterNetns { .. }) => {
            assert!(e.to_string().contains("/proc/self/ns/uts"), "{e}");
        }
        other => panic!("expected EnterNetns, got {other:?}"),
    }
}
