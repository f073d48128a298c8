//! From ring-buffer records to outputs: the event loop that reads the ring and ticks, the
//! reorder buffer that releases records in kernel-timestamp order behind a watermark, start-up
//! reconciliation, dispatch into the engine and out to the sinks, the run's named steps, and
//! reading a recording of the run back for `detector replay` (`replay`, `replay_feed`).

pub mod ct_full;
pub mod dispatch;
pub mod event_loop;
pub mod map_follow;
pub mod release_timer;
pub mod reorder;
pub mod replay;
pub mod replay_feed;
pub mod run;
pub mod startup;

/// Serves every large allocation (the engine's flow table, the start-up snapshots) from a
/// mapping of its own, as musl (the image's libc) does: a growing table then moves by mremap
/// instead of being copied within the heap, and a freed one goes back to the kernel at once.
/// Left to itself, glibc raises that threshold as set-up frees the parsed BTF, and a table's
/// old copy stays in the heap, in the RSS, until the trim (at 524288 flows the start-up peak
/// measured 3 MiB lower with this).
pub(crate) fn map_large_allocations() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets one of the allocator's tunables, under the allocator's lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Returns the heap's free memory to the kernel. Set-up parses tens of MiB (BTF, the object,
/// start-up snapshots) that are freed before the loop starts; glibc keeps freed memory for
/// reuse and would hold it in the process's RSS for the whole run.
pub(crate) fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
