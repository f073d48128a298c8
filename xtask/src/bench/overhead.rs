//! Overhead: conntrack churn (TCP connect/reset, UDP new flows) under each observer.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;

use super::floor::EmptyProgram;
use super::load::{self, Count, TcpSink, UdpGen};
use super::observer::{Observer, cost};
use super::profile::{perf_top, perf_top_of, tool_ok};
use super::sys::{self, Proc, Topology, check_stop};
use super::{Bench, Config, Profile, Workload, stats};

/// The raw tracepoint of the tracepoint backend's DESTROY program, run on every slab free.
const SLAB_FREE_TRACEPOINT: &str = "kmem_cache_free";

impl Bench {
    /// Overhead: each workload under each observer, repetitions interleaved so that drift in
    /// the machine's load spreads over all configurations alike.
    pub(super) fn overhead(&mut self, topo: &Topology, map: &Path) -> Result<()> {
        let srv = topo.srv_path();
        let cli = topo.cli_path();
        let ct = topo.ct_path();
        let dst = SocketAddrV4::new(sys::SRV_IP.parse()?, 5001);
        let _sink = TcpSink::start(&srv, dst, 2)?;
        let udp = UdpGen::new(&cli, sys::CLI_IP.parse()?, sys::SRV_IP.parse()?)?;
        let dur = Duration::from_secs_f64(self.plan.phase_s);
        let mut observers = vec![Observer::None];
        observers.extend(self.res.backends.iter().map(|b| Observer::Run(b.clone())));
        observers.push(Observer::Conntrack);
        let slab_observers: Vec<Observer> = std::iter::once(Observer::None)
            .chain(self.res.backends.iter().map(|b| Observer::Run(b.clone())))
            .chain(
                self.res
                    .backends
                    .iter()
                    .any(|b| b == "tracepoint")
                    .then_some(Observer::EmptyProgram),
            )
            .collect();
        for (name, unit, obs) in [
            ("TCP connection churn", "connections/s", &observers),
            ("UDP new flows", "flows/s", &observers),
            (
                "unrelated slab frees",
                "socket open+close/s",
                &slab_observers,
            ),
        ] {
            let mut w = Workload {
                name: name.into(),
                unit: unit.into(),
                configs: obs
                    .iter()
                    .map(|o| Config {
                        name: o.name(),
                        ..Default::default()
                    })
                    .collect(),
            };
            for rep in 0..self.plan.reps {
                for (i, o) in obs.iter().enumerate() {
                    check_stop()?;
                    topo.flush()?;
                    let running = self.start(o, &ct, map)?;
                    // The flush's frees and the observer's start-up settle before the clock
                    // starts (the same pause for every configuration).
                    sys::nap(Duration::from_millis(1000));
                    let pid = running.proc.as_ref().map(Proc::pid);
                    let floor = matches!(o, Observer::EmptyProgram)
                        .then(|| EmptyProgram::attach(SLAB_FREE_TRACEPOINT))
                        .transpose()?;
                    let floor0 = floor.as_ref().map(EmptyProgram::runs).transpose()?;
                    let cost0 = pid.map(cost).transpose()?;
                    let c = match name {
                        "TCP connection churn" => load::tcp_churn(&cli, dst, 8, dur)?,
                        "UDP new flows" => udp.run(2, dur, None, None)?,
                        _ => load::slab_frees(&cli, 2, dur)?,
                    };
                    let cost1 = pid.map(cost).transpose()?;
                    let floor1 = floor.as_ref().map(EmptyProgram::runs).transpose()?;
                    drop(floor);
                    self.stop(running)?;
                    load::check_reach(&c, name)?;
                    eprintln!(
                        "bench: {name}, {}, run {}: {:.0} {unit} ({} errors)",
                        o.name(),
                        rep + 1,
                        c.rate(),
                        c.errors
                    );
                    if let (Some(a), Some(b)) = (cost0, cost1) {
                        let per = |x: u64| x as f64 / c.ops.max(1) as f64;
                        let cfg = &mut w.configs[i];
                        cfg.observer_cpu_ns_per_op
                            .push(per(b.cpu_ns.saturating_sub(a.cpu_ns)));
                        if matches!(o, Observer::Run(_)) {
                            let (ta, tb) = (a.bpf_total(), b.bpf_total());
                            cfg.bpf_ns_per_op.push(per(tb.ns.saturating_sub(ta.ns)));
                            cfg.bpf_runs_per_op.push(per(tb.cnt.saturating_sub(ta.cnt)));
                            for (name, r) in &b.programs {
                                let before = a.programs.get(name).copied().unwrap_or_default();
                                let p = cfg.bpf_programs.entry(name.clone()).or_default();
                                p.ns_per_op.push(per(r.ns.saturating_sub(before.ns)));
                                p.runs_per_op.push(per(r.cnt.saturating_sub(before.cnt)));
                            }
                        }
                    }
                    if let (Some(a), Some(b)) = (floor0, floor1) {
                        let per = |x: u64| x as f64 / c.ops.max(1) as f64;
                        let cfg = &mut w.configs[i];
                        let (ns, runs) = (per(b.ns - a.ns), per(b.cnt - a.cnt));
                        cfg.bpf_ns_per_op.push(ns);
                        cfg.bpf_runs_per_op.push(runs);
                        let p = cfg.bpf_programs.entry("floor".into()).or_default();
                        p.ns_per_op.push(ns);
                        p.runs_per_op.push(runs);
                    }
                    w.configs[i].runs.push(c);
                }
            }
            let base = stats::median(
                &w.configs[0]
                    .runs
                    .iter()
                    .map(Count::rate)
                    .collect::<Vec<_>>(),
            );
            for c in &mut w.configs {
                c.median_rate = stats::median(&c.runs.iter().map(Count::rate).collect::<Vec<_>>());
                c.ratio = if base > 0.0 {
                    c.median_rate / base
                } else {
                    0.0
                };
            }
            self.res.overhead.push(w);
            // One more, unmeasured, run with the default backend under a system-wide profile.
            if self.profile && name == "UDP new flows" && tool_ok("perf") {
                topo.flush()?;
                let o = Observer::Run(self.res.backends[0].clone());
                let running = self.start(&o, &ct, map)?;
                sys::nap(Duration::from_millis(1000));
                let data = self.work.join("perf-udp.data");
                let mut c = Command::new("perf");
                c.args(["record", "-a", "-q", "-o"])
                    .arg(&data)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                let mut perf = Proc::spawn("perf record", c)?;
                sys::nap(Duration::from_millis(300));
                udp.run(2, dur, None, None)?;
                perf.stop(Duration::from_secs(60))?;
                self.stop(running)?;
                self.res.profiles.push(Profile {
                    what: format!(
                        "UDP new flows with {} (perf record -a, both CPUs, {:.0} s): where the \
                         CPU time went",
                        o.name(),
                        self.plan.phase_s
                    ),
                    top: [
                        perf_top(&data, "comm", 6)?,
                        vec![String::new()],
                        perf_top(&data, "dso", 8)?,
                        vec![String::new()],
                        perf_top(&data, "comm,dso,sym", 20)?,
                    ]
                    .concat(),
                });
                self.res.profiles.push(Profile {
                    what: "the same profile, the detector's event-loop thread alone (kernel \
                           time in its system calls included; shares of that thread's time)"
                        .to_string(),
                    top: perf_top_of(&data, "detector", 25)?,
                });
            }
        }
        topo.flush()?;
        Ok(())
    }
}
