//! The emulated agent's userspace cleanup, in the three shapes NPA has had:
//!
//! * `legacy` (#246): dump the kernel conntrack table, then walk the map and delete every key
//!   whose flow is not in the dump;
//! * `two-phase` (#256): copy the map's keys in one cycle, and in the next cycle delete the
//!   copied keys whose flow is missing from a fresh dump;
//! * `fixed` (#610): two-phase, and before each delete re-read the key's `last_seen`: a key the
//!   datapath touched after the copy is kept.
//!
//! Each delete is recorded with the ground truth the tests compare against: whether the
//! flow's conntrack entry was live in the kernel right after the delete (a second dump, which
//! also evicts entries that had merely expired, answers that independently of the detector).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};

use crate::clock;
use crate::npa::{KeyLayout, Layout, NpaKey, NpaValue};
use crate::record::FlowTuple;
use crate::snapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CleanupMode {
    Legacy,
    TwoPhase,
    Fixed,
}

/// One delete the emulated cleanup made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroundTruth {
    /// CLOCK_MONOTONIC just before and just after the bpf(2) call: the kernel's timestamp of
    /// the delete (the detector's, taken at the syscall's entry) lies in between.
    pub ts_ns: u64,
    pub end_ns: u64,
    pub key: NpaKey,
    /// The flow had a live conntrack entry right after the delete: the delete was wrongful.
    pub live: bool,
}

/// The cleanup's state across cycles.
pub struct Cleanup {
    pub mode: CleanupMode,
    pin: PathBuf,
    layout: Layout,
    netns: PathBuf,
    /// Two-phase: the keys copied in the previous cycle, and when.
    copy: Option<(u64, Vec<Vec<u8>>)>,
    pub log: Vec<GroundTruth>,
}

/// The flows the kernel knows, in the forms NPA's cleanup matches keys against: each entry's
/// original tuple and, for DNAT'd entries, the original source to the reply's source.
fn kernel_flows(netns: &Path) -> Result<HashSet<FlowTuple>> {
    let table = snapshot::dump(Some(netns)).context("cleanup: conntrack dump")?;
    let mut set = HashSet::new();
    for e in table {
        set.insert(e.orig);
        set.insert(FlowTuple {
            dst: e.reply.src,
            dport: e.reply.sport,
            ..e.orig
        });
    }
    Ok(set)
}

fn key_flow(k: &NpaKey) -> FlowTuple {
    FlowTuple {
        proto: k.proto,
        src: k.src,
        sport: k.sport,
        dst: k.dst,
        dport: k.dport,
    }
}

impl Cleanup {
    /// The fixed cleanup needs `last_seen`, which only the 16-byte value has.
    pub fn new(mode: CleanupMode, pin: &Path, layout: Layout, netns: &Path) -> Result<Self> {
        if mode == CleanupMode::Fixed && layout.value != crate::npa::ValueLayout::LastSeen16 {
            anyhow::bail!(
                "the fixed cleanup re-reads last_seen, which the {layout} layout's value does \
                 not have: use a /16 layout"
            );
        }
        Ok(Self {
            mode,
            pin: pin.to_path_buf(),
            layout,
            netns: netns.to_path_buf(),
            copy: None,
            log: Vec::new(),
        })
    }

    fn open(&self) -> Result<LabMap> {
        let m = Map::LruHashMap(MapData::from_pin(&self.pin).context("opening the lab map")?);
        Ok(match self.layout.key {
            KeyLayout::V4Ifindex => LabMap::Key24(HashMap::try_from(m)?),
            KeyLayout::V4 => LabMap::Key20(HashMap::try_from(m)?),
            other => anyhow::bail!("the lab is IPv4: layout {other:?} is not supported"),
        })
    }

    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.open()?.keys())
    }

    /// First half of a cycle: the dump (legacy, and two-phase's check) and, for the two-phase
    /// modes, taking the copy for the next cycle. Returns the keys to check against the dump.
    pub fn dump_phase(&mut self) -> Result<Pending> {
        let flows = kernel_flows(&self.netns)?;
        let candidates = match self.mode {
            CleanupMode::Legacy => Candidates::WalkNow,
            CleanupMode::TwoPhase | CleanupMode::Fixed => {
                let old = self.copy.take();
                self.copy = Some((clock::monotonic_ns(), self.keys()?));
                // The first cycle only takes the copy.
                old.map_or(Candidates::Nothing, |(at, keys)| {
                    Candidates::Copied(at, keys)
                })
            }
        };
        Ok(Pending { flows, candidates })
    }

    /// Second half: delete the keys whose flow is missing from the dump, from a thread in the
    /// node's namespace. NPA runs there (hostNetwork), so its bpf(2) deletes come from a task
    /// in that namespace, and the detector judges each delete in its deleting task's one.
    pub fn delete_phase(&mut self, p: Pending) -> Result<usize> {
        let ns = std::fs::File::open(&self.netns)
            .with_context(|| format!("opening the node's namespace {}", self.netns.display()))?;
        let this = &mut *self;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<usize> {
                    testbed::netns::enter(&ns).context("entering the node's namespace")?;
                    this.delete_here(p)
                })
                .join()
        })
        .map_err(|_| anyhow::anyhow!("the lab's cleanup thread panicked"))?
    }

    fn delete_here(&mut self, p: Pending) -> Result<usize> {
        let mut h = self.open()?;
        let (copied_at, keys) = match p.candidates {
            Candidates::Copied(at, keys) => (Some(at), keys),
            // Legacy walks the map as it is now.
            Candidates::WalkNow => (None, h.keys()),
            Candidates::Nothing => return Ok(0),
        };
        let mut done = Vec::new();
        for raw in keys {
            let Ok(key) = NpaKey::decode(self.layout.key, &raw) else {
                continue;
            };
            if p.flows.contains(&key_flow(&key)) {
                continue;
            }
            if self.mode == CleanupMode::Fixed
                && let Some(copied_at) = copied_at
                && h.last_seen(&raw).is_some_and(|seen| seen > copied_at)
            {
                // #610: the datapath used the key after the copy: the flow is alive.
                continue;
            }
            let ts_ns = clock::monotonic_ns();
            let removed = h.remove(&raw);
            let end_ns = clock::monotonic_ns();
            if removed {
                done.push((ts_ns, end_ns, key));
            }
        }
        // One dump after the deletes (not one per delete, which would stretch the cleanup
        // past the replies it races): the deleted keys' flows either have live entries now or
        // do not; none of them can expire within this pass.
        let live = kernel_flows(&self.netns)?;
        let deleted = done.len();
        for (ts_ns, end_ns, key) in done {
            let live = live.contains(&key_flow(&key));
            self.log.push(GroundTruth {
                ts_ns,
                end_ns,
                key,
                live,
            });
        }
        Ok(deleted)
    }

    pub fn wrongful(&self) -> usize {
        self.log.iter().filter(|g| g.live).count()
    }
}

/// The lab map in either IPv4 layout (raw key bytes in, so the cleanup is layout-blind).
enum LabMap {
    Key24(HashMap<MapData, [u8; 24], [u8; 16]>),
    Key20(HashMap<MapData, [u8; 20], [u8; 1]>),
}

impl LabMap {
    fn keys(&self) -> Vec<Vec<u8>> {
        match self {
            LabMap::Key24(h) => h
                .keys()
                .filter_map(Result::ok)
                .map(|k| k.to_vec())
                .collect(),
            LabMap::Key20(h) => h
                .keys()
                .filter_map(Result::ok)
                .map(|k| k.to_vec())
                .collect(),
        }
    }

    /// The key's `last_seen` (16-byte values only).
    fn last_seen(&self, raw: &[u8]) -> Option<u64> {
        let LabMap::Key24(h) = self else { return None };
        let k = <[u8; 24]>::try_from(raw).ok()?;
        let v = h.get(&k, 0).ok()?;
        NpaValue::decode(crate::npa::ValueLayout::LastSeen16, &v)
            .ok()?
            .last_seen_ns
    }

    fn remove(&mut self, raw: &[u8]) -> bool {
        match self {
            LabMap::Key24(h) => <[u8; 24]>::try_from(raw).is_ok_and(|k| h.remove(&k).is_ok()),
            LabMap::Key20(h) => <[u8; 20]>::try_from(raw).is_ok_and(|k| h.remove(&k).is_ok()),
        }
    }
}

/// Between the two halves of a cycle.
pub struct Pending {
    flows: HashSet<FlowTuple>,
    candidates: Candidates,
}

/// The keys a cycle's deletes consider.
enum Candidates {
    /// Legacy: the map as it is at the delete phase.
    WalkNow,
    /// Two-phase: the copy taken one cycle earlier, and when.
    Copied(u64, Vec<Vec<u8>>),
    /// Two-phase's first cycle: no copy yet.
    Nothing,
}
