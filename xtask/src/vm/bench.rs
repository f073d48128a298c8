//! `cargo xtask vm-bench`: the bench's overhead part in a Debian guest, where the kprobe
//! backend loads next to the tracepoint one (the host kernel has no kprobes), so their costs
//! are measured side by side on one kernel.
//!
//! The guest is vm-test's (same kernel, base initramfs and qemu setup); its payload is the
//! detector and xtask itself, built static for musl, and `bench.sh` as its run script, which
//! runs `xtask bench --only overhead` and sends bench.json back over the results port
//! (`transport`). The host stores it, with the guest's description, as
//! benchmarks/bench-guest.json; `cargo xtask bench` renders it into BENCHMARKS.md.
//!
//! Under TCG every instruction is emulated, so the absolute figures are many times the native
//! ones; the runs per operation and the ratios between backends are what the guest measures.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::guests::{GuestArch, guest_by_label};
use super::initramfs::{bench_payload, musl_cargo};
use super::{GUEST_MEMORY, boot_one, done, images, step, transport};

/// What the guest run takes at most unless `--timeout` says (qemu start to power-off). The
/// bench's full-mode overhead part takes about 4 minutes there under TCG (the measured seconds,
/// and a detector start-up per configuration); the margin is for a busy host.
const TIMEOUT_S: u64 = 1800;

/// Runs the bench in the guest `label` and writes its results to `out` (default:
/// benchmarks/bench-guest.json); returns the stored document.
pub fn vm_bench(
    root: &Path,
    label: &str,
    timeout: Option<Duration>,
    out: Option<PathBuf>,
) -> Result<Value> {
    let spec = guest_by_label(label)?;
    let t_prep = Instant::now();
    let (k, mut initrd, work) = images(spec, "bench")?;
    let t = step(&format!(
        "building the detector and xtask for {} (static)",
        spec.arch.musl
    ));
    let detector = build(
        root,
        spec.arch,
        &["-p", "detector", "--bin", "detector"],
        "detector",
    )?;
    let xtask = build(root, spec.arch, &["-p", "xtask", "--bin", "xtask"], "xtask")?;
    done(t, "built");
    initrd.extend(bench_payload(&detector, &xtask, &work, spec.arch)?);
    let initrd_path = work.join("initrd.cpio");
    fs::write(&initrd_path, &initrd)?;
    let prepare = t_prep.elapsed();
    let timeout = timeout.unwrap_or(Duration::from_secs(TIMEOUT_S));
    let (b, accel) = boot_one(spec, &k, &initrd_path, &work, timeout)?;
    let rc = b
        .results
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("BENCH-RC "))
        .unwrap_or("missing");
    if rc != "0" {
        println!(
            "----- guest console -----\n{}\n----- end of console -----",
            b.console
        );
        bail!("the bench in the guest failed (BENCH-RC {rc}); its console is above");
    }
    let results: Value = serde_json::from_slice(&transport::decode(&b.results)?)
        .context("the guest's bench.json is not JSON")?;
    // The guest has no checkout: the commit measured is the host's, as it was built here.
    let host = crate::bench::machine(root);
    let doc = json!({
        "guest": {
            "label": spec.label,
            "kernel": k.release,
            "accel": accel,
            "vcpus": 2,
            "memory": GUEST_MEMORY,
            "commit": host["commit"],
            "date": host["date"],
            "boot_to_end_s": (b.elapsed.as_secs_f64() * 10.0).round() / 10.0,
            "prepare_s": (prepare.as_secs_f64() * 10.0).round() / 10.0,
        },
        "results": results,
    });
    let path = out.unwrap_or_else(|| root.join("benchmarks/bench-guest.json"));
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(&path, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!(
        "vm-bench: wrote {} (guest {} s under {accel}, build and images {:.0} s)",
        path.display(),
        b.elapsed.as_secs(),
        prepare.as_secs_f64()
    );
    Ok(doc)
}

/// Builds one binary for the guest's musl target; its path, as cargo reports it.
fn build(root: &Path, arch: &GuestArch, what: &[&str], name: &str) -> Result<PathBuf> {
    let mut cmd: Command = musl_cargo(root, arch);
    cmd.args(["build", "--release", "--target", arch.musl])
        .args(what)
        .arg("--message-format=json-render-diagnostics");
    let out = cmd.output().context("starting cargo")?;
    if !out.status.success() {
        bail!(
            "building {name} for {} failed (is the target installed? scripts/setup.sh adds it)",
            arch.musl
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no {name} executable"))
}
