//! Verdict latency: `detector lab` (ground truth), delete to verdict.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::observer::read_all;
use super::sys::{self, Proc, check_stop};
use super::{Bench, Latency, stats};

impl Bench {
    /// Verdict latency from the lab: every wrongful delete's verdict, delete (kernel time) to
    /// emission.
    pub(super) fn latency(&mut self) -> Result<()> {
        // One retry: on a shared machine another lab's `--cleanup` can unmount this lab's
        // bpffs under it.
        match self.latency_once() {
            Err(e) if !sys::stopping() => {
                eprintln!("bench: the lab failed ({e:#}); once more");
                self.latency_once()
            }
            r => r,
        }
    }

    pub(super) fn latency_once(&mut self) -> Result<()> {
        check_stop()?;
        let log = std::fs::File::create(self.work.join("lab.log"))?;
        let mut cmd = Command::new(&self.detector);
        cmd.args(["lab", "--json", "--ports"])
            .arg(self.plan.lab_ports.to_string())
            .arg("--cycles")
            .arg(self.plan.lab_cycles.to_string())
            .arg("--trace-dir")
            .arg(self.work.join("lab-traces"))
            .stdout(Stdio::piped())
            .stderr(log);
        let mut p = Proc::spawn("detector lab", cmd)?;
        let out = p.child.stdout.take().context("lab stdout")?;
        let h = std::thread::spawn(move || read_all(out));
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(s) = p.child.try_wait()? {
                break s;
            }
            if sys::stopping() || Instant::now() > deadline {
                p.stop(Duration::from_secs(20))?;
                check_stop()?;
                bail!("detector lab did not finish within 180 s (log: target/bench/lab.log)");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let lines = h.join().unwrap_or_default();
        if !status.success() {
            bail!("detector lab failed ({status}); see target/bench/lab.log");
        }
        let v: Value = lines
            .iter()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .context("detector lab printed no JSON report")?;
        let samples: Vec<u64> = v["verdicts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["detection_latency_ns"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        let lat = Latency {
            p50_ns: stats::percentile(&samples, 50.0).unwrap_or(0),
            p99_ns: stats::percentile(&samples, 99.0).unwrap_or(0),
            max_ns: samples.iter().copied().max().unwrap_or(0),
            cycles: v["cycles"].as_u64().unwrap_or(0),
            port_reuses: v["reproducer"]["reuses"].as_u64().unwrap_or(0),
            wrongful_deletes: v["wrongful_deletes"].as_u64().unwrap_or(0),
            verdicts: samples.len() as u64,
            events_lost: v["events_lost"].as_u64().unwrap_or(0),
            // The lab runs its detector with --watermark-ms 2 (detector/src/cmd/lab.rs).
            watermark_ms: 2,
            samples,
        };
        eprintln!(
            "bench: verdict latency over {} verdicts: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.verdicts,
            lat.p50_ns as f64 / 1e6,
            lat.p99_ns as f64 / 1e6,
            lat.max_ns as f64 / 1e6
        );
        if lat.verdicts == 0 {
            bail!("the lab produced no verdict: no latency to report (see target/bench/lab.log)");
        }
        self.res.latency = Some(lat);
        Ok(())
    }
}
