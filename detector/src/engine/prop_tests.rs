//! Property test: random timelines against a straightforward reference model.
//!
//! Invariant: a successful delete yields a verdict iff, at the delete instant, a confirmed,
//! unexpired kernel entry existed for the key's flow. The model knows expiry (which no probe
//! reports), so whenever a matching entry is expired but not reaped the delete carries a
//! kernel view, as the kernel side would provide; otherwise the view is given at random.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::IpAddr;

use super::*;
use crate::npa::{KeyLayout, Layout, NpaKey, ValueLayout};
use crate::record::{DestroyReason, FlowTuple, Task, TcpState};

use crate::testutil::Rng;

const S: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
struct Template {
    orig: FlowTuple,
    reply: FlowTuple,
}

use crate::testutil::tuple as t;

/// A handful of flows sharing ports and addresses: plain, DNAT'd through a VIP, direct to
/// the same backend (so a DNAT form collides with a plain flow), and IPv6.
fn templates() -> Vec<Template> {
    let mut v = Vec::new();
    for c in ["10.0.0.1", "10.0.0.2"] {
        for sport in [1000, 1001] {
            let plain = t(6, c, sport, "10.0.1.1", 80);
            v.push(Template {
                orig: plain,
                reply: plain.reversed(),
            });
            v.push(Template {
                orig: t(6, c, sport, "172.20.0.1", 80),
                reply: t(6, "10.0.1.2", 8080, c, sport),
            });
            let direct = t(6, c, sport, "10.0.1.2", 8080);
            v.push(Template {
                orig: direct,
                reply: direct.reversed(),
            });
        }
    }
    let v6 = t(17, "fd00::1", 5353, "fd00:1::53", 53);
    v.push(Template {
        orig: v6,
        reply: v6.reversed(),
    });
    v
}

/// The key forms under which NPA would find an entry (directed; either direction matches).
fn forms(tpl: &Template) -> Vec<FlowTuple> {
    let mut f = vec![tpl.orig];
    if tpl.reply.src != tpl.orig.dst {
        f.push(FlowTuple {
            proto: tpl.orig.proto,
            src: tpl.orig.src,
            sport: tpl.orig.sport,
            dst: tpl.reply.src,
            dport: tpl.reply.sport,
        });
    }
    f
}

fn same_flow(a: &FlowTuple, b: &FlowTuple) -> bool {
    a == b || *a == b.reversed()
}

fn key_matches(key: &NpaKey, tpl: &Template) -> bool {
    let k = FlowTuple {
        proto: key.proto,
        src: key.src,
        sport: key.sport,
        dst: key.dst,
        dport: key.dport,
    };
    forms(tpl).iter().any(|f| same_flow(&k, f))
}

/// Two flows that one netns cannot hold at once (they share a form).
fn conflict(a: &Template, b: &Template) -> bool {
    forms(a)
        .iter()
        .any(|fa| forms(b).iter().any(|fb| same_flow(fa, fb)))
}

#[derive(Clone, Copy)]
struct RefEntry {
    id: u64,
    netns: u32,
    tpl: usize,
    born: Option<u64>,
    expired: bool,
}

struct Model {
    tpls: Vec<Template>,
    entries: Vec<RefEntry>,
    next_id: u64,
}

impl Model {
    fn destroy(&mut self, idx: usize, ts: u64, reason: DestroyReason) -> Input {
        let e = self.entries.remove(idx);
        let tpl = self.tpls[e.tpl];
        Input::CtDestroy {
            ts_ns: ts,
            id: e.id,
            netns: e.netns,
            orig: tpl.orig,
            reply: tpl.reply,
            born_ns: e.born,
            reason,
            expiry_ns: None,
            reaped_by: super::ReapedBy::GcWorker,
        }
    }
}

fn key_for(rng: &mut Rng, tpl: &Template) -> (NpaKey, Layout) {
    let fs = forms(tpl);
    let mut f = fs[rng.index(fs.len())];
    if rng.percent(30) {
        f = f.reversed();
    }
    let owner: IpAddr = match rng.below(10) {
        0 => "10.9.9.9".parse().unwrap(),
        1..=4 => f.dst,
        _ => f.src,
    };
    let owner = if f.src.is_ipv6() && owner.is_ipv4() {
        f.src
    } else {
        owner
    };
    let ifindex = rng.percent(50).then(|| rng.below(64) as u32);
    let key = match (f.src.is_ipv6(), ifindex.is_some()) {
        (false, false) => KeyLayout::V4,
        (false, true) => KeyLayout::V4Ifindex,
        (true, false) => KeyLayout::V6,
        (true, true) => KeyLayout::V6Ifindex,
    };
    let k = NpaKey {
        src: f.src,
        sport: f.sport,
        dst: f.dst,
        dport: f.dport,
        proto: f.proto,
        owner,
        ifindex,
    };
    (k, Layout::new(key, ValueLayout::LastSeen16))
}

/// Runs one random timeline; with `exact` the engine must match the model both ways,
/// otherwise (tiny tables that evict) every verdict must still be true.
fn run_one(seed: u64, cfg: EngineConfig, exact: bool) -> Stats {
    let mut rng = Rng(seed);
    let mut model = Model {
        tpls: templates(),
        entries: Vec::new(),
        next_id: 1,
    };
    let netns = [1u32, 2];
    let mut engine = Engine::new(cfg);
    let mut verdict_count = 0u64;
    let mut trace_count = 0u64;
    let mut closed_count = 0u64;
    let collect = |outs: &[Output], verdicts: &mut u64, traces: &mut u64, closed: &mut u64| {
        for o in outs {
            match o {
                Output::Verdict(_) => *verdicts += 1,
                Output::TraceReady(_) => *traces += 1,
                Output::ClosedFlowDelete(_) => *closed += 1,
                Output::RaceConfirmation(_) => {}
                Output::Unjudged(_) => {}
            }
        }
    };

    // Start-up snapshot.
    for tpl in 0..model.tpls.len() {
        if rng.percent(30) {
            let ns = netns[rng.index(2)];
            let clash = model
                .entries
                .iter()
                .any(|e| e.netns == ns && conflict(&model.tpls[e.tpl], &model.tpls[tpl]));
            if !clash {
                let id = model.next_id;
                model.next_id += 1;
                model.entries.push(RefEntry {
                    id,
                    netns: ns,
                    tpl,
                    born: None,
                    expired: false,
                });
                let tp = model.tpls[tpl];
                engine.push(Input::CtExisting {
                    id,
                    netns: ns,
                    orig: tp.orig,
                    reply: tp.reply,
                });
            }
        }
    }

    let mut ts = 10 * S;
    for _ in 0..400 {
        ts += S + rng.below(2 * S);
        let op = rng.below(100);
        let mut inputs = Vec::new();
        let mut expect: Option<(bool, bool, Vec<u64>)> = None;
        match op {
            0..=19 => {
                let tpl = rng.index(model.tpls.len());
                let ns = netns[rng.index(2)];
                let clashes: Vec<usize> = (0..model.entries.len())
                    .filter(|&i| {
                        let e = model.entries[i];
                        e.netns == ns && conflict(&model.tpls[e.tpl], &model.tpls[tpl])
                    })
                    .collect();
                // The kernel reaps an expired clashing entry when a new packet needs the
                // tuple; a live one makes the packet join it instead.
                if clashes.iter().all(|&i| model.entries[i].expired) {
                    for &i in clashes.iter().rev() {
                        inputs.push(model.destroy(i, ts, DestroyReason::Expired));
                    }
                    let id = model.next_id;
                    model.next_id += 1;
                    model.entries.push(RefEntry {
                        id,
                        netns: ns,
                        tpl,
                        born: Some(ts + 1),
                        expired: false,
                    });
                    let tp = model.tpls[tpl];
                    inputs.push(Input::CtNew {
                        ts_ns: ts + 1,
                        id,
                        netns: ns,
                        orig: tp.orig,
                        reply: tp.reply,
                    });
                }
            }
            20..=29 => {
                let live: Vec<usize> = (0..model.entries.len())
                    .filter(|&i| !model.entries[i].expired)
                    .collect();
                if !live.is_empty() {
                    let i = live[rng.index(live.len())];
                    model.entries[i].expired = true;
                }
            }
            30..=39 => {
                let exp: Vec<usize> = (0..model.entries.len())
                    .filter(|&i| model.entries[i].expired)
                    .collect();
                if !exp.is_empty() {
                    let i = exp[rng.index(exp.len())];
                    inputs.push(model.destroy(i, ts, DestroyReason::Expired));
                }
            }
            40..=44 => {
                let live: Vec<usize> = (0..model.entries.len())
                    .filter(|&i| !model.entries[i].expired)
                    .collect();
                if !live.is_empty() {
                    let i = live[rng.index(live.len())];
                    inputs.push(model.destroy(i, ts, DestroyReason::Killed));
                }
            }
            45..=79 => {
                let tpl = model.tpls[rng.index(model.tpls.len())];
                let (key, layout) = key_for(&mut rng, &tpl);
                let matching: Vec<RefEntry> = model
                    .entries
                    .iter()
                    .filter(|e| key_matches(&key, &model.tpls[e.tpl]))
                    .copied()
                    .collect();
                let live: Vec<RefEntry> = matching.iter().filter(|e| !e.expired).copied().collect();
                let expired: Vec<RefEntry> =
                    matching.iter().filter(|e| e.expired).copied().collect();
                let result = match rng.below(10) {
                    0 => DeleteResult::NotFound,
                    1 => DeleteResult::Error(-1),
                    _ => DeleteResult::Deleted,
                };
                // The live entry's TCP state as the kernel read it: unknown, still carrying
                // data, or closed (then the delete is no race).
                let tcp_state = match rng.below(6) {
                    0 => None,
                    1 => Some(TcpState::Established),
                    2 => Some(TcpState::LastAck),
                    3 => Some(TcpState::FinWait),
                    4 => Some(TcpState::Close),
                    _ => Some(TcpState::TimeWait),
                };
                let kernel_view = (!expired.is_empty() || rng.percent(50)).then(|| {
                    if let Some(e) = live.iter().max_by_key(|e| e.born) {
                        KernelView::Live {
                            entry_id: e.id,
                            born_ns: e.born.unwrap_or(0),
                            timeout_left_ns: 1,
                            tcp_state,
                        }
                    } else if let Some(e) = expired.first() {
                        KernelView::ExpiredNotReaped {
                            entry_id: e.id,
                            born_ns: e.born.unwrap_or(0),
                            expired_for_ns: 1,
                        }
                    } else {
                        KernelView::Absent
                    }
                });
                let closed = result == DeleteResult::Deleted
                    && matches!(
                        kernel_view,
                        Some(KernelView::Live { tcp_state: Some(t), .. }) if t.carries_no_packets()
                    );
                let harmful = result == DeleteResult::Deleted && !live.is_empty() && !closed;
                expect = Some((harmful, closed, live.iter().map(|e| e.id).collect()));
                inputs.push(Input::AgentDelete(AgentDelete {
                    ts_ns: ts,
                    task: Task {
                        pid: 1,
                        tid: 2,
                        comm: "npa".into(),
                    },
                    map_id: 7,
                    key,
                    layout,
                    result,
                    kernel_view,
                    judged_netns: None,
                }));
            }
            80..=84 => inputs.push(Input::Lost {
                ts_ns: ts,
                count: 1 + rng.below(3),
            }),
            85..=89 => {
                let tpl = model.tpls[rng.index(model.tpls.len())];
                inputs.push(Input::PacketDrop {
                    ts_ns: ts,
                    netns: netns[rng.index(2)],
                    tuple: tpl.reply,
                    reason: "policy".into(),
                });
            }
            90..=94 => {
                let tpl = model.tpls[rng.index(model.tpls.len())];
                let (key, _) = key_for(&mut rng, &tpl);
                inputs.push(Input::AgentInsert {
                    ts_ns: ts,
                    map_id: 7,
                    key,
                });
            }
            _ => {
                // Runs ahead of the next event now and then, so later inputs arrive with
                // timestamps below the engine's clock.
                inputs.push(Input::Tick {
                    now_ns: ts + rng.below(3 * S),
                });
            }
        }

        for input in inputs {
            let is_delete = matches!(input, Input::AgentDelete(_));
            let outs = engine.push(input);
            collect(
                &outs,
                &mut verdict_count,
                &mut trace_count,
                &mut closed_count,
            );
            if !is_delete {
                assert!(
                    outs.iter()
                        .all(|o| matches!(o, Output::TraceReady(_) | Output::RaceConfirmation(_))),
                    "seed {seed}: verdict outside a delete"
                );
                continue;
            }
            let Some((harmful, closed, live_ids)) = &expect else {
                continue;
            };
            let closed_deletes: Vec<&ClosedFlowDelete> = outs
                .iter()
                .filter_map(|o| match o {
                    Output::ClosedFlowDelete(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert_eq!(
                closed_deletes.len(),
                usize::from(*closed),
                "seed {seed}: a closed-flow delete iff the kernel saw a closed connection"
            );
            if let Some(c) = closed_deletes.first() {
                assert!(live_ids.contains(&c.entry_id), "seed {seed}");
                assert!(c.tcp_state.carries_no_packets(), "seed {seed}");
            }
            let got: Vec<&Verdict> = outs
                .iter()
                .filter_map(|o| match o {
                    Output::Verdict(v) => Some(v),
                    _ => None,
                })
                .collect();
            assert!(
                got.len() <= 1,
                "seed {seed}: several verdicts for one delete"
            );
            if let Some(v) = got.first() {
                assert!(
                    *harmful,
                    "seed {seed}: verdict for a harmless delete: {v:#?}"
                );
                assert!(
                    live_ids.contains(&v.live.id),
                    "seed {seed}: verdict names entry {} not live ({live_ids:?})",
                    v.live.id
                );
                if v.live.born_ns.is_none() {
                    assert_eq!(v.class, VerdictClass::StaleMatch, "seed {seed}");
                }
                if let Some(o) = v.old {
                    assert_eq!(v.class, VerdictClass::PortReuse, "seed {seed}");
                    assert_ne!(o.id, v.live.id, "seed {seed}");
                }
            } else if exact {
                assert!(!*harmful, "seed {seed}: missed a live-entry delete at {ts}");
            }
        }
    }

    let outs = engine.finish();
    collect(
        &outs,
        &mut verdict_count,
        &mut trace_count,
        &mut closed_count,
    );
    let s = engine.stats();
    assert_eq!(s.deletes.live, verdict_count, "seed {seed}");
    assert_eq!(s.deletes.closed_flow, closed_count, "seed {seed}");
    assert_eq!(s.verdicts.total(), verdict_count, "seed {seed}");
    assert_eq!(
        trace_count, verdict_count,
        "seed {seed}: one trace per verdict"
    );
    assert_eq!(s.traces_emitted, trace_count, "seed {seed}");
    if exact {
        assert_eq!(s.evictions.total(), 0, "seed {seed}");
        assert_eq!(s.implicit_destroys, 0, "seed {seed}");
    }
    s.clone()
}

/// Sums the counters that show which paths the random timelines reached.
fn coverage(all: &[Stats]) -> [u64; 11] {
    let mut c = [0u64; 11];
    for s in all {
        let add = [
            s.verdicts.port_reuse,
            s.verdicts.snapshot_lag,
            s.verdicts.stale_match,
            s.verdicts.decided_by_kernel,
            s.verdicts.decided_by_shadow,
            s.deletes.rightful,
            s.deletes.rightful_expired_not_reaped,
            s.deletes.unseen,
            s.deletes.closed_flow,
            s.deletes.not_found + s.deletes.error,
            s.out_of_order,
        ];
        for (a, b) in c.iter_mut().zip(add) {
            *a += b;
        }
    }
    c
}

#[test]
fn verdict_iff_live_entry_at_delete_random_timelines() {
    let all: Vec<Stats> = (0..300)
        .map(|seed| run_one(seed, EngineConfig::default(), true))
        .collect();
    // The generator must reach every outcome, or the invariant proves little.
    let c = coverage(&all);
    assert!(c.iter().all(|&n| n > 0), "unreached outcome: {c:?}");
}

#[test]
fn verdicts_stay_true_under_eviction_pressure() {
    let all: Vec<Stats> = (1000..1100)
        .map(|seed| {
            let cfg = EngineConfig {
                max_flows: 3,
                timeline_len: 4,
                max_markers: 2,
                ..EngineConfig::default()
            };
            run_one(seed, cfg, false)
        })
        .collect();
    assert!(all.iter().map(|s| s.evictions.flows).sum::<u64>() > 0);
    assert!(all.iter().map(|s| s.verdicts.total()).sum::<u64>() > 0);
}
