//! The guest's initramfs: a newc cpio writer, the cached base archive (busybox, modules,
//! tools with their libraries, /init) and the payload appended to it (the detector and its
//! test executables built for musl, the check list, the run script).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::CHECKS;
use super::guests::GuestArch;
use super::kernel::Kernel;
use crate::util::output;

/// A newc cpio archive, written in memory. The kernel unpacks concatenated archives in order,
/// so the payload is a second archive appended to the cached base.
#[derive(Default)]
pub(super) struct Cpio {
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
pub(super) fn libraries(bin: &str) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// The base initramfs: busybox, modules, the userland (tools and their libraries: (path in
/// the guest, host file)), /init.
pub(super) fn base_initramfs(
    k: &Kernel,
    busybox: &Path,
    userland: &[(String, PathBuf)],
    early_modules: &[&str],
) -> Result<Vec<u8>> {
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
    modules(&mut c, k, early_modules)?;
    for (guest, host) in userland {
        c.copy(host, guest)?;
    }
    Ok(c.finish())
}

/// The modules the checks need, with their dependencies, in the guest's module tree. Debian
/// compresses modules with xz from 6.12 on; busybox's modprobe cannot load those, so they are
/// decompressed here and the module index files name the plain `.ko` instead.
fn modules(c: &mut Cpio, k: &Kernel, early_modules: &[&str]) -> Result<()> {
    let mut files = std::collections::BTreeSet::new();
    for m in MODULES.iter().chain(early_modules) {
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
    let mut compressed = false;
    for f in &files {
        let rel = Path::new(f)
            .strip_prefix(&k.root)
            .with_context(|| format!("module {f} outside the kernel tree"))?
            .to_string_lossy()
            .into_owned();
        if let Some(plain) = rel.strip_suffix(".xz") {
            let ko = Command::new("xz")
                .arg("-dc")
                .arg(f)
                .output()
                .context("starting xz")?;
            if !ko.status.success() || !ko.stdout.starts_with(b"\x7fELF") {
                bail!("xz could not decompress {f}");
            }
            c.file(plain, 0o644, &ko.stdout);
            compressed = true;
        } else {
            c.copy(Path::new(f), &rel)?;
        }
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
        if !p.exists() {
            continue;
        }
        if !compressed {
            c.copy(&p, &format!("{moddir}/{f}"))?;
        } else if !f.ends_with(".bin") {
            // The binary indexes (kmod's) still name .ko.xz; busybox reads the text ones.
            let text = fs::read_to_string(&p)?.replace(".ko.xz", ".ko");
            c.file(&format!("{moddir}/{f}"), 0o644, text.as_bytes());
        }
    }
    Ok(())
}

/// `cargo` set up to build for the architecture's musl target (the build's JSON messages on
/// stdout, its diagnostics on stderr).
pub(super) fn musl_cargo(root: &Path, arch: &GuestArch) -> Command {
    let mut cmd = Command::new("cargo");
    if let Some(prefix) = arch.cross_prefix {
        // As `cargo xtask image` cross-builds: Rust's self-contained rust-lld links against the
        // target's bundled musl; C in dependencies is compiled by Debian's cross gcc.
        let env_target = arch.musl.replace('-', "_");
        cmd.env(
            format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()),
            "rust-lld",
        )
        .env(format!("CC_{env_target}"), format!("{prefix}gcc"))
        .env(format!("AR_{env_target}"), format!("{prefix}ar"));
    }
    // Release code (the guest is emulated: debug builds of the BTF parsing and the tests are
    // slow there) without debug info (stripped anyway; it costs compile and link time).
    cmd.current_dir(root)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Builds the detector and its test executables for musl; returns (target name -> path) and
/// the detector binary's path, both as cargo's JSON output reports them (so wherever the
/// target directory is). In the guest the tests find the binary through `DETECTOR_BIN`.
pub(super) fn build_musl(
    root: &Path,
    arch: &GuestArch,
) -> Result<(BTreeMap<String, PathBuf>, PathBuf)> {
    let target = arch.musl;
    let mut cmd = musl_cargo(root, arch);
    cmd.args([
        "test",
        "--release",
        "--no-run",
        "--target",
        target,
        "-p",
        "detector",
        "--message-format=json-render-diagnostics",
        "--lib",
    ]);
    for c in CHECKS {
        if c.target != "lib" {
            cmd.args(["--test", c.target]);
        }
    }
    let out = cmd.output().context("starting cargo")?;
    if !out.status.success() {
        bail!(
            "building the guest's test binaries for {target} failed (is the target \
             installed? scripts/setup.sh adds it and the cross gcc)"
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
pub(super) fn stripped(path: &Path, work: &Path, arch: &GuestArch) -> Result<Vec<u8>> {
    let out = work.join("stripped");
    output(
        Command::new(format!("{}strip", arch.cross_prefix.unwrap_or_default()))
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(path),
    )?;
    Ok(fs::read(&out)?)
}

/// Where the payload lives in the guest: its own directory, never the host's path of the
/// binaries (a checkout under /tmp would be hidden by the guest's tmpfs on /tmp).
pub(super) const GUEST_DIR: &str = "detector";

pub(super) fn payload(
    tests: &BTreeMap<String, PathBuf>,
    detector: &Path,
    work: &Path,
    arch: &GuestArch,
) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    c.file(
        &format!("{GUEST_DIR}/bin/detector"),
        0o755,
        &stripped(detector, work, arch)?,
    );
    for (name, path) in tests {
        c.file(
            &format!("{GUEST_DIR}/tests/{name}"),
            0o755,
            &stripped(path, work, arch)?,
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

/// The payload of a vm-bench guest: the detector and xtask (which runs the bench and sends its
/// results), with the bench's script as the run script /init starts.
pub(super) fn bench_payload(
    detector: &Path,
    xtask: &Path,
    work: &Path,
    arch: &GuestArch,
) -> Result<Vec<u8>> {
    let mut c = Cpio::default();
    for (name, path) in [("detector", detector), ("xtask", xtask)] {
        c.file(
            &format!("{GUEST_DIR}/bin/{name}"),
            0o755,
            &stripped(path, work, arch)?,
        );
    }
    c.file(&format!("{GUEST_DIR}/run.sh"), 0o755, BENCH.as_bytes());
    Ok(c.finish())
}

/// Modules the checks need; their dependencies come along (modprobe --show-depends).
/// crc32c_generic must be loaded before libcrc32c (nf_conntrack's dependency) can resolve.
pub(super) const MODULES: &[&str] = &[
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

pub(super) const INIT: &str = include_str!("init.sh");

pub(super) const RUN: &str = include_str!("run.sh");

pub(super) const BENCH: &str = include_str!("bench.sh");
