//! Flow ids and event indices: the names the shadow tables and the flight recorder share, in
//! a leaf module so that neither imports the other.

use std::net::IpAddr;

use crate::npa::NpaKey;
use crate::record::FlowTuple;

/// No event: the end of a flow's chain of events in the flight recorder.
pub(crate) const NO_EVENT: u64 = u64::MAX;

/// A 5-tuple with its two ends sorted, so both directions of a flow name the same id.
///
/// Agent keys carry no netns, so neither does the id: one id gathers the flow's entries in
/// every netns (see [`FlowState::live`]).
///
/// Packed, as the flow table holds one per tracked flow: an IPv4 flow in 13 bytes inline
/// (proto, then address and port of each end), an IPv6 one (or a mixed one, which the kernel
/// never reports) boxed with a family byte per end, so the id is 16 bytes either way.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum FlowId {
    V4([u8; 13]),
    V6(Box<[u8; 39]>),
}

impl FlowId {
    fn new(proto: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        match (lo.0, hi.0) {
            (IpAddr::V4(l), IpAddr::V4(h)) => {
                let mut id = [0u8; 13];
                id[0] = proto;
                id[1..5].copy_from_slice(&l.octets());
                id[5..7].copy_from_slice(&lo.1.to_be_bytes());
                id[7..11].copy_from_slice(&h.octets());
                id[11..13].copy_from_slice(&hi.1.to_be_bytes());
                FlowId::V4(id)
            }
            _ => {
                let mut id = [0u8; 39];
                id[0] = proto;
                for (at, (addr, port)) in [(1, lo), (20, hi)] {
                    let (family, bytes) = match addr {
                        IpAddr::V4(a) => (4, a.to_ipv6_mapped().octets()),
                        IpAddr::V6(a) => (6, a.octets()),
                    };
                    id[at] = family;
                    id[at + 1..at + 17].copy_from_slice(&bytes);
                    id[at + 17..at + 19].copy_from_slice(&port.to_be_bytes());
                }
                FlowId::V6(Box::new(id))
            }
        }
    }

    pub(crate) fn of_tuple(t: &FlowTuple) -> Self {
        Self::new(t.proto, (t.src, t.sport), (t.dst, t.dport))
    }

    pub(crate) fn of_key(k: &NpaKey) -> Self {
        Self::new(k.proto, (k.src, k.sport), (k.dst, k.dport))
    }

    /// The ids under which NPA's cleanup would find a kernel entry: its original tuple and,
    /// when the reply comes from elsewhere than the original destination (DNAT, e.g. a
    /// Service VIP), `orig.src:sport -> reply.src:sport`. Like NPA, only the address decides
    /// whether the second form exists.
    pub(crate) fn of_entry(orig: &FlowTuple, reply: &FlowTuple) -> (FlowId, Option<FlowId>) {
        let first = Self::of_tuple(orig);
        let dnat = (reply.src != orig.dst)
            .then(|| Self::new(orig.proto, (orig.src, orig.sport), (reply.src, reply.sport)))
            .filter(|d| *d != first);
        (first, dnat)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    #[test]
    fn flow_ids_ignore_direction_and_add_the_dnat_form() {
        let t = |s: &str, sp, d: &str, dp| FlowTuple {
            proto: 6,
            src: s.parse().unwrap(),
            sport: sp,
            dst: d.parse().unwrap(),
            dport: dp,
        };
        let orig = t("10.0.0.5", 40000, "172.20.0.10", 80);
        assert_eq!(FlowId::of_tuple(&orig), FlowId::of_tuple(&orig.reversed()));
        let (first, dnat) = FlowId::of_entry(&orig, &orig.reversed());
        assert_eq!(first, FlowId::of_tuple(&orig));
        assert!(dnat.is_none());
        let reply = t("10.0.1.7", 8080, "10.0.0.5", 40000);
        let (_, dnat) = FlowId::of_entry(&orig, &reply);
        assert_eq!(dnat, Some(FlowId::of_tuple(&reply)));
    }
}
