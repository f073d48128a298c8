//! Races confirmed by their flow's first denied packet, or marked unconfirmed when their
//! after-window closes without one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use super::tests::{S, client, ct_new, delete, engine, key_of, run, verdicts};
use super::*;

const MS: u64 = 1_000_000;
const NS: u32 = 4026531840;

fn confirmations(outs: &[Output]) -> Vec<&RaceConfirmation> {
    outs.iter()
        .filter_map(|o| match o {
            Output::RaceConfirmation(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn drop_of(ts: u64, tuple: FlowTuple) -> Input {
    Input::PacketDrop {
        ts_ns: ts,
        netns: NS,
        tuple,
        reason: "NETFILTER_DROP".into(),
    }
}

#[test]
fn first_denied_packet_confirms_the_race_at_once() {
    let mut e = engine();
    let t = client();
    let mut outs = run(&mut e, vec![ct_new(S, 1, t), delete(2 * S, key_of(&t))]);
    assert_eq!(verdicts(&outs).len(), 1);
    assert!(confirmations(&outs).is_empty(), "nothing denied yet");
    // The reply is denied 40 ms after the delete; a second drop confirms nothing more.
    let at_drop = e.push(drop_of(2 * S + 40 * MS, t.reversed()));
    let c = confirmations(&at_drop);
    assert_eq!(c.len(), 1, "confirmed at the drop, not at the trace");
    assert!(c[0].confirmed);
    assert_eq!(c[0].delete_ts_ns, 2 * S);
    assert_eq!(c[0].delete_to_denied_ns, Some(40 * MS));
    assert_eq!(c[0].live_entry_id, 1);
    let d = c[0].first_denied.as_ref().unwrap();
    assert_eq!(d.reason, "NETFILTER_DROP");
    assert_eq!(d.tuple, t.reversed());
    outs.extend(at_drop);
    outs.extend(e.push(drop_of(2 * S + 80 * MS, t.reversed())));
    outs.extend(e.push(Input::Tick { now_ns: 10 * S }));
    assert_eq!(confirmations(&outs).len(), 1, "one confirmation per race");
    let tr: Vec<&Trace> = outs
        .iter()
        .filter_map(|o| match o {
            Output::TraceReady(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(tr.len(), 1);
    assert!(tr[0].confirmed);
    assert_eq!(e.stats().verdicts.confirmed, 1);
    assert_eq!(e.stats().verdicts.unconfirmed, 0);
}

#[test]
fn a_race_without_denial_is_unconfirmed_when_its_window_closes() {
    let mut e = engine();
    let t = client();
    let after = EngineConfig::default().after_window_ns;
    run(&mut e, vec![ct_new(S, 1, t), delete(2 * S, key_of(&t))]);
    // A drop after the window closes does not confirm it.
    let outs = run(
        &mut e,
        vec![
            Input::Tick {
                now_ns: 2 * S + after + 1,
            },
            drop_of(2 * S + after + 2, t.reversed()),
        ],
    );
    let c = confirmations(&outs);
    assert_eq!(c.len(), 1, "{outs:#?}");
    assert!(!c[0].confirmed);
    assert_eq!(c[0].first_denied, None);
    assert_eq!(c[0].after_window_ns, after);
    assert!(
        !c[0].maybe_incomplete,
        "the window closed with no records lost"
    );
    // The unconfirmed record comes before its trace, which says the same.
    let pos = |f: fn(&Output) -> bool| outs.iter().position(f).unwrap();
    assert!(
        pos(|o| matches!(o, Output::RaceConfirmation(_)))
            < pos(|o| matches!(o, Output::TraceReady(_)))
    );
    let Some(Output::TraceReady(tr)) = outs.iter().find(|o| matches!(o, Output::TraceReady(_)))
    else {
        unreachable!()
    };
    assert!(!tr.confirmed);
    assert_eq!(e.stats().verdicts.unconfirmed, 1);
    assert_eq!(e.stats().verdicts.confirmed, 0);
}

#[test]
fn a_race_cut_short_by_the_end_of_the_run_is_unconfirmed_maybe_incomplete() {
    let mut e = engine();
    let t = client();
    run(&mut e, vec![ct_new(S, 1, t), delete(2 * S, key_of(&t))]);
    let outs = e.finish();
    let c = confirmations(&outs);
    assert_eq!(c.len(), 1);
    assert!(!c[0].confirmed);
    assert!(c[0].maybe_incomplete, "its window never closed");
}
