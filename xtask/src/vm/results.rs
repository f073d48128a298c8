//! The checks' results: parsing the guest's RESULT lines, the host's column, the table and
//! what counts as a failure.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::{BACKENDS, CHECKS, CheckResult, CheckSpec, GuestRun, Status};

/// Parses `RESULT backend check status secs detail...` lines.
pub(super) fn parse_results(text: &str) -> (Vec<CheckResult>, String) {
    let mut out = Vec::new();
    let mut auto = String::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix("RESULT ") else {
            continue;
        };
        let mut it = rest.splitn(5, ' ');
        let (Some(backend), Some(check), Some(status), Some(secs)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let detail = it.next().unwrap_or_default().to_string();
        // The doctor line is a check of its own (a guest that cannot run the detector fails
        // here), and a passing one names the backend `auto` picks.
        if backend == "auto" && status == "pass" {
            auto.clone_from(&detail);
        }
        out.push(CheckResult {
            backend: backend.into(),
            check: check.into(),
            status: match status {
                "pass" => Status::Pass,
                "unsupported" => Status::Unsupported,
                _ => Status::Fail,
            },
            secs: secs.parse().unwrap_or(0.0),
            detail,
        });
    }
    (out, auto)
}

/// Host results: the tracepoint column from the host test run (`passed_tests`: names of the
/// tests that passed, `ran`: whether the host tests ran at all), kprobe and fentry from the
/// host's `detector doctor --json` reasons.
pub fn host(
    root: &Path,
    passed_tests: &std::collections::HashSet<String>,
    ran: bool,
) -> Result<Vec<CheckResult>> {
    if !ran {
        // No host run (vm-test --no-host, or a filtered test run): no column to fill, and
        // possibly no host build of the detector to ask.
        let mut out = Vec::new();
        for c in CHECKS {
            let backends: &[&str] = if c.scope == "kernel" {
                &["-"]
            } else {
                BACKENDS
            };
            for b in backends {
                out.push(CheckResult {
                    backend: (*b).into(),
                    check: c.name.into(),
                    status: Status::NotRun,
                    secs: 0.0,
                    detail: String::new(),
                });
            }
        }
        return Ok(out);
    }
    let detector = crate::util::target_dir(root)?.join("debug/detector");
    let doctor = Command::new(&detector)
        .args(["doctor", "--json"])
        .output()
        .with_context(|| format!("running {} doctor --json", detector.display()))?;
    // doctor exits non-zero when no backend loads; its JSON report still says why.
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).with_context(|| {
        format!(
            "parsing {} doctor --json (exit {}): {}",
            detector.display(),
            doctor.status,
            String::from_utf8_lossy(&doctor.stderr).trim()
        )
    })?;
    let support = |b: &str| -> (bool, String) {
        report["backends"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["backend"] == b))
            .map(|s| {
                (
                    s["ok"] == true,
                    s["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .unwrap_or((false, "not in doctor's report".into()))
    };
    let mut out = Vec::new();
    let result = |backend: &str, c: &CheckSpec| {
        let status = if !ran {
            Status::NotRun
        } else if passed_tests.contains(c.test) {
            Status::Pass
        } else {
            Status::Fail
        };
        CheckResult {
            backend: backend.into(),
            check: c.name.into(),
            status,
            secs: 0.0,
            detail: format!("{}::{}", c.target, c.test),
        }
    };
    for c in CHECKS.iter().filter(|c| c.scope == "kernel") {
        out.push(result("-", c));
    }
    for b in BACKENDS {
        let (ok, reason) = support(b);
        for c in CHECKS.iter().filter(|c| c.scope == "backend") {
            if ok {
                out.push(result(b, c));
            } else {
                out.push(CheckResult {
                    backend: (*b).into(),
                    check: c.name.into(),
                    status: Status::Unsupported,
                    secs: 0.0,
                    detail: reason.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Runs only the host tests the check list names (for `cargo xtask vm-test` on its own).
pub fn host_tests(root: &Path) -> Result<std::collections::HashSet<String>> {
    let mut passed = std::collections::HashSet::new();
    let mut targets: Vec<&str> = CHECKS.iter().map(|c| c.target).collect();
    targets.dedup();
    for target in targets {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root)
            .env("DETECTOR_REQUIRE_PRIVILEGED", "1")
            .args(["test", "-p", "detector"]);
        if target == "lib" {
            cmd.arg("--lib");
        } else {
            cmd.args(["--test", target]);
        }
        cmd.arg("--").arg("--exact");
        for c in CHECKS.iter().filter(|c| c.target == target) {
            cmd.arg(c.test);
        }
        let out = cmd.stderr(Stdio::inherit()).output()?;
        passed.extend(passed_tests(&String::from_utf8_lossy(&out.stdout)));
    }
    Ok(passed)
}

/// Names of the tests a libtest output reports as passed (`test NAME ... ok`).
pub fn passed_tests(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... ok"))
        .map(str::to_string)
        .collect()
}

/// Prints the check × backend table: the host's column, then one per guest (kernel, arch).
/// A guest that could not run says so in its column, and why below the table; cells that are
/// not a pass are explained below it too (each distinct reason once).
pub fn print_table(runs: &[GuestRun], host: &[CheckResult]) {
    println!();
    let mut header = format!("{:<24}{:<12}{:<12}", "check", "backend", "host");
    for r in runs {
        header.push_str(&format!("{:<14}", r.label));
    }
    println!("{header}");
    let mut rows: Vec<(String, String)> = Vec::new();
    for c in CHECKS.iter().filter(|c| c.scope == "kernel") {
        rows.push((c.name.into(), "-".into()));
    }
    for b in BACKENDS {
        for c in CHECKS.iter().filter(|c| c.scope == "backend") {
            rows.push((c.name.into(), (*b).into()));
        }
    }
    let find = |set: &[CheckResult], check: &str, b: &str| {
        set.iter()
            .find(|r| r.check == check && r.backend == b)
            .cloned()
    };
    let word = |r: &Option<CheckResult>| match r {
        Some(r) if r.status == Status::Pass && r.secs > 0.0 => format!("pass {:.0}s", r.secs),
        Some(r) => r.status.word().to_string(),
        None => "-".into(),
    };
    // (column, backend, reason) of every cell that is not a pass, in order, once each.
    let mut notes: Vec<(String, String, String)> = Vec::new();
    let mut note = |col: &str, r: &Option<CheckResult>| {
        if let Some(r) = r
            && r.status != Status::Pass
            && r.status != Status::NotRun
        {
            let n = (col.to_string(), r.backend.clone(), r.detail.clone());
            if !notes.contains(&n) {
                notes.push(n);
            }
        }
    };
    for (check, b) in rows {
        let h = find(host, &check, &b);
        note("host", &h);
        let mut line = format!("{check:<24}{b:<12}{:<12}", word(&h));
        for run in runs {
            let cell = match &run.outcome {
                Ok(g) => {
                    let r = find(&g.results, &check, &b);
                    note(run.label, &r);
                    word(&r)
                }
                Err(_) => "skipped".into(),
            };
            line.push_str(&format!("{cell:<14}"));
        }
        println!("{line}");
    }
    for run in runs {
        match &run.outcome {
            Ok(g) => println!(
                "{}: auto picks {}; wall time {:.1} s (build and images {:.1} s, qemu {} boot \
                 to power-off {:.1} s)",
                run.label,
                g.auto,
                (g.prepare + g.boot_to_end).as_secs_f64(),
                g.prepare.as_secs_f64(),
                g.accel,
                g.boot_to_end.as_secs_f64()
            ),
            Err(why) => println!("{}: skipped: {why}", run.label),
        }
    }
    for (col, b, why) in notes {
        println!("  {col} {b}: {why}");
    }
}

/// Failures that make the run fail: any failed check, a guest that could not run, and a guest
/// where the kprobe backend (the one production nodes with nf_conntrack as a module need) or
/// `auto` does not pass every check.
pub fn failures(runs: &[GuestRun], host: &[CheckResult]) -> Vec<String> {
    let mut f = Vec::new();
    for r in host {
        if r.status == Status::Fail {
            f.push(format!("host {} {}: {}", r.backend, r.check, r.detail));
        }
    }
    for run in runs {
        let g = match &run.outcome {
            Ok(g) => g,
            Err(why) => {
                f.push(format!("guest {} did not run: {why}", run.label));
                continue;
            }
        };
        let label = run.label;
        for r in g.results.iter() {
            if r.status == Status::Fail {
                f.push(format!("{label} {} {}: {}", r.backend, r.check, r.detail));
            }
        }
        for c in CHECKS {
            let b = if c.scope == "kernel" { "-" } else { "kprobe" };
            if !g
                .results
                .iter()
                .any(|r| r.backend == b && r.check == c.name && r.status == Status::Pass)
            {
                f.push(format!("{label} {b} {} did not pass", c.name));
            }
        }
        let auto = g.auto.split(':').next().unwrap_or_default();
        let auto_ok = BACKENDS.contains(&auto)
            && CHECKS.iter().filter(|c| c.scope == "backend").all(|c| {
                g.results
                    .iter()
                    .any(|r| r.backend == auto && r.check == c.name && r.status == Status::Pass)
            });
        if !auto_ok {
            f.push(format!(
                "{label} auto picks `{}`, which did not pass every check",
                g.auto
            ));
        }
    }
    f
}

/// Prints the table and timings; returns (passed, failed) counted over guest checks.
pub fn report(runs: &[GuestRun], host: &[CheckResult]) -> Result<(u64, u64)> {
    print_table(runs, host);
    let f = failures(runs, host);
    let passed = runs
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .flat_map(|g| &g.results)
        .filter(|r| r.status == Status::Pass)
        .count() as u64;
    let failed = f.len() as u64;
    for x in &f {
        println!("vm-test FAILED: {x}");
    }
    Ok((passed, failed))
}
