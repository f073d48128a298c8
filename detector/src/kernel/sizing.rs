//! What the in-kernel tables of live entries hold and cost, against the node's conntrack limit.

use detector_common::FlowKey;

/// Where the node's conntrack table limit is read (the detector's namespace: the node's, for
/// a DaemonSet with hostNetwork).
const NF_CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The kernel's own bookkeeping per element of a preallocated hash map (`struct htab_elem`
/// before the key: list node, free-list link and hash, on 64-bit).
const HTAB_ELEM_OVERHEAD: u64 = 48;

/// The node's `nf_conntrack_max`, when readable.
pub fn node_conntrack_max() -> Option<u32> {
    std::fs::read_to_string(NF_CONNTRACK_MAX)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Bytes the tables of live entries take for `max_entries` (SEEN: entry -> birth; FLOWS, twice
/// as large: flow -> entry), all preallocated by the kernel at load.
pub fn table_bytes(max_entries: u32) -> u64 {
    let elem = |key: usize, value: usize| {
        HTAB_ELEM_OVERHEAD + (key as u64).next_multiple_of(8) + (value as u64).next_multiple_of(8)
    };
    let seen = u64::from(max_entries) * elem(8, 8);
    let flows = 2 * u64::from(max_entries) * elem(std::mem::size_of::<FlowKey>(), 8);
    seen + flows
}

/// The start-up line on the tables' size and cost, and a warning when the node can hold more
/// live entries than they can (beyond them, deletes are unjudged, counted as
/// seen_full/flows_full).
pub fn describe(max_entries: u32, node_max: Option<u32>) -> (String, Option<String>) {
    let mib = table_bytes(max_entries) as f64 / f64::from(1u32 << 20);
    let node = node_max.map_or("unknown".to_string(), |m| m.to_string());
    let line = format!(
        "detector: kernel tables hold {max_entries} live conntrack entries (--max-entries; flow \
         index {}), {mib:.1} MiB of kernel memory; node nf_conntrack_max {node}",
        u64::from(max_entries) * 2
    );
    let warning = node_max.filter(|&m| m > max_entries).map(|m| {
        format!(
            "--max-entries {max_entries} is below the node's nf_conntrack_max {m}: beyond \
             {max_entries} live entries, deletes of live flows are unjudged (seen_full / \
             flows_full in /metrics); raise --max-entries to {m}"
        )
    });
    (line, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_grows_with_the_table_and_a_small_table_is_flagged() {
        assert!(table_bytes(2048) == 2 * table_bytes(1024));
        assert!(table_bytes(262_144) > 262_144 * 3 * 64);
        let (line, warning) = describe(16, Some(262_144));
        assert!(line.contains("hold 16 live"), "{line}");
        assert!(line.contains("nf_conntrack_max 262144"), "{line}");
        let warning = warning.unwrap_or_default();
        assert!(warning.contains("--max-entries 16 is below"), "{warning}");
        assert_eq!(describe(262_144, Some(262_144)).1, None);
        assert_eq!(describe(16, None).1, None);
    }
}
