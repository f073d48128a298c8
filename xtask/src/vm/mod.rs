//! `cargo xtask vm-test`: the detector's end-to-end checks in Debian guests under qemu, one
//! per (kernel, architecture) of the matrix in `guests.rs` (6.1 and 6.12 on amd64, 6.1 on
//! arm64).
//!
//! The host kernel has neither kprobes nor BPF trampolines, so the kprobe and fentry backends
//! can only be proven in a guest with a production-like kernel (EKS runs 6.1 and 6.12 with
//! nf_conntrack as a module, on x86_64 and Graviton). Steps, per guest:
//! 1. Debian's `linux-image-*` package for the guest's architecture is downloaded with
//!    `apt-get download` (never installed on the host; a foreign architecture through a private
//!    apt state), unpacked, `depmod`'ed; an amd64 bzImage is decompressed to an ELF `vmlinux`
//!    that qemu boots directly (PVH). Cached under ~/.cache/detector/vm/ by version.
//! 2. A base initramfs: static busybox, the modules the checks need with their dependencies
//!    (xz-compressed ones decompressed), `ip`, `tc`, `nft`, `conntrack` with their shared
//!    libraries (the host's, or the guest architecture's Debian packages), and an /init.
//! 3. A payload archive appended to it: the detector and its integration-test executables built
//!    for the architecture's musl target (static; once per architecture and run), the check
//!    list and the guest's run script.
//! 4. qemu boots it (TCG; KVM only for the host's architecture where the CPU has vmx/svm and it
//!    works), the guest writes one `RESULT` line per check to its results port and a final
//!    `VMTEST-END` marker; a timeout or a missing marker fails with the console log printed.
//!
//! The checks are the host's own integration tests, run in the guest with `DETECTOR_BACKEND`
//! set to each backend the guest's `detector doctor` says loads.
//!
//! `cargo xtask vm-bench` (`bench.rs`) boots the same guest with another payload: the bench's
//! overhead part, its results sent back over the results port (`transport.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

mod apt;
mod bench;
mod guests;
mod initramfs;
mod kernel;
mod qemu;
mod results;
mod transport;

use apt::Apt;
use guests::{AMD64, GuestSpec, guest_by_label, userland};
use initramfs::{base_initramfs, build_musl, payload};
use kernel::{Kernel, busybox, kernel};
use qemu::{Boot, boot, kvm_usable};
use results::{host_tests, parse_results};

pub use bench::vm_bench;
pub use guests::GUESTS;
pub use transport::encode;

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

/// What one guest's run produced.
pub struct GuestOutcome {
    pub results: Vec<CheckResult>,
    /// The guest's `auto` choice and doctor's line about it.
    pub auto: String,
    /// Building the musl binaries (the first guest of an architecture) and the images.
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

/// One guest of the matrix: its outcome, or why it could not run (the table says so).
pub struct GuestRun {
    pub label: &'static str,
    pub outcome: std::result::Result<GuestOutcome, String>,
}

/// The static test payload of one architecture: (test target -> executable, detector).
type Payload = (BTreeMap<String, PathBuf>, PathBuf);

/// Boots each guest of the matrix whose label is in `only` (all when empty), one at a time;
/// `timeout` overrides each guest's own.
pub fn guests(root: &Path, only: &[String], timeout: Option<Duration>) -> Result<Vec<GuestRun>> {
    for label in only {
        guest_by_label(label)?;
    }
    // Each architecture's payload is built once per run and shared by its guests.
    let mut payloads: BTreeMap<&str, std::result::Result<Payload, String>> = BTreeMap::new();
    let mut runs = Vec::new();
    for spec in GUESTS
        .iter()
        .filter(|g| only.is_empty() || only.iter().any(|o| o == g.label))
    {
        let t0 = Instant::now();
        println!("vm-test: ===== guest {} =====", spec.label);
        let outcome = guest(root, spec, &mut payloads, timeout);
        println!(
            "vm-test: guest {} {} in {:.1} s",
            spec.label,
            if outcome.is_ok() {
                "ran"
            } else {
                "FAILED to run"
            },
            t0.elapsed().as_secs_f64()
        );
        runs.push(GuestRun {
            label: spec.label,
            outcome: outcome.map_err(|e| format!("{e:#}")),
        });
    }
    Ok(runs)
}

/// Builds what `spec` needs, boots it, returns its results (an error for a timeout, a missing
/// end marker, or a guest that could not run its checks).
fn guest(
    root: &Path,
    spec: &GuestSpec,
    payloads: &mut BTreeMap<&str, std::result::Result<Payload, String>>,
    timeout: Option<Duration>,
) -> Result<GuestOutcome> {
    let arch = spec.arch;
    let t_prep = Instant::now();
    let (k, base, work) = images(spec, "run")?;
    let built = payloads.entry(arch.musl).or_insert_with(|| {
        let t = step(&format!(
            "building the detector and its tests for {} (static)",
            arch.musl
        ));
        let b = build_musl(root, arch).map_err(|e| format!("{e:#}"));
        done(t, "built");
        b
    });
    let (tests, detector) = match built {
        Ok(p) => p.clone(),
        Err(e) => bail!("{e}"),
    };
    let t = step("building the initramfs");
    let mut initrd = base;
    initrd.extend(payload(&tests, &detector, &work, arch)?);
    let initrd_path = work.join("initrd.cpio");
    fs::write(&initrd_path, &initrd)?;
    done(
        t,
        &format!("initramfs {} MiB", fs::metadata(&initrd_path)?.size() >> 20),
    );
    let prepare = t_prep.elapsed();
    let timeout = timeout.unwrap_or(Duration::from_secs(spec.timeout_secs));
    let (b, accel) = boot_one(spec, &k, &initrd_path, &work, timeout)?;
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
        accel,
    })
}

/// The guest's memory (the initramfs is unpacked into it; vm-bench's detector maps, sized
/// for `--max-entries 1048576`, fit beside it).
const GUEST_MEMORY: &str = "1536M";

/// The guest's kernel and base initramfs (cached downloads), and its work directory
/// (`<what>-<label>` in the cache).
fn images(spec: &GuestSpec, what: &str) -> Result<(Kernel, Vec<u8>, PathBuf)> {
    let arch = spec.arch;
    let cross_strip = arch.cross_prefix.map(|p| format!("{p}strip"));
    for (tool, pkg) in [
        (arch.qemu, arch.qemu_package),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
        ("depmod", "kmod"),
        ("readelf", "binutils"),
        (cross_strip.as_deref().unwrap_or("strip"), "binutils"),
        ("apt-get", "apt"),
        ("ldd", "libc-bin"),
    ] {
        need(tool, pkg)?;
    }
    let apt = Apt::for_arch(arch.deb)?;
    let k = kernel(&apt, spec.kernel_package)?;
    let busybox = busybox(&apt)?;
    let userland = userland(&apt)?;
    let work = cache_dir().join(format!("{what}-{}", spec.label.replace(' ', "-")));
    fs::create_dir_all(&work)?;
    let base = base_initramfs(&k, &busybox, &userland, arch.early_modules)?;
    Ok((k, base, work))
}

/// Boots one guest and waits for it to power off; an error (with the console printed) for a
/// timeout or a run that ended without its `VMTEST-END rc=0` marker. Returns the boot and the
/// accelerator that ran it.
fn boot_one(
    spec: &GuestSpec,
    k: &Kernel,
    initrd_path: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<(Boot, &'static str)> {
    let arch = spec.arch;
    // One guest at a time on this machine (TCG takes every core it is given), whichever
    // checkout started it; the lock is released when this guest's run returns.
    let lock = fs::File::create(cache_dir().join("qemu.lock"))?;
    if lock.try_lock().is_err() {
        println!("vm-test: waiting for another vm-test guest to finish");
        lock.lock()?;
    }
    // KVM only runs the host's own architecture.
    let mut kvm = arch.deb == AMD64.deb && cfg!(target_arch = "x86_64") && kvm_usable();
    let mut b;
    loop {
        let t = step(&format!(
            "booting {} ({}) under qemu ({})",
            k.release,
            arch.deb,
            if kvm { "KVM" } else { "TCG" }
        ));
        b = boot(arch, k, initrd_path, work, kvm, timeout)?;
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
    Ok((b, if kvm { "KVM" } else { "TCG" }))
}

/// `cargo xtask vm-test`: the guests, then the host's own run of the same tests (unless
/// `host_too` is off: its column then says `not run`).
pub fn vm_test(
    root: &Path,
    only: &[String],
    timeout: Option<Duration>,
    host_too: bool,
) -> Result<(u64, u64)> {
    let runs = guests(root, only, timeout)?;
    let host_results = if host_too {
        host(root, &host_tests(root)?, true)?
    } else {
        host(root, &Default::default(), false)?
    };
    report(&runs, &host_results)
}
