//! Memory and insert time of the engine's shadows, without a kernel: feeds N synthetic IPv4 UDP
//! flows (a start-up snapshot entry and an agent-map key each, as `detector run` does at
//! start-up) and prints heap bytes per flow, counted by a global allocator.
//!
//! `cargo run --release -p detector --example engine_mem -- [FLOWS]` (default 524288).

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use detector::clock::WallClock;
use detector::engine::{AgentDelete, DeleteResult, Engine, EngineConfig, Input, Output};
use detector::npa::{Layout, NpaKey};
use detector::record::{FlowTuple, Task};
use detector::report::trace_file::{add_wall_times, json_with_wall_times};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().context("FLOWS must be a number")?,
        None => 512 * 1024,
    };
    let layout: Layout = "v4-24/16".parse()?;
    let base = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(EngineConfig {
        max_flows: n,
        ..EngineConfig::default()
    });
    let t0 = Instant::now();
    for i in 0..n as u32 {
        // Client 10.(i>>16).x.y:port -> server 10.200.0.1:53, unique per flow, like the bench.
        let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i >> 8)));
        let sport = 1024 + (i & 0xff) as u16;
        let dst = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
        let orig = FlowTuple {
            proto: 17,
            src,
            sport,
            dst,
            dport: 53,
        };
        engine.push(Input::CtExisting {
            id: (1 << 63) | u64::from(i),
            netns: 4026531840,
            orig,
            reply: orig.reversed(),
        });
        engine.push(Input::MapExisting {
            map_id: 7,
            key: NpaKey {
                src,
                sport,
                dst,
                dport: 53,
                proto: 17,
                owner: src,
                ifindex: None,
            },
        });
    }
    let took = t0.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let s = engine.stats();
    println!(
        "flows {n}: tracked {} flows + {} keys; heap {:.1} MiB live ({:.0} B/flow), peak {:.1} MiB \
         ({:.0} B/flow); inserts {:.3} s ({:.0} ns/flow)",
        s.flows_tracked,
        s.map_keys_tracked,
        live as f64 / 1048576.0,
        live as f64 / n as f64,
        peak as f64 / 1048576.0,
        peak as f64 / n as f64,
        took.as_secs_f64(),
        took.as_nanos() as f64 / n as f64
    );
    // Cost of a verdict with a full flight recorder: wrongful deletes of snapshot flows.
    let t1 = Instant::now();
    let verdicts = 1000.min(n as u32);
    let mut emitted = 0;
    let mut last = None;
    for i in 0..verdicts {
        let src = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i >> 8)));
        let sport = 1024 + (i & 0xff) as u16;
        let key = NpaKey {
            src,
            sport,
            dst: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
            dport: 53,
            proto: 17,
            owner: src,
            ifindex: None,
        };
        let outs = engine.push(Input::AgentDelete(AgentDelete {
            ts_ns: 1_000_000_000 + u64::from(i),
            task: Task {
                pid: 1,
                tid: 1,
                comm: "agent".into(),
            },
            map_id: 7,
            key,
            layout,
            result: DeleteResult::Deleted,
            kernel_view: None,
            judged_netns: None,
        }));
        emitted += outs.len();
        last = outs.into_iter().next().or(last);
    }
    println!(
        "{emitted} verdicts: {:.1} us each",
        t1.elapsed().as_secs_f64() * 1e6 / f64::from(verdicts)
    );
    // A lab-like flow: eight port reuses, each with a wrongful delete and four denied
    // packets, so its verdict carries a full timeline.
    let c = FlowTuple {
        proto: 6,
        src: IpAddr::V4(Ipv4Addr::new(10, 78, 1, 2)),
        sport: 42000,
        dst: IpAddr::V4(Ipv4Addr::new(10, 78, 2, 2)),
        dport: 8080,
    };
    let ckey = NpaKey {
        src: c.src,
        sport: c.sport,
        dst: c.dst,
        dport: c.dport,
        proto: 6,
        owner: c.src,
        ifindex: None,
    };
    for cycle in 0..8u64 {
        let t = 2_000_000_000 + cycle * 10_000_000;
        let id = 1_000_000 + cycle;
        engine.push(Input::CtNew {
            ts_ns: t,
            id,
            netns: 1,
            orig: c,
            reply: c.reversed(),
        });
        if cycle > 0 {
            engine.push(Input::CtDestroy {
                ts_ns: t - 1000,
                id: id - 1,
                netns: 1,
                orig: c,
                reply: c.reversed(),
                born_ns: None,
                reason: detector::record::DestroyReason::Killed,
                expiry_ns: None,
                reaped_by: detector::engine::ReapedBy::Softirq,
            });
        }
        let outs = engine.push(Input::AgentDelete(AgentDelete {
            ts_ns: t + 1_000_000,
            task: Task {
                pid: 1,
                tid: 1,
                comm: "agent".into(),
            },
            map_id: 7,
            key: ckey.clone(),
            layout,
            result: DeleteResult::Deleted,
            kernel_view: None,
            judged_netns: None,
        }));
        last = outs.into_iter().next().or(last);
        for k in 0..4 {
            engine.push(Input::PacketDrop {
                ts_ns: t + 2_000_000 + k,
                netns: 1,
                tuple: c.reversed(),
                reason: "NO_KEY".into(),
            });
        }
    }
    // What `detector run --json` then does with each verdict: its JSON line with wall times.
    if let Some(Output::Verdict(v)) = last {
        let wall = WallClock::measure();
        let t2 = Instant::now();
        let mut bytes = 0;
        for _ in 0..1000 {
            let mut body = serde_json::to_value(&v)?;
            add_wall_times(&mut body, &wall);
            bytes += body.to_string().len();
        }
        println!(
            "verdict JSON line through a Value tree ({} timeline events, {} B): {:.1} us each",
            v.timeline.len(),
            bytes / 1000,
            t2.elapsed().as_secs_f64() * 1e3
        );
        let t7 = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(json_with_wall_times(&v, &wall)?);
        }
        println!(
            "verdict JSON line, straight to text (detector run): {:.1} us each",
            t7.elapsed().as_secs_f64() * 1e3
        );
    }
    drop(engine);
    Ok(())
}
