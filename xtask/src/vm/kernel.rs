//! The guest's kernel: Debian's package fetched with `apt-get download` (never installed on
//! the host), unpacked, `depmod`'ed, and its bzImage decompressed to an ELF vmlinux; and a
//! static busybox. Cached under ~/.cache/detector/vm/ by version.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{cache_dir, done, step};
use crate::util::output;

/// The version apt would download for `package`, from the local apt lists (the cache key).
/// Lists that do not know the package (a fresh image with empty lists) are updated once.
pub(super) fn candidate(package: &str) -> Result<Option<String>> {
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
pub(super) struct Kernel {
    pub(super) release: String,
    pub(super) root: PathBuf,
    pub(super) vmlinux: PathBuf,
}

/// Downloads, unpacks and prepares the kernel package once per package version.
pub(super) fn kernel() -> Result<Kernel> {
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
pub(super) fn apt_download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
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
pub(super) fn busybox() -> Result<PathBuf> {
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
pub(super) fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
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

/// Debian's 6.1 LTS kernel (bookworm), the closest to EKS AL2023's 6.1 that apt can fetch.
pub(super) const KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-amd64";
