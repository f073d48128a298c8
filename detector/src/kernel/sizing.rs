//! How many live conntrack entries the in-kernel tables hold, what they cost, and the node's
//! conntrack limit they are sized to.

use std::fmt;
use std::str::FromStr;

use detector_common::FlowKey;

/// Where the node's conntrack table limit is read (the detector's namespace: the node's, for
/// a DaemonSet with hostNetwork; in another namespace the file shows the same global limit).
const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The tables of live entries, by their names in the eBPF object: SEEN (entry -> birth) and
/// FLOWS (flow -> entry, twice as large: an entry's original tuple and its DNAT form).
pub const LIVE_ENTRY_TABLES: [&str; 2] = ["SEEN", "FLOWS"];

/// The size when the node has no conntrack limit to follow (nf_conntrack not loaded yet, or
/// `nf_conntrack_max` 0, "unlimited"): the kernel's own default limit on a machine with more
/// than 4 GiB of memory.
pub const FALLBACK_MAX_ENTRIES: u32 = 262_144;

/// The largest table `--max-entries` (and so the automatic size) allows.
const MAX_ENTRIES_LIMIT: u32 = 1 << 24;

/// The kernel's own bookkeeping per element of a hash map (`struct htab_elem` before the key:
/// list node, free-list link and hash, on 64-bit).
const HTAB_ELEM_OVERHEAD: u64 = 48;
/// What an element allocated at run time adds (the allocator's `llist_node`).
const RUNTIME_ELEM_OVERHEAD: u64 = 8;
/// One hash bucket (`struct bucket`: list head and spinlock), one per power of two of entries.
const BUCKET_BYTES: u64 = 16;

/// `--max-entries`: a number, or `auto` (the node's `nf_conntrack_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxEntries {
    Auto,
    Fixed(u32),
}

impl FromStr for MaxEntries {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let v: u64 = s
            .parse()
            .map_err(|_| format!("`{s}` is not a number of entries (or `auto`)"))?;
        if v == 0 || v > u64::from(MAX_ENTRIES_LIMIT) {
            return Err(format!(
                "entries must be from 1 to {MAX_ENTRIES_LIMIT} (or `auto`), not {v}"
            ));
        }
        Ok(Self::Fixed(v as u32))
    }
}

impl fmt::Display for MaxEntries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Where the tables' size came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizedBy {
    Flag,
    NodeMax,
    /// No usable `nf_conntrack_max` (none, 0, or beyond what a table may hold).
    Fallback,
}

impl SizedBy {
    fn describe(self) -> &'static str {
        match self {
            Self::Flag => "--max-entries",
            Self::NodeMax => "the node's nf_conntrack_max",
            Self::Fallback => "no usable nf_conntrack_max: the fallback",
        }
    }
}

impl MaxEntries {
    /// The tables' size: the flag's, else the node's `nf_conntrack_max` (within the bound
    /// the flag has), else [`FALLBACK_MAX_ENTRIES`].
    pub fn resolve(self, node_max: Option<u32>) -> (u32, SizedBy) {
        match (self, node_max) {
            (Self::Fixed(n), _) => (n, SizedBy::Flag),
            (Self::Auto, Some(m)) if m > 0 => (m.min(MAX_ENTRIES_LIMIT), SizedBy::NodeMax),
            (Self::Auto, _) => (FALLBACK_MAX_ENTRIES, SizedBy::Fallback),
        }
    }
}

/// The node's `nf_conntrack_max`, when readable.
pub fn node_conntrack_max() -> Option<u32> {
    std::fs::read_to_string(NF_CONNTRACK_MAX)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What the tables of live entries cost in kernel memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCost {
    /// Bytes each live entry adds (one SEEN element, up to two FLOWS elements).
    pub per_entry: u64,
    /// Bytes taken with no entry in the tables.
    pub idle: u64,
    /// Bytes taken with the tables full.
    pub full: u64,
}

/// The cost of tables for `max_entries` live entries: preallocated, every element is taken
/// at load (and one spare per CPU); otherwise only the buckets are, and elements as they come.
pub fn table_cost(max_entries: u32, preallocated: bool, cpus: u32) -> TableCost {
    let runtime = if preallocated {
        0
    } else {
        RUNTIME_ELEM_OVERHEAD
    };
    let elem = |key: usize, value: usize| {
        HTAB_ELEM_OVERHEAD
            + (key as u64).next_multiple_of(8)
            + (value as u64).next_multiple_of(8)
            + runtime
    };
    let seen_elem = elem(8, 8);
    let flow_elem = elem(std::mem::size_of::<FlowKey>(), 8);
    let n = u64::from(max_entries);
    let buckets = BUCKET_BYTES * (n.next_power_of_two() + (2 * n).next_power_of_two());
    let per_entry = seen_elem + 2 * flow_elem;
    let elements = n * per_entry;
    let idle = if preallocated {
        let spares = u64::from(cpus) * (seen_elem + flow_elem);
        buckets + elements + spares
    } else {
        buckets
    };
    TableCost {
        per_entry,
        idle,
        full: idle.max(buckets + elements),
    }
}

/// How the tables were sized and created, for the start-up line.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub max_entries: u32,
    pub sized_by: SizedBy,
    pub preallocated: bool,
    pub ring_bytes: u32,
    pub node_max: Option<u32>,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The start-up line on the tables' size and cost, and a warning when the node can hold more
/// live entries than they can (beyond them, deletes are unjudged, counted as
/// seen_full/flows_full).
pub fn describe(s: &Sizing, cpus: u32) -> (String, Option<String>) {
    let n = s.max_entries;
    let cost = table_cost(n, s.preallocated, cpus);
    let node = s.node_max.map_or("unknown".to_string(), |m| m.to_string());
    let how = if s.preallocated {
        "preallocated"
    } else {
        "allocated as they fill"
    };
    let line = format!(
        "detector: kernel tables hold {n} live conntrack entries ({}; flow index {}), {} B per \
         entry, {how}: {:.1} MiB of kernel memory idle, {:.1} MiB full, plus the ring buffer's \
         {} MiB; node nf_conntrack_max {node}",
        s.sized_by.describe(),
        u64::from(n) * 2,
        cost.per_entry,
        mib(cost.idle),
        mib(cost.full),
        s.ring_bytes >> 20,
    );
    let warning = s.node_max.filter(|&m| m > n).map(|m| {
        format!(
            "--max-entries {n} is below the node's nf_conntrack_max {m}: beyond {n} live \
             entries, deletes of live flows are unjudged (seen_full / flows_full in /metrics); \
             raise --max-entries to {m}, or leave it at auto"
        )
    });
    (line, warning)
}

/// The number of CPUs the kernel may bring up (`/sys/devices/system/cpu/possible`, e.g.
/// `0-7`): a preallocated hash map keeps one spare element per possible CPU.
pub fn possible_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
                    None => r.parse::<u32>().ok().map(|_| 1),
                })
                .sum::<Option<u32>>()
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizing(n: u32, node_max: Option<u32>, preallocated: bool) -> Sizing {
        Sizing {
            max_entries: n,
            sized_by: SizedBy::Flag,
            preallocated,
            ring_bytes: 8 << 20,
            node_max,
        }
    }

    #[test]
    fn cost_grows_with_the_table_and_a_small_table_is_flagged() {
        let c1 = table_cost(1024, true, 2);
        let c2 = table_cost(2048, true, 2);
        assert!(c2.idle > c1.idle && c2.idle < 2 * c1.idle + 1024);
        assert!(table_cost(262_144, true, 2).idle > 262_144 * 3 * 64);
        let (line, warning) = describe(&sizing(16, Some(262_144), true), 2);
        assert!(line.contains("hold 16 live"), "{line}");
        assert!(line.contains("nf_conntrack_max 262144"), "{line}");
        assert!(line.contains("B per entry"), "{line}");
        let warning = warning.unwrap_or_default();
        assert!(warning.contains("--max-entries 16 is below"), "{warning}");
        assert_eq!(describe(&sizing(262_144, Some(262_144), true), 2).1, None);
        assert_eq!(describe(&sizing(16, None, true), 2).1, None);
    }

    /// Without preallocation an idle table costs only its buckets; full, it costs at least
    /// what a preallocated one does.
    #[test]
    fn tables_that_fill_as_they_go_cost_little_idle() {
        let pre = table_cost(262_144, true, 2);
        let lazy = table_cost(262_144, false, 2);
        // 2^18 + 2^19 buckets of 16 B.
        assert_eq!(lazy.idle, 16 * (262_144 + 524_288));
        assert!(lazy.idle * 5 < pre.idle, "{lazy:?} vs {pre:?}");
        assert!(
            lazy.full >= pre.full - 2 * (64 + 104),
            "{lazy:?} vs {pre:?}"
        );
        assert_eq!(lazy.per_entry, pre.per_entry + 3 * 8);
        let (line, _) = describe(&sizing(262_144, None, false), 2);
        assert!(line.contains("allocated as they fill"), "{line}");
        assert!(line.contains("12.0 MiB of kernel memory idle"), "{line}");
    }

    #[test]
    fn the_size_follows_the_node_unless_given() {
        let auto: MaxEntries = "auto".parse().unwrap_or(MaxEntries::Fixed(1));
        assert_eq!(auto, MaxEntries::Auto);
        assert_eq!(auto.resolve(Some(1_048_576)), (1_048_576, SizedBy::NodeMax));
        assert_eq!(
            auto.resolve(None),
            (FALLBACK_MAX_ENTRIES, SizedBy::Fallback)
        );
        assert_eq!(
            auto.resolve(Some(0)),
            (FALLBACK_MAX_ENTRIES, SizedBy::Fallback)
        );
        assert_eq!(auto.resolve(Some(u32::MAX)), (1 << 24, SizedBy::NodeMax));
        assert_eq!(
            MaxEntries::Fixed(16).resolve(Some(262_144)),
            (16, SizedBy::Flag)
        );
        assert_eq!("16".parse::<MaxEntries>(), Ok(MaxEntries::Fixed(16)));
        assert!("0".parse::<MaxEntries>().is_err());
        assert!("16777217".parse::<MaxEntries>().is_err());
        assert!("lots".parse::<MaxEntries>().is_err());
    }
}
