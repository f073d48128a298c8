//! The engine's per-flow state: the flow's live kernel entries, its last destroyed one, the
//! agent-map keys that name it and the head of its timeline, all in one node of the flow table
//! ([`LruMap`](super::lru::LruMap)). The flow id holds the 5-tuple once; entries and keys keep
//! only which of its ends is their source.

use std::collections::VecDeque;
use std::net::IpAddr;

use super::few::Few;
use super::flow_id::{FlowId, NO_EVENT};
use super::verdict::{OldEntry, TimelineEvent};
use crate::npa::NpaKey;
use crate::record::FlowTuple;

/// A kernel timestamp that may be unknown, in 8 bytes: `u64::MAX`, which a monotonic clock in
/// ns reaches after 584 years, stands for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptNs(u64);

impl OptNs {
    pub(crate) fn of(ns: Option<u64>) -> Self {
        Self(ns.unwrap_or(u64::MAX))
    }

    pub(crate) fn get(self) -> Option<u64> {
        (self.0 != u64::MAX).then_some(self.0)
    }
}

/// A kernel entry the shadow believes live (confirmed, not yet destroyed), as the flow it is
/// stored under holds it: 32 bytes.
///
/// Its tuples are told by the flow id and one bit, unless they cannot be: NAT made the reply
/// differ from the original reversed, or the entry is stored under its DNAT form (whose id is
/// not the original tuple's). Then both are boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KEntry {
    pub id: u64,
    born: OptNs,
    tuples: Option<Box<[FlowTuple; 2]>>,
    pub netns: u32,
    /// The original tuple's source is the flow id's lower end.
    orig_src_is_lo: bool,
}

impl KEntry {
    /// `orig_src_is_lo` is `Some` when the entry is stored under its original tuple's flow id
    /// (whether that tuple's source is the id's lower end), `None` under its DNAT form.
    pub(crate) fn new(
        id: u64,
        netns: u32,
        born_ns: Option<u64>,
        (orig, reply): (&FlowTuple, &FlowTuple),
        orig_src_is_lo: Option<bool>,
    ) -> Self {
        let plain = orig_src_is_lo.filter(|_| *reply == orig.reversed());
        Self {
            id,
            born: OptNs::of(born_ns),
            tuples: plain.is_none().then(|| Box::new([*orig, *reply])),
            netns,
            orig_src_is_lo: plain.unwrap_or(false),
        }
    }

    /// `None` for entries that predate the detector.
    pub(crate) fn born_ns(&self) -> Option<u64> {
        self.born.get()
    }

    /// Keeps the birth already known, else takes `born_ns`.
    pub(crate) fn learn_birth(&mut self, born_ns: Option<u64>) {
        self.born = OptNs::of(self.born.get().or(born_ns));
    }

    /// The original tuple; `fid` is the id of the flow the entry is stored under.
    pub(crate) fn orig(&self, fid: &FlowId) -> FlowTuple {
        match &self.tuples {
            Some(t) => t[0],
            None => fid.tuple(self.orig_src_is_lo),
        }
    }

    /// The reply tuple; `fid` is the id of the flow the entry is stored under.
    pub(crate) fn reply(&self, fid: &FlowId) -> FlowTuple {
        match &self.tuples {
            Some(t) => t[1],
            None => fid.tuple(!self.orig_src_is_lo),
        }
    }
}

/// The owner is the key's destination (else its source, or [`AgentKey::other_owner`]).
const OWNER_IS_DST: u8 = 1;
/// The key has an ifindex (NPA v1.3.7 on).
const HAS_IFINDEX: u8 = 2;

/// An agent-map key as the flow it names holds it, with what the shadow knows of it: 32 bytes
/// against the 64 of an [`NpaKey`]. The 5-tuple is the flow id's, with one bit for which end
/// is the source; the owner is which end it is (NPA always uses one), another address boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentKey {
    /// Last datapath insert/update seen; none for start-up snapshot keys.
    inserted: OptNs,
    other_owner: Option<Box<IpAddr>>,
    pub map_id: u32,
    ifindex: u32,
    flags: u8,
    /// The key's source is the flow id's lower end. A `bool` of its own (not a flag bit):
    /// its spare values are where [`Few`] keeps its tag.
    src_is_lo: bool,
}

impl AgentKey {
    /// `src_is_lo`: whether `k`'s source is the lower end of its flow id
    /// ([`FlowId::oriented_key`]).
    pub(crate) fn new(k: &NpaKey, src_is_lo: bool, map_id: u32, inserted_ns: Option<u64>) -> Self {
        let (flags, ifindex, other_owner) = Self::shape(k);
        Self {
            inserted: OptNs::of(inserted_ns),
            other_owner: other_owner.map(Box::new),
            map_id,
            ifindex,
            flags,
            src_is_lo,
        }
    }

    fn shape(k: &NpaKey) -> (u8, u32, Option<IpAddr>) {
        let mut flags = 0;
        let mut other = None;
        if k.owner == k.src {
        } else if k.owner == k.dst {
            flags |= OWNER_IS_DST;
        } else {
            other = Some(k.owner);
        }
        if k.ifindex.is_some() {
            flags |= HAS_IFINDEX;
        }
        (flags, k.ifindex.unwrap_or(0), other)
    }

    /// Whether this is key `k` of the flow (`src_is_lo` as in [`AgentKey::new`]).
    pub(crate) fn is(&self, k: &NpaKey, src_is_lo: bool) -> bool {
        let (flags, ifindex, other) = Self::shape(k);
        self.src_is_lo == src_is_lo
            && self.flags == flags
            && self.ifindex == ifindex
            && self.other_owner.as_deref() == other.as_ref()
    }

    pub(crate) fn inserted_ns(&self) -> Option<u64> {
        self.inserted.get()
    }

    /// Keeps the last insert known, else takes `inserted_ns`.
    pub(crate) fn learn_insert(&mut self, map_id: u32, inserted_ns: Option<u64>) {
        self.map_id = map_id;
        self.inserted = OptNs::of(inserted_ns.or(self.inserted.get()));
    }
}

/// Everything known about one [`FlowId`].
#[derive(Debug)]
pub(crate) struct FlowState {
    /// Live entries; usually one (kept inline, no allocation), more when the flow is tracked
    /// in several netns (host and pod) since agent keys cannot tell netns apart.
    pub live: Few<KEntry>,
    /// The agent-map keys naming the flow; usually one (inline), more when both ends are
    /// local pods (one per owner) or the datapath keyed both directions.
    pub keys: Few<AgentKey>,
    /// The most recently destroyed entry, so a reused tuple can be recognised. Boxed: most
    /// tracked flows are live and have none, and inline it would cost each of them its 80-odd
    /// bytes.
    pub last_destroyed: Option<Box<OldEntry>>,
    /// The flow's newest event in the flight recorder (the head of its chain there).
    pub last_event: u64,
}

impl Default for FlowState {
    fn default() -> Self {
        Self {
            live: Few::None,
            keys: Few::None,
            last_destroyed: None,
            last_event: NO_EVENT,
        }
    }
}

impl FlowState {
    /// Whether the engine knows anything about the flow's kernel side.
    pub(crate) fn has_kernel_state(&self) -> bool {
        !self.live.is_empty() || self.last_destroyed.is_some()
    }

    /// The live entry a verdict should name: the youngest (entries of unknown birth are the
    /// oldest), since a young entry is the one a stale agent view is most likely to miss.
    pub(crate) fn youngest_live(&self) -> Option<&KEntry> {
        self.live
            .iter()
            .max_by_key(|e| e.born_ns().map_or(0, |b| b + 1))
    }

    /// Records the end of entry `id` unless a later end is already known (a late record).
    pub(crate) fn note_destroyed(&mut self, old: OldEntry) {
        self.live.retain(|e| e.id != old.id);
        let newer_known = self
            .last_destroyed
            .as_deref()
            .is_some_and(|d| d.id != old.id && d.destroyed_ns > old.destroyed_ns);
        if !newer_known {
            match &mut self.last_destroyed {
                Some(kept) => **kept = old,
                None => self.last_destroyed = Some(Box::new(old)),
            }
        }
    }

    /// Key `k` of the flow, if the shadow holds it (`src_is_lo` as in [`AgentKey::new`]).
    pub(crate) fn key_mut(&mut self, k: &NpaKey, src_is_lo: bool) -> Option<&mut AgentKey> {
        self.keys.iter_mut().find(|a| a.is(k, src_is_lo))
    }

    /// Removes key `k` of the flow, returning what the shadow knew of it.
    pub(crate) fn take_key(&mut self, k: &NpaKey, src_is_lo: bool) -> Option<AgentKey> {
        let i = self.keys.iter().position(|a| a.is(k, src_is_lo))?;
        Some(self.keys.swap_remove(i))
    }
}

pub(crate) fn insert_sorted(ring: &mut VecDeque<TimelineEvent>, ev: TimelineEvent) {
    // Events almost always arrive in order, so search from the back.
    let pos = ring
        .iter()
        .rposition(|e| e.ts_ns <= ev.ts_ns)
        .map_or(0, |p| p + 1);
    ring.insert(pos, ev);
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
    fn agent_keys_match_exactly_the_npa_keys_they_were_made_from() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let base = NpaKey {
            src: ip("10.0.0.5"),
            sport: 40000,
            dst: ip("10.0.1.7"),
            dport: 80,
            proto: 6,
            owner: ip("10.0.0.5"),
            ifindex: None,
        };
        let reversed = NpaKey {
            src: base.dst,
            sport: base.dport,
            dst: base.src,
            dport: base.sport,
            ..base.clone()
        };
        // Keys of one flow id (a flow holds only its own), differing in every other part.
        let variants = [
            base.clone(),
            NpaKey {
                owner: ip("10.0.1.7"),
                ..base.clone()
            },
            NpaKey {
                owner: ip("10.9.9.9"),
                ..base.clone()
            },
            NpaKey {
                owner: ip("10.9.9.8"),
                ..base.clone()
            },
            NpaKey {
                ifindex: Some(3),
                ..base.clone()
            },
            NpaKey {
                ifindex: Some(0),
                ..base.clone()
            },
            reversed.clone(),
            NpaKey {
                owner: ip("10.0.1.7"),
                ..reversed
            },
        ];
        let fid = FlowId::oriented_key(&base).0;
        for a in &variants {
            let (fa, a_lo) = FlowId::oriented_key(a);
            assert_eq!(fa, fid);
            let stored = AgentKey::new(a, a_lo, 1, Some(5));
            for b in &variants {
                let (_, b_lo) = FlowId::oriented_key(b);
                assert_eq!(stored.is(b, b_lo), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn a_flow_finds_takes_and_updates_its_keys() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let k = NpaKey {
            src: ip("fd00::5"),
            sport: 40000,
            dst: ip("fd00::7"),
            dport: 80,
            proto: 17,
            owner: ip("fd00::7"),
            ifindex: Some(9),
        };
        let (_, lo) = FlowId::oriented_key(&k);
        let mut f = FlowState::default();
        f.keys.push(AgentKey::new(&k, lo, 1, None));
        let key = f.key_mut(&k, lo).unwrap();
        key.learn_insert(2, Some(70));
        key.learn_insert(2, None);
        assert_eq!((key.map_id, key.inserted_ns()), (2, Some(70)));
        assert!(
            f.take_key(&k, !lo).is_none(),
            "the other direction is another key"
        );
        assert_eq!(f.take_key(&k, lo).unwrap().inserted_ns(), Some(70));
        assert!(f.keys.is_empty());
    }

    #[test]
    fn kernel_entries_give_both_tuples_back() {
        let t = |s: &str, sp, d: &str, dp| tuple(17, s, sp, d, dp);
        let orig = t("10.0.0.5", 40000, "172.20.0.10", 53);
        for o in [
            orig,
            orig.reversed(),
            t("fd00::1", 1, "fd00::2", 2),
            t("fd00::2", 2, "fd00::1", 1),
        ] {
            let (fid, lo) = FlowId::oriented(&o);
            let plain = KEntry::new(1, 7, None, (&o, &o.reversed()), Some(lo));
            assert!(plain.tuples.is_none(), "no NAT: no tuple is stored");
            assert_eq!((plain.orig(&fid), plain.reply(&fid)), (o, o.reversed()));
        }
        // DNAT: stored under both ids, boxed under each since the reply is not the reverse.
        let nat = t("10.0.1.7", 5353, "10.0.0.5", 40000);
        let ((first, lo), dnat) = FlowId::of_entry(&orig, &nat);
        let dnat = dnat.unwrap();
        let under_first = KEntry::new(2, 7, Some(9), (&orig, &nat), Some(lo));
        let under_dnat = KEntry::new(2, 7, Some(9), (&orig, &nat), None);
        for (e, fid) in [(&under_first, &first), (&under_dnat, &dnat)] {
            assert_eq!(
                (e.orig(fid), e.reply(fid), e.born_ns()),
                (orig, nat, Some(9))
            );
        }
        let mut e = under_first;
        e.learn_birth(Some(20));
        assert_eq!(e.born_ns(), Some(9), "a known birth is kept");
    }

    #[test]
    fn a_tracked_flow_stays_small() {
        // What every tracked flow costs in the table; BENCHMARKS.md counts on it.
        assert_eq!(std::mem::size_of::<KEntry>(), 32);
        assert_eq!(std::mem::size_of::<AgentKey>(), 32);
        assert_eq!(std::mem::size_of::<Few<KEntry>>(), 32);
        assert_eq!(std::mem::size_of::<Few<AgentKey>>(), 32);
        assert_eq!(std::mem::size_of::<FlowState>(), 80);
    }
}
