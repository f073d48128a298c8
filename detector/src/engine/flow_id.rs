//! Flow ids and event indices: the names the shadow tables and the flight recorder share, in
//! a leaf module so that neither imports the other.

use std::net::IpAddr;

use crate::npa::NpaKey;
use crate::record::{FlowTuple, PackedTuple};

/// No event: the end of a flow's chain of events in the flight recorder.
pub(crate) const NO_EVENT: u64 = u64::MAX;

/// A 5-tuple with its two ends sorted, so both directions of a flow name the same id.
///
/// Agent keys carry no netns, so neither does the id: one id gathers the flow's entries in
/// every netns (see [`FlowState::live`](super::shadow::FlowState::live)).
///
/// The sorted tuple packed (the lower end as its source): an IPv4 flow in 13 bytes inline, an
/// IPv6 one boxed, 16 bytes either way. With one bit saying which end is a tuple's source, the
/// id gives the tuple back, so what the flow table stores per flow need not repeat it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FlowId(PackedTuple);

impl FlowId {
    /// The id of the flow between `a` and `b`, and whether `a` is its lower end.
    fn new(proto: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> (Self, bool) {
        let a_is_lo = a <= b;
        let (lo, hi) = if a_is_lo { (a, b) } else { (b, a) };
        let sorted = FlowTuple {
            proto,
            src: lo.0,
            sport: lo.1,
            dst: hi.0,
            dport: hi.1,
        };
        (FlowId(PackedTuple::of(&sorted)), a_is_lo)
    }

    /// The flow's tuple seen from its lower end (`src_is_lo`) or from its higher end.
    pub(crate) fn tuple(&self, src_is_lo: bool) -> FlowTuple {
        let t = self.0.tuple();
        if src_is_lo { t } else { t.reversed() }
    }

    /// The id of `t`'s flow, and whether `t`'s source is the id's lower end.
    pub(crate) fn oriented(t: &FlowTuple) -> (Self, bool) {
        Self::new(t.proto, (t.src, t.sport), (t.dst, t.dport))
    }

    /// The id of `k`'s flow, and whether `k`'s source is the id's lower end.
    pub(crate) fn oriented_key(k: &NpaKey) -> (Self, bool) {
        Self::new(k.proto, (k.src, k.sport), (k.dst, k.dport))
    }

    pub(crate) fn of_tuple(t: &FlowTuple) -> Self {
        Self::oriented(t).0
    }

    /// The ids under which NPA's cleanup would find a kernel entry: its original tuple's (with
    /// whether the original source is that id's lower end) and, when the reply comes from
    /// elsewhere than the original destination (DNAT, e.g. a Service VIP),
    /// `orig.src:sport -> reply.src:sport`. Like NPA, only the address decides whether the
    /// second form exists.
    pub(crate) fn of_entry(
        orig: &FlowTuple,
        reply: &FlowTuple,
    ) -> ((FlowId, bool), Option<FlowId>) {
        let first = Self::oriented(orig);
        let dnat = (reply.src != orig.dst)
            .then(|| Self::new(orig.proto, (orig.src, orig.sport), (reply.src, reply.sport)).0)
            .filter(|d| *d != first.0);
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
    use crate::testutil::tuple;

    #[test]
    fn flow_ids_ignore_direction_and_add_the_dnat_form() {
        let t = |s: &str, sp, d: &str, dp| tuple(6, s, sp, d, dp);
        let orig = t("10.0.0.5", 40000, "172.20.0.10", 80);
        assert_eq!(FlowId::of_tuple(&orig), FlowId::of_tuple(&orig.reversed()));
        let ((first, _), dnat) = FlowId::of_entry(&orig, &orig.reversed());
        assert_eq!(first, FlowId::of_tuple(&orig));
        assert!(dnat.is_none());
        let reply = t("10.0.1.7", 8080, "10.0.0.5", 40000);
        let (_, dnat) = FlowId::of_entry(&orig, &reply);
        assert_eq!(dnat, Some(FlowId::of_tuple(&reply)));
    }

    #[test]
    fn a_flow_id_gives_each_orientation_of_its_tuple_back() {
        let t = |s: &str, sp, d: &str, dp| tuple(17, s, sp, d, dp);
        for tuple in [
            t("10.0.0.5", 40000, "10.0.1.7", 53),
            t("10.0.1.7", 53, "10.0.0.5", 40000),
            t("10.0.0.5", 7, "10.0.0.5", 7),
            t("fd00::5", 40000, "fd00::1", 53),
            t("10.0.0.5", 40000, "fd00::1", 53),
            t("fd00::1", 53, "10.0.0.5", 40000),
        ] {
            let (fid, src_is_lo) = FlowId::oriented(&tuple);
            assert_eq!(fid.tuple(src_is_lo), tuple);
            assert_eq!(fid.tuple(!src_is_lo), tuple.reversed());
            assert_eq!(FlowId::oriented(&tuple.reversed()).0, fid);
        }
    }
}
