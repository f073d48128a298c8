//! `cargo xtask bench`: the detector's cost and completeness, measured side by side in one run
//! on this machine, in namespaces the bench creates (loopback/veth only), and written as
//! `BENCHMARKS.md` (a table) and `benchmarks/bench.json` (the raw figures).
//!
//! 1. Overhead: TCP connect/reset churn and UDP new flows per second through conntrack,
//!    without the detector, with `detector run` on each backend that loads here, and with
//!    `conntrack -E`; the tracepoint backend's cost on unrelated slab frees, next to an empty
//!    BPF program's on the same tracepoint (the floor of what bpf_stats counts per run).
//! 2. Completeness: the conntrack event rate raised step by step; events generated (the
//!    generator, cross-checked with the kernel's table) against what `detector trace` and
//!    `conntrack -E` delivered.
//! 3. Verdict latency: `detector lab` (ground truth), delete to verdict, p50/p99/max.
//! 4. Memory and start-up: `detector run` on 512k kernel conntrack entries and a 512k-key
//!    agent map, against an idle one.
//!
//! 5. The overhead part again in a Debian guest under qemu (`cargo xtask vm-bench`), where
//!    the kprobe backend loads (full mode only; the report otherwise shows the stored figures).
//!
//! Bounded in time (about 6 minutes plus the guest's 5, `--quick` about 2); everything it creates or changes is
//! undone on exit, on error and on Ctrl-C (and a killed bench is undone by the next one).

mod bpfmap;
mod completeness;
mod floor;
mod latency;
mod load;
mod memory;
mod observer;
mod overhead;
mod profile;
mod report;
mod results;
mod stats;
mod sys;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use sys::Topology;

pub use report::{guest_section, machine};
pub use results::{Config, Latency, Memory, Profile, Results, Step, Workload};

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
    /// Skip the overhead part's run in the Debian guest (`cargo xtask vm-bench`, kprobe and
    /// tracepoint side by side) that full mode does last; the report then shows the stored
    /// guest figures, as quick mode always does.
    #[arg(long)]
    pub no_guest: bool,
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
    // In a vm-bench guest there is neither cargo nor the checkout: the detector is given, and
    // the scratch files go to the temporary directory.
    let target = crate::util::target_dir(&root);
    let detector = match &args.detector {
        Some(p) => p.clone(),
        None => {
            crate::run(Command::new("cargo").current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "detector",
            ]))?;
            target
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?
                .join("release/detector")
        }
    };
    if !detector.exists() {
        bail!("{}: no detector binary there", detector.display());
    }
    let work = match &target {
        Ok(t) => t.join("bench"),
        Err(_) => std::env::temp_dir().join("detector-bench"),
    };
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
    // The file this run replaces (or, for a run written elsewhere, the repository's) gives the
    // "previous run" column.
    let previous = std::fs::read_to_string(&md)
        .or_else(|_| std::fs::read_to_string(root.join("BENCHMARKS.md")))
        .ok();
    // The kprobe backend's cost comes from a guest (the host kernel has no kprobes): full mode
    // runs `cargo xtask vm-bench` last, alone on the machine and with the host's sysctls put
    // back (about 5 minutes under TCG with warm builds); quick mode, `--no-guest` and a guest
    // run that fails leave the stored file, whose section names its own date and commit.
    let guest_json = json.with_file_name("bench-guest.json");
    if b.plan.mode == "full" && wanted("overhead") && !args.no_guest {
        drop(_stats);
        drop(_max);
        if let Err(e) = crate::vm::vm_bench(&root, "6.1 amd64", None, Some(guest_json.clone())) {
            eprintln!("bench: the guest run failed ({e:#}); the report shows the stored figures");
        }
    }
    let guest = [guest_json, root.join("benchmarks/bench-guest.json")]
        .iter()
        .find_map(|p| report::read_guest(p));
    let text = report::with_previous(
        &report::markdown(&b.res, &b.plan, guest.as_ref()),
        previous.as_deref(),
    );
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
