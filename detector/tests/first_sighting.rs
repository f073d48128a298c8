//! Privileged: the tracepoint backend reports NEW for a flow wherever it is tracked, whichever
//! packet of the flow its probes see first: a flow whose server is in the judged namespace
//! (its inbound packets lose their conntrack entry before the socket gets them, so the first
//! packet seen carrying the entry is the server's reply), one whose client is there (the first
//! packet leaves with the entry, NEW), and one the namespace forwards. Each flow's key deleted
//! from the agent's map while the flow is open must be judged live by the kernel (which it can
//! only be if NEW indexed the flow) and make one verdict.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::Duration;

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::{Detector, connect_from, privileged, start_echo_server};
use detector::npa::{Layout, NpaKey};
use serde_json::Value;
use testbed::netns;
use testbed::veth::{self, End};

/// The tests of this file run one at a time: each attaches the detector's programs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

const CLIENT_IP: &str = "10.79.1.2";
const SERVER_IP: &str = "10.79.2.2";

/// Client and server namespaces joined through a router namespace (10.79.1.0/24 on the
/// client's side, 10.79.2.0/24 on the server's), conntrack active in `tracked` only (an nft
/// `ct state new` rule on the hook the flow's first packet takes there). Removed on drop.
struct Line {
    client: String,
    router: String,
    server: String,
}

/// Where the flow's conntrack entry lives (the judged namespace).
#[derive(Clone, Copy, Debug)]
enum Tracked {
    /// The server's namespace: the flow is terminated there (inbound).
    Server,
    /// The client's namespace: the flow is originated there (outbound).
    Client,
    /// The router's namespace: the flow is forwarded.
    Router,
}

impl Line {
    fn new(tracked: Tracked) -> Self {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let line = Self {
            client: format!("dfc-{id}"),
            router: format!("dfr-{id}"),
            server: format!("dfs-{id}"),
        };
        for ns in [&line.client, &line.router, &line.server] {
            netns::add(ns).unwrap();
        }
        for (a, b, net) in [
            (&line.client, &line.router, "10.79.1"),
            (&line.server, &line.router, "10.79.2"),
        ] {
            let a_end = End {
                dev: "veth-h",
                ns: a,
            };
            let b_end = End {
                dev: if net.ends_with('1') {
                    "veth-c"
                } else {
                    "veth-s"
                },
                ns: b,
            };
            veth::add_pair(a_end, b_end).unwrap();
            veth::add_address(a_end, &format!("{net}.2/24")).unwrap();
            veth::add_address(b_end, &format!("{net}.1/24")).unwrap();
            veth::up(a_end).unwrap();
            veth::up(b_end).unwrap();
            let via = format!("{net}.1");
            line.ns_ok(a, "ip", &["route", "add", "default", "via", &via]);
        }
        line.ns_ok(&line.router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let (ns, hook) = match tracked {
            Tracked::Server => (&line.server, "input"),
            Tracked::Client => (&line.client, "output"),
            Tracked::Router => (&line.router, "forward"),
        };
        // Conntrack hooks register only when a rule needs them.
        line.ns_ok(
            ns,
            "nft",
            &[&format!(
                "add table inet dt; \
                 add chain inet dt c {{ type filter hook {hook} priority 0; policy accept; }}; \
                 add rule inet dt c ct state new counter accept"
            )],
        );
        line
    }

    fn tracked(&self, tracked: Tracked) -> &str {
        match tracked {
            Tracked::Server => &self.server,
            Tracked::Client => &self.client,
            Tracked::Router => &self.router,
        }
    }

    fn ns_ok(&self, ns: &str, cmd: &str, args: &[&str]) -> String {
        netns::exec_in(ns, cmd, args).unwrap_or_else(|e| panic!("{cmd} {args:?} in {ns}: {e}"))
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        for ns in [&self.client, &self.router, &self.server] {
            let _ = netns::delete(ns);
        }
    }
}

/// One TCP flow across a [`Line`] whose entry lives in `tracked`: `detector run` judging that
/// namespace must know the flow (NEW), so the delete of its key while it is open is judged live.
fn open_flow_is_known(tracked: Tracked) {
    if !privileged() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let line = Line::new(tracked);
    let judged = line.tracked(tracked).to_string();
    let layout: Layout = "v4-20/1".parse().unwrap();
    let fs = Bpffs::mount();
    let map = AgentMap::create(layout, &fs.dir.join("aws_conntrack_map"), &unique_name());
    let traces = fs.dir.with_extension("traces");
    let server: SocketAddr = start_echo_server(&line.server, SERVER_IP);
    let netns = netns::path(&judged);
    let det = Detector::watching(&map, netns.to_str(), &traces, &[]);
    // One request/reply, then the connection stays open (the echo server keeps it).
    let conn = connect_from(&line.client, server);
    let sport = conn.local_addr().unwrap().port();
    let key = NpaKey {
        src: CLIENT_IP.parse().unwrap(),
        sport,
        dst: server.ip(),
        dport: server.port(),
        proto: 6,
        owner: server.ip(),
        ifindex: None,
    };
    // The entry exists in the judged namespace (else the topology, not the detector, failed).
    let listed = line.ns_ok(&judged, "conntrack", &["-L", "-p", "tcp"]);
    assert!(
        listed.contains(&format!("sport={sport} ")),
        "{tracked:?}: no conntrack entry for sport {sport} in {judged}: {listed}"
    );
    map.insert(&key, 1);
    assert_eq!(map.delete(&key), 0);
    sleep(Duration::from_millis(500));
    let (events, stderr) = det.stop();
    let deletes: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "agent_delete")
        .collect();
    assert_eq!(deletes.len(), 1, "{tracked:?}: {stderr}");
    assert_eq!(
        deletes[0]["kernel_view"], "live",
        "{tracked:?}: the kernel did not know the open flow (NEW missed): {:#}",
        deletes[0]
    );
    let verdicts: Vec<&Value> = events.iter().filter(|e| e["type"] == "verdict").collect();
    assert_eq!(verdicts.len(), 1, "{tracked:?}: {verdicts:#?}\n{stderr}");
    assert_eq!(
        verdicts[0]["verdict"]["live"]["orig"]["sport"], sport,
        "{tracked:?}: {:#}",
        verdicts[0]
    );
    drop(conn);
    let _ = std::fs::remove_dir_all(&traces);
}

/// The server is in the judged namespace: its inbound packets reach the socket without their
/// entry, so NEW comes from the first reply leaving (IP_CT_ESTABLISHED_REPLY).
#[test]
fn inbound_flow_is_known() {
    open_flow_is_known(Tracked::Server);
}

/// The client is in the judged namespace: the SYN leaves with the entry (IP_CT_NEW).
#[test]
fn outbound_flow_is_known() {
    open_flow_is_known(Tracked::Client);
}

/// The judged namespace forwards the flow: the SYN leaves its egress device with the entry.
#[test]
fn forwarded_flow_is_known() {
    open_flow_is_known(Tracked::Router);
}
