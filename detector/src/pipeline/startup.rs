//! Start-up reconciliation: the conntrack entries and map keys that existed before the probes
//! were attached, fed to the engine and matched against the first events that name them.
//! Pure bookkeeping, testable without a kernel.

use std::collections::HashMap;

use crate::engine::{Engine, Input};
use crate::npa::{KeyLayout, NpaKey};
use crate::record::{FlowTuple, PackedTuple};
use crate::snapshot::CtSnapshotEntry;

/// Conntrack entries that existed when the detector started (ctnetlink snapshot).
///
/// The kernel side only learns an entry at its NEW, so for these it knows no birth, and the
/// tracepoint backend reports each one as NEW when it first sees a packet of it. Both are
/// reconciled here: that first NEW is recognised as the pre-existing entry (its id aliased to
/// the snapshot's, so the engine sees one entry), and a delete the kernel judged `absent`
/// because it never indexed the entry is left to the engine's shadow while the snapshot's
/// timeout says the entry is still alive.
///
/// Kept for the whole run (entries can live for days), so it is lean: the entries sorted by
/// packed original tuple in one vector (24 bytes each for IPv4; it never grows), and a hash
/// map only for NPA's DNAT form of the few entries that have one.
pub struct Preexisting {
    /// The agent's namespace, where the snapshot was taken.
    netns: u32,
    /// Monotonic ns of the dump: the snapshot's timeouts count from it.
    dump_ns: u64,
    /// Sorted by `orig` once the snapshot is in ([`Preexisting::seal`]).
    live: Vec<PreEntry>,
    /// DNAT form (`orig.src:sport -> reply.src:sport`, direction-free) -> monotonic ns its
    /// entry's snapshot timeout runs out.
    dnat: FastMap<FlowTuple, u64>,
    /// Kernel entry id -> engine id of the same pre-existing entry.
    pub alias: FastMap<u64, u64>,
}

struct PreEntry {
    orig: PackedTuple,
    /// ctnetlink's id of the entry.
    id: u32,
    /// Seconds of timeout left at the dump; [`GONE`] set once the entry is destroyed.
    timeout_s: u32,
}

/// Marks a [`PreEntry`] whose entry ended (no timeout is anywhere near 2^31 s).
const GONE: u32 = 1 << 31;

/// Hash maps with foldhash: seeded per process (see the engine's `LruMap` on hash flooding),
/// several times faster than SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One name for both directions of a flow.
fn canonical(t: FlowTuple) -> FlowTuple {
    t.min(t.reversed())
}

impl Preexisting {
    pub fn new(netns: u32, dump_ns: u64) -> Self {
        Self {
            netns,
            dump_ns,
            live: Vec::new(),
            dnat: FastMap::default(),
            alias: FastMap::default(),
        }
    }

    fn until(&self, timeout_s: u32) -> u64 {
        self.dump_ns + u64::from(timeout_s) * 1_000_000_000
    }

    /// The engine id of snapshot entry `id`.
    pub fn engine_id(id: u32) -> u64 {
        (1 << 63) | u64::from(id)
    }

    pub fn insert(&mut self, orig: FlowTuple, reply: FlowTuple, id: u32, timeout_s: u32) {
        self.live.push(PreEntry {
            orig: PackedTuple::of(&orig),
            id,
            timeout_s: timeout_s.min(GONE - 1),
        });
        if reply.src != orig.dst {
            let dnat = FlowTuple {
                dst: reply.src,
                dport: reply.sport,
                ..orig
            };
            self.dnat.insert(canonical(dnat), self.until(timeout_s));
        }
    }

    /// Feeds one entry of the snapshot to the engine and keeps it (then [`Preexisting::seal`]
    /// once all are in).
    pub fn feed(&mut self, engine: &mut Engine, e: CtSnapshotEntry) {
        self.insert(e.orig, e.reply, e.id, e.timeout_s);
        engine.push(Input::CtExisting {
            id: Self::engine_id(e.id),
            netns: self.netns,
            orig: e.orig,
            reply: e.reply,
        });
    }

    /// Sorts the entries for lookups, once the snapshot is in. (A tuple is in one netns's
    /// table at most once, so there are no duplicates to worry about.)
    pub fn seal(&mut self) {
        self.live.sort_unstable_by(|a, b| a.orig.cmp(&b.orig));
        self.live.shrink_to_fit();
    }

    fn find(&self, netns: u32, orig: &FlowTuple) -> Option<usize> {
        if netns != self.netns || self.live.is_empty() {
            return None;
        }
        let p = PackedTuple::of(orig);
        let i = self.live.binary_search_by(|e| e.orig.cmp(&p)).ok()?;
        (self.live[i].timeout_s & GONE == 0).then_some(i)
    }

    /// The snapshot entry of `netns` with original tuple `orig`, if still held: its engine
    /// id and the monotonic ns its snapshot timeout runs out.
    pub fn get(&self, netns: u32, orig: &FlowTuple) -> Option<(u64, u64)> {
        let e = &self.live[self.find(netns, orig)?];
        Some((Self::engine_id(e.id), self.until(e.timeout_s)))
    }

    pub fn remove(&mut self, netns: u32, orig: &FlowTuple) -> Option<u64> {
        let i = self.find(netns, orig)?;
        // Its DNAT form, if any, is left to run out with its snapshot timeout.
        let e = &mut self.live[i];
        e.timeout_s |= GONE;
        Some(Self::engine_id(e.id))
    }

    /// A key whose flow is a snapshot entry whose timeout has not run out.
    pub fn key_matches(&self, key: &NpaKey, now_ns: u64) -> bool {
        let t = FlowTuple {
            proto: key.proto,
            src: key.src,
            sport: key.sport,
            dst: key.dst,
            dport: key.dport,
        };
        // Either direction of the key may be the entry's original tuple.
        [t, t.reversed()].iter().any(|o| {
            self.get(self.netns, o)
                .is_some_and(|(_, until)| now_ns < until)
        }) || self
            .dnat
            .get(&canonical(t))
            .is_some_and(|&until| now_ns < until)
    }
}

/// Feeds the start-up snapshot of the agent's map to the engine, so deletes of keys inserted
/// before the detector started are known. Returns how many keys did not decode with `layout`
/// (they are left out; a wrong `--layout` shows here first).
pub fn load_map_keys(
    engine: &mut Engine,
    map_id: u32,
    layout: KeyLayout,
    keys: impl IntoIterator<Item = impl AsRef<[u8]>>,
) -> u64 {
    let mut undecodable = 0;
    for k in keys {
        match NpaKey::decode(layout, k.as_ref()) {
            Ok(key) => {
                engine.push(Input::MapExisting { map_id, key });
            }
            Err(_) => undecodable += 1,
        }
    }
    undecodable
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    fn t(s: &str, sp: u16, d: &str, dp: u16) -> FlowTuple {
        FlowTuple {
            proto: 17,
            src: s.parse().unwrap(),
            sport: sp,
            dst: d.parse().unwrap(),
            dport: dp,
        }
    }

    fn key(t: &FlowTuple) -> NpaKey {
        NpaKey {
            src: t.src,
            sport: t.sport,
            dst: t.dst,
            dport: t.dport,
            proto: t.proto,
            owner: t.src,
            ifindex: None,
        }
    }

    #[test]
    fn undecodable_startup_keys_are_counted_not_fed() {
        let mut engine = Engine::new(crate::engine::EngineConfig::default());
        let layout = KeyLayout::V4;
        let good = vec![0u8; 20];
        let short = vec![0u8; 7];
        let n = load_map_keys(&mut engine, 1, layout, vec![good, short.clone(), short]);
        assert_eq!(n, 2);
    }

    #[test]
    fn preexisting_entries_are_found_matched_and_removed() {
        const S: u64 = 1_000_000_000;
        let mut p = Preexisting::new(7, 100 * S);
        let a = t("10.0.0.1", 1000, "10.0.0.2", 53);
        let b = t("fd00::1", 2000, "fd00::2", 53);
        let vip = t("10.0.0.1", 3000, "172.20.0.10", 80);
        let backend = t("10.0.1.9", 8080, "10.0.0.1", 3000);
        for (i, o) in [a, b].iter().enumerate() {
            p.insert(*o, o.reversed(), i as u32 + 1, 60);
        }
        p.insert(vip, backend, 3, 10);
        p.seal();
        assert_eq!(p.get(7, &a), Some(((1 << 63) | 1, 160 * S)));
        assert_eq!(p.get(7, &b), Some(((1 << 63) | 2, 160 * S)));
        assert_eq!(p.get(8, &a), None, "another netns");
        assert_eq!(p.get(7, &a.reversed()), None, "by original tuple only");
        // Keys match either direction, and the DNAT form, until the timeout runs out.
        assert!(p.key_matches(&key(&a.reversed()), 159 * S));
        assert!(!p.key_matches(&key(&a), 160 * S));
        let dnat = t("10.0.0.1", 3000, "10.0.1.9", 8080);
        assert!(p.key_matches(&key(&dnat), 105 * S));
        assert!(!p.key_matches(&key(&dnat), 110 * S));
        assert_eq!(p.remove(7, &a), Some((1 << 63) | 1));
        assert_eq!(p.remove(7, &a), None);
        assert_eq!(p.get(7, &a), None);
        assert!(!p.key_matches(&key(&a), 101 * S));
        assert!(p.key_matches(&key(&b), 101 * S));
    }
}
