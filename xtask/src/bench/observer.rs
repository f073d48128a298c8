//! What watches conntrack during a measurement (the detector on a backend, `conntrack -E`,
//! nothing), started and stopped around each run, and its cost.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::sys::{self, Proc, check_stop};
use super::{Bench, report};

/// What watches conntrack during a measurement.
#[derive(Debug, Clone)]
pub(super) enum Observer {
    None,
    /// `detector run` (the product) on a backend.
    Run(String),
    /// `detector trace` (the event stream alone, for counting) on a backend.
    Trace(String),
    Conntrack,
    /// No process: an empty BPF program on the detector's slab-free tracepoint, for the floor
    /// of what bpf_stats counts per run ([`super::floor`]).
    EmptyProgram,
}

impl Observer {
    pub(super) fn name(&self) -> String {
        match self {
            Observer::None => "no observer".into(),
            Observer::Run(b) => format!("detector run ({b})"),
            Observer::Trace(b) => format!("detector trace ({b})"),
            Observer::Conntrack => "conntrack -E".into(),
            Observer::EmptyProgram => "empty BPF program (floor)".into(),
        }
    }
}

/// A running observer.
pub(super) struct Running {
    pub(super) proc: Option<Proc>,
    pub(super) stdout: Option<std::thread::JoinHandle<(u64, u64)>>,
    pub(super) stderr: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// What an observer delivered.
#[derive(Debug, Default)]
pub(super) struct Delivered {
    pub(super) new: u64,
    pub(super) destroy: u64,
    pub(super) lost: u64,
}

impl Bench {
    pub(super) fn load(&mut self, when: &str) {
        let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let l = l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        eprintln!("bench: load average {when}: {l}");
        self.res.load.push((when.to_string(), l));
    }

    pub(super) fn detector_cmd(
        &self,
        sub: &str,
        srv: &Path,
        backend: &str,
        max_entries: u32,
    ) -> Command {
        let mut c = Command::new(&self.detector);
        c.arg(sub)
            .args(["--backend", backend, "--max-entries"])
            .arg(max_entries.to_string())
            .arg("--netns")
            .arg(srv);
        c
    }

    pub(super) fn start(&self, obs: &Observer, srv: &Path, map: &Path) -> Result<Running> {
        let traces = self.work.join("traces");
        let (mut cmd, ready) = match obs {
            Observer::None | Observer::EmptyProgram => {
                return Ok(Running {
                    proc: None,
                    stdout: None,
                    stderr: None,
                });
            }
            Observer::Run(b) => {
                let mut c = self.detector_cmd("run", srv, b, 1 << 20);
                c.arg("--map-pin").arg(map).arg("--trace-dir").arg(&traces);
                (c, "watching map")
            }
            Observer::Trace(b) => (
                self.detector_cmd("trace", srv, b, 1 << 20),
                "tracing conntrack",
            ),
            Observer::Conntrack => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", srv.display()))
                    .args(["conntrack", "-E"]);
                (c, "")
            }
        };
        let counting = matches!(obs, Observer::Conntrack);
        cmd.stdout(if counting {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
        let mut p = Proc::spawn(&obs.name(), cmd)?;
        let stdout = p.child.stdout.take().map(|out| {
            std::thread::spawn(move || {
                use std::io::BufRead;
                let (mut new, mut destroy) = (0, 0);
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if l.contains("[NEW]") {
                        new += 1;
                    } else if l.contains("[DESTROY]") {
                        destroy += 1;
                    }
                }
                (new, destroy)
            })
        });
        let err = p.child.stderr.take().context("observer stderr")?;
        let stderr = if ready.is_empty() {
            // conntrack -E has no ready signal: its socket is subscribed long before this.
            sys::nap(Duration::from_millis(500));
            std::thread::spawn(move || read_all(err))
        } else {
            // Generous: in an emulated guest (vm-bench) the start-up takes tens of seconds.
            sys::wait_line(err, move |l| l.contains(ready), Duration::from_secs(240))
                .with_context(|| format!("waiting for {} to be ready", obs.name()))?
                .1
        };
        check_stop()?;
        Ok(Running {
            proc: Some(p),
            stdout,
            stderr: Some(stderr),
        })
    }

    pub(super) fn stop(&self, mut r: Running) -> Result<(Delivered, Vec<String>)> {
        let Some(mut p) = r.proc.take() else {
            return Ok((Delivered::default(), Vec::new()));
        };
        let status = p.stop(Duration::from_secs(30))?;
        let (new, destroy) = match r.stdout.take() {
            Some(h) => h.join().unwrap_or_default(),
            None => (0, 0),
        };
        let lines = r
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let mut d = Delivered {
            new,
            destroy,
            lost: 0,
        };
        if p.name.starts_with("conntrack") {
            d.lost = lines.iter().filter(|l| l.contains("ENOBUFS")).count() as u64;
        } else {
            if !status.success() {
                bail!("{} failed ({status}): {}", p.name, lines.join(" | "));
            }
            if p.name.starts_with("detector trace") {
                let l = lines
                    .iter()
                    .find(|l| l.contains(" NEW, ") && l.contains("lost in kernel"))
                    .with_context(|| {
                        format!("no summary from {}: {}", p.name, lines.join(" | "))
                    })?;
                let n = report::numbers(l);
                // "detector: N NEW, M DESTROY; lost in kernel: L (ring buffer full), dedupe
                // table full: F, kernel read failures: R, ..."
                if n.len() >= 5 {
                    d.new = n[0];
                    d.destroy = n[1];
                    d.lost = n[2] + n[3] + n[4];
                }
            }
        }
        Ok((d, lines))
    }
}

/// What an observer has cost so far: its CPU time, and its BPF programs' run time and runs.
pub(super) struct Cost {
    pub(super) cpu_ns: u64,
    pub(super) programs: BTreeMap<String, sys::ProgRuns>,
}

impl Cost {
    /// Run time and runs of all its programs together.
    pub(super) fn bpf_total(&self) -> sys::ProgRuns {
        self.programs
            .values()
            .fold(sys::ProgRuns::default(), |t, r| sys::ProgRuns {
                ns: t.ns + r.ns,
                cnt: t.cnt + r.cnt,
            })
    }
}

/// An observer's cost so far.
pub(super) fn cost(pid: u32) -> Result<Cost> {
    Ok(Cost {
        cpu_ns: sys::proc_cpu_ns(pid)?,
        programs: sys::bpf_prog_stats(pid)?,
    })
}

pub(super) fn read_all(r: impl std::io::Read) -> Vec<String> {
    use std::io::BufRead;
    std::io::BufReader::new(r)
        .lines()
        .map_while(Result::ok)
        .collect()
}
