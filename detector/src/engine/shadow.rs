//! The engine's shadows: per-flow state (live kernel entries, the last destroyed one, a
//! bounded timeline) and the agent's map, each in a bounded least-recently-touched table.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;

use hashbrown::HashTable;
use smallvec::SmallVec;

use super::flow_id::NO_EVENT;
use super::verdict::{OldEntry, TimelineEvent};
use crate::npa::NpaKey;
use crate::record::{FlowTuple, PackedTuple};

/// No node: the end of the recency list.
const NIL: u32 = u32::MAX;

struct Node<K, V> {
    key: K,
    val: V,
    /// Neighbours in the recency list (slab indices): `prev` is older, `next` newer.
    prev: u32,
    next: u32,
}

/// A map bounded to `cap` entries that evicts the least recently touched one.
///
/// Entries live in one dense slab (`Vec`), linked oldest to newest through `u32` indices, and
/// the hash index holds only those indices: one allocation per table instead of a hash map
/// plus a recency tree holding each key a second time. Recency is list order, not a
/// timestamp, so out-of-order timestamps cannot make a fresh entry look old.
///
/// Hashing: keys are 5-tuples, which pods partly choose (ports), so a fixed-seed hash would
/// let a pod craft colliding flows and slow every lookup (hash flooding). `foldhash`'s
/// `RandomState` seeds every table from a per-process random value, so collisions cannot be
/// precomputed, and the hash values never leave the process; that, plus the table bound,
/// is enough for kernel-supplied keys at a fraction of SipHash's cost.
pub(crate) struct LruMap<K, V> {
    nodes: Vec<Node<K, V>>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    oldest: u32,
    newest: u32,
    cap: usize,
}

impl<K: Eq + Hash, V> LruMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            nodes: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            oldest: NIL,
            newest: NIL,
            // Indices are u32 with one value reserved for NIL.
            cap: cap.clamp(1, (NIL - 1) as usize),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    fn find(&self, k: &K) -> Option<u32> {
        let h = self.hasher.hash_one(k);
        self.index
            .find(h, |&i| self.nodes[i as usize].key == *k)
            .copied()
    }

    fn unlink(&mut self, i: u32) {
        let (p, n) = {
            let node = &self.nodes[i as usize];
            (node.prev, node.next)
        };
        if p == NIL {
            self.oldest = n;
        } else {
            self.nodes[p as usize].next = n;
        }
        if n == NIL {
            self.newest = p;
        } else {
            self.nodes[n as usize].prev = p;
        }
    }

    fn link_newest(&mut self, i: u32) {
        let newest = self.newest;
        let node = &mut self.nodes[i as usize];
        node.prev = newest;
        node.next = NIL;
        if newest == NIL {
            self.oldest = i;
        } else {
            self.nodes[newest as usize].next = i;
        }
        self.newest = i;
    }

    fn touch(&mut self, i: u32) {
        if self.newest != i {
            self.unlink(i);
            self.link_newest(i);
        }
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.find(k).map(|i| &self.nodes[i as usize].val)
    }

    /// Mutable access that also marks the entry as recently used.
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let i = self.find(k)?;
        self.touch(i);
        Some(&mut self.nodes[i as usize].val)
    }

    /// The entry for `k`, created with `make` if absent; a creation that overflows the table
    /// returns the evicted entry too.
    pub(crate) fn get_or_insert_with(
        &mut self,
        k: K,
        make: impl FnOnce() -> V,
    ) -> (&mut V, Option<(K, V)>) {
        if let Some(i) = self.find(&k) {
            self.touch(i);
            return (&mut self.nodes[i as usize].val, None);
        }
        let evicted = if self.nodes.len() >= self.cap {
            self.pop_oldest()
        } else {
            None
        };
        let i = self.nodes.len() as u32;
        let h = self.hasher.hash_one(&k);
        self.nodes.push(Node {
            key: k,
            val: make(),
            prev: NIL,
            next: NIL,
        });
        let (nodes, hasher) = (&self.nodes, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(&nodes[j as usize].key));
        self.link_newest(i);
        (&mut self.nodes[i as usize].val, evicted)
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.find(k)?;
        Some(self.remove_at(i).1)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let mut i = 0;
        while i < self.nodes.len() {
            let node = &self.nodes[i];
            if keep(&node.key, &node.val) {
                i += 1;
            } else {
                // The last node moves into `i`: look at `i` again.
                self.remove_at(i as u32);
            }
        }
    }

    fn pop_oldest(&mut self) -> Option<(K, V)> {
        (self.oldest != NIL).then(|| self.remove_at(self.oldest))
    }

    /// Removes node `i`, moving the slab's last node into its place to keep the slab dense.
    fn remove_at(&mut self, i: u32) -> (K, V) {
        self.unlink(i);
        let h = self.hasher.hash_one(&self.nodes[i as usize].key);
        if let Ok(e) = self.index.find_entry(h, |&j| j == i) {
            e.remove();
        }
        let last = (self.nodes.len() - 1) as u32;
        let node = self.nodes.swap_remove(i as usize);
        if i != last {
            let moved = &self.nodes[i as usize];
            let (p, n) = (moved.prev, moved.next);
            let h = self.hasher.hash_one(&moved.key);
            if let Some(slot) = self.index.find_mut(h, |&j| j == last) {
                *slot = i;
            }
            if p == NIL {
                self.oldest = i;
            } else {
                self.nodes[p as usize].next = i;
            }
            if n == NIL {
                self.newest = i;
            } else {
                self.nodes[n as usize].prev = i;
            }
        }
        (node.key, node.val)
    }

    /// Keys from the least to the most recently touched (tests).
    #[cfg(test)]
    pub(crate) fn keys_by_age(&self) -> Vec<&K> {
        let mut out = Vec::new();
        let mut i = self.oldest;
        while i != NIL {
            let node = &self.nodes[i as usize];
            out.push(&node.key);
            i = node.next;
        }
        out
    }
}

/// A kernel entry the shadow believes live (confirmed, not yet destroyed).
///
/// Packed, as every tracked flow holds one: the original tuple in 16 bytes, and the reply
/// tuple only when NAT made it differ from the original reversed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KEntry {
    pub id: u64,
    /// `None` for entries that predate the detector.
    pub born_ns: Option<u64>,
    orig: PackedTuple,
    nat_reply: Option<Box<FlowTuple>>,
    pub netns: u32,
}

impl KEntry {
    pub(crate) fn new(
        id: u64,
        netns: u32,
        orig: &FlowTuple,
        reply: &FlowTuple,
        born_ns: Option<u64>,
    ) -> Self {
        Self {
            id,
            born_ns,
            orig: PackedTuple::of(orig),
            nat_reply: (*reply != orig.reversed()).then(|| Box::new(*reply)),
            netns,
        }
    }

    pub(crate) fn orig(&self) -> FlowTuple {
        self.orig.tuple()
    }

    pub(crate) fn reply(&self) -> FlowTuple {
        match &self.nat_reply {
            Some(r) => **r,
            None => self.orig().reversed(),
        }
    }
}

/// Everything known about one [`FlowId`](super::flow_id::FlowId).
#[derive(Debug)]
pub(crate) struct FlowState {
    /// Live entries; usually one (kept inline, no allocation), more when the flow is tracked
    /// in several netns (host and pod) since agent keys cannot tell netns apart.
    pub live: SmallVec<[KEntry; 1]>,
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
            live: SmallVec::new(),
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
            .max_by_key(|e| e.born_ns.map_or(0, |b| b + 1))
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
}

pub(crate) fn insert_sorted(ring: &mut VecDeque<TimelineEvent>, ev: TimelineEvent) {
    // Events almost always arrive in order, so search from the back.
    let pos = ring
        .iter()
        .rposition(|e| e.ts_ns <= ev.ts_ns)
        .map_or(0, |p| p + 1);
    ring.insert(pos, ev);
}

/// An agent-map key as the map shadow stores it: the 5-tuple packed, the owner as which end
/// of the key it is (NPA always uses one; another address is boxed), 40 bytes against 64.
/// Equal exactly when the [`NpaKey`]s are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MapKey {
    tuple: PackedTuple,
    /// `None`: the owner is `src`; `Some(None)`: `dst`; `Some(Some(a))`: another address.
    owner: Option<Option<Box<IpAddr>>>,
    ifindex: Option<u32>,
}

impl MapKey {
    pub(crate) fn of(k: &NpaKey) -> Self {
        let owner = if k.owner == k.src {
            None
        } else if k.owner == k.dst {
            Some(None)
        } else {
            Some(Some(Box::new(k.owner)))
        };
        Self {
            tuple: PackedTuple::of(&FlowTuple {
                proto: k.proto,
                src: k.src,
                sport: k.sport,
                dst: k.dst,
                dport: k.dport,
            }),
            owner,
            ifindex: k.ifindex,
        }
    }
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
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
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
    fn lru_slab_stays_consistent_against_a_model() {
        // A plain Vec of (key, value), oldest first, is the model; random operations on a
        // small table exercise eviction, removal from the middle (slab swaps) and retain.
        let mut m: LruMap<u16, u32> = LruMap::new(8);
        let mut model: Vec<(u16, u32)> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 13) as u16;
            match (x >> 32) % 10 {
                0..=4 => {
                    let (v, evicted) = m.get_or_insert_with(k, || step);
                    let want_evicted = if let Some(p) = model.iter().position(|e| e.0 == k) {
                        let e = model.remove(p);
                        model.push(e);
                        None
                    } else {
                        let ev = (model.len() >= 8).then(|| model.remove(0));
                        model.push((k, step));
                        ev
                    };
                    assert_eq!(*v, model.last().unwrap().1);
                    assert_eq!(evicted, want_evicted);
                }
                5 | 6 => {
                    let got = m.get_mut(&k).map(|v| *v);
                    let want = model.iter().position(|e| e.0 == k).map(|p| {
                        let e = model.remove(p);
                        model.push(e);
                        e.1
                    });
                    assert_eq!(got, want);
                }
                7 | 8 => {
                    let want = model
                        .iter()
                        .position(|e| e.0 == k)
                        .map(|p| model.remove(p).1);
                    assert_eq!(m.remove(&k), want);
                }
                _ => {
                    m.retain(|k, _| k % 3 != 0);
                    model.retain(|e| e.0 % 3 != 0);
                }
            }
            let keys: Vec<u16> = m.keys_by_age().into_iter().copied().collect();
            let want: Vec<u16> = model.iter().map(|e| e.0).collect();
            assert_eq!(keys, want, "step {step}");
            assert_eq!(m.len(), model.len());
            for (k, v) in &model {
                assert_eq!(m.get(k), Some(v));
            }
        }
    }

    #[test]
    fn map_keys_are_equal_exactly_when_npa_keys_are() {
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
                ifindex: Some(3),
                ..base.clone()
            },
            NpaKey {
                sport: 40001,
                ..base.clone()
            },
            NpaKey {
                src: ip("fd00::5"),
                owner: ip("fd00::5"),
                ..base.clone()
            },
        ];
        for a in &variants {
            for b in &variants {
                assert_eq!(MapKey::of(a) == MapKey::of(b), a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn kernel_entries_keep_both_tuples() {
        let t = |s: &str, sp, d: &str, dp| FlowTuple {
            proto: 17,
            src: s.parse().unwrap(),
            sport: sp,
            dst: d.parse().unwrap(),
            dport: dp,
        };
        let orig = t("10.0.0.5", 40000, "172.20.0.10", 53);
        let plain = KEntry::new(1, 7, &orig, &orig.reversed(), None);
        assert!(plain.nat_reply.is_none(), "no NAT: the reply is not stored");
        assert_eq!((plain.orig(), plain.reply()), (orig, orig.reversed()));
        let nat = t("10.0.1.7", 5353, "10.0.0.5", 40000);
        let dnat = KEntry::new(2, 7, &orig, &nat, Some(9));
        assert_eq!(
            (dnat.orig(), dnat.reply(), dnat.born_ns),
            (orig, nat, Some(9))
        );
        let v6 = t("fd00::1", 1, "fd00::2", 2);
        let e = KEntry::new(3, 7, &v6, &v6.reversed(), None);
        assert_eq!((e.orig(), e.reply()), (v6, v6.reversed()));
    }
}
