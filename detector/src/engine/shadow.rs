//! The engine's shadows: per-flow state (live kernel entries, the last destroyed one, a
//! bounded timeline) and the agent's map, each in a bounded least-recently-touched table.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;

use super::verdict::{OldEntry, TimelineEvent};
use crate::agent::NpaKey;
use crate::event::FlowTuple;

/// A 5-tuple with its two ends sorted, so both directions of a flow name the same id.
///
/// Agent keys carry no netns, so neither does the id: one id gathers the flow's entries in
/// every netns (see [`FlowState::live`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FlowId {
    proto: u8,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

impl FlowId {
    fn new(proto: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Self { proto, lo, hi }
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

/// A map bounded to `cap` entries that evicts the least recently touched one.
///
/// Recency is an insertion counter, not a timestamp, so out-of-order timestamps cannot make a
/// fresh entry look old.
pub(crate) struct LruMap<K, V> {
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    next: u64,
    cap: usize,
}

impl<K: Clone + Eq + Hash, V> LruMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            cap: cap.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _)| v)
    }

    fn bump(&mut self, k: &K) {
        if let Some((_, stamp)) = self.map.get_mut(k) {
            self.order.remove(stamp);
            *stamp = self.next;
            self.order.insert(self.next, k.clone());
            self.next += 1;
        }
    }

    /// Mutable access that also marks the entry as recently used.
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.bump(k);
        self.map.get_mut(k).map(|(v, _)| v)
    }

    /// The entry for `k`, created with `make` if absent; a creation that overflows the table
    /// returns the evicted entry too.
    pub(crate) fn get_or_insert_with(
        &mut self,
        k: K,
        make: impl FnOnce() -> V,
    ) -> (&mut V, Option<(K, V)>) {
        let evicted = if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            self.pop_oldest()
        } else {
            None
        };
        let stamp = self.next;
        self.next += 1;
        let order = &mut self.order;
        let slot = match self.map.entry(k) {
            Entry::Occupied(o) => {
                let key = o.key().clone();
                let slot = o.into_mut();
                order.remove(&slot.1);
                slot.1 = stamp;
                order.insert(stamp, key);
                slot
            }
            Entry::Vacant(v) => {
                order.insert(stamp, v.key().clone());
                v.insert((make(), stamp))
            }
        };
        (&mut slot.0, evicted)
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        let (v, stamp) = self.map.remove(k)?;
        self.order.remove(&stamp);
        Some(v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let order = &mut self.order;
        self.map.retain(|k, (v, stamp)| {
            let kept = keep(k, v);
            if !kept {
                order.remove(stamp);
            }
            kept
        });
    }

    fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, k) = self.order.pop_first()?;
        let (v, _) = self.map.remove(&k)?;
        Some((k, v))
    }
}

/// A kernel entry the shadow believes live (confirmed, not yet destroyed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KEntry {
    pub id: u64,
    pub netns: u32,
    pub orig: FlowTuple,
    pub reply: FlowTuple,
    /// `None` for entries that predate the detector.
    pub born_ns: Option<u64>,
}

/// Everything known about one [`FlowId`].
#[derive(Debug, Default)]
pub(crate) struct FlowState {
    /// Live entries; usually one, more when the flow is tracked in several netns (host and
    /// pod) since agent keys cannot tell netns apart.
    pub live: Vec<KEntry>,
    /// The most recently destroyed entry, so a reused tuple can be recognised.
    pub last_destroyed: Option<OldEntry>,
    /// Ring of the flow's last events, kept sorted by timestamp.
    pub timeline: VecDeque<TimelineEvent>,
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
            .max_by_key(|e| e.born_ns.map_or(0, |b| b + 1))
    }

    /// Inserts by timestamp (late arrivals land in their place) and drops the oldest event
    /// beyond `cap`.
    pub(crate) fn record(&mut self, ev: TimelineEvent, cap: usize) {
        insert_sorted(&mut self.timeline, ev);
        while self.timeline.len() > cap.max(1) {
            self.timeline.pop_front();
        }
    }

    /// Records the end of entry `id` unless a later end is already known (a late record).
    pub(crate) fn note_destroyed(&mut self, old: OldEntry) {
        self.live.retain(|e| e.id != old.id);
        let newer_known = self
            .last_destroyed
            .is_some_and(|d| d.id != old.id && d.destroyed_ns > old.destroyed_ns);
        if !newer_known {
            self.last_destroyed = Some(old);
        }
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

/// What the shadow knows of one key in the agent's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub map_id: u32,
    /// Last datapath insert/update seen; `None` for start-up snapshot keys.
    pub inserted_ns: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_touched() {
        let mut m: LruMap<u32, &str> = LruMap::new(2);
        assert!(m.get_or_insert_with(1, || "a").1.is_none());
        assert!(m.get_or_insert_with(2, || "b").1.is_none());
        // Touch 1 so that 2 is the oldest.
        assert!(m.get_mut(&1).is_some());
        let (_, evicted) = m.get_or_insert_with(3, || "c");
        assert_eq!(evicted, Some((2, "b")));
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove(&1), Some("a"));
        m.retain(|_, v| *v != "c");
        assert_eq!(m.len(), 0);
        assert!(m.pop_oldest().is_none());
    }

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
