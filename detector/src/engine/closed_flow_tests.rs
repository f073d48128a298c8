//! Deletes of closed connections' keys (TCP CLOSE/TIME_WAIT): their own kind, never a race.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use super::tests::{S, client, ct_new, delete_with, engine, key_of, run, v4, verdicts};
use super::*;
use crate::record::TcpState;

fn live_view(tcp_state: Option<TcpState>) -> Option<KernelView> {
    Some(KernelView::Live {
        entry_id: 1,
        born_ns: S,
        timeout_left_ns: 9 * S as i64,
        tcp_state,
    })
}

fn closed(outs: &[Output]) -> Vec<&ClosedFlowDelete> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ClosedFlowDelete(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// The delete of a live entry's key in `state`, with the shadow holding that entry.
fn delete_in(state: Option<TcpState>) -> (Engine, Vec<Output>) {
    let mut e = engine();
    let t = client();
    let mut outs = run(&mut e, vec![ct_new(S, 1, t)]);
    outs.extend(e.push(delete_with(
        2 * S,
        key_of(&t),
        v4(),
        DeleteResult::Deleted,
        live_view(state),
    )));
    outs.extend(e.finish());
    (e, outs)
}

#[test]
fn close_and_time_wait_are_closed_flow_deletes_not_races() {
    for state in [TcpState::Close, TcpState::TimeWait] {
        let (e, outs) = delete_in(Some(state));
        assert!(verdicts(&outs).is_empty(), "{state:?}: no race");
        let c = closed(&outs);
        assert_eq!(c.len(), 1, "{state:?}");
        assert_eq!(c[0].tcp_state, state);
        assert_eq!(c[0].entry_id, 1);
        assert_eq!(c[0].delete_ts_ns, 2 * S);
        assert_eq!(c[0].timeout_left_ns, 9 * S as i64);
        let s = e.stats();
        assert_eq!(s.deletes.closed_flow, 1);
        assert_eq!(s.deletes.live, 0);
        assert_eq!(s.deletes.rightful, 0, "counted apart from rightful deletes");
        assert_eq!(s.verdicts.total(), 0);
        assert_eq!(s.traces_emitted, 0, "no trace for a closed flow");
    }
}

#[test]
fn states_that_carry_packets_stay_races() {
    for state in [
        None,
        Some(TcpState::SynSent),
        Some(TcpState::SynRecv),
        Some(TcpState::Established),
        Some(TcpState::FinWait),
        Some(TcpState::CloseWait),
        Some(TcpState::LastAck),
    ] {
        let (e, outs) = delete_in(state);
        assert_eq!(verdicts(&outs).len(), 1, "{state:?}: a race");
        assert!(closed(&outs).is_empty(), "{state:?}");
        assert_eq!(e.stats().deletes.closed_flow, 0);
        assert_eq!(e.stats().deletes.live, 1);
    }
}

#[test]
fn a_failed_delete_of_a_closed_flow_is_not_counted_as_one() {
    let mut e = engine();
    let t = client();
    let outs = e.push(delete_with(
        2 * S,
        key_of(&t),
        v4(),
        DeleteResult::NotFound,
        live_view(Some(TcpState::Close)),
    ));
    assert!(closed(&outs).is_empty());
    assert_eq!(e.stats().deletes.closed_flow, 0);
    assert_eq!(e.stats().deletes.not_found, 1);
}
