//! Privileged: `detector lab --cleanup` unmounts the bpffs a dead lab left, and leaves alone
//! the one of a lab that is still running (its directory is named by its pid).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::process::Command;

use common::{DETECTOR, privileged, run_ok};

fn mounted(dir: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(dir.to_str().unwrap()))
}

fn mount_at(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    run_ok("mount", &["-t", "bpf", "bpf", dir.to_str().unwrap()]);
}

#[test]
fn cleanup_spares_a_running_labs_bpffs_and_removes_a_dead_ones() {
    if !privileged() {
        return;
    }
    // A live "lab": this test process. A dead one: a child that has exited.
    let live = std::env::temp_dir().join(format!("detector-lab-{}/bpffs", std::process::id()));
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let dead = std::env::temp_dir().join(format!("detector-lab-{dead_pid}/bpffs"));
    mount_at(&live);
    mount_at(&dead);
    let out = Command::new(DETECTOR)
        .args(["lab", "--cleanup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live_kept = mounted(&live);
    let dead_kept = mounted(&dead);
    for d in [&live, &dead] {
        if mounted(d) {
            let _ = Command::new("umount").arg(d).status();
        }
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }
    assert!(live_kept, "a running lab's bpffs was unmounted");
    assert!(!dead_kept, "a dead lab's bpffs was left mounted");
}
