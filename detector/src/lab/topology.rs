//! Namespaces: a node with conntrack active, a client pod and a server pod, each pod joined to
//! the node by a veth pair and routed through it.

use std::path::Path;

use anyhow::Result;
use testbed::netns::{self, exec_in};
use testbed::sysctl::InNetns;
use testbed::veth::{self, End};

pub use testbed::netns::path as netns_path;

pub const CLIENT_IP: &str = "10.78.1.2";
pub const SERVER_IP: &str = "10.78.2.2";
/// The node-side interface of the server pod (where the emulated datapath attaches).
pub const SERVER_VETH: &str = "vsrv";

/// The lab's namespaces; removed on drop (deleting a namespace removes its veth ends too).
pub struct Topology {
    pub id: String,
    pub node: String,
    pub client: String,
    pub server: String,
    /// The node namespace's established timeout, set by [`Topology::tune`] (restored on drop).
    timeout: Option<InNetns>,
    /// The node namespace's CLOSE timeout, set by [`Topology::tune_close`] (restored on drop).
    close_timeout: Option<InNetns>,
    /// Namespaces this lab created: only these are removed (a name clash is not ours).
    created: Vec<String>,
}

const TIMEOUT_SYSCTL: &str = "net.netfilter.nf_conntrack_tcp_timeout_established";

impl Topology {
    /// Builds the namespaces. `id` keeps two labs apart (names are short: interface names
    /// live inside the namespaces, namespace names in /run/netns).
    pub fn create(id: &str) -> Result<Self> {
        let mut t = Self {
            id: id.to_string(),
            node: format!("lab-{id}-node"),
            client: format!("lab-{id}-cli"),
            server: format!("lab-{id}-srv"),
            timeout: None,
            close_timeout: None,
            created: Vec::new(),
        };
        // From here on, drop cleans up whatever was made.
        for ns in [t.node.clone(), t.client.clone(), t.server.clone()] {
            netns::add(&ns)?;
            t.created.push(ns);
        }
        for (pod, dev, node_ip, pod_ip) in [
            (&t.client, "vcli", "10.78.1.1/24", "10.78.1.2/24"),
            (&t.server, SERVER_VETH, "10.78.2.1/24", "10.78.2.2/24"),
        ] {
            let node_end = End { dev, ns: &t.node };
            let pod_end = End {
                dev: "eth0",
                ns: pod,
            };
            veth::add_pair(node_end, pod_end)?;
            veth::add_address(node_end, node_ip)?;
            veth::up(node_end)?;
            veth::add_address(pod_end, pod_ip)?;
            veth::up(pod_end)?;
            let gw = node_ip.split('/').next().unwrap_or_default();
            testbed::cmd::run("ip", &["-n", pod, "route", "add", "default", "via", gw])?;
        }
        exec_in(&t.node, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // Conntrack hooks register only when a rule needs them (like kube-proxy's rules on a
        // node).
        exec_in(
            &t.node,
            "nft",
            &["add table inet lab; \
               add chain inet lab forwarding { type filter hook forward priority 0; policy accept; }; \
               add rule inet lab forwarding ct state new counter accept"],
        )?;
        Ok(t)
    }

    /// Sets the node's established timeout (the tuner), remembering the original.
    pub fn tune(&mut self, seconds: u32) -> Result<()> {
        let value = seconds.to_string();
        match &mut self.timeout {
            Some(t) => t.set_again(&value)?,
            None => self.timeout = Some(InNetns::set(&self.node, TIMEOUT_SYSCTL, &value)?),
        }
        Ok(())
    }

    /// Sets the node's timeout for entries of reset connections (TCP CLOSE), remembering the
    /// original: the lab's reset flows must expire between two cleanup runs, as its idle
    /// established flows do, or the cleanup never deletes their keys.
    pub fn tune_close(&mut self, seconds: u32) -> Result<()> {
        if self.close_timeout.is_none() {
            self.close_timeout = Some(InNetns::set(
                &self.node,
                "net.netfilter.nf_conntrack_tcp_timeout_close",
                &seconds.to_string(),
            )?);
        }
        Ok(())
    }

    /// Removes everything; errors are reported, not fatal (a namespace may already be gone).
    pub fn destroy(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for mut t in [self.timeout.take(), self.close_timeout.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = t.restore() {
                errors.push(e.to_string());
            }
        }
        for ns in std::mem::take(&mut self.created) {
            if netns_path(&ns).exists()
                && let Err(e) = netns::delete(&ns)
            {
                errors.push(e.to_string());
            }
        }
        errors
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for e in self.destroy() {
            tracing::warn!("lab cleanup: {e}");
        }
    }
}

/// Namespaces left by labs that did not finish (a crash): `lab-<id>-*` whose process (the id
/// is the lab's pid) is gone.
pub fn leftovers() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with("lab-")
                        && (n.ends_with("-node") || n.ends_with("-cli") || n.ends_with("-srv"))
                })
                .filter(|n| {
                    let id = n.trim_start_matches("lab-").split('-').next().unwrap_or("");
                    // A running lab's id is its pid: leave it alone.
                    !id.parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
                })
                .collect()
        })
        .unwrap_or_default()
}
