//! One lab run: the race reproduced and caught on one machine.
//!
//! A node namespace with conntrack, a client and a server pod, the emulated agent (datapath
//! and cleanup in the chosen mode), the tuner, the reproducer, and the detector itself (this
//! binary's `run`, as a child process, exactly as a user runs it). Each cycle: the client's
//! connections idle past the kernel's timeout; the cleanup dumps the kernel table (reaping the
//! expired entries); the client reuses its ports with a request answered late; the cleanup
//! deletes the keys of flows missing from its dump, which are live again by then.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::kernel::caps;
use crate::lab::agent::{Cleanup, CleanupMode, GroundTruth};
use crate::lab::datapath::Datapath;
use crate::lab::reproducer::{Client, ReproStats, start_server};
use crate::lab::topology::{self, CLIENT_IP, SERVER_IP, Topology};
use crate::npa::Layout;

/// What a lab run does (the `lab` and `validate` command lines, without clap).
#[derive(Debug, Clone)]
pub struct LabSettings {
    pub mode: CleanupMode,
    pub ports: u16,
    pub idle_ports: u16,
    /// Ports whose connection is reset (TCP CLOSE) between the cleanup's dump and its deletes.
    pub reset_ports: u16,
    pub cycles: u32,
    pub timeout: u32,
    pub delay_ms: u64,
    pub period_ms: Option<u64>,
    pub layout: Layout,
    pub trace_dir: PathBuf,
    pub json: bool,
    pub listen: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Where to keep the detector's NDJSON stream as it came (for `detector replay`).
    pub record: Option<PathBuf>,
}

const SERVER_PORT: u16 = 8080;

/// Set by SIGINT/SIGTERM: the lab stops after the current step and cleans up.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Sleeps, waking early when the lab is asked to stop.
fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !stopping() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}
const FIRST_PORT: u16 = 42_000;

/// What one lab run found.
#[derive(Debug, serde::Serialize)]
pub struct LabReport {
    pub mode: CleanupMode,
    pub cycles: u32,
    pub reproducer: ReproStats,
    pub cleanup_deletes: usize,
    pub wrongful_deletes: usize,
    pub verdicts: Vec<Value>,
    pub races_by_class: serde_json::Map<String, Value>,
    /// Deletes of keys whose connection had already closed (TCP CLOSE/TIME_WAIT): not races.
    pub closed_flow_deletes: Vec<Value>,
    /// Races whose flow then had a packet denied, and races whose window closed without one.
    pub races_confirmed: usize,
    pub races_unconfirmed: usize,
    pub events_lost: u64,
    pub ground_truth: Vec<GroundTruth>,
    pub seconds: f64,
}

/// Runs the lab: sets up the namespaces, the emulated agent and the detector, runs the cycles,
/// and tears everything down.
pub fn run_lab(args: &LabSettings) -> Result<LabReport> {
    if !caps::can_load_bpf(caps::effective_caps()) {
        bail!("the lab creates namespaces and loads BPF programs: run it as root");
    }
    // Ctrl-C and SIGTERM end the lab cleanly (the detector child gets Ctrl-C too and writes
    // its summary); without this the namespaces would outlive the process.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let layout = args.layout;
    let t0 = Instant::now();
    // The pid: unique among running labs, and `--cleanup` can tell a live lab from a dead one.
    let id = std::process::id().to_string();
    let work = WorkDir(std::env::temp_dir().join(format!("detector-lab-{id}")));
    let mut topo = Topology::create(&id).context("building the lab's namespaces")?;
    topo.tune(args.timeout)?;
    if args.reset_ports > 0 {
        topo.tune_close(args.timeout)?;
    }
    let dp = Datapath::attach(&topo.node, &work.0, layout, SERVER_PORT)?;
    let node = topology::netns_path(&topo.node);
    start_server(
        &topology::netns_path(&topo.server),
        std::net::SocketAddrV4::new(SERVER_IP.parse()?, SERVER_PORT),
    )?;

    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--json",
        "--watermark-ms",
        "2",
        "--trace-after",
        "1.5",
    ])
    .arg("--map-pin")
    .arg(&dp.pin)
    .arg("--map-name")
    .arg(if layout.key == crate::npa::KeyLayout::V4 {
        "LAB_CT20"
    } else {
        "LAB_CT24"
    })
    .arg("--netns")
    .arg(&node)
    .arg("--trace-dir")
    .arg(&args.trace_dir)
    // The lab is not in a cluster, whatever the environment says.
    .args(["--kube", "off"]);
    if let Some(l) = &args.listen {
        cmd.arg("--listen").arg(l);
    }
    if let Some(t) = &args.token_file {
        cmd.arg("--token-file").arg(t);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // The detector must not outlive the lab, even one that is killed.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut det = cmd.spawn().context("starting the detector")?;
    let guard = KillOnDrop(det.id());
    // Wait until its probes are attached, showing its own start-up lines.
    let mut err = BufReader::new(det.stderr.take().context("detector stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("the detector exited before it was ready");
        }
        crate::note!("{}", line.trim_end_matches('\n'));
        if line.contains("watching map") {
            break;
        }
    }
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            crate::note!("{l}");
        }
    });
    let mut out = det.stdout.take().context("detector stdout")?;
    // A burst of deletes makes a burst of verdict lines (a few KiB each) and kernel records:
    // with the pipe's default 64 KiB the detector would wait on its stdout for this reader,
    // which parses the verdicts, and its later verdicts would come out late by that wait. A
    // node's log collector is not a pipe this small; 1 MiB is the unprivileged maximum.
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor this function owns; failure only leaves the
    // default size.
    if unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) } < 0 {
        tracing::debug!(
            "could not enlarge the detector's stdout pipe: {}",
            std::io::Error::last_os_error()
        );
    }
    // Races are shown as they are found (on stderr when stdout carries the JSON report).
    let json_out = args.json;
    let mut recording = match &args.record {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("creating the recording {}", p.display()))?,
        )),
        None => None,
    };
    let reader = std::thread::spawn(move || {
        let mut events = Vec::new();
        for line in BufReader::new(&mut out).lines().map_while(Result::ok) {
            if let Some(r) = recording.as_mut() {
                // Best effort: a full disk must not stop the lab.
                let _ = writeln!(r, "{line}");
            }
            // The report reads only these lines: parsing every kernel record of a burst as
            // well would take the CPU the detector under test needs (a lab node has few).
            if !REPORTED_TYPES.iter().any(|t| line.contains(t)) {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["type"] == "verdict" {
                let l = race_line(&v);
                if json_out {
                    crate::note!("{l}");
                } else {
                    println!("{l}");
                }
            }
            events.push(v);
        }
        events
    });

    let ports: Vec<u16> = (0..args.ports).map(|i| FIRST_PORT + i).collect();
    let mut client = Client::new(
        &topology::netns_path(&topo.client),
        CLIENT_IP.parse()?,
        std::net::SocketAddrV4::new(SERVER_IP.parse()?, SERVER_PORT),
        ports,
    );
    let mut cleanup = Cleanup::new(args.mode, &dp.pin, layout, &node)?;
    let period = args.period_ms.map_or(
        Duration::from_secs(u64::from(args.timeout)) + Duration::from_millis(700),
        Duration::from_millis,
    );
    let mut cycles = 0;
    client.reuse_all(false)?;
    // Idle ports: connected once, then silent for good; their keys are deleted rightfully.
    let mut idle = Client::new(
        &topology::netns_path(&topo.client),
        CLIENT_IP.parse()?,
        std::net::SocketAddrV4::new(SERVER_IP.parse()?, SERVER_PORT),
        (0..args.idle_ports)
            .map(|i| FIRST_PORT + args.ports + i)
            .collect(),
    );
    idle.reuse_all(false)?;
    // Reset ports: each cycle a new connection from the port makes one exchange and is reset
    // before the cleanup deletes the port's key: the key of a closed flow, which carries no
    // packet any more (a closed-flow delete, not a race).
    let mut resets = Client::new(
        &topology::netns_path(&topo.client),
        CLIENT_IP.parse()?,
        std::net::SocketAddrV4::new(SERVER_IP.parse()?, SERVER_PORT),
        (0..args.reset_ports)
            .map(|i| FIRST_PORT + args.ports + args.idle_ports + i)
            .collect(),
    );
    resets.reuse_all(false)?;
    resets.reset_all();
    for cycle in 0..args.cycles {
        // Idle past the timeout: the kernel entries expire, the map keeps the keys.
        nap(period);
        if stopping() {
            crate::note!("detector lab: stopping early");
            break;
        }
        let pending = cleanup.dump_phase()?;
        client.reuse_all(true)?;
        resets.reuse_all(false)?;
        resets.reset_all();
        nap(Duration::from_millis(args.delay_ms));
        let n = cleanup.delete_phase(pending)?;
        client.collect();
        cycles += 1;
        crate::note!(
            "detector lab: cycle {}/{}: {n} deletes, {} wrongful so far, {} failed requests so far",
            cycle + 1,
            args.cycles,
            cleanup.wrongful(),
            client.stats.failed
        );
    }
    // Let the last traces close, then stop the detector as Ctrl-C would.
    nap(Duration::from_millis(2000));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(det.id() as i32, libc::SIGINT) };
    let status = det.wait()?;
    std::mem::forget(guard);
    let events = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    if !status.success() {
        bail!("the detector failed: {status}");
    }
    let verdicts: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "verdict")
        .cloned()
        .collect();
    let mut by_class = serde_json::Map::new();
    for v in &verdicts {
        let c = v["verdict"]["class"].as_str().unwrap_or("?").to_string();
        let n = by_class.get(&c).and_then(Value::as_u64).unwrap_or(0) + 1;
        by_class.insert(c, json!(n));
    }
    let of_type = |t: &'static str| events.iter().filter(move |e| e["type"] == t);
    let closed_flow_deletes: Vec<Value> = of_type("closed_flow_delete").cloned().collect();
    let races_confirmed = of_type("race_confirmed").count();
    let races_unconfirmed = of_type("race_unconfirmed").count();
    let summary = events.iter().find(|e| e["type"] == "summary");
    let events_lost = summary
        .and_then(|s| s["kernel"]["lost"].as_array())
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let report = LabReport {
        mode: args.mode,
        cycles,
        reproducer: client.stats.clone(),
        cleanup_deletes: cleanup.log.len(),
        wrongful_deletes: cleanup.wrongful(),
        verdicts,
        races_by_class: by_class,
        closed_flow_deletes,
        races_confirmed,
        races_unconfirmed,
        events_lost,
        ground_truth: cleanup.log.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    drop(client);
    drop(idle);
    drop(resets);
    drop(dp);
    for e in topo.destroy() {
        tracing::warn!("lab cleanup: {e}");
    }
    Ok(report)
}

/// The detector's NDJSON lines the lab's report is made of, as their `type` field reads in
/// compact JSON.
const REPORTED_TYPES: [&str; 5] = [
    r#""type":"verdict""#,
    r#""type":"closed_flow_delete""#,
    r#""type":"race_confirmed""#,
    r#""type":"race_unconfirmed""#,
    r#""type":"summary""#,
];

/// One line per race from the detector's NDJSON verdict.
fn race_line(v: &Value) -> String {
    let d = &v["verdict"];
    let k = &d["key"];
    let ms = |x: &Value| {
        x.as_f64()
            .map_or("?".into(), |n| format!("{:.3} ms", n / 1e6))
    };
    let i = &d["instants"];
    let reaper = match i["reaped_by"]["by"].as_str() {
        Some("agent") => "the agent".to_string(),
        Some("gc_worker") => "the gc worker".to_string(),
        Some("softirq") => "softirq".to_string(),
        Some(_) => i["reaped_by"]["comm"].as_str().unwrap_or("?").to_string(),
        None => "?".to_string(),
    };
    format!(
        "{} RACE {}  {}:{} -> {}:{}  key deleted by {}/{} {} after the new entry's birth \
         (previous entry expired {} before {reaper} reaped it, {} before the reuse; \
         detected {} after the delete)",
        v["time"]
            .as_str()
            .and_then(|t| t.get(11..26))
            .unwrap_or("?"),
        d["class"].as_str().unwrap_or("?"),
        k["src"].as_str().unwrap_or("?"),
        k["sport"],
        k["dst"].as_str().unwrap_or("?"),
        k["dport"],
        d["agent"]["comm"].as_str().unwrap_or("?"),
        d["agent"]["pid"],
        ms(&d["delete_lag_ns"]),
        ms(&i["expiry_to_reap_ns"]),
        ms(&i["reap_to_reuse_ns"]),
        ms(&v["detection_latency_ns"]),
    )
}

/// The lab's temporary directory, removed whatever way the lab ends (declared before the
/// topology and the datapath, it is dropped after them).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops the detector child if the lab fails midway.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}
