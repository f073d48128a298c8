//! Unit tests of the engine on synthetic timelines.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::IpAddr;

use super::*;
use crate::npa::{KeyLayout, Layout, NpaKey, ValueLayout};
use crate::record::{DestroyReason, FlowTuple, Task};

pub(super) const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const NS: u32 = 4026531840;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> FlowTuple {
    FlowTuple {
        proto: 6,
        src: ip(src),
        sport,
        dst: ip(dst),
        dport,
    }
}

pub(super) fn client() -> FlowTuple {
    tcp("10.0.0.5", 40000, "10.0.1.7", 8080)
}

pub(super) fn key_of(t: &FlowTuple) -> NpaKey {
    NpaKey {
        src: t.src,
        sport: t.sport,
        dst: t.dst,
        dport: t.dport,
        proto: t.proto,
        owner: t.src,
        ifindex: None,
    }
}

pub(super) fn v4() -> Layout {
    Layout::new(KeyLayout::V4, ValueLayout::LastSeen16)
}

pub(super) fn ct_new(ts: u64, id: u64, orig: FlowTuple) -> Input {
    Input::CtNew {
        ts_ns: ts,
        id,
        netns: NS,
        orig,
        reply: orig.reversed(),
    }
}

fn ct_destroy(ts: u64, id: u64, orig: FlowTuple, reason: DestroyReason) -> Input {
    Input::CtDestroy {
        ts_ns: ts,
        id,
        netns: NS,
        orig,
        reply: orig.reversed(),
        born_ns: None,
        reason,
        // An expired entry timed out 2 s before the gc reaped it; a killed one would have
        // lived on for 2 s.
        expiry_ns: Some(match reason {
            DestroyReason::Expired => ts - 2 * S,
            DestroyReason::Killed => ts + 2 * S,
        }),
        reaped_by: ReapedBy::GcWorker,
    }
}

/// A destroy seen in a task's context (a dump by it, or its `conntrack -D`).
fn ct_destroy_by(ts: u64, id: u64, orig: FlowTuple, reason: DestroyReason, pid: u32) -> Input {
    let Input::CtDestroy {
        ts_ns,
        id,
        netns,
        orig,
        reply,
        born_ns,
        reason,
        expiry_ns,
        ..
    } = ct_destroy(ts, id, orig, reason)
    else {
        unreachable!("ct_destroy builds a CtDestroy")
    };
    Input::CtDestroy {
        ts_ns,
        id,
        netns,
        orig,
        reply,
        born_ns,
        reason,
        expiry_ns,
        reaped_by: ReapedBy::Task {
            pid,
            comm: Comm::new("dumper"),
        },
    }
}

pub(super) fn delete_with(
    ts: u64,
    key: NpaKey,
    layout: Layout,
    result: DeleteResult,
    kernel_view: Option<KernelView>,
) -> Input {
    Input::AgentDelete(AgentDelete {
        ts_ns: ts,
        task: Task {
            pid: 1234,
            tid: 1240,
            comm: "aws-network-pol".into(),
        },
        map_id: 42,
        key,
        layout,
        result,
        kernel_view,
        judged_netns: None,
    })
}

pub(super) fn delete(ts: u64, key: NpaKey) -> Input {
    delete_with(ts, key, v4(), DeleteResult::Deleted, None)
}

pub(super) fn verdicts(outs: &[Output]) -> Vec<&Verdict> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Verdict(v) => Some(v),
            _ => None,
        })
        .collect()
}

fn traces(outs: &[Output]) -> Vec<&Trace> {
    outs.iter()
        .filter_map(|o| match o {
            Output::TraceReady(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// Pushes all inputs, returning every output.
pub(super) fn run(engine: &mut Engine, inputs: Vec<Input>) -> Vec<Output> {
    inputs.into_iter().flat_map(|i| engine.push(i)).collect()
}

pub(super) fn engine() -> Engine {
    Engine::new(EngineConfig::default())
}

fn event_names(tl: &[TimelineEvent]) -> Vec<&'static str> {
    tl.iter()
        .map(|e| match e.what {
            TimelineKind::CtNew { .. } => "ct_new",
            TimelineKind::CtDestroy { .. } => "ct_destroy",
            TimelineKind::CtExisting { .. } => "ct_existing",
            TimelineKind::MapExisting { .. } => "map_existing",
            TimelineKind::AgentInsert { .. } => "agent_insert",
            TimelineKind::AgentDelete(_) => "agent_delete",
            TimelineKind::PacketDrop { .. } => "packet_drop",
            TimelineKind::Lost { .. } => "lost",
            TimelineKind::MapRecreated { .. } => "map_recreated",
        })
        .collect()
}

#[test]
fn port_reuse_is_recognised() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(10 * S, 1, t),
            Input::AgentInsert {
                ts_ns: 10 * S + MS,
                map_id: 42,
                key: key_of(&t),
            },
            ct_destroy(100 * S, 1, t, DestroyReason::Expired),
            ct_new(101 * S, 2, t),
            delete(101 * S + 500 * MS, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    let v = v[0];
    assert_eq!(v.kind, VerdictKind::LiveEntryDelete);
    assert_eq!(v.class, VerdictClass::PortReuse);
    assert_eq!(v.decided_by, DecidedBy::Shadow);
    assert_eq!(v.live.id, 2);
    assert_eq!(v.live.born_ns, Some(101 * S));
    assert_eq!(v.live.netns, Some(NS));
    let old = v.old.unwrap();
    assert_eq!(old.id, 1);
    assert_eq!(old.born_ns, Some(10 * S));
    assert_eq!(old.destroyed_ns, 100 * S);
    assert_eq!(old.reason, Some(DestroyReason::Expired));
    assert_eq!(v.reuse_gap_ns, Some(S as i64));
    assert_eq!(v.delete_lag_ns, Some(500 * MS));
    let i = v.instants.unwrap();
    assert_eq!(
        (i.expiry_ns, i.reap_ns, i.reuse_ns, i.delete_ns),
        (Some(98 * S), 100 * S, Some(101 * S), 101 * S + 500 * MS)
    );
    assert_eq!(
        (
            i.expiry_to_reap_ns,
            i.reap_to_reuse_ns,
            i.reuse_to_delete_ns
        ),
        (Some(2 * S as i64), Some(S as i64), Some(500 * MS as i64))
    );
    assert_eq!(i.reaped_by, Some(ReapedBy::GcWorker));
    assert_eq!(v.key_inserted_ns, Some(10 * S + MS));
    assert_eq!(v.agent.pid, 1234);
    assert_eq!(v.agent.comm, "aws-network-pol");
    assert_eq!(v.map_id, 42);
    assert!(!v.maybe_incomplete);
    assert!(!v.timeline_truncated);
    assert_eq!(
        event_names(&v.timeline),
        [
            "ct_new",
            "agent_insert",
            "ct_destroy",
            "ct_new",
            "agent_delete"
        ]
    );
    assert_eq!(e.stats().verdicts.port_reuse, 1);
    assert_eq!(e.stats().deletes.live, 1);
    assert_eq!(e.stats().verdicts.decided_by_shadow, 1);
    // The live line's story: the predecessor's end, the live entry's birth and the delete,
    // not the first entry's birth or the datapath's insert.
    let story = crate::report::verdict::story_timeline(v);
    assert_eq!(
        event_names(&story),
        ["ct_destroy", "ct_new", "agent_delete"]
    );
    assert_eq!(
        story.iter().map(|e| e.ts_ns).collect::<Vec<_>>(),
        [100 * S, 101 * S, 101 * S + 500 * MS]
    );
    let j = serde_json::to_value(v).unwrap();
    assert_eq!(j["kind"], "live-entry-delete");
    assert_eq!(j["class"], "port-reuse");
    assert_eq!(j["timeline"][0]["event"], "ct_new");
}

#[test]
fn race_instants_name_the_reaper_and_only_a_timed_out_expiry() {
    let t = client();
    let story = |end: Input| {
        let mut e = engine();
        let outs = run(
            &mut e,
            vec![
                ct_new(10 * S, 1, t),
                end,
                ct_new(101 * S, 2, t),
                delete(101 * S + 500 * MS, key_of(&t)),
            ],
        );
        verdicts(&outs)[0].clone()
    };
    // The deleting agent's own dump reaped the expired entry.
    let v = story(ct_destroy_by(100 * S, 1, t, DestroyReason::Expired, 1234));
    let i = v.instants.unwrap();
    assert!(
        matches!(i.reaped_by, Some(ReapedBy::Agent { pid: 1234, .. })),
        "{i:?}"
    );
    assert_eq!(v.old.unwrap().reaped_by, i.reaped_by);
    assert_eq!(i.expiry_ns, Some(98 * S));
    // Killed before its timeout by another task: there is no expiry to name.
    let v = story(ct_destroy_by(100 * S, 1, t, DestroyReason::Killed, 77));
    let i = v.instants.unwrap();
    assert!(
        matches!(i.reaped_by, Some(ReapedBy::Task { pid: 77, .. })),
        "{i:?}"
    );
    assert_eq!((i.expiry_ns, i.expiry_to_reap_ns), (None, None));
    assert_eq!(i.reap_to_reuse_ns, Some(S as i64));
}

#[test]
fn snapshot_lag_without_predecessor() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![ct_new(10 * S, 1, t), delete(20 * S, key_of(&t))],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].class, VerdictClass::SnapshotLag);
    assert_eq!(v[0].old, None);
    assert_eq!(v[0].reuse_gap_ns, None);
    assert_eq!(v[0].delete_lag_ns, Some(10 * S));
    assert_eq!(e.stats().verdicts.snapshot_lag, 1);
}

#[test]
fn entry_older_than_the_window_is_stale_match() {
    let mut e = engine();
    let t = client();
    let window = e.config().snapshot_lag_window_ns;
    let outs = run(
        &mut e,
        vec![
            // A predecessor does not explain a delete of an entry that outlived a period.
            ct_new(S, 1, t),
            ct_destroy(2 * S, 1, t, DestroyReason::Expired),
            ct_new(3 * S, 2, t),
            delete(3 * S + window + 1, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].class, VerdictClass::StaleMatch);
    assert_eq!(v[0].old, None);
}

#[test]
fn entry_from_the_start_up_snapshot_is_stale_match() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            Input::CtExisting {
                id: 9,
                netns: NS,
                orig: t,
                reply: t.reversed(),
            },
            delete(5 * S, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].class, VerdictClass::StaleMatch);
    assert_eq!(v[0].live.born_ns, None);
    assert_eq!(v[0].delete_lag_ns, None);
    assert_eq!(e.stats().verdicts.stale_match, 1);
}

#[test]
fn kernel_live_view_overrides_an_empty_shadow() {
    let mut e = engine();
    let t = client();
    let outs = e.push(delete_with(
        50 * S,
        key_of(&t),
        v4(),
        DeleteResult::Deleted,
        Some(KernelView::Live {
            entry_id: 7,
            born_ns: 49 * S,
            timeout_left_ns: 10 * S as i64,
            tcp_state: None,
        }),
    ));
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].decided_by, DecidedBy::Kernel);
    assert_eq!(v[0].class, VerdictClass::SnapshotLag);
    assert_eq!(v[0].live.id, 7);
    assert_eq!(v[0].live.born_ns, Some(49 * S));
    assert_eq!(v[0].live.timeout_left_ns, Some(10 * S as i64));
    assert_eq!(v[0].live.orig, None);
    assert!(!v[0].notes.is_empty());
    assert_eq!(e.stats().kernel_overrode_shadow, 1);
    assert_eq!(e.stats().verdicts.decided_by_kernel, 1);
}

#[test]
fn kernel_view_with_shadow_entry_and_history_still_classifies() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            ct_destroy(2 * S, 1, t, DestroyReason::Expired),
            ct_new(3 * S, 2, t),
            delete_with(
                4 * S,
                key_of(&t),
                v4(),
                DeleteResult::Deleted,
                Some(KernelView::Live {
                    entry_id: 2,
                    born_ns: 3 * S,
                    timeout_left_ns: 1,
                    tcp_state: None,
                }),
            ),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v[0].decided_by, DecidedBy::Kernel);
    assert_eq!(v[0].class, VerdictClass::PortReuse);
    // The shadow supplies what the kernel view lacks.
    assert_eq!(v[0].live.orig, Some(t));
    assert_eq!(e.stats().kernel_overrode_shadow, 0);
}

#[test]
fn kernel_expired_not_reaped_makes_a_rightful_delete() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            delete_with(
                200 * S,
                key_of(&t),
                v4(),
                DeleteResult::Deleted,
                Some(KernelView::ExpiredNotReaped {
                    entry_id: 1,
                    born_ns: S,
                    expired_for_ns: 3 * S,
                }),
            ),
            Input::Tick { now_ns: 1000 * S },
        ],
    );
    assert!(outs.is_empty());
    let d = &e.stats().deletes;
    assert_eq!(
        (d.live, d.rightful, d.rightful_expired_not_reaped),
        (0, 1, 1)
    );
    assert_eq!(e.stats().kernel_overrode_shadow, 1);
}

#[test]
fn kernel_absent_overrides_a_live_shadow() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            delete_with(
                2 * S,
                key_of(&t),
                v4(),
                DeleteResult::Deleted,
                Some(KernelView::Absent),
            ),
        ],
    );
    assert!(verdicts(&outs).is_empty());
    assert_eq!(e.stats().deletes.rightful, 1);
}

#[test]
fn delete_after_the_flow_ended_is_rightful() {
    let t = client();
    for reason in [DestroyReason::Expired, DestroyReason::Killed] {
        let mut e = engine();
        let outs = run(
            &mut e,
            vec![
                ct_new(S, 1, t),
                ct_destroy(100 * S, 1, t, reason),
                delete(101 * S, key_of(&t)),
                Input::Tick { now_ns: 500 * S },
            ],
        );
        assert!(outs.is_empty(), "{reason:?}");
        assert_eq!(e.stats().deletes.rightful, 1);
        assert_eq!(e.stats().verdicts.total(), 0);
    }
}

#[test]
fn delete_of_an_unseen_key_is_counted() {
    let mut e = engine();
    let outs = e.push(delete(S, key_of(&client())));
    assert!(outs.is_empty());
    assert_eq!(e.stats().deletes.unseen, 1);
    assert_eq!(e.stats().deletes.rightful, 0);
    // A key the map snapshot knew is not unseen.
    let t = tcp("10.0.0.9", 1, "10.0.0.10", 2);
    e.push(Input::MapExisting {
        map_id: 42,
        key: key_of(&t),
    });
    e.push(delete(2 * S, key_of(&t)));
    assert_eq!(e.stats().deletes.unseen, 1);
    assert_eq!(e.stats().deletes.rightful, 1);
}

#[test]
fn not_found_and_failed_deletes_are_not_verdicts() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            delete_with(2 * S, key_of(&t), v4(), DeleteResult::NotFound, None),
            delete_with(3 * S, key_of(&t), v4(), DeleteResult::Error(-22), None),
            Input::Tick { now_ns: 100 * S },
        ],
    );
    assert!(outs.is_empty());
    let d = &e.stats().deletes;
    assert_eq!((d.not_found, d.error, d.live), (1, 1, 0));
    assert_eq!(DeleteResult::from_ret(0), DeleteResult::Deleted);
    assert_eq!(DeleteResult::from_ret(-2), DeleteResult::NotFound);
    assert_eq!(DeleteResult::from_ret(-22), DeleteResult::Error(-22));
}

#[test]
fn lost_records_flag_maybe_incomplete() {
    let t = client();
    // Loss inside the story (between the old entry's birth and the delete).
    let mut e = engine();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            Input::Lost {
                ts_ns: 2 * S,
                count: 3,
            },
            ct_destroy(100 * S, 1, t, DestroyReason::Expired),
            ct_new(101 * S, 2, t),
            delete(102 * S, key_of(&t)),
        ],
    );
    assert!(verdicts(&outs)[0].maybe_incomplete);
    assert_eq!(e.stats().lost_records, 3);

    // Loss long before the story is irrelevant.
    let mut e = engine();
    let outs = run(
        &mut e,
        vec![
            Input::Lost { ts_ns: S, count: 1 },
            ct_new(100 * S, 1, t),
            delete(101 * S, key_of(&t)),
        ],
    );
    assert!(!verdicts(&outs)[0].maybe_incomplete);

    // A loss reported late, and one after the delete, reach the trace.
    let mut e = engine();
    let outs = run(
        &mut e,
        vec![
            ct_new(100 * S, 1, t),
            delete(101 * S, key_of(&t)),
            Input::Lost {
                ts_ns: 100 * S + 1,
                count: 1,
            },
            Input::Lost {
                ts_ns: 102 * S,
                count: 1,
            },
            Input::Tick { now_ns: 200 * S },
        ],
    );
    assert!(!verdicts(&outs)[0].maybe_incomplete);
    let tr = traces(&outs);
    assert!(tr[0].verdict.maybe_incomplete);
    assert!(tr[0].after_window_incomplete);
    assert_eq!(
        event_names(&tr[0].timeline)
            .iter()
            .filter(|n| **n == "lost")
            .count(),
        2
    );
}

#[test]
fn lost_markers_pushed_out_of_the_ring_still_count() {
    let mut e = Engine::new(EngineConfig {
        max_markers: 2,
        ..EngineConfig::default()
    });
    let t = client();
    let mut inputs = vec![ct_new(S, 1, t)];
    inputs.extend((0..5).map(|i| Input::Lost {
        ts_ns: 2 * S + i,
        count: 1,
    }));
    inputs.extend((0..5).map(|i| Input::MapRecreated {
        ts_ns: 3 * S + i,
        old_id: 100 + i as u32,
        new_id: 101 + i as u32,
    }));
    inputs.push(delete(4 * S, key_of(&t)));
    let outs = run(&mut e, inputs);
    assert!(verdicts(&outs)[0].maybe_incomplete);
    assert_eq!(e.stats().evictions.markers, 8);
}

#[test]
fn map_recreation_resets_the_map_shadow_only() {
    let t = client();
    let u = tcp("10.0.0.6", 1000, "10.0.1.8", 80);
    let mut e = engine();
    let outs = run(
        &mut e,
        vec![
            Input::MapExisting {
                map_id: 42,
                key: key_of(&u),
            },
            ct_new(S, 1, t),
            Input::MapRecreated {
                ts_ns: 2 * S,
                old_id: 42,
                new_id: 43,
            },
            // The old map's key is forgotten...
            delete(3 * S, key_of(&u)),
            // ...but the kernel shadow is kept.
            delete(4 * S, key_of(&t)),
        ],
    );
    assert_eq!(e.stats().deletes.unseen, 1);
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].live.id, 1);
    assert_eq!(e.stats().inputs.map_recreated, 1);
    assert_eq!(e.stats().map_keys_tracked, 0);
}

#[test]
fn ipv6_flows_are_matched() {
    let mut e = engine();
    let t = FlowTuple {
        proto: 17,
        src: ip("fd00::5"),
        sport: 5353,
        dst: ip("fd00:1::53"),
        dport: 53,
    };
    let mut k = key_of(&t);
    k.ifindex = Some(12);
    let layout = Layout::new(KeyLayout::V6Ifindex, ValueLayout::LastSeen16);
    // Through the byte codec, as the daemon would get it.
    let k = NpaKey::decode(
        KeyLayout::V6Ifindex,
        &k.encode(KeyLayout::V6Ifindex).unwrap(),
    )
    .unwrap();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            delete_with(2 * S, k.clone(), layout, DeleteResult::Deleted, None),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].key, k);
    assert_eq!(v[0].layout, layout);
    assert_eq!(serde_json::to_value(v[0]).unwrap()["layout"], "v6-60/16");
}

#[test]
fn dnat_keys_use_the_reply_source() {
    let mut e = engine();
    let orig = tcp("10.0.0.5", 40000, "172.20.0.10", 80);
    let reply = tcp("10.0.1.7", 8080, "10.0.0.5", 40000);
    let dnat_key = key_of(&tcp("10.0.0.5", 40000, "10.0.1.7", 8080));
    let outs = run(
        &mut e,
        vec![
            Input::CtNew {
                ts_ns: S,
                id: 1,
                netns: NS,
                orig,
                reply,
            },
            delete(2 * S, dnat_key.clone()),
            // The VIP form matches too.
            delete(2 * S + 1, key_of(&orig)),
            // The backend's reply is dropped: the denial the delete caused.
            Input::PacketDrop {
                ts_ns: 2 * S + 300 * MS,
                netns: NS,
                tuple: reply,
                reason: "tc_egress".into(),
            },
            Input::Tick { now_ns: 10 * S },
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].live.reply, Some(reply));
    let tr = traces(&outs);
    assert_eq!(tr.len(), 2);
    assert_eq!(tr[0].verdict.delete_to_denied_ns, Some(300 * MS));
    assert_eq!(tr[0].verdict.first_denied.as_ref().unwrap().tuple, reply);
    assert!(event_names(&tr[0].timeline).contains(&"packet_drop"));
}

#[test]
fn reversed_key_direction_matches() {
    let mut e = engine();
    let t = client();
    let mut k = key_of(&t.reversed());
    k.owner = t.src;
    let outs = run(&mut e, vec![ct_new(S, 1, t), delete(2 * S, k)]);
    assert_eq!(verdicts(&outs).len(), 1);
}

#[test]
fn both_ipv4_key_layouts_work() {
    for (kl, ifindex) in [(KeyLayout::V4, None), (KeyLayout::V4Ifindex, Some(5))] {
        let mut e = engine();
        let t = client();
        let mut k = key_of(&t);
        k.ifindex = ifindex;
        let bytes = k.encode(kl).unwrap();
        assert_eq!(bytes.len(), kl.size());
        let k = NpaKey::decode(kl, &bytes).unwrap();
        let layout = Layout::new(kl, ValueLayout::Flag1);
        let outs = run(
            &mut e,
            vec![
                ct_new(S, 1, t),
                delete_with(2 * S, k, layout, DeleteResult::Deleted, None),
            ],
        );
        let v = verdicts(&outs);
        assert_eq!(v.len(), 1, "{kl:?}");
        assert_eq!(v[0].layout.key, kl);
        assert_eq!(v[0].key.ifindex, ifindex);
    }
}

#[test]
fn memory_is_bounded_and_evictions_counted() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 4,
        timeline_len: 3,
        ..EngineConfig::default()
    });
    for i in 0..10u16 {
        let t = tcp("10.0.0.5", 1000 + i, "10.0.1.7", 80);
        e.push(ct_new(S + u64::from(i), u64::from(i), t));
        e.push(Input::MapExisting {
            map_id: 42,
            key: key_of(&t),
        });
    }
    // Many events on one flow stay within its ring.
    let t = tcp("10.0.0.5", 1009, "10.0.1.7", 80);
    for i in 0..10 {
        e.push(Input::PacketDrop {
            ts_ns: 2 * S + i,
            netns: NS,
            tuple: t,
            reason: "x".into(),
        });
    }
    let s = e.stats();
    assert!(s.flows_tracked <= 4 && s.map_keys_tracked <= 4);
    assert_eq!(s.evictions.flows, 6);
    assert_eq!(s.evictions.map_keys, 6);
    // The newest flow is still known, the oldest one was evicted.
    let outs = e.push(delete(3 * S, key_of(&t)));
    assert_eq!(verdicts(&outs)[0].timeline.len(), 3);
    let oldest = tcp("10.0.0.5", 1000, "10.0.1.7", 80);
    let outs = e.push(delete(3 * S, key_of(&oldest)));
    assert!(verdicts(&outs).is_empty());
    // Its state went while it had a live entry: the delete cannot be judged, and says so.
    assert_eq!(e.stats().deletes.unjudged, 1);
    assert_eq!(e.stats().deletes.unseen + e.stats().deletes.rightful, 0);
}

fn unjudged(outs: &[Output]) -> Vec<&Unjudged> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Unjudged(u) => Some(u),
            _ => None,
        })
        .collect()
}

/// A pre-existing live flow whose state the bounded flow table evicted: its wrongful delete is
/// unjudged (with the reason), never rightful.
#[test]
fn delete_of_an_evicted_preexisting_live_flow_is_unjudged_not_rightful() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 2,
        ..EngineConfig::default()
    });
    let old = tcp("10.0.0.5", 999, "10.0.1.7", 80);
    let mut inputs = vec![
        Input::CtExisting {
            id: 9,
            netns: NS,
            orig: old,
            reply: old.reversed(),
        },
        Input::MapExisting {
            map_id: 42,
            key: key_of(&old),
        },
    ];
    for i in 0..4u16 {
        inputs.push(ct_new(
            S + u64::from(i),
            100 + u64::from(i),
            tcp("10.0.0.5", 2000 + i, "10.0.1.7", 80),
        ));
    }
    inputs.push(delete(5 * S, key_of(&old)));
    let outs = run(&mut e, inputs);
    assert!(verdicts(&outs).is_empty());
    let u = unjudged(&outs);
    assert_eq!(u.len(), 1, "{outs:#?}");
    assert_eq!(u[0].reason, UnjudgedReason::ShadowEvicted);
    assert_eq!(u[0].key, key_of(&old));
    let d = &e.stats().deletes;
    assert_eq!(
        (d.unjudged, d.unjudged_shadow_evicted, d.rightful),
        (1, 1, 0)
    );
}

/// Once the kernel's tables of live entries overflowed, "absent" in the kernel proves nothing:
/// the delete is unjudged, where before the overflow the same delete is rightful.
#[test]
fn kernel_absent_after_a_kernel_table_overflow_is_unjudged() {
    let t = client();
    let absent = |ts| {
        delete_with(
            ts,
            key_of(&t),
            v4(),
            DeleteResult::Deleted,
            Some(KernelView::Absent),
        )
    };
    let mut e = engine();
    let outs = run(&mut e, vec![ct_new(S, 1, t), absent(2 * S)]);
    assert!(unjudged(&outs).is_empty());
    assert_eq!(e.stats().deletes.rightful, 1);
    e.note_kernel_tables_full();
    let outs = run(&mut e, vec![ct_new(3 * S, 2, t), absent(4 * S)]);
    assert!(verdicts(&outs).is_empty());
    let u = unjudged(&outs);
    assert_eq!(u.len(), 1, "{outs:#?}");
    assert_eq!(u[0].reason, UnjudgedReason::KernelTableFull);
    let d = &e.stats().deletes;
    assert_eq!((d.rightful, d.unjudged_kernel_table_full), (1, 1));
}

#[test]
fn pending_traces_are_bounded() {
    let mut e = Engine::new(EngineConfig {
        max_flows: 2,
        ..EngineConfig::default()
    });
    let mut outs = Vec::new();
    for i in 0..3u16 {
        let t = tcp("10.0.0.5", 2000 + i, "10.0.1.7", 80);
        outs.extend(e.push(ct_new(S, u64::from(i), t)));
        outs.extend(e.push(delete(S + 1, key_of(&t))));
    }
    assert_eq!(verdicts(&outs).len(), 3);
    assert_eq!(traces(&outs).len(), 1);
    assert_eq!(e.stats().evictions.traces, 1);
    assert_eq!(traces(&e.finish()).len(), 2);
}

#[test]
fn trace_follows_the_after_window_with_the_denial() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            // Outside the 30 s before-window: not in the trace, but in the verdict.
            ct_new(60 * S, 1, t),
            ct_destroy(95 * S, 1, t, DestroyReason::Expired),
            ct_new(96 * S, 2, t),
            delete(100 * S, key_of(&t)),
        ],
    );
    assert_eq!(verdicts(&outs).len(), 1);
    let outs = e.push(Input::PacketDrop {
        ts_ns: 100 * S + 200 * MS,
        netns: NS,
        tuple: t.reversed(),
        reason: "policy".into(),
    });
    // The denial confirms the race at once; the trace still waits for its window.
    assert_eq!(outs.len(), 1, "{outs:#?}");
    assert!(matches!(&outs[0], Output::RaceConfirmation(c) if c.confirmed));
    assert!(e.push(Input::Tick { now_ns: 104 * S }).is_empty());
    // A second drop is not the first denial.
    e.push(Input::PacketDrop {
        ts_ns: 104 * S + 1,
        netns: NS,
        tuple: t.reversed(),
        reason: "policy".into(),
    });
    let outs = e.push(Input::Tick { now_ns: 105 * S });
    let tr = traces(&outs);
    assert_eq!(tr.len(), 1);
    let tr = tr[0];
    assert_eq!(tr.verdict.delete_to_denied_ns, Some(200 * MS));
    assert_eq!(tr.verdict.first_denied.as_ref().unwrap().reason, "policy");
    assert_eq!((tr.window_start_ns, tr.window_end_ns), (70 * S, 105 * S));
    assert_eq!(
        event_names(&tr.timeline),
        [
            "ct_destroy",
            "ct_new",
            "agent_delete",
            "packet_drop",
            "packet_drop"
        ]
    );
    assert_eq!(event_names(&tr.verdict.timeline)[0], "ct_new");
    assert_eq!(e.stats().traces_emitted, 1);
    // Emitted once only.
    assert!(e.push(Input::Tick { now_ns: 200 * S }).is_empty());
    assert!(e.finish().is_empty());
}

#[test]
fn finish_emits_pending_traces() {
    let mut e = engine();
    let t = client();
    run(&mut e, vec![ct_new(S, 1, t), delete(2 * S, key_of(&t))]);
    let outs = e.finish();
    assert_eq!(traces(&outs).len(), 1);
    assert_eq!(traces(&outs)[0].verdict.delete_to_denied_ns, None);
}

#[test]
fn slightly_late_inputs_are_placed_by_timestamp() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            Input::Tick { now_ns: 50 * S },
            ct_new(50 * S - 10, 1, t),
            delete(50 * S + 1, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].class, VerdictClass::SnapshotLag);
    assert_eq!(e.stats().out_of_order, 1);

    // Events land in the timeline in timestamp order whatever their arrival order.
    let mut e = engine();
    let outs = run(
        &mut e,
        vec![
            ct_new(10 * S, 1, t),
            Input::AgentInsert {
                ts_ns: 12 * S,
                map_id: 42,
                key: key_of(&t),
            },
            ct_destroy(11 * S, 1, t, DestroyReason::Killed),
            ct_new(13 * S, 2, t),
            delete(14 * S, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    let ts: Vec<u64> = v[0].timeline.iter().map(|e| e.ts_ns).collect();
    assert_eq!(ts, [10 * S, 11 * S, 12 * S, 13 * S, 14 * S]);
    assert_eq!(v[0].class, VerdictClass::PortReuse);
}

#[test]
fn destroy_arriving_before_its_insert_does_not_resurrect_the_entry() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_destroy(10 * S, 1, t, DestroyReason::Expired),
            ct_new(9 * S, 1, t),
            delete(11 * S, key_of(&t)),
        ],
    );
    assert!(verdicts(&outs).is_empty());
    assert_eq!(e.stats().deletes.rightful, 1);
}

#[test]
fn lost_destroy_is_inferred_from_a_new_entry() {
    let mut e = engine();
    let t = client();
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            ct_new(20 * S, 2, t),
            delete(21 * S, key_of(&t)),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v[0].class, VerdictClass::PortReuse);
    assert_eq!(v[0].old.unwrap().reason, None);
    assert_eq!(e.stats().implicit_destroys, 1);
}

#[test]
fn several_netns_and_odd_owners_are_noted() {
    let mut e = engine();
    let t = client();
    let mut k = key_of(&t);
    k.owner = ip("10.9.9.9");
    let outs = run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            Input::CtNew {
                ts_ns: 2 * S,
                id: 2,
                netns: NS + 1,
                orig: t,
                reply: t.reversed(),
            },
            delete(3 * S, k),
        ],
    );
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1);
    // The youngest live entry is reported.
    assert_eq!(v[0].live.id, 2);
    assert_eq!(v[0].live.netns, Some(NS + 1));
    assert_eq!(v[0].notes.len(), 2, "{:?}", v[0].notes);
    assert_eq!(e.stats().owner_not_endpoint, 1);
}

#[test]
fn inputs_are_counted_by_kind() {
    let mut e = engine();
    let t = client();
    run(
        &mut e,
        vec![
            ct_new(S, 1, t),
            ct_destroy(2 * S, 1, t, DestroyReason::Killed),
            Input::Lost {
                ts_ns: 3 * S,
                count: 1,
            },
            Input::Tick { now_ns: 4 * S },
            Input::Tick { now_ns: 4 * S },
        ],
    );
    let i = &e.stats().inputs;
    assert_eq!((i.ct_new, i.ct_destroy, i.lost, i.tick), (1, 1, 1, 2));
    assert_eq!(e.stats().out_of_order, 0);
}

#[test]
fn adapts_decoded_kernel_records() {
    use crate::record::tests::{bytes_of, raw_ct};
    use detector_common::kind;

    let crate::record::Event::Ct(ev) =
        crate::record::decode(&bytes_of(&raw_ct(kind::CT_NEW))).unwrap()
    else {
        panic!("not a ct record");
    };
    let Input::CtNew { ts_ns, netns, .. } = Input::from(&ev) else {
        panic!("not a CtNew");
    };
    assert_eq!((ts_ns, netns), (123, 4026532177));

    let crate::record::Event::Ct(rec) =
        crate::record::decode(&bytes_of(&raw_ct(kind::CT_DESTROY))).unwrap()
    else {
        panic!("not a ct record");
    };
    let Input::CtDestroy {
        id,
        born_ns,
        reason,
        ..
    } = Input::from(&rec)
    else {
        panic!("not a CtDestroy");
    };
    assert_eq!(id, rec.id);
    assert_eq!(born_ns, Some(100));
    assert_eq!(reason, DestroyReason::Expired);
    let mut unborn = rec.clone();
    unborn.born_ns = 0;
    unborn.reason = None;
    let Input::CtDestroy {
        born_ns, reason, ..
    } = Input::from(&unborn)
    else {
        panic!("not a CtDestroy");
    };
    assert_eq!((born_ns, reason), (None, DestroyReason::Expired));
}

#[test]
fn every_input_and_output_serializes() {
    let t = client();
    let inputs = vec![
        ct_new(S, 1, t),
        Input::CtExisting {
            id: 2,
            netns: NS,
            orig: t,
            reply: t.reversed(),
        },
        Input::MapExisting {
            map_id: 42,
            key: key_of(&t),
        },
        Input::AgentInsert {
            ts_ns: S,
            map_id: 42,
            key: key_of(&t),
        },
        delete_with(
            2 * S,
            key_of(&t),
            v4(),
            DeleteResult::Error(-22),
            Some(KernelView::Absent),
        ),
        delete_with(
            2 * S,
            key_of(&t),
            v4(),
            DeleteResult::Deleted,
            Some(KernelView::Live {
                entry_id: 1,
                born_ns: S,
                timeout_left_ns: -1,
                tcp_state: None,
            }),
        ),
        Input::PacketDrop {
            ts_ns: 3 * S,
            netns: NS,
            tuple: t,
            reason: "r".into(),
        },
        Input::Lost {
            ts_ns: 3 * S,
            count: 1,
        },
        Input::MapRecreated {
            ts_ns: 3 * S,
            old_id: 42,
            new_id: 43,
        },
        ct_destroy(4 * S, 1, t, DestroyReason::Killed),
        Input::Tick { now_ns: 60 * S },
    ];
    let mut e = engine();
    let mut outs = Vec::new();
    for i in inputs {
        let j = serde_json::to_value(&i).unwrap();
        assert_eq!(j["input"], i.name());
        outs.extend(e.push(i));
    }
    assert_eq!(outs.len(), 3);
    // The drop confirmed the race: verdict, confirmation, trace.
    let confirmation = serde_json::to_value(&outs[1]).unwrap();
    assert_eq!(confirmation["output"], "race_confirmation");
    assert_eq!(confirmation["confirmed"], true);
    let trace = serde_json::to_value(&outs[2]).unwrap();
    assert_eq!(trace["output"], "trace_ready");
    assert_eq!(trace["confirmed"], true);
    assert_eq!(trace["verdict"]["decided_by"], "kernel");
    let kinds: Vec<&str> = trace["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"map_recreated") && kinds.contains(&"lost"));
    let delete = trace["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "agent_delete" && e["result"] == "deleted")
        .unwrap();
    assert_eq!(delete["kernel_view"]["state"], "live");
    assert!(serde_json::to_value(e.stats()).is_ok());
    assert!(serde_json::to_value(e.config()).is_ok());
}

#[test]
fn flight_recorder_is_bounded_and_says_what_it_pushed_out() {
    let mut e = Engine::new(EngineConfig {
        recorder_len: 4,
        ..EngineConfig::default()
    });
    let t = client();
    e.push(ct_new(10 * S, 1, t));
    // Other flows' events push the flow's NEW out of the shared ring.
    for i in 0..4u16 {
        e.push(ct_new(
            11 * S + u64::from(i),
            100 + u64::from(i),
            tcp("10.0.0.9", 3000 + i, "10.0.1.7", 80),
        ));
    }
    let outs = e.push(delete(12 * S, key_of(&t)));
    let v = verdicts(&outs);
    assert_eq!(v.len(), 1, "the decision does not depend on the recorder");
    assert_eq!(v[0].live.id, 1);
    assert_eq!(event_names(&v[0].timeline), ["agent_delete"]);
    assert!(v[0].timeline_truncated);
    assert_eq!(e.stats().timeline_events_pushed_out, 2);
    let outs = e.push(Input::Tick { now_ns: 30 * S });
    let tr = traces(&outs);
    assert_eq!(tr.len(), 1);
    assert!(tr[0].timeline_truncated);
    // A window after the pushed-out events is complete.
    let t2 = tcp("10.0.0.5", 5555, "10.0.1.7", 80);
    e.push(ct_new(50 * S, 9, t2));
    let outs = e.push(delete(51 * S, key_of(&t2)));
    let v = verdicts(&outs);
    assert_eq!(event_names(&v[0].timeline), ["ct_new", "agent_delete"]);
    assert!(!v[0].timeline_truncated);
}

/// The kernel judged a delete in one namespace (the deleting task's) and found no entry
/// there, while the flow is live in another: unjudged, naming both, never rightful. Found
/// absent in the namespace that holds the live entry, the kernel's view stands (rightful).
#[test]
fn kernel_absent_in_one_netns_with_the_flow_live_in_another_is_unjudged() {
    let t = client();
    let judged_in = |netns: u32| {
        let mut e = engine();
        let Input::AgentDelete(mut d) = delete_with(
            2 * S,
            key_of(&t),
            v4(),
            DeleteResult::Deleted,
            Some(KernelView::Absent),
        ) else {
            unreachable!("delete_with builds a delete")
        };
        d.judged_netns = Some(netns);
        let outs = run(&mut e, vec![ct_new(S, 1, t), Input::AgentDelete(d)]);
        (unjudged(&outs).into_iter().cloned().collect::<Vec<_>>(), e)
    };
    let (u, e) = judged_in(NS + 7);
    assert_eq!(u.len(), 1, "{u:?}");
    assert_eq!(u[0].reason, UnjudgedReason::LiveInOtherNetns);
    assert_eq!(
        (u[0].judged_netns, u[0].live_netns),
        (Some(NS + 7), Some(NS))
    );
    let d = &e.stats().deletes;
    assert_eq!((d.unjudged, d.unjudged_other_netns, d.rightful), (1, 1, 0));

    let (u, e) = judged_in(NS);
    assert!(u.is_empty(), "{u:?}");
    assert_eq!(e.stats().deletes.rightful, 1);
}
