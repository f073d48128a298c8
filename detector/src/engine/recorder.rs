//! The flight recorder: one bounded ring of recent timeline events for all flows, from which
//! a verdict's or trace's timeline is extracted. One shared ring costs a fixed amount however
//! many flows are tracked, where per-flow rings cost a few events' worth for every flow
//! (most of which never see a verdict).

use std::collections::VecDeque;

use super::shadow::FlowId;
use super::verdict::TimelineEvent;

/// An event and the flow ids it concerns (a conntrack entry may concern two: its original
/// tuple and NPA's DNAT form).
struct Recorded {
    ev: TimelineEvent,
    flows: [Option<FlowId>; 2],
}

pub(crate) struct Recorder {
    /// Sorted by timestamp.
    ring: VecDeque<Recorded>,
    cap: usize,
    /// Newest timestamp among the events pushed out: a timeline reaching back to it or
    /// earlier may be missing events.
    horizon_ns: Option<u64>,
    pushed_out: u64,
}

impl Recorder {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            ring: VecDeque::new(),
            cap: cap.max(1),
            horizon_ns: None,
            pushed_out: 0,
        }
    }

    /// Events pushed out of the ring so far.
    pub(crate) fn pushed_out(&self) -> u64 {
        self.pushed_out
    }

    pub(crate) fn record(&mut self, ev: TimelineEvent, flows: [Option<FlowId>; 2]) {
        // Events almost always arrive in order, so search from the back; a late one lands in
        // its place.
        let pos = self
            .ring
            .iter()
            .rposition(|r| r.ev.ts_ns <= ev.ts_ns)
            .map_or(0, |p| p + 1);
        self.ring.insert(pos, Recorded { ev, flows });
        while self.ring.len() > self.cap {
            if let Some(old) = self.ring.pop_front() {
                self.pushed_out += 1;
                self.horizon_ns = Some(self.horizon_ns.unwrap_or(0).max(old.ev.ts_ns));
            }
        }
    }

    /// Whether events from `since_ns` on may have been pushed out of the ring.
    pub(crate) fn lost_since(&self, since_ns: u64) -> bool {
        self.horizon_ns.is_some_and(|h| h >= since_ns)
    }

    /// The newest `per_flow` events of each of `fids`, oldest first, and whether any of the
    /// flows had more (so the timeline does not reach back as far as the ring does).
    pub(crate) fn extract(&self, fids: &[FlowId], per_flow: usize) -> (Vec<TimelineEvent>, bool) {
        let per_flow = per_flow.max(1);
        let mut counts = vec![0usize; fids.len()];
        let mut capped = false;
        let mut out = Vec::new();
        for r in self.ring.iter().rev() {
            let mut wanted = false;
            let mut touches = false;
            for (fid, n) in fids.iter().zip(counts.iter_mut()) {
                if r.flows.iter().flatten().any(|f| f == fid) {
                    touches = true;
                    if *n < per_flow {
                        wanted = true;
                    }
                    *n += 1;
                }
            }
            if wanted {
                out.push(r.ev.clone());
            } else if touches {
                capped = true;
            }
        }
        out.reverse();
        (out, capped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TimelineKind;
    use crate::event::FlowTuple;

    fn fid(port: u16) -> FlowId {
        FlowId::of_tuple(&FlowTuple {
            proto: 6,
            src: "10.0.0.1".parse().unwrap(),
            sport: port,
            dst: "10.0.0.2".parse().unwrap(),
            dport: 80,
        })
    }

    fn ev(seq: u64, ts_ns: u64) -> TimelineEvent {
        TimelineEvent {
            seq,
            ts_ns,
            what: TimelineKind::Lost { count: seq },
        }
    }

    #[test]
    fn ring_is_bounded_sorted_and_flags_what_it_pushed_out() {
        let mut r = Recorder::new(3);
        r.record(ev(1, 10), [Some(fid(1)), None]);
        r.record(ev(2, 30), [Some(fid(1)), Some(fid(2))]);
        r.record(ev(3, 20), [Some(fid(2)), None]); // late: lands before ts 30
        let (a, capped) = r.extract(&[fid(1)], 10);
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(!capped);
        let (b, _) = r.extract(&[fid(2)], 10);
        assert_eq!(b.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 2]);
        assert!(!r.lost_since(0));
        r.record(ev(4, 40), [Some(fid(3)), None]);
        assert_eq!(r.pushed_out(), 1);
        assert!(r.lost_since(10) && !r.lost_since(11));
        let (a, _) = r.extract(&[fid(1)], 10);
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn extract_keeps_the_newest_per_flow_and_says_so() {
        let mut r = Recorder::new(100);
        for i in 0..5 {
            r.record(ev(i, i), [Some(fid(1)), None]);
        }
        r.record(ev(9, 9), [Some(fid(2)), None]);
        let (a, capped) = r.extract(&[fid(1), fid(2)], 2);
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 9]);
        assert!(capped);
    }
}
