//! Privileged: under a seccomp filter that refuses bpf() with EPERM (what a RuntimeDefault-style
//! profile does to a container without CAP_SYS_ADMIN), `detector doctor` must not say
//! `privileges ok`: it names seccomp as the reason and fails; without the filter it does not.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{DETECTOR, privileged};

/// A seccomp filter program: bpf(2) fails with EPERM, every other call is allowed.
fn refuse_bpf() -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let prog = [
        // seccomp_data.nr is at offset 0.
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_bpf as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a filter program that lives until the call returns (the kernel
    // copies it); PR_SET_NO_NEW_PRIVS takes no pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn doctor_names_seccomp_when_bpf_is_refused() {
    if !privileged() {
        return;
    }
    let mut cmd = Command::new(DETECTOR);
    cmd.arg("doctor");
    // SAFETY: the closure runs in the forked child before exec and only calls prctl.
    unsafe {
        cmd.pre_exec(refuse_bpf);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("privileges      ok"), "{text}");
    assert!(
        text.contains("seccomp         filter (Seccomp: 2") && text.contains("REFUSES bpf()"),
        "{text}"
    );
    assert!(text.contains("seccomp is active"), "{text}");

    let free = Command::new(DETECTOR).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&free.stdout);
    assert!(!text.contains("REFUSES"), "{text}");
    assert!(text.contains("privileges      ok"), "{text}");
}
