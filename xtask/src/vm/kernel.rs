//! The guest's kernel: Debian's package fetched with `apt-get download` (never installed on
//! the host), unpacked, `depmod`'ed, and an amd64 bzImage decompressed to an ELF vmlinux; and
//! a static busybox of the guest's architecture. Cached under ~/.cache/detector/vm/ by version.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::apt::Apt;
use super::{done, step};
use crate::util::output;

/// The unpacked kernel package: its release name, the module tree root and the image qemu
/// boots.
pub(super) struct Kernel {
    pub(super) release: String,
    pub(super) root: PathBuf,
    pub(super) vmlinux: PathBuf,
}

/// Downloads, unpacks and prepares a kernel package once per package version: `depmod` (the
/// package ships no modules.dep; its postinst makes it) and, for a bzImage, the ELF vmlinux
/// inside it. An arm64 `vmlinuz` is already a plain `Image` that qemu boots as it is.
pub(super) fn kernel(apt: &Apt, package: &str) -> Result<Kernel> {
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("{package} is not a linux-image-* package"))?
        .to_string();
    let root = apt.unpacked(package, &[package]).with_context(|| {
        format!(
            "fetching the guest kernel {package} ({}): if a newer ABI replaced it, name that \
             package in GUESTS (xtask/src/vm/guests.rs)",
            apt.arch
        )
    })?;
    let dir = root
        .parent()
        .context("kernel tree has no parent")?
        .to_path_buf();
    let k = Kernel {
        release: release.clone(),
        vmlinux: dir.join("vmlinux"),
        root,
    };
    if !k
        .root
        .join(format!("lib/modules/{release}/modules.dep"))
        .exists()
    {
        let t = step(&format!("depmod for {release}"));
        output(Command::new("depmod").arg("-b").arg(&k.root).arg(&release))?;
        done(t, "modules.dep written");
    }
    if !k.vmlinux.exists() {
        let image = fs::read(k.root.join(format!("boot/vmlinuz-{release}")))?;
        let bootable = if image.starts_with(b"MZ") && image.get(0x202..0x206) == Some(b"HdrS") {
            extract_vmlinux(&image)?
        } else {
            image
        };
        let tmp = dir.join("vmlinux.tmp");
        fs::write(&tmp, bootable)?;
        fs::rename(&tmp, &k.vmlinux)?;
    }
    println!("vm-test: kernel {package} ({})", dir.display());
    Ok(k)
}

/// Debian's static busybox for the guest's architecture, unpacked from its package (not
/// installed: the host's /bin/busybox may be the dynamic `busybox` package, which conflicts
/// with it, and the guest may be another architecture).
pub(super) fn busybox(apt: &Apt) -> Result<PathBuf> {
    let bin = apt
        .unpacked("busybox-static", &["busybox-static"])?
        .join("bin/busybox");
    if !bin.is_file() {
        bail!("busybox-static has no bin/busybox");
    }
    Ok(bin)
}

/// The ELF kernel inside a Debian bzImage (xz payload up to 6.1, zstd from 6.12). qemu boots
/// an ELF vmlinux through its PVH note, which skips the firmware and the in-guest
/// decompression (about 3 s under TCG).
pub(super) fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    const XZ: &[u8] = b"\xfd7zXZ\x00";
    const ZSTD: &[u8] = b"\x28\xb5\x2f\xfd";
    let find = |magic: &[u8]| bz.windows(magic.len()).position(|w| w == magic);
    // Each stops at the end of its first stream or frame (the bzImage has trailing data; zstd
    // then complains about it, which is why only the output is judged).
    let (at, tool, args): (usize, &str, &[&str]) = if let Some(at) = find(XZ) {
        (at, "xz", &["-dc", "--single-stream"])
    } else if let Some(at) = find(ZSTD) {
        (at, "zstd", &["-dcq"])
    } else {
        bail!("no xz or zstd payload in the kernel image");
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    let mut stdin = child.stdin.take().context("decompressor stdin")?;
    let payload = bz[at..].to_vec();
    let feeder = std::thread::spawn(move || {
        // The decompressor stops reading at the end of the stream: a broken pipe is expected.
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output()?;
    let _ = feeder.join();
    if !out.stdout.starts_with(b"\x7fELF") {
        bail!("decompressing the kernel image did not give an ELF vmlinux");
    }
    Ok(out.stdout)
}
