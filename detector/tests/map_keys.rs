//! Privileged: the start-up read of the agent map's keys. The batched read returns exactly the
//! keys the map holds (every one once, whatever their number against the batch size, with
//! buckets that hold several keys), and the same set as the one-key-at-a-time walk it falls
//! back to; an empty map and keys of an unusual size read too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::collections::BTreeSet;

use common::privileged;
use detector::npa::map_keys::{ReadMethod, read_keys};
use testbed::bpfmap::{BpfMap, LRU_HASH, MapSpec};

/// `BPF_MAP_TYPE_HASH`.
const HASH: u32 = 1;

fn map_with(
    map_type: u32,
    key_size: usize,
    n: u32,
    max_entries: u32,
) -> (BpfMap, BTreeSet<Vec<u8>>) {
    let map = BpfMap::create(&MapSpec {
        map_type,
        key_size: key_size as u32,
        value_size: 16,
        max_entries,
        name: "dtct_keys_test",
    })
    .unwrap();
    let mut want = BTreeSet::new();
    let mut keys = Vec::new();
    for i in 0..n {
        let mut k = vec![0xa5u8; key_size];
        k[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_ne_bytes());
        keys.extend_from_slice(&k);
        want.insert(k);
    }
    if n > 0 {
        map.update_batch(&keys, &vec![7u8; 16 * n as usize])
            .unwrap();
    }
    (map, want)
}

fn read(map: &BpfMap, key_size: usize, max: u32, method: ReadMethod) -> (Vec<Vec<u8>>, ReadMethod) {
    let snap = read_keys(map.as_fd(), key_size, 16, max as usize, method);
    assert!(snap.stopped.is_none(), "walk stopped: {:?}", snap.stopped);
    (snap.iter().map(<[u8]>::to_vec).collect(), snap.method)
}

#[test]
fn batched_read_returns_every_key_once_and_matches_the_one_at_a_time_walk() {
    if !privileged() {
        return;
    }
    // More keys than one batch asks for, not a multiple of it, in a plain hash (which holds
    // every key inserted) and in an LRU hash (which may evict a few before it is full: there
    // the walk is the reference).
    for (map_type, n, max) in [(HASH, 20_000, 65_536), (LRU_HASH, 10_007, 10_007)] {
        let (map, inserted) = map_with(map_type, 24, n, max);
        let (batched, method) = read(&map, 24, max, ReadMethod::Batch);
        assert_eq!(
            method,
            ReadMethod::Batch,
            "this kernel has batched map reads"
        );
        let (walked, method) = read(&map, 24, max, ReadMethod::OneAtATime);
        assert_eq!(method, ReadMethod::OneAtATime);
        let batched_set: BTreeSet<_> = batched.iter().cloned().collect();
        let walked_set: BTreeSet<_> = walked.iter().cloned().collect();
        assert_eq!(
            batched.len(),
            batched_set.len(),
            "every key once (type {map_type})"
        );
        assert_eq!(walked.len(), walked_set.len());
        assert_eq!(
            batched_set, walked_set,
            "the same keys both ways (type {map_type})"
        );
        assert!(batched_set.is_subset(&inserted));
        if map_type == HASH {
            assert_eq!(batched_set, inserted);
        } else {
            assert!(
                batched_set.len() * 10 > inserted.len() * 9,
                "{} of {n}",
                batched_set.len()
            );
        }
    }
}

#[test]
fn an_empty_map_and_odd_key_sizes_read() {
    if !privileged() {
        return;
    }
    let (empty, _) = map_with(LRU_HASH, 24, 0, 128);
    for method in [ReadMethod::Batch, ReadMethod::OneAtATime] {
        assert!(read(&empty, 24, 128, method).0.is_empty());
    }
    let (odd, want) = map_with(HASH, 13, 300, 512);
    for method in [ReadMethod::Batch, ReadMethod::OneAtATime] {
        let (got, _) = read(&odd, 13, 512, method);
        assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    }
}
