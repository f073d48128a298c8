//! A map bounded to a number of entries that evicts the least recently touched one: the
//! engine's flow table.

use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

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
        let h = self.hasher.hash_one(&k);
        let found = self
            .index
            .find(h, |&i| self.nodes[i as usize].key == k)
            .copied();
        if let Some(i) = found {
            self.touch(i);
            return (&mut self.nodes[i as usize].val, None);
        }
        if self.nodes.len() >= self.cap && self.oldest != NIL {
            // Full: the new entry takes the oldest one's node in place. Removing that node
            // instead would move the slab's last node into its hole, and with it rewrite the
            // index and both neighbours of a node no one asked for: cache misses, on every
            // insert of a full table.
            let i = self.oldest;
            self.unlink(i);
            let old_h = self.hasher.hash_one(&self.nodes[i as usize].key);
            if let Ok(e) = self.index.find_entry(old_h, |&j| j == i) {
                e.remove();
            }
            let node = &mut self.nodes[i as usize];
            let evicted = (
                std::mem::replace(&mut node.key, k),
                std::mem::replace(&mut node.val, make()),
            );
            self.insert_index(h, i);
            self.link_newest(i);
            return (&mut self.nodes[i as usize].val, Some(evicted));
        }
        let i = self.nodes.len() as u32;
        self.nodes.push(Node {
            key: k,
            val: make(),
            prev: NIL,
            next: NIL,
        });
        self.insert_index(h, i);
        self.link_newest(i);
        (&mut self.nodes[i as usize].val, None)
    }

    /// Indexes node `i`, whose key hashes to `h`.
    fn insert_index(&mut self, h: u64, i: u32) {
        let (nodes, hasher) = (&self.nodes, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(&nodes[j as usize].key));
    }

    /// Every value, in no particular order (no entry is touched).
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.nodes.iter_mut().map(|n| &mut n.val)
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

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;
    use crate::testutil::Rng;

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
        assert_eq!(m.keys_by_age(), [&1, &3]);
        assert_eq!(m.get(&2), None);
    }

    #[test]
    fn lru_slab_stays_consistent_against_a_model() {
        // A plain Vec of (key, value), oldest first, is the model; random operations on a
        // small table exercise eviction (the new entry reusing the oldest's node, anywhere in
        // the slab), recency and updates.
        let mut m: LruMap<u16, u32> = LruMap::new(8);
        let mut model: Vec<(u16, u32)> = Vec::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for step in 0..20_000u32 {
            let x = rng.next();
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
                    // A key past the model's range: always new, so a full table evicts.
                    let k = 100 + (x >> 40) as u16 % 5;
                    let (_, evicted) = m.get_or_insert_with(k, || step);
                    let want = match model.iter().position(|e| e.0 == k) {
                        Some(p) => {
                            let e = model.remove(p);
                            model.push(e);
                            None
                        }
                        None => {
                            let ev = (model.len() >= 8).then(|| model.remove(0));
                            model.push((k, step));
                            ev
                        }
                    };
                    assert_eq!(evicted, want);
                }
                _ => {
                    for v in m.values_mut() {
                        *v += 1;
                    }
                    for e in &mut model {
                        e.1 += 1;
                    }
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
}
