//! Lines for people on stderr that never stop the detector: `eprintln!` panics when stderr is
//! a pipe whose reader has gone (`detector run 2>&1 | head -1`), and a detector must go on
//! detecting without its console. Lines that could not be written are counted (the summary's
//! `stderr_lines_lost` and `detector_stderr_lines_lost_total` in /metrics), not silently
//! dropped. Test code keeps `eprintln!`, which the test harness captures.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static LOST: AtomicU64 = AtomicU64::new(0);

/// Writes one line to stderr; a failed write is counted instead of panicking.
pub fn line(args: std::fmt::Arguments<'_>) {
    if writeln!(std::io::stderr().lock(), "{args}").is_err() {
        LOST.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines [`line`] could not write so far.
pub fn lost() -> u64 {
    LOST.load(Ordering::Relaxed)
}

/// `eprintln!` that counts a failed write instead of panicking ([`line`]).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::stderr::line(format_args!($($arg)*))
    };
}
