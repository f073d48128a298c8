//! What testbed checks before it touches the kernel, and how it reports failed tools.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is the test failing"
)]

use testbed::Error;
use testbed::bpfmap::{BpfMap, LRU_HASH, MapSpec};
use testbed::cmd::run;

#[test]
fn a_failing_command_reports_its_stderr() {
    let e = run("sh", &["-c", "echo out; echo oops >&2; exit 3"]).unwrap_err();
    match e {
        Error::Command { cmd, stderr } => {
            assert_eq!(stderr, "oops");
            assert!(cmd.starts_with("sh -c"), "{cmd}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[test]
fn a_missing_tool_is_named() {
    let e = run("testbed-no-such-tool", &[]).unwrap_err();
    assert!(
        matches!(e, Error::Spawn { ref cmd, .. } if cmd == "testbed-no-such-tool"),
        "{e:?}"
    );
}

#[test]
fn a_successful_command_returns_its_stdout() {
    assert_eq!(run("sh", &["-c", "echo hello"]).unwrap(), "hello\n");
}

#[test]
fn map_names_longer_than_the_kernel_keeps_are_refused() {
    let spec = MapSpec {
        map_type: LRU_HASH,
        key_size: 24,
        value_size: 16,
        max_entries: 16,
        name: "sixteen_bytes_xx",
    };
    let e = BpfMap::create(&spec).err().unwrap();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
}
