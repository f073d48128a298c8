//! Reordering by kernel timestamp with a bounded watermark.
//!
//! Records from different CPUs reach the ring buffer in reservation order, which can differ from
//! their `bpf_ktime_get_ns()` order by a few microseconds (more under load). Each record is held
//! until the monotonic clock has passed its timestamp by `watermark`, then released in timestamp
//! order. A record that arrives after a later one was already released is released at once and
//! counted as late (never dropped). The buffer is bounded: past `capacity` the oldest record is
//! released early and counted.

use std::collections::VecDeque;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReorderStats {
    /// Records that arrived behind the watermark (released out of order).
    pub late: u64,
    /// Records released before their watermark because the buffer was full.
    pub forced: u64,
}

/// Held records sorted by (timestamp, arrival), oldest first, in a ring: records arrive almost
/// in order, so a push lands at or near the back (found by binary search, moved into place
/// once) and a release takes from the front, each record moved twice in all. (A binary heap
/// moved every record, a few hundred bytes, once per level on the way in and out.)
pub struct Reorder<T> {
    held: VecDeque<Held<T>>,
    watermark_ns: u64,
    capacity: usize,
    released_ts: u64,
    stats: ReorderStats,
}

struct Held<T> {
    ts_ns: u64,
    item: T,
}

impl<T> Reorder<T> {
    pub fn new(watermark_ns: u64, capacity: usize) -> Self {
        Self {
            held: VecDeque::new(),
            watermark_ns,
            capacity: capacity.max(1),
            released_ts: 0,
            stats: ReorderStats::default(),
        }
    }

    pub fn stats(&self) -> ReorderStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Adds a record; whatever must leave now (late records, overflow) is appended to `out`.
    pub fn push(&mut self, ts_ns: u64, item: T, out: &mut Vec<T>) {
        if ts_ns < self.released_ts {
            self.stats.late += 1;
            out.push(item);
            return;
        }
        let held = Held { ts_ns, item };
        // Arrival order breaks ties: the new record goes after every one of equal timestamp.
        if self.held.back().is_none_or(|b| b.ts_ns <= ts_ns) {
            self.held.push_back(held);
        } else {
            let at = self.held.partition_point(|h| h.ts_ns <= ts_ns);
            self.held.insert(at, held);
        }
        while self.held.len() > self.capacity {
            self.stats.forced += 1;
            self.pop_into(out);
        }
    }

    /// When (monotonic ns) the oldest held record passes the watermark, if any is held: the
    /// event loop sleeps until then rather than polling.
    pub fn next_release_ns(&self) -> Option<u64> {
        self.held
            .front()
            .map(|h| h.ts_ns.saturating_add(self.watermark_ns))
    }

    /// Releases every record whose timestamp is at least `watermark` older than `now_ns`.
    pub fn release(&mut self, now_ns: u64, out: &mut Vec<T>) {
        let limit = now_ns.saturating_sub(self.watermark_ns);
        while self.held.front().is_some_and(|h| h.ts_ns <= limit) {
            self.pop_into(out);
        }
    }

    /// Releases everything (shutdown).
    pub fn drain(&mut self, out: &mut Vec<T>) {
        while !self.held.is_empty() {
            self.pop_into(out);
        }
    }

    fn pop_into(&mut self, out: &mut Vec<T>) {
        if let Some(h) = self.held.pop_front() {
            self.released_ts = self.released_ts.max(h.ts_ns);
            out.push(h.item);
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
    fn out_of_order_arrivals_leave_sorted_with_ties_in_arrival_order() {
        // Against a stable sort of the same records, for arrivals shuffled within a window.
        let mut r = Reorder::new(0, 10_000);
        let mut out = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut arrivals = Vec::new();
        for i in 0..2000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ts = i / 3 + x % 40;
            arrivals.push((ts, i));
            r.push(ts, (ts, i), &mut out);
        }
        r.drain(&mut out);
        let mut want = arrivals.clone();
        want.sort_by_key(|&(ts, _)| ts);
        assert_eq!(out, want);
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
