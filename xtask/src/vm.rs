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

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::output;

/// Debian's 6.1 LTS kernel (bookworm), the closest to EKS AL2023's 6.1 that apt can fetch.
const KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-amd64";
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Modules the checks need; their dependencies come along (modprobe --show-depends).
/// crc32c_generic must be loaded before libcrc32c (nf_conntrack's dependency) can resolve.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "nf_conntrack",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_ct",
    "veth",
    "sch_ingress",
    "cls_bpf",
];
/// Dynamically linked tools the tests run, copied with their libraries.
const TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/nft",
    "/usr/sbin/conntrack",
];
const INIT: &str = include_str!("vm/init.sh");
const RUN: &str = include_str!("vm/run.sh");

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
        test: "probe::offsets::tests::resolves_every_field_on_this_kernel",
        env: "-",
    },
    CheckSpec {
        scope: "kernel",
        name: "module-split-btf",
        target: "lib",
        test: "probe::offsets::tests::module_split_btf_on_this_kernel",
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

/// The version apt would download for `package`, from the local apt lists (the cache key).
/// Lists that do not know the package (a fresh image with empty lists) are updated once.
fn candidate(package: &str) -> Result<Option<String>> {
    let lookup = || -> Result<Option<String>> {
        let policy = output(Command::new("apt-cache").args(["policy", package]))?;
        Ok(policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(|v| v.trim().to_string())
            .filter(|v| v != "(none)"))
    };
    if let Some(v) = lookup()? {
        return Ok(Some(v));
    }
    let t = step("apt-get update (the apt lists do not know the guest's packages)");
    output(Command::new("apt-get").args(["update", "-qq"]))?;
    done(t, "apt lists updated");
    lookup()
}

/// The unpacked kernel package: its release name, the module tree root and a bootable vmlinux.
struct Kernel {
    release: String,
    root: PathBuf,
    vmlinux: PathBuf,
}

/// Downloads, unpacks and prepares the kernel package once per package version.
fn kernel() -> Result<Kernel> {
    let package = std::env::var("DETECTOR_VM_KERNEL").unwrap_or_else(|_| KERNEL_PACKAGE.into());
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("DETECTOR_VM_KERNEL={package} is not a linux-image-* package"))?
        .to_string();
    let version = candidate(&package)?.with_context(|| {
        format!(
            "apt knows no package {package} (even after apt-get update): set \
             DETECTOR_VM_KERNEL to a linux-image-6.1.0-*-amd64 package apt has"
        )
    })?;
    let dir = cache_dir().join(format!("{package}_{version}"));
    let k = Kernel {
        release: release.clone(),
        root: dir.join("root"),
        vmlinux: dir.join("vmlinux"),
    };
    if dir.join("ready").exists() {
        println!(
            "vm-test: kernel {package} {version} (cached in {})",
            dir.display()
        );
        return Ok(k);
    }
    let t = step(&format!("downloading {package} {version}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let deb = apt_download(&dir, &package, &version)?;
    done(t, "downloaded");
    let t = step("unpacking the kernel, depmod, extracting vmlinux");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&k.root))?;
    // The package ships no modules.dep (the postinst makes it).
    output(Command::new("depmod").arg("-b").arg(&k.root).arg(&release))?;
    let bz = fs::read(k.root.join(format!("boot/vmlinuz-{release}")))?;
    fs::write(&k.vmlinux, extract_vmlinux(&bz)?)?;
    fs::remove_file(&deb)?;
    fs::write(dir.join("ready"), format!("{package} {version}\n"))?;
    done(t, "kernel ready");
    Ok(k)
}

/// `apt-get download`s `package` at `version` into `dir` (never installs it) and returns the
/// .deb's path.
fn apt_download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    output(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["download", &format!("{package}={version}")]),
    )?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")
}

/// Debian's static busybox, unpacked from its package into the cache (not installed: the
/// host's /bin/busybox may be the dynamic `busybox` package, which conflicts with it).
fn busybox() -> Result<PathBuf> {
    let package = "busybox-static";
    let version = candidate(package)?
        .context("apt knows no package busybox-static (even after apt-get update)")?;
    let dir = cache_dir().join(format!("{package}_{version}"));
    let bin = dir.join("root/bin/busybox");
    if dir.join("ready").exists() {
        return Ok(bin);
    }
    let t = step(&format!("downloading {package} {version}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let deb = apt_download(&dir, package, &version)?;
    output(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")),
    )?;
    if !bin.is_file() {
        bail!("{package} has no bin/busybox");
    }
    fs::remove_file(&deb)?;
    fs::write(dir.join("ready"), format!("{package} {version}\n"))?;
    done(t, "busybox ready");
    Ok(bin)
}

/// The ELF kernel inside a Debian bzImage (xz payload). qemu boots an ELF vmlinux through its
/// PVH note, which skips the firmware and the in-guest decompression (about 3 s under TCG).
fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    const XZ: &[u8] = b"\xfd7zXZ\x00";
    let at = bz
        .windows(XZ.len())
        .position(|w| w == XZ)
        .context("no xz payload in the kernel image")?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting xz")?;
    let mut stdin = child.stdin.take().context("xz stdin")?;
    let payload = bz[at..].to_vec();
    let feeder = std::thread::spawn(move || {
        // xz stops reading at the end of the stream: a broken pipe after that is expected.
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    if !out.stdout.starts_with(b"\x7fELF") {
        bail!("decompressing the kernel image did not give an ELF vmlinux");
    }
    Ok(out.stdout)
}

/// A newc cpio archive, written in memory. The kernel unpacks concatenated archives in order,
/// so the payload is a second archive appended to the cached base.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: std::collections::HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Creates `path`'s parent directories (once each).
    fn parents(&mut self, path: &str) {
        let path = path.trim_start_matches('/');
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.entry(&a, 0o040755, &[]);
            }
        }
    }

    fn dir(&mut self, path: &str) {
        self.parents(&format!("{path}/x"));
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes());
    }

    /// Copies a host file (following symlinks) to the same path in the archive.
    fn copy(&mut self, host: &Path, path: &str) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(path, mode, &data);
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// Shared libraries of a dynamic executable, from ldd.
fn libraries(bin: &str) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// The base initramfs: busybox, modules, tools, /init.
fn base_initramfs(k: &Kernel, busybox: &Path) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "root", "etc", "usr/bin", "sbin", "var",
    ] {
        c.dir(d);
    }
    c.symlink("var/run", "../run");
    c.copy(busybox, "bin/busybox")?;
    // The kernel's request_module runs /sbin/modprobe.
    c.symlink("sbin/modprobe", "../bin/busybox");
    c.file("init", 0o755, INIT.as_bytes());
    c.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    for f in ["/etc/protocols", "/etc/services"] {
        if Path::new(f).exists() {
            c.copy(Path::new(f), f)?;
        }
    }
    // Modules with their dependencies, in the guest's module tree.
    let mut files = std::collections::BTreeSet::new();
    for m in MODULES {
        let deps = output(Command::new("modprobe").arg("-d").arg(&k.root).args([
            "-S",
            &k.release,
            "--show-depends",
            m,
        ]))?;
        for l in deps.lines() {
            if let Some(f) = l.strip_prefix("insmod ") {
                files.insert(f.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    }
    let moddir = format!("lib/modules/{}", k.release);
    for f in &files {
        let rel = Path::new(f)
            .strip_prefix(&k.root)
            .with_context(|| format!("module {f} outside the kernel tree"))?;
        c.copy(Path::new(f), &rel.to_string_lossy())?;
    }
    for f in [
        "modules.dep",
        "modules.dep.bin",
        "modules.alias",
        "modules.alias.bin",
        "modules.symbols",
        "modules.symbols.bin",
        "modules.builtin",
        "modules.builtin.bin",
        "modules.builtin.modinfo",
        "modules.order",
        "modules.softdep",
    ] {
        let p = k.root.join(&moddir).join(f);
        if p.exists() {
            c.copy(&p, &format!("{moddir}/{f}"))?;
        }
    }
    let mut libs = std::collections::BTreeSet::new();
    for t in TOOLS {
        c.copy(Path::new(t), t)?;
        libs.extend(libraries(t)?);
    }
    for l in libs {
        let real = fs::canonicalize(&l)?;
        c.copy(&real, &l.to_string_lossy())?;
    }
    Ok(c.finish())
}

/// Builds the detector and its test executables for musl; returns (target name -> path) and
/// the detector binary's path, both as cargo's JSON output reports them (so wherever the
/// target directory is). In the guest the tests find the binary through `DETECTOR_BIN`.
fn build_musl(root: &Path) -> Result<(BTreeMap<String, PathBuf>, PathBuf)> {
    let mut cmd = Command::new("cargo");
    // Release code (the guest is emulated: debug builds of the BTF parsing and the tests are
    // slow there) without debug info (stripped anyway; it costs compile and link time).
    cmd.current_dir(root)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .args([
            "test",
            "--release",
            "--no-run",
            "--target",
            MUSL,
            "-p",
            "detector",
            "--message-format=json-render-diagnostics",
            "--lib",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for c in CHECKS {
        if c.target != "lib" {
            cmd.args(["--test", c.target]);
        }
    }
    let out = cmd.output().context("starting cargo")?;
    if !out.status.success() {
        bail!(
            "building the guest's test binaries for {MUSL} failed (is the target installed? \
             scripts/setup.sh adds it)"
        );
    }
    let mut tests = BTreeMap::new();
    let mut detector = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let name = v["target"]["name"].as_str().unwrap_or_default();
        let kinds = v["target"]["kind"].to_string();
        if v["profile"]["test"] == true {
            let key = if kinds.contains("lib") { "lib" } else { name };
            tests.insert(key.to_string(), PathBuf::from(exe));
        } else if kinds.contains("bin") && name == "detector" {
            detector = Some(PathBuf::from(exe));
        }
    }
    let detector = detector.context("cargo built no detector binary")?;
    for c in CHECKS {
        if !tests.contains_key(c.target) {
            bail!("cargo built no test executable for `{}`", c.target);
        }
    }
    Ok((tests, detector))
}

/// Debug info only makes the archive bigger (the guest has no use for it).
fn stripped(path: &Path, work: &Path) -> Result<Vec<u8>> {
    let out = work.join("stripped");
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(path),
    )?;
    Ok(fs::read(&out)?)
}

/// Where the payload lives in the guest: its own directory, never the host's path of the
/// binaries (a checkout under /tmp would be hidden by the guest's tmpfs on /tmp).
const GUEST_DIR: &str = "detector";

fn payload(tests: &BTreeMap<String, PathBuf>, detector: &Path, work: &Path) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    c.file(
        &format!("{GUEST_DIR}/bin/detector"),
        0o755,
        &stripped(detector, work)?,
    );
    for (name, path) in tests {
        c.file(
            &format!("{GUEST_DIR}/tests/{name}"),
            0o755,
            &stripped(path, work)?,
        );
    }
    let checks: String = CHECKS
        .iter()
        .map(|c| format!("{} {} {} {} {}\n", c.scope, c.name, c.target, c.test, c.env))
        .collect();
    c.file(&format!("{GUEST_DIR}/checks"), 0o644, checks.as_bytes());
    c.file(&format!("{GUEST_DIR}/run.sh"), 0o755, RUN.as_bytes());
    Ok(c.finish())
}

/// KVM only where the CPU has hardware virtualisation and the module is a real KVM (here it is
/// a paravirtual one that cannot run a stock kernel: qemu aborts on MSR 0x10a).
fn kvm_usable() -> bool {
    let cpu = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    hw && Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists()
}

struct Boot {
    console: String,
    results: String,
    elapsed: Duration,
    timed_out: bool,
}

fn boot(k: &Kernel, initrd: &Path, work: &Path, kvm: bool, timeout: Duration) -> Result<Boot> {
    let console = work.join("console.log");
    let results = work.join("results.txt");
    let _ = fs::remove_file(&console);
    let _ = fs::remove_file(&results);
    let mut cmd = Command::new("qemu-system-x86_64");
    if kvm {
        cmd.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args([
        "-smp",
        "2",
        "-m",
        "1536M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-serial")
    .arg(format!("file:{}", results.display()))
    .arg("-kernel")
    .arg(&k.vmlinux)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    // softlockup_panic: a guest that wedges ends at once (a panic, no end marker) with the
    // stuck CPU's backtrace on the console, instead of running into the timeout.
    .arg(
        "console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests mitigations=off nokaslr \
         softlockup_panic=1",
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let mut timed_out = false;
    let mut last_len = 0;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        // Progress: echo each new result line as it arrives.
        if let Ok(text) = fs::read_to_string(&results)
            && text.len() > last_len
        {
            for l in text[last_len..].lines() {
                println!("vm-test: [{:>5.1} s] {l}", t0.elapsed().as_secs_f64());
            }
            last_len = text.rfind('\n').map_or(last_len, |i| i + 1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = t0.elapsed();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let mut console_text = fs::read_to_string(&console).unwrap_or_default();
    if !stderr.trim().is_empty() {
        console_text.push_str(&format!("\n[qemu stderr]\n{stderr}"));
    }
    Ok(Boot {
        console: console_text,
        results: fs::read_to_string(&results).unwrap_or_default(),
        elapsed,
        timed_out,
    })
}

/// Parses `RESULT backend check status secs detail...` lines.
fn parse_results(text: &str) -> (Vec<CheckResult>, String) {
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
