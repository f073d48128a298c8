//! `cargo xtask bench`: the detector's cost and completeness, measured side by side in one run
//! on this machine, in namespaces the bench creates (loopback/veth only), and written as
//! `BENCHMARKS.md` (a table) and `benchmarks/bench.json` (the raw figures).
//!
//! 1. Overhead: TCP connect/reset churn and UDP new flows per second through conntrack,
//!    without the detector, with `detector run` on each backend that loads here, and with
//!    `conntrack -E`; the tracepoint backend's cost on unrelated slab frees.
//! 2. Completeness: the conntrack event rate raised step by step; events generated (the
//!    generator, cross-checked with the kernel's table) against what `detector trace` and
//!    `conntrack -E` delivered.
//! 3. Verdict latency: `detector lab` (ground truth), delete to verdict, p50/p99/max.
//! 4. Memory and start-up: `detector run` on 512k kernel conntrack entries and a 512k-key
//!    agent map, against an idle one.
//!
//! Bounded in time (about 6 minutes, `--quick` about 2); everything it creates or changes is
//! undone on exit, on error and on Ctrl-C (and a killed bench is undone by the next one).

mod bpfmap;
mod load;
mod report;
mod stats;
mod sys;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use load::{Count, TcpSink, UdpGen};
use sys::{Bpffs, Proc, Topology, check_stop};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Smoke mode (about 2 minutes): shorter phases, fewer steps and repetitions.
    #[arg(long)]
    pub quick: bool,
    /// The detector binary to measure (default: build target/release/detector).
    #[arg(long, value_name = "PATH")]
    pub detector: Option<PathBuf>,
    /// Where to write BENCHMARKS.md and bench.json (default: the repository root and
    /// benchmarks/).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Profile where the targets are at stake and put the results in the report: a
    /// system-wide perf profile of UDP churn with the detector, a perf profile of its start-up
    /// with the full state, a valgrind (dhat) heap profile of its state (at 64k flows). On by
    /// default in full mode when perf/valgrind are installed; `--quick --profile` adds them.
    #[arg(long)]
    pub profile: bool,
    /// No profiles (a full run is then about a minute shorter).
    #[arg(long, conflicts_with = "profile")]
    pub no_profile: bool,
    /// Run only these parts (comma-separated: overhead, completeness, latency, memory); the
    /// report then has only their figures.
    #[arg(long, value_delimiter = ',', value_name = "PARTS")]
    pub only: Vec<String>,
    /// Flows (kernel entries and agent-map keys) for the memory part (default 524288, NPA's
    /// map size).
    #[arg(long, value_name = "N")]
    pub flows: Option<u64>,
    /// Run the memory part's loaded detector under this command (e.g. `valgrind
    /// --tool=dhat`), to see what its memory is made of; its times are then not meaningful.
    #[arg(long, value_name = "CMD")]
    pub memory_wrap: Option<String>,
}

/// How long and how often, by mode.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub phase_s: f64,
    pub reps: usize,
    pub step_s: f64,
    /// Conntrack events per second (NEW + DESTROY) asked of the generator; None: as fast as
    /// it can.
    pub steps: Vec<Option<f64>>,
    pub lab_ports: u16,
    pub lab_cycles: u32,
    pub flows: u64,
    pub ready_reps: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                mode: "quick",
                phase_s: 2.0,
                reps: 1,
                step_s: 2.0,
                steps: vec![Some(5e3), Some(50e3), None],
                lab_ports: 16,
                lab_cycles: 2,
                flows: 524_288,
                ready_reps: 1,
            }
        } else {
            Plan {
                mode: "full",
                phase_s: 3.0,
                reps: 3,
                step_s: 3.0,
                steps: vec![
                    Some(2e3),
                    Some(5e3),
                    Some(10e3),
                    Some(20e3),
                    Some(50e3),
                    Some(100e3),
                    Some(200e3),
                    None,
                ],
                lab_ports: 64,
                lab_cycles: 4,
                flows: 524_288,
                ready_reps: 3,
            }
        }
    }
}

/// Everything measured; serialized as bench.json.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub machine: Value,
    pub plan: Value,
    pub backends: Vec<String>,
    pub overhead: Vec<Workload>,
    pub completeness: Vec<Step>,
    pub latency: Option<Latency>,
    pub memory: Option<Memory>,
    pub profiles: Vec<Profile>,
    pub load: Vec<(String, String)>,
    pub wall_s: f64,
}

/// One workload's throughput under each observer, repetitions interleaved.
#[derive(Debug, Default, Serialize)]
pub struct Workload {
    pub name: String,
    pub unit: String,
    pub configs: Vec<Config>,
}

#[derive(Debug, Default, Serialize)]
pub struct Config {
    pub name: String,
    pub runs: Vec<Count>,
    /// The observer process's CPU time (user + system) per operation, per run, ns.
    pub observer_cpu_ns_per_op: Vec<f64>,
    /// Run time of the detector's BPF programs per operation, per run, ns
    /// (kernel.bpf_stats_enabled).
    pub bpf_ns_per_op: Vec<f64>,
    /// BPF program runs per operation, per run.
    pub bpf_runs_per_op: Vec<f64>,
    pub median_rate: f64,
    /// Median rate over the baseline's median.
    pub ratio: f64,
}

/// One rate step of the completeness test, for one observer.
#[derive(Debug, Default, Serialize)]
pub struct Step {
    pub observer: String,
    /// Events per second asked (None: unlimited).
    pub target_events_per_s: Option<f64>,
    pub flows: Count,
    /// NEW + DESTROY per second generated: 2 x flows / s.
    pub events_per_s: f64,
    pub expected_new: u64,
    pub expected_destroy: u64,
    pub delivered_new: u64,
    pub delivered_destroy: u64,
    /// What the observer itself says it lost: the detector's kernel counters (ring buffer
    /// full, dedupe table full), `conntrack -E`'s ENOBUFS warnings.
    pub reported_lost: u64,
    pub missing: u64,
    /// The kernel's own per-namespace counters over the step (insert_failed, drop, ...).
    pub kernel_stats: std::collections::BTreeMap<String, u64>,
    pub drain_s: f64,
    /// Entries the gc had not reaped after 5 s, flushed (a burst of DESTROYs).
    pub flushed: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub samples: Vec<u64>,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub cycles: u64,
    pub port_reuses: u64,
    pub wrongful_deletes: u64,
    pub verdicts: u64,
    pub events_lost: u64,
    pub watermark_ms: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Memory {
    pub flows_target: u64,
    pub kernel_entries: u64,
    pub map_keys: u64,
    pub idle_rss: u64,
    pub idle_hwm: u64,
    pub idle_ready_s: f64,
    pub rss: u64,
    pub hwm: u64,
    pub ready_s: Vec<f64>,
    pub ready_median_s: f64,
    pub user_bytes_per_flow: f64,
    pub kernel_map_bytes: u64,
    pub kernel_maps: usize,
    pub kernel_map_bytes_idle: u64,
    pub fill_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Profile {
    pub what: String,
    pub top: Vec<String>,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench creates network namespaces and loads BPF programs: run it as root");
    }
    let t0 = Instant::now();
    sys::install_signal_handlers();
    // Held to the end: with it, a state file or namespace of a bench is a leftover of a dead
    // one, never of one that is running.
    let _lock = sys::BenchLock::acquire(Duration::from_secs(20 * 60))?;
    sys::restore_leftover_sysctls();
    sys::remove_leftovers();
    sys::unmount_leftovers();
    let root = crate::root();
    let mut plan = Plan::new(args.quick);
    if let Some(n) = args.flows {
        if !(1024..=1 << 20).contains(&n) {
            bail!("--flows {n}: use 1024 to 1048576");
        }
        plan.flows = n;
    }
    let detector = match &args.detector {
        Some(p) => p.clone(),
        None => {
            crate::run(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "detector",
            ]))?;
            root.join("target/release/detector")
        }
    };
    if !detector.exists() {
        bail!("{}: no detector binary there", detector.display());
    }
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    let mut res = Results {
        machine: report::machine(&root),
        plan: serde_json::to_value(&plan)?,
        ..Default::default()
    };
    res.backends = backends(&detector)?;
    eprintln!(
        "bench ({} mode): backends that load here: {}",
        plan.mode,
        res.backends.join(", ")
    );
    let mut b = Bench {
        detector,
        work,
        plan,
        res,
        wrap: args.memory_wrap.clone(),
        profile: args.profile || (!args.quick && !args.no_profile),
    };
    // Room for the 512k case plus the churn phases' entries (global; restored on drop).
    let _max = sys::set_sysctl("/proc/sys/net/netfilter/nf_conntrack_max", "1048576")?;
    // BPF programs' run time and count in fdinfo: the detector's kernel-side cost per
    // operation, a figure the machine's other load does not distort.
    let _stats = sys::set_sysctl("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let fs = sys::mount_bpffs()?;
    let topo = Topology::create("a")?;
    let small = fs.dir.join("small_map");
    let _small = bpfmap::AgentMap::create(&small, 4096)?;
    for part in &args.only {
        if !["overhead", "completeness", "latency", "memory"].contains(&part.as_str()) {
            bail!("--only {part}: not a part; use overhead, completeness, latency or memory");
        }
    }
    let wanted = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    b.load("start");
    if wanted("overhead") {
        b.overhead(&topo, &small)?;
        b.load("after overhead");
    }
    if wanted("completeness") {
        b.completeness(&topo)?;
        b.load("after completeness");
    }
    if wanted("latency") {
        b.latency()?;
        b.load("after latency");
    }
    if wanted("memory") {
        b.memory(&topo, &fs)?;
        b.load("after memory");
    }
    drop(topo);
    b.res.wall_s = t0.elapsed().as_secs_f64();
    let out = args.out_dir.clone();
    let (md, json) = match &out {
        Some(d) => (d.join("BENCHMARKS.md"), d.join("bench.json")),
        None => (
            root.join("BENCHMARKS.md"),
            root.join("benchmarks/bench.json"),
        ),
    };
    if let Some(p) = json.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&b.res)?)?;
    let text = report::markdown(&b.res, &b.plan);
    std::fs::write(&md, &text)?;
    println!("{text}");
    eprintln!(
        "bench: wrote {} and {} in {:.0} s",
        md.display(),
        json.display(),
        b.res.wall_s
    );
    Ok(())
}

/// The backends whose programs load here, most precise first (`detector doctor --json`).
fn backends(detector: &Path) -> Result<Vec<String>> {
    let out = Command::new(detector)
        .args(["doctor", "--json"])
        .output()
        .context("running detector doctor")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "detector doctor --json printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let list: Vec<String> = v["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|b| b["supported"].as_bool() == Some(true) || b["ok"] == true)
                .filter_map(|b| b["backend"].as_str().or(b["name"].as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        bail!("detector doctor: no backend loads on this kernel: {v}");
    }
    Ok(list)
}

struct Bench {
    detector: PathBuf,
    work: PathBuf,
    plan: Plan,
    res: Results,
    wrap: Option<String>,
    profile: bool,
}

/// What watches conntrack during a measurement.
#[derive(Debug, Clone)]
enum Observer {
    None,
    /// `detector run` (the product) on a backend.
    Run(String),
    /// `detector trace` (the event stream alone, for counting) on a backend.
    Trace(String),
    Conntrack,
}

impl Observer {
    fn name(&self) -> String {
        match self {
            Observer::None => "no observer".into(),
            Observer::Run(b) => format!("detector run ({b})"),
            Observer::Trace(b) => format!("detector trace ({b})"),
            Observer::Conntrack => "conntrack -E".into(),
        }
    }
}

/// A running observer.
struct Running {
    proc: Option<Proc>,
    stdout: Option<std::thread::JoinHandle<(u64, u64)>>,
    stderr: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// What an observer delivered.
#[derive(Debug, Default)]
struct Delivered {
    new: u64,
    destroy: u64,
    lost: u64,
}

impl Bench {
    fn load(&mut self, when: &str) {
        let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let l = l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        eprintln!("bench: load average {when}: {l}");
        self.res.load.push((when.to_string(), l));
    }

    fn detector_cmd(&self, sub: &str, srv: &Path, backend: &str, max_entries: u32) -> Command {
        let mut c = Command::new(&self.detector);
        c.arg(sub)
            .args(["--backend", backend, "--max-entries"])
            .arg(max_entries.to_string())
            .arg("--netns")
            .arg(srv);
        c
    }

    fn start(&self, obs: &Observer, srv: &Path, map: &Path) -> Result<Running> {
        let traces = self.work.join("traces");
        let (mut cmd, ready) = match obs {
            Observer::None => {
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
            sys::wait_line(err, move |l| l.contains(ready), Duration::from_secs(60))
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

    fn stop(&self, mut r: Running) -> Result<(Delivered, Vec<String>)> {
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

    /// Overhead: each workload under each observer, repetitions interleaved so that drift in
    /// the machine's load spreads over all configurations alike.
    fn overhead(&mut self, topo: &Topology, map: &Path) -> Result<()> {
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
                    let cost0 = pid.map(cost).transpose()?;
                    let c = match name {
                        "TCP connection churn" => load::tcp_churn(&cli, dst, 8, dur)?,
                        "UDP new flows" => udp.run(2, dur, None, None)?,
                        _ => load::slab_frees(&cli, 2, dur)?,
                    };
                    let cost1 = pid.map(cost).transpose()?;
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
                        cfg.observer_cpu_ns_per_op.push(per(b.0 - a.0));
                        if matches!(o, Observer::Run(_)) {
                            cfg.bpf_ns_per_op.push(per(b.1 - a.1));
                            cfg.bpf_runs_per_op.push(per(b.2 - a.2));
                        }
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
            }
        }
        topo.flush()?;
        Ok(())
    }

    /// Completeness: for each rate step and each observer (alone), flows are generated at the
    /// rate, then left to expire and be reaped (1 s UDP timeout in the bench namespace), so
    /// every flow is one NEW and one DESTROY; what each observer delivered is compared.
    fn completeness(&mut self, topo: &Topology) -> Result<()> {
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

    /// Verdict latency from the lab: every wrongful delete's verdict, delete (kernel time) to
    /// emission.
    fn latency(&mut self) -> Result<()> {
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

    fn latency_once(&mut self) -> Result<()> {
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

    /// Memory and start-up with 512k kernel entries and a 512k-key agent map, against an idle
    /// detector (empty table, small map) with the same table sizes.
    fn memory(&mut self, idle_topo: &Topology, fs: &Bpffs) -> Result<()> {
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
    fn heap_profile(&mut self, fs: &Bpffs) -> Result<()> {
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
    fn sample(
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

/// An observer's CPU time, its BPF programs' run time and run count so far.
fn cost(pid: u32) -> Result<(u64, u64, u64)> {
    let cpu = sys::proc_cpu_ns(pid)?;
    let (ns, cnt) = sys::bpf_prog_stats(pid)?;
    Ok((cpu, ns, cnt))
}

fn read_all(r: impl std::io::Read) -> Vec<String> {
    use std::io::BufRead;
    std::io::BufReader::new(r)
        .lines()
        .map_while(Result::ok)
        .collect()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether a profiling tool is installed.
fn tool_ok(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The top lines of a perf recording by self time, sorted by `sort` (comm, dso, sym...).
fn perf_top(data: &Path, sort: &str, n: usize) -> Result<Vec<String>> {
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", sort, "-i"])
        .arg(data)
        .output()
        .context("perf report")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('%'))
        .take(n)
        .map(|l| {
            let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
            // Rust symbols can be very long; the start says enough.
            l.chars().take(160).collect()
        })
        .collect())
}

/// Creates and pins, at `path`, an NPA-layout agent map of `max_entries` holding the keys of
/// the generator's first `n` UDP flows (client to server), as NPA's datapath would have them.
fn agent_map_of_udp_flows(path: &Path, max_entries: u32, n: u64) -> Result<bpfmap::AgentMap> {
    let am = bpfmap::AgentMap::create(path, max_entries)?;
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (sys::CLI_IP.parse()?, sys::SRV_IP.parse()?);
    let keys: Vec<[u8; bpfmap::KEY_SIZE]> = (0..n)
        .map(|i| {
            let (sport, dport) = load::udp_flow(i);
            bpfmap::key(src.octets(), sport, dst.octets(), dport, 2)
        })
        .collect();
    am.fill(&keys, monotonic_ns())?;
    Ok(am)
}
