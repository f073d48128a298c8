//! Memory and start-up: `detector run` on a full conntrack table and agent map against an
//! idle one, and where its heap goes.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use super::load::{self, UdpGen};
use super::profile::{perf_top, tool_ok};
use super::sys::{self, Bpffs, Proc, Topology, check_stop};
use super::{Bench, Memory, Profile, bpfmap, report, stats};

impl Bench {
    /// Memory and start-up with 512k kernel entries and a 512k-key agent map, against an idle
    /// detector (empty table, small map) with the same table sizes.
    pub(super) fn memory(&mut self, idle_topo: &Topology, fs: &Bpffs) -> Result<()> {
        check_stop()?;
        let n = self.plan.flows;
        let entries = n as u32;
        // Idle: the bench namespace, flushed, and the small empty map.
        idle_topo.flush()?;
        let idle_map = fs.dir.join("idle_map");
        let _im = bpfmap::AgentMap::create(&idle_map, entries)?;
        let (idle_ready, idle_rss, idle_hwm, idle_kmem, _) =
            self.sample(&idle_topo.ct_path(), &idle_map, entries, None)?;
        // Loaded: a fresh pair of namespaces whose UDP entries live 10 minutes.
        let topo = Topology::create("m")?;
        sys::exec_in(
            &topo.cli,
            "sysctl",
            &["-qw", "net.netfilter.nf_conntrack_udp_timeout=600"],
        )?;
        let udp = UdpGen::new(&topo.cli_path(), sys::CLI_IP.parse()?, sys::SRV_IP.parse()?)?;
        let t = Instant::now();
        let mut c = udp.run(2, Duration::from_secs(60), None, Some(n))?;
        let mut kernel_entries = topo.ct_count()?;
        // Datagrams the kernel dropped (a full table, a full queue) made no entry: send the
        // same flows again (those that exist are not new) until the table holds them all.
        for _ in 0..3 {
            if kernel_entries >= n {
                break;
            }
            let max = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
                .unwrap_or_default();
            eprintln!(
                "bench: the table holds {kernel_entries} of {n} flows (nf_conntrack_max {}, \
                 kernel counters {:?}); sending them again",
                max.trim(),
                topo.ct_stats()?
            );
            if max.trim().parse::<u64>().unwrap_or(0) < n + 4096 {
                std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", "1048576")?;
            }
            udp.set_cursor(0);
            c = udp.run(2, Duration::from_secs(60), None, Some(n))?;
            kernel_entries = topo.ct_count()?;
        }
        eprintln!(
            "bench: {} flows made in {:.1} s; the kernel table holds {kernel_entries}",
            c.ops,
            t.elapsed().as_secs_f64()
        );
        let map = fs.dir.join("big_map");
        let am = agent_map_of_udp_flows(&map, entries, n)?;
        let fill_s = t.elapsed().as_secs_f64();
        let mut ready = Vec::new();
        let (mut rss, mut hwm, mut kmem, mut nmaps, mut keys_seen) = (0, 0, 0, 0, 0);
        for _ in 0..self.plan.ready_reps {
            let (r, s, h, (k, m), line) =
                self.sample(&topo.ct_path(), &map, entries, self.wrap.as_deref())?;
            ready.push(r);
            rss = rss.max(s);
            hwm = hwm.max(h);
            (kmem, nmaps) = (k, m);
            // "(found by pin, layout v4-24/16, 524288 keys now) and conntrack (524288 entries
            // now)"
            if let Some(i) = line.find(" keys now") {
                keys_seen = report::numbers(&line[..i]).last().copied().unwrap_or(0);
            }
        }
        let mem = Memory {
            flows_target: n,
            kernel_entries,
            map_keys: keys_seen,
            idle_rss,
            idle_hwm,
            idle_ready_s: idle_ready,
            rss,
            hwm,
            ready_median_s: stats::median(&ready),
            ready_s: ready,
            user_bytes_per_flow: rss.saturating_sub(idle_rss) as f64 / n as f64,
            kernel_map_bytes: kmem,
            kernel_maps: nmaps,
            kernel_map_bytes_idle: idle_kmem.0,
            fill_s,
        };
        eprintln!(
            "bench: memory at {n} flows: RSS {:.1} MiB (peak {:.1}), idle {:.1} MiB: {:.0} B/flow; \
             kernel maps {:.1} MiB; ready in {:.2} s",
            mem.rss as f64 / 1048576.0,
            mem.hwm as f64 / 1048576.0,
            mem.idle_rss as f64 / 1048576.0,
            mem.user_bytes_per_flow,
            mem.kernel_map_bytes as f64 / 1048576.0,
            mem.ready_median_s
        );
        self.res.memory = Some(mem);
        if self.profile && tool_ok("perf") {
            let data = self.work.join("perf-startup.data");
            let wrap = format!("perf record -q -o {}", data.display());
            self.sample(&topo.ct_path(), &map, entries, Some(&wrap))?;
            self.res.profiles.push(Profile {
                what: format!(
                    "start-up of detector run with {n} entries and keys (perf record of the \
                     process, start to ready plus 2 s): where the time went"
                ),
                top: perf_top(&data, "comm,dso,sym", 20)?,
            });
        }
        drop(am);
        drop(topo);
        if self.profile && tool_ok("valgrind") {
            self.heap_profile(fs)?;
        }
        Ok(())
    }

    /// What the detector's memory is made of: a valgrind dhat run with 64k entries and keys
    /// (dhat is slow), its heap at the peak by allocating detector function.
    pub(super) fn heap_profile(&mut self, fs: &Bpffs) -> Result<()> {
        let n: u64 = 65_536;
        let topo = Topology::create("h")?;
        sys::exec_in(
            &topo.cli,
            "sysctl",
            &["-qw", "net.netfilter.nf_conntrack_udp_timeout=600"],
        )?;
        let udp = UdpGen::new(&topo.cli_path(), sys::CLI_IP.parse()?, sys::SRV_IP.parse()?)?;
        udp.run(2, Duration::from_secs(60), None, Some(n))?;
        let map = fs.dir.join("heap_map");
        let _am = agent_map_of_udp_flows(&map, n as u32, n)?;
        let out = self.work.join("dhat.json");
        let wrap = format!("valgrind -q --tool=dhat --dhat-out-file={}", out.display());
        self.sample(&topo.ct_path(), &map, n as u32, Some(&wrap))?;
        let text = std::fs::read_to_string(&out).context("reading dhat's output")?;
        let v: Value = serde_json::from_str(&text).context("parsing dhat's output")?;
        let top = report::dhat_top(&v, n, 12);
        self.res.profiles.push(Profile {
            what: format!(
                "heap of detector run at its peak with {n} entries and keys (valgrind dhat), by \
                 the detector function that allocated it"
            ),
            top,
        });
        Ok(())
    }

    /// Starts `detector run`, times it to ready, lets it settle, reads its memory, stops it.
    #[allow(clippy::type_complexity)]
    pub(super) fn sample(
        &self,
        srv: &Path,
        map: &Path,
        entries: u32,
        wrap: Option<&str>,
    ) -> Result<(f64, u64, u64, (u64, usize), String)> {
        let mut c = self.detector_cmd("run", srv, &self.res.backends[0], entries);
        if let Some(w) = wrap {
            let mut words = w.split_whitespace();
            let mut wrapped = Command::new(words.next().context("--memory-wrap is empty")?);
            wrapped.args(words).arg(c.get_program()).args(c.get_args());
            c = wrapped;
        }
        c.arg("--map-pin")
            .arg(map)
            .arg("--max-flows")
            .arg(entries.to_string())
            .arg("--trace-dir")
            .arg(self.work.join("traces"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut p = Proc::spawn("detector run", c)?;
        let err = p.child.stderr.take().context("detector stderr")?;
        let (ready, h) = sys::wait_line(
            err,
            |l| l.contains("watching map"),
            Duration::from_secs(if wrap.is_some() { 1200 } else { 120 }),
        )?;
        // From spawn (wait_line starts its clock right after it) to the ready line.
        let ready_s = ready.as_secs_f64();
        sys::nap(Duration::from_secs(2));
        check_stop()?;
        let (rss, hwm) = sys::proc_mem(p.pid())?;
        let kmem = sys::bpf_map_memlock(p.pid())?;
        // A profiler writes its output at exit, which takes a while.
        p.stop(Duration::from_secs(if wrap.is_some() { 300 } else { 30 }))?;
        let lines = h.join().unwrap_or_default();
        let line = lines
            .iter()
            .find(|l| l.contains("watching map"))
            .cloned()
            .unwrap_or_default();
        Ok((ready_s, rss, hwm, kmem, line))
    }
}

/// Creates and pins, at `path`, an NPA-layout agent map of `max_entries` holding the keys of
/// the generator's first `n` UDP flows (client to server), as NPA's datapath would have them.
pub(super) fn agent_map_of_udp_flows(
    path: &Path,
    max_entries: u32,
    n: u64,
) -> Result<bpfmap::AgentMap> {
    let am = bpfmap::AgentMap::create(path, max_entries)?;
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (sys::CLI_IP.parse()?, sys::SRV_IP.parse()?);
    let keys = (0..n)
        .map(|i| {
            let (sport, dport) = load::udp_flow(i);
            bpfmap::key(src.octets(), sport, dst.octets(), dport, 2)
        })
        .collect::<Result<Vec<_>>>()?;
    am.fill(&keys, monotonic_ns())?;
    Ok(am)
}

pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
