//! The kernel-side counters of what the probes could not record, read per CPU and summed.

use aya::maps::{MapData, PerCpuArray};
use detector_common::counter;

/// The kernel-side counters (per CPU, summed when read).
pub struct Counters(pub(super) PerCpuArray<MapData, u64>);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    /// Records dropped because the ring buffer was full, by kind index.
    pub lost: [u64; detector_common::kind::COUNT as usize],
    pub seen_full: u64,
    pub read_failed: u64,
    /// Agent deletes lost between syscall entry and exit (table full).
    pub pending_full: u64,
    /// Batch delete syscalls on a watched map (their keys are reported one by one).
    pub batch_deletes: u64,
    /// Keys of batch deletes beyond the 32 per syscall that are reported: not reported.
    pub batch_truncated: u64,
    /// kprobe backend: confirms whose entry could not be carried to the return (NEW lost).
    pub confirm_full: u64,
    /// Flow index full: a later delete may have seen its entry as absent.
    pub flows_full: u64,
}

impl CounterSnapshot {
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().sum()
    }

    /// Everything that makes the observed story incomplete: records the ring buffer could not
    /// take, entries the kernel tables could not hold, deletes or confirms not carried from
    /// syscall entry to exit, batch keys not reported.
    pub fn incomplete_total(&self) -> u64 {
        self.lost_total()
            + self.seen_full
            + self.flows_full
            + self.pending_full
            + self.confirm_full
            + self.batch_truncated
    }
}

impl Counters {
    pub fn read(&self) -> CounterSnapshot {
        let sum = |i: u32| -> u64 {
            self.0
                .get(&i, 0)
                .map(|v| v.iter().copied().sum())
                .unwrap_or(0)
        };
        let mut s = CounterSnapshot::default();
        for (k, slot) in s.lost.iter_mut().enumerate() {
            *slot = sum(counter::LOST_BASE + k as u32);
        }
        s.seen_full = sum(counter::SEEN_FULL);
        s.read_failed = sum(counter::READ_FAILED);
        s.pending_full = sum(counter::PENDING_FULL);
        s.batch_deletes = sum(counter::BATCH_DELETE);
        s.flows_full = sum(counter::FLOWS_FULL);
        s.batch_truncated = sum(counter::BATCH_TRUNCATED);
        s.confirm_full = sum(counter::CONFIRM_FULL);
        s
    }
}
