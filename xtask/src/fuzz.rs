//! `cargo xtask fuzz`: builds the cargo-fuzz targets in fuzz/ (their own workspace, on the
//! pinned nightly) and runs each for a fixed time from its committed seeds in fuzz/corpus/.
//! Inputs libFuzzer finds go to a scratch corpus under fuzz/target/, so a run never changes the
//! repository; a crash fails the target and names the file that reproduces it.
//!
//! Two builds: the default is cargo-fuzz's own (release, AddressSanitizer) for long runs;
//! `--quick` is a debug build without a sanitizer, which `cargo xtask test` runs for
//! [`TEST_SECONDS`] per target. Its cold build takes about 3 minutes on 2 cores (the sanitizer
//! build about 16 minutes of CPU), and its overflow checks and debug assertions catch
//! arithmetic that a release build would wrap silently; the decoders hold no `unsafe` code for
//! the sanitizer to watch.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Seconds per target when `cargo xtask test` runs the fuzz stage.
pub const TEST_SECONDS: u64 = 5;

#[derive(Debug, Clone, clap::Args)]
pub struct FuzzArgs {
    /// Seconds to run each target (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// The build `cargo xtask test` runs: debug (overflow checks on), no sanitizer; it builds
    /// in a few minutes where the default release + AddressSanitizer build takes far longer.
    #[arg(long)]
    pub quick: bool,
    /// Only this target (a file name in fuzz/fuzz_targets/ without `.rs`).
    pub target: Option<String>,
}

/// What one target's run showed.
struct Outcome {
    executions: Option<u64>,
    /// The reproducer libFuzzer wrote, when it found a crash, leak or timeout.
    crash: Option<String>,
    ok: bool,
}

/// The committed corpus of every target through its body in a plain build
/// (detector/tests/fuzz_corpus.rs, which the test stage ran already): prints its per-target
/// lines.
pub fn corpus_counts(root: &Path) -> Result<()> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "-q",
            "-p",
            "detector",
            "--test",
            "fuzz_corpus",
            "--",
            "--nocapture",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the fuzz corpus test")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("fuzz corpus ") {
            println!("{line}");
        }
    }
    if !out.status.success() {
        bail!("the fuzz corpus run failed (see detector/tests/fuzz_corpus.rs)");
    }
    Ok(())
}

/// `cargo xtask fuzz`.
pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    let (_, failed) = run_targets(args.seconds, args.quick, args.target.as_deref())?;
    if failed > 0 {
        bail!("{failed} fuzz target(s) crashed");
    }
    Ok(())
}

/// The fuzz stage of `cargo xtask test`: every target for [`TEST_SECONDS`] in the quick build;
/// (passed, failed) targets, a build failure counting as one failure.
pub fn test_stage() -> (u64, u64) {
    run_targets(TEST_SECONDS, true, None).unwrap_or_else(|e| {
        println!("fuzz FAILED: {e:#}");
        (0, 1)
    })
}

/// The nightly that builds the eBPF object; cargo-fuzz needs a nightly too, and one pin is
/// enough (scripts/setup.sh installs it).
fn nightly(root: &Path) -> Result<String> {
    let file = root.join("detector-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .with_context(|| format!("{} names no channel", file.display()))
}

/// `cargo +<nightly> fuzz <sub> [--dev -s none]` in fuzz/, without the outer cargo's toolchain
/// and flags. `run` must get the build options `build` got, or it builds again.
fn cargo_fuzz(root: &Path, nightly: &str, sub: &str, quick: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("fuzz"))
        .arg(format!("+{nightly}"))
        .args(["fuzz", sub]);
    if quick {
        cmd.args(["--dev", "--sanitizer", "none"]);
    }
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn run_targets(seconds: u64, quick: bool, only: Option<&str>) -> Result<(u64, u64)> {
    let root = super::root();
    let nightly = nightly(&root)?;
    let mut names = targets(&root)?;
    if let Some(t) = only {
        if !names.iter().any(|n| n == t) {
            bail!("no fuzz target `{t}`; there are: {}", names.join(", "));
        }
        names.retain(|n| n == t);
    }
    let t0 = Instant::now();
    let mut build = cargo_fuzz(&root, &nightly, "build", quick);
    if only.is_some() {
        build.args(&names);
    }
    super::run(&mut build).context(
        "building the fuzz targets (needs cargo-fuzz and the pinned nightly: run scripts/setup.sh)",
    )?;
    println!(
        "fuzz: built in {:.0} s ({})",
        t0.elapsed().as_secs_f64(),
        if quick {
            "debug, no sanitizer"
        } else {
            "release, AddressSanitizer"
        }
    );
    let (mut passed, mut failed) = (0, 0);
    for name in &names {
        let o = run_one(&root, &nightly, name, seconds, quick)?;
        let execs = o
            .executions
            .map_or_else(|| "? executions".to_string(), |n| format!("{n} executions"));
        match (&o.crash, o.ok) {
            (None, true) => {
                passed += 1;
                println!("fuzz {name}: {execs} in {seconds} s, 0 crashes");
            }
            (Some(file), _) => {
                failed += 1;
                println!("fuzz {name}: FAILED after {execs}: 1 crash, reproduce with {file}");
            }
            (None, false) => {
                failed += 1;
                println!("fuzz {name}: FAILED after {execs}: libFuzzer exited with an error");
            }
        }
    }
    println!(
        "fuzz: {} targets, {failed} crashed, {:.0} s with the build",
        names.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok((passed, failed))
}

/// Runs one target from its seeds; new inputs go to a scratch corpus, not the committed one.
fn run_one(root: &Path, nightly: &str, name: &str, seconds: u64, quick: bool) -> Result<Outcome> {
    let seeds = root.join("fuzz/corpus").join(name);
    let scratch = root.join("fuzz/target/corpus").join(name);
    let artifacts: PathBuf = root.join("fuzz/artifacts").join(name);
    for dir in [&scratch, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut cmd = cargo_fuzz(root, nightly, "run", quick);
    cmd.arg(name)
        .arg(&scratch)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // An input that takes this long is a hang, reported like a crash.
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stderr = child.stderr.take().context("cargo fuzz stderr")?;
    let (mut executions, mut crash) = (None, None);
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        // "Done 123456 runs in 10 second(s)"
        if let Some(rest) = line.strip_prefix("Done ") {
            executions = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
        // "#123456\tNEW ..." lines: the latest execution count, for a run that crashed.
        if let Some(rest) = line.strip_prefix('#')
            && let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            executions = Some(n);
        }
        // "Test unit written to fuzz/artifacts/<target>/crash-<sha1>"
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            crash = Some(path.trim().to_string());
        }
        tail.push(line);
        if tail.len() > 40 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        // libFuzzer's own report (the panic message and stack) says what broke.
        for line in &tail {
            println!("  {line}");
        }
    }
    Ok(Outcome {
        executions,
        crash,
        ok: status.success(),
    })
}
