//! veth pairs between namespaces and the addresses on their ends.

use crate::Result;
use crate::cmd::run;

/// One end of a veth pair: the interface's name and the namespace it lives in.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    pub dev: &'a str,
    pub ns: &'a str,
}

/// Creates a veth pair with `a` and `b` in their namespaces (both down, no address).
pub fn add_pair(a: End<'_>, b: End<'_>) -> Result<()> {
    run(
        "ip",
        &[
            "link", "add", a.dev, "netns", a.ns, "type", "veth", "peer", "name", b.dev, "netns",
            b.ns,
        ],
    )
    .map(drop)
}

/// Adds `cidr` (e.g. `10.0.0.1/24`) to the end; IPv6 addresses skip duplicate address
/// detection so they are usable at once.
pub fn add_address(end: End<'_>, cidr: &str) -> Result<()> {
    let mut args = vec!["-n", end.ns, "addr", "add", cidr, "dev", end.dev];
    if cidr.contains(':') {
        args.push("nodad");
    }
    run("ip", &args).map(drop)
}

/// Sets the end and its namespace's loopback up.
pub fn up(end: End<'_>) -> Result<()> {
    run("ip", &["-n", end.ns, "link", "set", end.dev, "up"])?;
    run("ip", &["-n", end.ns, "link", "set", "lo", "up"]).map(drop)
}
