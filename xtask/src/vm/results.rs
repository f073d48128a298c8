//! The checks' results: parsing the guest's RESULT lines, the host's column, the table and
//! what counts as a failure.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::{BACKENDS, CHECKS, CheckResult, CheckSpec, GuestOutcome, Status};

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

/// Prints the backend × check table for the guest and the host.
pub fn print_table(guest: &[CheckResult], host: &[CheckResult]) {
    println!();
    println!(
        "{:<24}{:<12}{:<14}{:<14}detail (guest; host when it differs)",
        "check", "backend", "guest 6.1", "host"
    );
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
    for (check, b) in rows {
        let g = find(guest, &check, &b);
        let h = find(host, &check, &b);
        let word = |r: &Option<CheckResult>| match r {
            Some(r) if r.status == Status::Pass && r.secs > 0.0 => {
                format!("pass {:.0}s", r.secs)
            }
            Some(r) => r.status.word().to_string(),
            None => "-".into(),
        };
        let mut detail = g.as_ref().map(|r| r.detail.clone()).unwrap_or_default();
        if let Some(h) = &h
            && g.as_ref().is_none_or(|g| g.detail != h.detail)
        {
            detail = format!("{detail}; host: {}", h.detail);
        }
        println!("{check:<24}{b:<12}{:<14}{:<14}{detail}", word(&g), word(&h));
    }
}

/// Failures that make the run fail: any failed check, and a guest where the kprobe backend
/// (the one production nodes with nf_conntrack as a module need) or `auto` does not work.
pub fn failures(g: &GuestOutcome, host: &[CheckResult]) -> Vec<String> {
    let mut f = Vec::new();
    for r in g.results.iter() {
        if r.status == Status::Fail {
            f.push(format!("guest {} {}: {}", r.backend, r.check, r.detail));
        }
    }
    for r in host {
        if r.status == Status::Fail {
            f.push(format!("host {} {}: {}", r.backend, r.check, r.detail));
        }
    }
    for c in CHECKS {
        let b = if c.scope == "kernel" { "-" } else { "kprobe" };
        if !g
            .results
            .iter()
            .any(|r| r.backend == b && r.check == c.name && r.status == Status::Pass)
        {
            f.push(format!("guest {b} {} did not pass", c.name));
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
            "guest auto picks `{}`, which did not pass every check",
            g.auto
        ));
    }
    f
}

/// Prints the table and timings; returns (passed, failed) counted over guest checks.
pub fn report(g: &GuestOutcome, host: &[CheckResult]) -> Result<(u64, u64)> {
    print_table(&g.results, host);
    println!(
        "guest: auto picks {}\nguest wall time: {:.1} s (build and images {:.1} s, qemu {} boot to power-off {:.1} s)",
        g.auto,
        (g.prepare + g.boot_to_end).as_secs_f64(),
        g.prepare.as_secs_f64(),
        g.accel,
        g.boot_to_end.as_secs_f64()
    );
    let f = failures(g, host);
    let passed = g
        .results
        .iter()
        .filter(|r| r.status == Status::Pass)
        .count() as u64;
    let failed = f.len() as u64;
    for x in &f {
        println!("vm-test FAILED: {x}");
    }
    Ok((passed, failed))
}
