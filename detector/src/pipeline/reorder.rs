//! Reordering by kernel timestamp with a bounded watermark.
//!
//! Records from different CPUs reach the ring buffer in reservation order, which can differ from
//! their `bpf_ktime_get_ns()` order by a few microseconds (more under load). Each record is held
//! until the monotonic clock has passed its timestamp by `watermark`, then released in timestamp
//! order. A record that arrives after a later one was already released is released at once and
//! counted as late (never dropped). The buffer is bounded: past `capacity` the oldest record is
//! released early and counted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReorderStats {
    /// Records that arrived behind the watermark (released out of order).
    pub late: u64,
    /// Records released before their watermark because the buffer was full.
    pub forced: u64,
}

pub struct Reorder<T> {
    heap: BinaryHeap<Reverse<(u64, u64, Slot<T>)>>,
    watermark_ns: u64,
    capacity: usize,
    seq: u64,
    released_ts: u64,
    stats: ReorderStats,
}

/// Wrapper so the heap orders by (ts, seq) only.
struct Slot<T>(T);
impl<T> PartialEq for Slot<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<T> Reorder<T> {
    pub fn new(watermark_ns: u64, capacity: usize) -> Self {
        Self {
            heap: BinaryHeap::new(),
            watermark_ns,
            capacity: capacity.max(1),
            seq: 0,
            released_ts: 0,
            stats: ReorderStats::default(),
        }
    }

    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Adds a record; whatever must leave now (late records, overflow) is appended to `out`.
    pub fn push(&mut self, ts_ns: u64, item: T, out: &mut Vec<T>) {
        if ts_ns < self.released_ts {
            self.stats.late += 1;
            out.push(item);
            return;
        }
        self.seq += 1;
        self.heap.push(Reverse((ts_ns, self.seq, Slot(item))));
        while self.heap.len() > self.capacity {
            self.stats.forced += 1;
            self.pop_into(out);
        }
    }

    /// When (monotonic ns) the oldest held record passes the watermark, if any is held: the
    /// event loop sleeps until then rather than polling.
    pub fn next_release_ns(&self) -> Option<u64> {
        self.heap
            .peek()
            .map(|Reverse((ts, _, _))| ts.saturating_add(self.watermark_ns))
    }

    /// Releases every record whose timestamp is at least `watermark` older than `now_ns`.
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<T>) {
        let limit = now_ns.saturating_sub(self.watermark_ns);
        while matches!(self.heap.peek(), Some(Reverse((ts, _, _))) if *ts <= limit) {
            self.pop_into(out);
        }
    }

    /// Releases everything (shutdown).
    pub fn drain(&mut self, out: &mut Vec<T>) {
        while !self.heap.is_empty() {
            self.pop_into(out);
        }
    }

    fn pop_into(&mut self, out: &mut Vec<T>) {
        if let Some(Reverse((ts, _, Slot(item)))) = self.heap.pop() {
            self.released_ts = self.released_ts.max(ts);
            out.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_timestamp_order_after_the_watermark() {
        let mut r = Reorder::new(100, 1000);
        let mut out = Vec::new();
        for ts in [500, 300, 400, 350] {
            r.push(ts, ts, &mut out);
        }
        assert!(out.is_empty());
        r.release(430, &mut out); // limit 330
        assert_eq!(out, vec![300]);
        r.release(10_000, &mut out);
        assert_eq!(out, vec![300, 350, 400, 500]);
        assert_eq!(r.stats(), ReorderStats::default());
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let mut r = Reorder::new(0, 10);
        let mut out = Vec::new();
        r.push(5, "a", &mut out);
        r.push(5, "b", &mut out);
        r.push(5, "c", &mut out);
        r.release(5, &mut out);
        assert_eq!(out, vec!["a", "b", "c"]);
    }

    #[test]
    fn late_records_are_counted_not_dropped() {
        let mut r = Reorder::new(10, 100);
        let mut out = Vec::new();
        r.push(100, 100, &mut out);
        r.release(200, &mut out);
        r.push(50, 50, &mut out);
        assert_eq!(out, vec![100, 50]);
        assert_eq!(r.stats().late, 1);
    }

    #[test]
    fn next_release_is_the_oldest_record_plus_the_watermark() {
        let mut r = Reorder::new(100, 10);
        let mut out = Vec::new();
        assert_eq!(r.next_release_ns(), None);
        r.push(500, 500, &mut out);
        r.push(300, 300, &mut out);
        assert_eq!(r.next_release_ns(), Some(400));
        r.release(400, &mut out);
        assert_eq!(out, vec![300]);
        assert_eq!(r.next_release_ns(), Some(600));
    }

    #[test]
    fn capacity_bounds_memory() {
        let mut r = Reorder::new(1_000_000, 2);
        let mut out = Vec::new();
        for ts in [3, 1, 2] {
            r.push(ts, ts, &mut out);
        }
        assert_eq!(out, vec![1]);
        assert_eq!(r.len(), 2);
        assert_eq!(r.stats().forced, 1);
        r.drain(&mut out);
        assert_eq!(out, vec![1, 2, 3]);
    }
}
