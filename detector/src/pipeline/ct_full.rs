//! Windows in which the kernel conntrack table of the judged namespace was full: it tracked no
//! new flow then, so a verdict whose story reaches into such a window is flagged
//! `maybe_incomplete`, and the agent deletes made in one are counted.
//!
//! The table is checked every [`CHECK_EVERY_NS`] of kernel time. A window opens at the last
//! check that found room (the table may have filled any time after it) and closes at the first
//! check that finds room again.

use std::collections::VecDeque;

use crate::snapshot::fill::{ConntrackFill, Fill};

/// How often the table's fill is read (two `pread`s of a sysctl file).
pub const CHECK_EVERY_NS: u64 = 100_000_000;
/// Closed windows kept at most (the oldest are forgotten first).
const MAX_WINDOWS: usize = 1024;

/// A change the latest check saw, to be said once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Found full; the window opened at `since_ns`.
    Filled {
        fill: Fill,
        since_ns: u64,
    },
    Emptied {
        fill: Fill,
        lasted_ns: u64,
    },
}

#[derive(Default)]
pub struct FullWindows {
    fill: Option<ConntrackFill>,
    last_check_ns: u64,
    /// The open window's start, while the table is full.
    open_since_ns: Option<u64>,
    closed: VecDeque<(u64, u64)>,
    /// Times the table was found full.
    pub windows: u64,
    /// Agent deletes made while it was full.
    pub deletes: u64,
}

impl FullWindows {
    /// Checks the table read through `fill` (none: never full, e.g. conntrack not loaded or a
    /// replay).
    pub fn new(fill: Option<ConntrackFill>) -> Self {
        Self {
            fill,
            ..Self::default()
        }
    }

    /// Reads the table when a check is due; returns what changed, for the caller to say,
    /// record and [`FullWindows::apply`].
    pub fn check(&mut self, now_ns: u64) -> Option<Change> {
        if now_ns < self.last_check_ns + CHECK_EVERY_NS {
            return None;
        }
        let fill = self.fill.as_ref()?.read()?;
        let previous = std::mem::replace(&mut self.last_check_ns, now_ns);
        self.observe(fill, previous, now_ns)
    }

    /// What a reading `fill` at `now_ns` means, the previous check having been at
    /// `previous_ns`.
    fn observe(&mut self, fill: Fill, previous_ns: u64, now_ns: u64) -> Option<Change> {
        match (fill.full(), self.open_since_ns) {
            (true, None) => Some(Change::Filled {
                fill,
                since_ns: previous_ns,
            }),
            (false, Some(start)) => Some(Change::Emptied {
                fill,
                lasted_ns: now_ns.saturating_sub(start),
            }),
            _ => None,
        }
    }

    /// Applies a change [`FullWindows::check`] found, or a recorded one (a replay).
    pub fn apply(&mut self, change: Change, now_ns: u64) {
        match change {
            Change::Filled { since_ns, .. } => self.open(since_ns),
            Change::Emptied { .. } => self.close(now_ns),
        }
    }

    /// A window opens at `since_ns`.
    fn open(&mut self, since_ns: u64) {
        if self.open_since_ns.is_none() {
            self.open_since_ns = Some(since_ns);
            self.windows += 1;
        }
    }

    /// The open window closes at `now_ns`.
    fn close(&mut self, now_ns: u64) {
        if let Some(start) = self.open_since_ns.take() {
            if self.closed.len() == MAX_WINDOWS {
                self.closed.pop_front();
            }
            self.closed.push_back((start, now_ns));
        }
    }

    /// Whether the table was (or may have been) full at some instant of `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.open_since_ns.is_some_and(|s| s <= end)
            || self.closed.iter().any(|&(s, e)| s <= end && e >= start)
    }

    /// Counts a delete made at `ts_ns` if the table was full then; whether it was.
    pub fn note_delete(&mut self, ts_ns: u64) -> bool {
        let full = self.overlaps(ts_ns, ts_ns);
        self.deletes += u64::from(full);
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_window_opens_at_the_last_roomy_check_and_closes_at_the_next() {
        let mut w = FullWindows::default();
        let room = Fill { count: 3, max: 8 };
        let full = Fill { count: 8, max: 8 };
        let step = |w: &mut FullWindows, fill, prev, now| {
            let c = w.observe(fill, prev, now);
            if let Some(c) = c {
                w.apply(c, now);
            }
            c
        };
        assert_eq!(step(&mut w, room, 0, 100 * MS), None);
        assert_eq!(
            step(&mut w, full, 100 * MS, 200 * MS),
            Some(Change::Filled {
                fill: full,
                since_ns: 100 * MS
            })
        );
        assert_eq!(step(&mut w, full, 200 * MS, 300 * MS), None, "said once");
        assert!(
            w.overlaps(150 * MS, 150 * MS),
            "it may have filled after 100 ms"
        );
        assert!(!w.overlaps(0, 99 * MS));
        assert!(w.overlaps(10_000 * MS, 10_000 * MS), "still open");
        assert_eq!(
            step(&mut w, room, 300 * MS, 400 * MS),
            Some(Change::Emptied {
                fill: room,
                lasted_ns: 300 * MS
            })
        );
        assert!(w.overlaps(350 * MS, 350 * MS));
        assert!(!w.overlaps(401 * MS, 900 * MS), "closed at 400 ms");
        assert!(w.overlaps(0, 120 * MS), "a story reaching into the window");
        assert!(w.note_delete(250 * MS));
        assert!(!w.note_delete(500 * MS));
        assert_eq!((w.windows, w.deletes), (1, 1));
    }

    /// A replay applies the recorded changes: the same answers.
    #[test]
    fn recorded_changes_replay_the_same() {
        let mut w = FullWindows::default();
        let fill = Fill { count: 8, max: 8 };
        w.apply(
            Change::Filled {
                fill,
                since_ns: 100 * MS,
            },
            200 * MS,
        );
        assert!(w.note_delete(150 * MS));
        w.apply(
            Change::Emptied {
                fill,
                lasted_ns: 300 * MS,
            },
            400 * MS,
        );
        assert!(!w.overlaps(401 * MS, 900 * MS));
        assert_eq!((w.windows, w.deletes), (1, 1));
    }

    #[test]
    fn without_a_table_to_read_nothing_is_ever_full() {
        let mut w = FullWindows::new(None);
        assert_eq!(w.check(10 * CHECK_EVERY_NS), None);
        assert!(!w.overlaps(0, u64::MAX));
    }
}
