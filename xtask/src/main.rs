//! Project tasks: `cargo xtask <task>`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod bench;

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
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure overhead, event completeness, verdict latency and memory side by side, in
    /// namespaces it creates; writes BENCHMARKS.md and benchmarks/bench.json. Needs root.
    Bench(bench::BenchArgs),
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// The path of the eBPF object that `build_ebpf` writes (detector/build.rs uses the same).
fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/detector-ebpf")
}

fn build_ebpf() -> Result<PathBuf> {
    let root = root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("detector-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(root.join("target/ebpf"));
    // Let detector-ebpf/rust-toolchain.toml pick the nightly, not this process's toolchain.
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
    let obj = ebpf_object();
    let size = std::fs::metadata(&obj)
        .with_context(|| format!("the build did not produce {}", obj.display()))?
        .len();
    Ok(obj).inspect(|o| {
        println!(
            "eBPF object: {} ({} KiB)",
            o.strip_prefix(&root).unwrap_or(o).display(),
            size / 1024
        )
    })
}

fn test(args: &[String]) -> Result<()> {
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
    let (passed, failed) = cargo_test(&root, args)?;
    println!("xtask test: {:.0} s", t0.elapsed().as_secs_f64());
    // One closing line for the whole run, whatever the number of test binaries.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// Runs `cargo test --workspace`, echoing its output, and sums its per-binary results.
fn cargo_test(root: &Path, args: &[String]) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("cargo")
        .current_dir(root)
        .env("DETECTOR_REQUIRE_PRIVILEGED", "1")
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
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
    Ok((passed, failed))
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => run(Command::new("bash").arg(root().join("scripts/setup.sh"))),
        Task::BuildEbpf => build_ebpf().map(drop),
        Task::Test { args } => test(&args),
        Task::Bench(args) => bench::bench(args),
    }
}
