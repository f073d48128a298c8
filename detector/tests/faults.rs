//! Faults a user or a hostile tester can cause from the command line: each out-of-range
//! flag is a usage error (exit code 2, a message naming the range), never a panic, a raw
//! errno or a silent clamp.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::process::Command;

fn detector(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_detector"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_out_of_range_flag_is_a_usage_error_with_its_range() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--duration", "1e300"], "out of range"),
        (&["run", "--duration", "1e19"], "out of range"),
        (&["run", "--duration", "nan"], "finite"),
        (&["trace", "--duration", "1e300"], "out of range"),
        (&["trace", "--watermark-ms", "99999999999"], "0 to 5000"),
        (&["run", "--watermark-ms", "99999999999"], "0 to 5000"),
        (&["run", "--trace-before=-5"], "from 0"),
        (&["run", "--trace-after", "nan"], "finite"),
        (&["run", "--snapshot-lag-window", "inf"], "finite"),
        (&["run", "--max-entries", "0"], "1 to"),
        (&["run", "--max-flows", "0"], "1 to"),
        (&["run", "--trace-max-files=-1"], "whole number"),
        (&["run", "--http-max-connections", "0"], "0"),
        (&["run", "--replay", "99999999999"], "0..=10000"),
    ];
    for (args, want) in cases {
        let (code, err) = detector(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains('\u{1b}'), "{args:?}: colour codes in {err:?}");
    }
}

/// stderr a pipe whose reader has gone (`detector ... 2>&1 | head -1`): the detector's lines
/// for people cannot be written, which must not turn an orderly exit into a panic (101).
#[test]
fn a_closed_stderr_pipe_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(env!("CARGO_BIN_EXE_detector"))
        .args(["replay", "/nonexistent/recording.ndjson"])
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
}
