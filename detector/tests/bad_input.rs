//! Bad input gets a one-line error naming the cause and the fix, a non-zero exit, no panic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::process::{Command, Output};

use common::{DETECTOR, privileged};

fn detector(args: &[&str]) -> Output {
    Command::new(DETECTOR)
        .args(args)
        .output()
        .expect("run detector")
}

/// The error text, after checking the common contract: failure, no panic, a single line.
fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    errors[0].to_string()
}

#[test]
fn unknown_backend_lists_the_valid_ones() {
    let out = detector(&["trace", "--backend", "ebpf-magic"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    let err = one_line_error(&out);
    assert!(err.contains("ebpf-magic"), "{err}");
    let all = String::from_utf8_lossy(&out.stderr);
    for b in ["auto", "fentry", "kprobe", "tracepoint"] {
        assert!(all.contains(b), "valid values listed: {all}");
    }
}

#[test]
fn unsupported_backend_names_cause_and_fix() {
    if !privileged() {
        return;
    }
    // Ask doctor which backends this kernel refuses, then request one of them.
    let doc = detector(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&doc.stdout).expect("doctor --json");
    let refused: Vec<String> = report["backends"]
        .as_array()
        .expect("backends in report")
        .iter()
        .filter(|b| b["ok"] == false)
        .map(|b| b["backend"].as_str().unwrap().to_string())
        .collect();
    let Some(b) = refused.first() else {
        eprintln!("skipped: this kernel supports every backend");
        return;
    };
    let out = detector(&["trace", "--backend", b, "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!("backend `{b}` is not supported")),
        "{err}"
    );
    assert!(err.contains("--backend auto"), "names the fix: {err}");
}

#[test]
fn missing_btf_names_cause_and_fix() {
    if !privileged() {
        return;
    }
    let out = detector(&["trace", "--btf-dir", "/nonexistent/btf", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(err.contains("/nonexistent/btf/vmlinux"), "{err}");
    assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
}

#[test]
fn unprivileged_user_is_told_to_use_root() {
    if !privileged() {
        return;
    }
    // Drop to nobody: no capabilities survive the uid change. The build directory may not be
    // reachable for nobody (a checkout under /root), so run a copy from a world-readable place.
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("detector-unpriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("detector");
    std::fs::copy(DETECTOR, &bin).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["trace", "--duration", "1"])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(err.contains("not privileged"), "{err}");
    assert!(err.contains("sudo") && err.contains("CAP_BPF"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_netns_and_ring_size() {
    let out = detector(&["trace", "--ring-mib", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("power of two"));
    let out = detector(&["trace", "--proto", "tpc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("unknown protocol"));
    if privileged() {
        let out = detector(&[
            "trace",
            "--netns",
            "/run/netns/does-not-exist",
            "--duration",
            "1",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(one_line_error(&out).contains("--netns /run/netns/does-not-exist"));
    }
}

#[test]
fn run_without_the_agent_map_names_the_fix() {
    if !privileged() {
        return;
    }
    let out = detector(&[
        "run",
        "--map-pin",
        "/nonexistent/aws_conntrack_map",
        "--map-name",
        "no_such_map_xyz",
        "--duration",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(err.contains("no agent conntrack map found"), "{err}");
    assert!(
        err.contains("--map-pin") && err.contains("--map-id"),
        "names the fix: {err}"
    );
    let out = detector(&["run", "--netns", "4026531840", "--duration", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line_error(&out).contains("needs the namespace as a path"));
    let out = detector(&["run", "--layout", "v5-99/3"]);
    assert_eq!(out.status.code(), Some(2), "a bad layout is a usage error");
}
