//! The flight recorder: one bounded ring of recent timeline events for all flows, from which
//! a verdict's or trace's timeline is extracted. One shared ring costs a fixed amount however
//! many flows are tracked, where per-flow rings cost a few events' worth for every flow
//! (most of which never see a verdict).

use std::collections::VecDeque;

use super::flow_id::{FlowId, NO_EVENT};
use super::verdict::TimelineEvent;

/// An event, the flow ids it concerns (a conntrack entry may concern two: its original tuple
/// and NPA's DNAT form) and, for each, the previous event of that flow, so that a flow's
/// events are found by following its chain from the newest (held in its `FlowState`) instead
/// of scanning the whole ring.
struct Recorded {
    ev: TimelineEvent,
    flows: [Option<FlowId>; 2],
    prev: [u64; 2],
}

pub(crate) struct Recorder {
    /// In arrival order; `ring[i]` has the absolute index `base + i`.
    ring: VecDeque<Recorded>,
    base: u64,
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
            base: 0,
            cap: cap.max(1),
            horizon_ns: None,
            pushed_out: 0,
        }
    }

    /// Events pushed out of the ring so far.
    pub(crate) fn pushed_out(&self) -> u64 {
        self.pushed_out
    }

    /// The absolute index the next recorded event will have.
    pub(crate) fn next_index(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    /// Appends an event; `prev[j]` is the index of the previous event of `flows[j]`
    /// ([`NO_EVENT`] if none).
    pub(crate) fn record(&mut self, ev: TimelineEvent, flows: [Option<FlowId>; 2], prev: [u64; 2]) {
        // Room is made before the push, so the ring never holds more than `cap` events and
        // its buffer never grows past them (one more would double it).
        while self.ring.len() >= self.cap {
            if let Some(old) = self.ring.pop_front() {
                self.base += 1;
                self.pushed_out += 1;
                self.horizon_ns = Some(self.horizon_ns.unwrap_or(0).max(old.ev.ts_ns));
            }
        }
        self.ring.push_back(Recorded { ev, flows, prev });
    }

    fn get(&self, idx: u64) -> Option<&Recorded> {
        let i = usize::try_from(idx.checked_sub(self.base)?).ok()?;
        self.ring.get(i)
    }

    /// Whether events from `since_ns` on may have been pushed out of the ring.
    pub(crate) fn lost_since(&self, since_ns: u64) -> bool {
        self.horizon_ns.is_some_and(|h| h >= since_ns)
    }

    /// The newest `per_flow` events of each flow, given as (id, index of its newest event),
    /// unsorted; and whether a flow had more (so the timeline does not reach back as far as
    /// the ring does).
    pub(crate) fn extract(
        &self,
        heads: &[(FlowId, u64)],
        per_flow: usize,
    ) -> (Vec<TimelineEvent>, bool) {
        let per_flow = per_flow.max(1);
        let mut capped = false;
        let mut out = Vec::new();
        for (fid, head) in heads {
            let mut idx = *head;
            let mut n = 0;
            // Events pushed out end the chain; `lost_since` reports them.
            while let Some(r) = self.get(idx) {
                if n == per_flow {
                    capped = true;
                    break;
                }
                out.push(r.ev.clone());
                n += 1;
                let slot = r.flows.iter().position(|f| f.as_ref() == Some(fid));
                idx = slot.map_or(NO_EVENT, |j| r.prev[j]);
            }
        }
        (out, capped)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;
    use crate::engine::TimelineKind;
    use crate::record::FlowTuple;

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

    /// Records like the engine does: each flow's newest event index in `heads`.
    fn rec(r: &mut Recorder, heads: &mut Vec<(FlowId, u64)>, e: TimelineEvent, fl: &[u16]) {
        let idx = r.next_index();
        let mut flows = [None, None];
        let mut prev = [NO_EVENT; 2];
        for (j, p) in fl.iter().enumerate() {
            let f = fid(*p);
            flows[j] = Some(f.clone());
            match heads.iter_mut().find(|h| h.0 == f) {
                Some(h) => prev[j] = std::mem::replace(&mut h.1, idx),
                None => heads.push((f, idx)),
            }
        }
        r.record(e, flows, prev);
    }

    fn seqs(
        r: &Recorder,
        heads: &[(FlowId, u64)],
        ports: &[u16],
        per_flow: usize,
    ) -> (Vec<u64>, bool) {
        let hs: Vec<(FlowId, u64)> = heads
            .iter()
            .filter(|h| ports.iter().any(|p| fid(*p) == h.0))
            .cloned()
            .collect();
        let (mut evs, capped) = r.extract(&hs, per_flow);
        evs.sort_by_key(|e| (e.ts_ns, e.seq));
        evs.dedup_by_key(|e| e.seq);
        (evs.iter().map(|e| e.seq).collect(), capped)
    }

    #[test]
    fn ring_is_bounded_and_flags_what_it_pushed_out() {
        let mut r = Recorder::new(3);
        let mut h = Vec::new();
        rec(&mut r, &mut h, ev(1, 10), &[1]);
        rec(&mut r, &mut h, ev(2, 30), &[1, 2]);
        rec(&mut r, &mut h, ev(3, 20), &[2]);
        assert_eq!(seqs(&r, &h, &[1], 10), (vec![1, 2], false));
        assert_eq!(seqs(&r, &h, &[2], 10), (vec![3, 2], false));
        assert_eq!(seqs(&r, &h, &[1, 2], 10), (vec![1, 3, 2], false));
        assert!(!r.lost_since(0));
        rec(&mut r, &mut h, ev(4, 40), &[3]);
        assert_eq!(r.pushed_out(), 1);
        assert!(r.lost_since(10) && !r.lost_since(11));
        assert_eq!(seqs(&r, &h, &[1], 10), (vec![2], false));
    }

    #[test]
    fn extract_keeps_the_newest_per_flow_and_says_so() {
        let mut r = Recorder::new(100);
        let mut h = Vec::new();
        for i in 0..5 {
            rec(&mut r, &mut h, ev(i, i), &[1]);
        }
        rec(&mut r, &mut h, ev(9, 9), &[2]);
        assert_eq!(seqs(&r, &h, &[1, 2], 2), (vec![3, 4, 9], true));
        assert_eq!(seqs(&r, &h, &[2], 2), (vec![9], false));
    }
}
