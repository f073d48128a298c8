//! Completeness: the conntrack event rate raised step by step, events generated against
//! events delivered.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::load::UdpGen;
use super::observer::Observer;
use super::sys::{self, Topology, check_stop};
use super::{Bench, Step};

impl Bench {
    /// Completeness: for each rate step and each observer (alone), flows are generated at the
    /// rate, then left to expire and be reaped (1 s UDP timeout in the bench namespace), so
    /// every flow is one NEW and one DESTROY; what each observer delivered is compared.
    pub(super) fn completeness(&mut self, topo: &Topology) -> Result<()> {
        let ct = topo.ct_path();
        let cli = topo.cli_path();
        let udp = UdpGen::new(&cli, sys::CLI_IP.parse()?, sys::SRV_IP.parse()?)?;
        // Past the overhead phase's tuples (a fresh cursor would also be fine: the table is
        // flushed, but fresh tuples keep the kernel's state simple).
        udp.set_cursor(0);
        let mut observers: Vec<Observer> = self
            .res
            .backends
            .iter()
            .map(|b| Observer::Trace(b.clone()))
            .collect();
        observers.push(Observer::Conntrack);
        let dur = Duration::from_secs_f64(self.plan.step_s);
        let mut lossless_seen: std::collections::HashMap<String, u32> = Default::default();
        for target in self.plan.steps.clone() {
            for o in &observers {
                check_stop()?;
                // Once an observer lost events at two rates in a row, higher rates only
                // repeat that: skip them to keep the run short... except the unlimited step,
                // which always runs (it is the machine's ceiling).
                let name = o.name();
                if lossless_seen.get(&name).copied().unwrap_or(0) >= 2 && target.is_some() {
                    continue;
                }
                topo.flush()?;
                let before = topo.ct_stats()?;
                let running = self.start(o, &ct, Path::new("/nonexistent"))?;
                sys::nap(Duration::from_millis(500));
                let pid = running.proc.as_ref().map(sys::Proc::pid);
                let cpu0 = pid.map(sys::proc_cpu_ns).transpose()?;
                let flows = udp.run(2, dur, target.map(|e| e / 2.0), None)?;
                // Let every entry expire and be reaped (each one a DESTROY), then give the
                // observer time to read the last records.
                let t = Instant::now();
                while topo.ct_count()? > 0 && t.elapsed() < Duration::from_secs(5) {
                    check_stop()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                let drain_s = t.elapsed().as_secs_f64();
                let flushed = topo.ct_count()?;
                // Entries the kernel's gc has not reaped after 5 s: flushed (still DESTROYs;
                // the gc reaps in bursts too, so the DESTROY side is bursty either way).
                topo.flush()?;
                sys::nap(Duration::from_millis(500));
                let cpu1 = pid.map(sys::proc_cpu_ns).transpose()?;
                let after = topo.ct_stats()?;
                let (d, _) = self.stop(running)?;
                let kernel_stats: std::collections::BTreeMap<String, u64> = after
                    .iter()
                    .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
                    .filter(|(_, v)| *v > 0)
                    .collect();
                // A datagram the kernel dropped before confirming its entry made no flow.
                let not_created = kernel_stats.get("insert_failed").copied().unwrap_or(0)
                    + kernel_stats.get("drop").copied().unwrap_or(0);
                let expected = flows.ops.saturating_sub(not_created);
                let missing = (2 * expected).saturating_sub(d.new + d.destroy);
                // The observer's CPU per event it delivered: what one CPU of its own can
                // sustain, whatever the generator leaves it here.
                let observer_cpu_ns_per_event = cpu0.zip(cpu1).and_then(|(a, b)| {
                    let events = d.new + d.destroy;
                    (events > 0).then(|| b.saturating_sub(a) as f64 / events as f64)
                });
                let step = Step {
                    observer: name.clone(),
                    target_events_per_s: target,
                    events_per_s: 2.0 * flows.rate(),
                    flows,
                    expected_new: expected,
                    expected_destroy: expected,
                    delivered_new: d.new,
                    delivered_destroy: d.destroy,
                    reported_lost: d.lost,
                    missing,
                    kernel_stats,
                    drain_s,
                    flushed,
                    observer_cpu_ns_per_event,
                };
                eprintln!(
                    "bench: completeness {name} at {:.0} events/s: expected {} NEW + {} DESTROY, \
                     delivered {} + {}, missing {missing}, reported lost {} (drained in {drain_s:.1} s)",
                    step.events_per_s, expected, expected, d.new, d.destroy, d.lost
                );
                if missing > 0 || d.lost > 0 {
                    *lossless_seen.entry(name).or_default() += 1;
                } else {
                    lossless_seen.insert(name, 0);
                }
                self.res.completeness.push(step);
            }
        }
        Ok(())
    }
}
