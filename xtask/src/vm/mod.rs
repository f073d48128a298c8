//! `cargo xtask vm-test`: the detector's end-to-end checks in a Debian 6.1 guest under qemu.
//!
//! The host kernel has neither kprobes nor BPF trampolines, so the kprobe and fentry backends
//! can only be proven in a guest with a production-like kernel (EKS AL2023 runs 6.1, with
//! nf_conntrack as a module). Steps:
//! 1. Debian's `linux-image-6.1.0-*-amd64` package is downloaded with `apt-get download` (never
//!    installed on the host), unpacked, `depmod`'ed, and its bzImage decompressed to an ELF
//!    `vmlinux` that qemu boots directly (PVH). Cached under ~/.cache/detector/vm/ by version.
//! 2. A base initramfs: static busybox, the modules the checks need with their dependencies,
//!    `ip`, `tc`, `nft`, `conntrack` with their shared libraries, and an /init.
//! 3. A payload archive appended to it: the detector and its integration-test executables built
//!    for x86_64-unknown-linux-musl (static), the check list and the guest's run script.
//! 4. qemu boots it (TCG; KVM only where the CPU has vmx/svm and it works), the guest writes one
//!    `RESULT` line per check to its second serial port and a final `VMTEST-END` marker; a
//!    timeout or a missing marker fails with the console log printed.
//!
//! The checks are the host's own integration tests, run in the guest with `DETECTOR_BACKEND`
//! set to each backend the guest's `detector doctor` says loads.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

mod initramfs;
mod kernel;
mod qemu;
mod results;

use initramfs::{TOOLS, base_initramfs, build_musl, payload};
use kernel::{busybox, kernel};
use qemu::{boot, kvm_usable};
use results::{host_tests, parse_results};

pub use results::{host, passed_tests, report};

/// One check: where it runs (`kernel`: once; `backend`: once per backend) and the integration
/// test that is the check (test target name, exact test name). The host runs the same tests.
pub struct CheckSpec {
    pub scope: &'static str,
    pub name: &'static str,
    /// Test target (`lib` for the detector library's unit tests).
    pub target: &'static str,
    pub test: &'static str,
    /// Extra environment for the test (`-`: none), e.g. forcing a hook.
    pub env: &'static str,
}

pub const CHECKS: &[CheckSpec] = &[
    CheckSpec {
        scope: "kernel",
        name: "btf-offsets",
        target: "lib",
        test: "kernel::offsets::tests::resolves_every_field_on_this_kernel",
        env: "-",
    },
    CheckSpec {
        scope: "kernel",
        name: "module-split-btf",
        target: "lib",
        test: "kernel::offsets::tests::module_split_btf_on_this_kernel",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "conntrack-new-destroy",
        target: "conntrack_events",
        test: "new_expired_and_killed",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "agent-deletes-race",
        target: "agent_races",
        test: "wrongful_deletes_are_races_v4_24",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "agent-batch-deletes",
        target: "agent_races",
        test: "batch_deletes_are_judged_key_by_key",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "agent-ipv6-keys",
        target: "agent_races",
        test: "ipv6_keys_are_judged_in_the_kernel",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "datapath-writes",
        target: "map_writes",
        test: "datapath_writes_are_seen",
        env: "-",
    },
    CheckSpec {
        scope: "backend",
        name: "datapath-writes-kprobe",
        target: "map_writes",
        test: "datapath_writes_are_seen",
        env: "DETECTOR_WRITES_HOOK=kprobe",
    },
];

pub const BACKENDS: &[&str] = &["fentry", "kprobe", "tracepoint"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Unsupported,
    NotRun,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::Unsupported => "unsupported",
            Status::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckResult {
    /// `-` for kernel-scope checks, else the backend.
    pub backend: String,
    pub check: String,
    pub status: Status,
    pub secs: f64,
    pub detail: String,
}

/// What the guest run produced.
pub struct GuestOutcome {
    pub results: Vec<CheckResult>,
    /// The guest's `auto` choice and doctor's line about it.
    pub auto: String,
    /// Building the musl binaries and the images.
    pub prepare: Duration,
    /// qemu start to power-off.
    pub boot_to_end: Duration,
    pub accel: &'static str,
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("detector/vm")
}

fn step(what: &str) -> Instant {
    println!("vm-test: {what}");
    Instant::now()
}

fn done(t: Instant, what: &str) {
    println!("vm-test: {what} ({:.1} s)", t.elapsed().as_secs_f64());
}

fn need(tool: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        || Path::new(tool).is_file();
    if !found {
        bail!("vm-test needs `{tool}` (Debian package {package}): run ./scripts/setup.sh");
    }
    Ok(())
}

/// Builds everything, boots the guest, returns its results (an error for a timeout, a missing
/// end marker, or a guest that could not run its checks).
pub fn guest(root: &Path, timeout: Duration) -> Result<GuestOutcome> {
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("xz", "xz-utils"),
        ("depmod", "kmod"),
        ("strip", "binutils"),
        ("apt-get", "apt"),
        ("ldd", "libc-bin"),
    ] {
        need(tool, pkg)?;
    }
    for t in TOOLS {
        need(t, "iproute2/nftables/conntrack")?;
    }
    let t_prep = Instant::now();
    let k = kernel()?;
    let busybox = busybox()?;
    let work = cache_dir().join("run");
    fs::create_dir_all(&work)?;
    let t = step("building the detector and its tests for musl (static)");
    let (tests, detector) = build_musl(root)?;
    done(t, "built");
    let t = step("building the initramfs");
    let mut initrd = base_initramfs(&k, &busybox)?;
    initrd.extend(payload(&tests, &detector, &work)?);
    let initrd_path = work.join("initrd.cpio");
    fs::write(&initrd_path, &initrd)?;
    done(
        t,
        &format!("initramfs {} MiB", fs::metadata(&initrd_path)?.size() >> 20),
    );
    let prepare = t_prep.elapsed();

    let mut kvm = kvm_usable();
    let mut b;
    loop {
        let t = step(&format!(
            "booting {} under qemu ({})",
            k.release,
            if kvm { "KVM" } else { "TCG" }
        ));
        b = boot(&k, &initrd_path, &work, kvm, timeout)?;
        done(t, "qemu exited");
        // KVM that looked usable but could not boot the guest: TCG always works.
        if kvm && !b.console.contains("VMTEST-BOOTED") {
            println!("vm-test: the guest did not boot under KVM; retrying with TCG");
            kvm = false;
            continue;
        }
        break;
    }
    let fail = |why: String| -> anyhow::Error {
        println!(
            "----- guest console -----\n{}\n----- end of console -----",
            b.console
        );
        anyhow::anyhow!(why)
    };
    if b.timed_out {
        return Err(fail(format!(
            "the guest did not finish within {} s",
            timeout.as_secs()
        )));
    }
    if !b.results.contains("VMTEST-END rc=0") {
        return Err(fail(
            "the guest ended without the VMTEST-END marker (a panic or a crash of its run \
             script)"
                .into(),
        ));
    }
    let (results, auto) = parse_results(&b.results);
    if std::env::var_os("DETECTOR_VM_CONSOLE").is_some()
        || results.iter().any(|r| r.status == Status::Fail)
    {
        println!(
            "----- guest console -----\n{}\n----- end of console -----",
            b.console
        );
    }
    Ok(GuestOutcome {
        results,
        auto,
        prepare,
        boot_to_end: b.elapsed,
        accel: if kvm { "KVM" } else { "TCG" },
    })
}

/// `cargo xtask vm-test`: the guest, then the host's own run of the same tests.
pub fn vm_test(root: &Path, timeout: Duration, host_too: bool) -> Result<(u64, u64)> {
    let g = guest(root, timeout)?;
    let host_results = if host_too {
        host(root, &host_tests(root)?, true)?
    } else {
        host(root, &Default::default(), false)?
    };
    report(&g, &host_results)
}
