//! Project tasks: `cargo xtask <task>`.

mod bench;
mod deploy;
mod fuzz;
mod util;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use util::{root, run};

#[derive(Parser)]
#[command(name = "xtask", about = "detector's build and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install toolchains, bpf-linker and Debian packages (runs scripts/setup.sh).
    Setup,
    /// Build the eBPF object (release, with BTF) and print where it was written.
    BuildEbpf,
    /// Build everything and run every test: unit tests, and the privileged integration tests
    /// (real kernel, real BPF programs, TCP in network namespaces the tests create). Needs root.
    Test {
        /// Skip the Debian guest stage (`vm-test`) for a quick local run.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Validate deploy/'s manifests: Kubernetes schema (kubernetes-validate, cached venv),
    /// kustomizations, and every `detector` flag they pass against the binary's --help.
    ValidateManifests {
        /// The detector binary to check the flags against (default: a fresh debug build).
        #[arg(long, value_name = "PATH")]
        detector: Option<PathBuf>,
    },
    /// Run deploy/'s script tests (tuner/reset script, reproducer) in network namespaces.
    DeployTest {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Build the static (musl) detector binary and, with buildah, a FROM-scratch OCI archive.
    Image,
    /// Run the end-to-end checks for every backend in Debian guests under qemu, one per
    /// (kernel, arch) of the matrix: 6.1 and 6.12 amd64, 6.1 arm64 (kprobe and fentry need a
    /// kernel that has them), and the host's run of the same tests. Needs root.
    VmTest {
        /// Give up on each guest after this many seconds (default: each guest's own).
        #[arg(long)]
        timeout: Option<u64>,
        /// Only this guest (repeatable), by its column name, e.g. `--guest "6.1 arm64"`.
        #[arg(long = "guest", value_name = "LABEL")]
        guests: Vec<String>,
        /// Skip the host's run of the same tests (its column says `not run`).
        #[arg(long)]
        no_host: bool,
    },
    /// Run the bench's overhead part in a Debian guest under qemu, on every backend that loads
    /// there (kprobe and tracepoint side by side; the host has no kprobes), and store its
    /// results as benchmarks/bench-guest.json for BENCHMARKS.md. About 5 minutes under TCG.
    VmBench {
        /// The guest, by its vm-test column name.
        #[arg(long, value_name = "LABEL", default_value = "6.1 amd64")]
        guest: String,
        /// Give up on the guest after this many seconds (default 1800).
        #[arg(long)]
        timeout: Option<u64>,
        /// Where to write the results (default: benchmarks/bench-guest.json).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// In a vm-bench guest: print a file as the lines that carry it over the results port.
    #[command(hide = true)]
    VmSend { file: PathBuf },
    /// Measure overhead, event completeness, verdict latency and memory side by side, in
    /// namespaces it creates; writes BENCHMARKS.md and benchmarks/bench.json. Needs root.
    Bench(bench::BenchArgs),
    /// Run each cargo-fuzz target in fuzz/ for a few seconds from its committed seeds.
    Fuzz(fuzz::FuzzArgs),
}

/// The path of the eBPF object that `build_ebpf` writes (detector/build.rs uses the same).
fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/detector-ebpf")
}

/// The lab's object, built beside it (the eBPF crate's second binary).
fn lab_ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/detector-lab-ebpf")
}

fn build_ebpf() -> Result<PathBuf> {
    let root = root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("detector-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(root.join("target/ebpf"));
    // Let detector-ebpf/rust-toolchain.toml pick the nightly, not this process's toolchain.
    // The objects are for this host's architecture (kprobe argument registers; see
    // detector/build.rs): aarch64 ones come from `cargo build --target aarch64-...`.
    cmd.env("AYA_BPF_TARGET_ARCH", std::env::consts::ARCH);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd).context(
        "building the eBPF object (needs the pinned nightly with rust-src and bpf-linker: \
         run scripts/setup.sh)",
    )?;
    for (what, obj) in [
        ("eBPF object", ebpf_object()),
        ("lab eBPF object", lab_ebpf_object()),
    ] {
        let size = std::fs::metadata(&obj)
            .with_context(|| format!("the build did not produce {}", obj.display()))?
            .len();
        println!(
            "{what}: {} ({} KiB)",
            obj.strip_prefix(&root).unwrap_or(&obj).display(),
            size / 1024
        );
    }
    Ok(ebpf_object())
}

fn test(args: &[String], no_vm: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "the integration tests load BPF programs and create network namespaces: \
             run `cargo xtask test` as root (e.g. `sudo -E cargo xtask test`)"
        );
    }
    let t0 = Instant::now();
    build_ebpf()?;
    let root = root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))
    .context("code is not formatted: run `cargo fmt --all`")?;
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let (mut passed, mut failed, names) = cargo_test(&root, args)?;
    // deploy/: manifest validation and the tuner/reproducer script tests.
    let (p, f) = deploy::test_stages()?;
    passed += p;
    failed += f;
    // The committed corpus through each target's body in the plain build (the test above), then
    // a few seconds of libFuzzer per target in the quick fuzz build.
    if let Err(e) = fuzz::corpus_counts(&root) {
        println!("fuzz corpus FAILED: {e:#}");
        failed += 1;
    }
    let t = Instant::now();
    let (p, f) = fuzz::test_stage();
    println!("fuzz: {:.0} s", t.elapsed().as_secs_f64());
    passed += p;
    failed += f;
    if !no_vm {
        // The host half of the backend table is this run's results (the same tests).
        let t = Instant::now();
        let in_test: Vec<String> = vm::GUESTS
            .iter()
            .filter(|g| g.in_test)
            .map(|g| g.label.to_string())
            .collect();
        let (p, f) = vm::guests(&root, &in_test, None)
            .and_then(|g| vm::report(&g, &vm::host(&root, &names, args.is_empty())?))
            .unwrap_or_else(|e| {
                println!("vm-test FAILED: {e:#}");
                (0, 1)
            });
        println!("vm-test: {:.0} s", t.elapsed().as_secs_f64());
        passed += p;
        failed += f;
    }
    println!("xtask test: {:.0} s", t0.elapsed().as_secs_f64());
    // One closing line for the whole run, whatever the number of test binaries.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// Runs `cargo test --workspace`, echoing its output, and sums its per-binary results.
fn cargo_test(
    root: &Path,
    args: &[String],
) -> Result<(u64, u64, std::collections::HashSet<String>)> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("cargo")
        .current_dir(root)
        .env("DETECTOR_REQUIRE_PRIVILEGED", "1")
        // scripts/setup.sh installs chromium: the picture test must not skip.
        .env("DETECTOR_REQUIRE_CHROMIUM", "1")
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut names = std::collections::HashSet::new();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        names.extend(vm::passed_tests(&line));
        // test result: ok. 64 passed; 0 failed; 0 ignored; ...
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                match (label, n.parse::<u64>()) {
                    ("passed", Ok(n)) => passed += n,
                    ("failed", Ok(n)) => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed with {status} (a build error?)");
    }
    Ok((passed, failed, names))
}

/// `cargo xtask vm-test`: the guest's table and the host's, from a run of the same tests.
fn vm_test(timeout: Option<u64>, guests: &[String], no_host: bool) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("vm-test runs the privileged tests on the host too: run it as root");
    }
    let root = root();
    build_ebpf()?;
    let timeout = timeout.map(std::time::Duration::from_secs);
    let (passed, failed) = vm::vm_test(&root, guests, timeout, !no_host)?;
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} vm-test check(s) failed");
    }
    Ok(())
}

/// `cargo xtask vm-bench`: the guest's bench, stored; its section of BENCHMARKS.md printed.
fn vm_bench(guest: &str, timeout: Option<u64>, out: Option<PathBuf>) -> Result<()> {
    let root = root();
    let timeout = timeout.map(std::time::Duration::from_secs);
    let doc = vm::vm_bench(&root, guest, timeout, out)?;
    println!("{}", bench::guest_section(&serde_json::from_value(doc)?));
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => run(Command::new("bash").arg(root().join("scripts/setup.sh"))),
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::ValidateManifests { detector } => {
            let (_, failed) = deploy::validate_manifests(detector.as_deref())?;
            if failed > 0 {
                bail!("{failed} manifest check(s) failed");
            }
            Ok(())
        }
        Task::DeployTest { filter } => {
            let (_, failed) = deploy::script_tests(filter.as_deref())?;
            if failed > 0 {
                bail!("{failed} deploy test(s) failed");
            }
            Ok(())
        }
        Task::Image => deploy::image(),
        Task::Test { args, no_vm } => test(&args, no_vm),
        Task::VmTest {
            timeout,
            guests,
            no_host,
        } => vm_test(timeout, &guests, no_host),
        Task::VmBench {
            guest,
            timeout,
            out,
        } => vm_bench(&guest, timeout, out),
        Task::VmSend { file } => {
            let data =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            print!("{}", vm::encode(&data));
            Ok(())
        }
        Task::Bench(args) => bench::bench(args),
        Task::Fuzz(args) => fuzz::fuzz(&args),
    }
}
