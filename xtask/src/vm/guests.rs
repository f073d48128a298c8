//! The kernel matrix: which Debian kernels boot on which architecture, how qemu runs each
//! architecture, and where a guest's userland tools (ip, tc, nft, conntrack) come from.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::apt::{Apt, resolve_in};
use super::initramfs::libraries;
use crate::util::output;

/// How one architecture's guest is built and booted.
pub struct GuestArch {
    /// Debian's architecture name (apt, the table's column).
    pub deb: &'static str,
    /// The Rust target of the guest's static test payload.
    pub musl: &'static str,
    /// Cross binutils/gcc prefix when the payload is cross-built.
    pub cross_prefix: Option<&'static str>,
    pub qemu: &'static str,
    /// The Debian package with `qemu`.
    pub qemu_package: &'static str,
    /// Machine and CPU options (TCG; amd64 tries KVM first where it works).
    pub machine: &'static [&'static str],
    /// The kernel's console device.
    pub console: &'static str,
    /// The guest device its run script writes results to: a second port, kept apart from
    /// kernel messages. arm64's `virt` board has one UART, so a virtio console carries them.
    pub results_tty: &'static str,
    /// qemu options that create `results_tty`, wired to the chardev `results`.
    pub results_device: &'static [&'static str],
    /// Modules the guest needs before it can write results (loaded by /init).
    pub early_modules: &'static [&'static str],
}

pub const AMD64: GuestArch = GuestArch {
    deb: "amd64",
    musl: "x86_64-unknown-linux-musl",
    cross_prefix: None,
    qemu: "qemu-system-x86_64",
    qemu_package: "qemu-system-x86",
    machine: &[],
    console: "ttyS0",
    results_tty: "/dev/ttyS1",
    results_device: &["-serial", "chardev:results"],
    early_modules: &[],
};

pub const ARM64: GuestArch = GuestArch {
    deb: "arm64",
    musl: "aarch64-unknown-linux-musl",
    cross_prefix: Some("aarch64-linux-gnu-"),
    qemu: "qemu-system-aarch64",
    qemu_package: "qemu-system-arm",
    // pauth-impdef: the architected pointer-authentication hash (QARMA) dominates TCG time;
    // the implementation-defined one is much cheaper to emulate and the guest cannot tell.
    machine: &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
    console: "ttyAMA0",
    results_tty: "/dev/hvc0",
    results_device: &[
        "-device",
        "virtio-serial-device",
        "-device",
        "virtconsole,chardev=results",
    ],
    early_modules: &["virtio_mmio", "virtio_console"],
};

/// One column of the matrix.
pub struct GuestSpec {
    /// The column's name, e.g. `6.1 amd64`.
    pub label: &'static str,
    pub arch: &'static GuestArch,
    /// Debian's kernel package (`apt-get download`ed for `arch`).
    pub kernel_package: &'static str,
    /// Give up on the guest after this long (qemu start to power-off) unless `--timeout` says.
    pub timeout_secs: u64,
    /// Part of `cargo xtask test` (CI); `cargo xtask vm-test` boots every guest.
    pub in_test: bool,
}

/// The guests `cargo xtask vm-test` boots, in order. EKS nodes run 6.1 and 6.12 on x86_64
/// and arm64 (Graviton); these are Debian's builds of the same kernel lines (nf_conntrack a
/// module, module BTF, kprobes and trampolines on).
pub const GUESTS: &[GuestSpec] = &[
    GuestSpec {
        label: "6.1 amd64",
        arch: &AMD64,
        kernel_package: "linux-image-6.1.0-56-amd64",
        timeout_secs: 540,
        in_test: true,
    },
    GuestSpec {
        // bookworm-security's backport of trixie's 6.12.
        label: "6.12 amd64",
        arch: &AMD64,
        kernel_package: "linux-image-6.12.117+deb12-amd64",
        timeout_secs: 540,
        in_test: true,
    },
    GuestSpec {
        label: "6.1 arm64",
        arch: &ARM64,
        kernel_package: "linux-image-6.1.0-56-arm64",
        timeout_secs: 1200,
        in_test: true,
    },
];

/// The tools the tests run, at their paths in the guest.
pub(super) const TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/nft",
    "/usr/sbin/conntrack",
];

/// The Debian packages with the tools and every library they load (bookworm).
const TOOL_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "libnftables1",
    "conntrack",
    "libbpf1",
    "libbsd0",
    "libc6",
    "libcap2",
    "libedit2",
    "libelf1",
    "libgmp10",
    "libjansson4",
    "libmd0",
    "libmnl0",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
    "libnftnl11",
    "libtinfo6",
    "libxtables12",
    "zlib1g",
];

/// Files of the guest's userland: (path in the guest, file on the host). The host's own
/// architecture copies the host's tools and what `ldd` names; another architecture takes the
/// same tools from its Debian packages (unpacked, never installed) with the libraries their
/// ELF headers ask for, found in those packages.
pub(super) fn userland(apt: &Apt) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    if apt.arch == AMD64.deb && cfg!(target_arch = "x86_64") {
        let mut libs = BTreeSet::new();
        for t in TOOLS {
            files.push((t.to_string(), PathBuf::from(t)));
            libs.extend(libraries(t)?);
        }
        for l in libs {
            let real = std::fs::canonicalize(&l)?;
            files.push((l.to_string_lossy().into_owned(), real));
        }
        return Ok(files);
    }
    let root = apt.unpacked("guest-tools", TOOL_PACKAGES)?;
    let mut wanted: Vec<(String, PathBuf)> = Vec::new();
    for t in TOOLS {
        let name = Path::new(t).file_name().context("tool path")?;
        let found = ["usr/sbin", "sbin", "bin", "usr/bin"]
            .iter()
            .map(|d| root.join(d).join(name))
            .find(|p| p.exists())
            .with_context(|| format!("no {} in the {} packages", t, apt.arch))?;
        wanted.push((
            t.to_string(),
            resolve_in(&root, found.strip_prefix(&root)?)?,
        ));
    }
    let mut seen = BTreeSet::new();
    while let Some((guest, host)) = wanted.pop() {
        if !seen.insert(guest.clone()) {
            continue;
        }
        let (interp, needed) = elf_dynamic(&host)?;
        if let Some(i) = interp {
            wanted.push((i.clone(), resolve_in(&root, Path::new(&i))?));
        }
        for lib in needed {
            let dir = ["lib", "usr/lib"]
                .iter()
                .map(|d| Path::new(d).join(multiarch(apt.arch)))
                .find(|d| root.join(d).join(&lib).exists())
                .with_context(|| {
                    format!(
                        "{} needs {lib}, which none of the {} packages in TOOL_PACKAGES has",
                        host.display(),
                        apt.arch
                    )
                })?;
            wanted.push((
                format!("/lib/{}/{lib}", multiarch(apt.arch)),
                resolve_in(&root, &dir.join(&lib))?,
            ));
        }
        files.push((guest, host));
    }
    Ok(files)
}

fn multiarch(deb: &str) -> &'static str {
    match deb {
        "arm64" => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    }
}

/// An ELF file's program interpreter and DT_NEEDED libraries, from binutils' readelf (which
/// reads any architecture's ELF).
fn elf_dynamic(path: &Path) -> Result<(Option<String>, Vec<String>)> {
    let text = output(Command::new("readelf").args(["-l", "-d", "-W"]).arg(path))?;
    let interp = text
        .lines()
        .find_map(|l| l.split("program interpreter: ").nth(1))
        .map(|s| s.trim_end_matches(']').to_string());
    let needed = text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1))
        .map(|s| s.trim_end_matches(']').to_string())
        .collect();
    Ok((interp, needed))
}

/// The guest of the matrix labelled `label`; an error listing the labels when there is none.
pub fn guest_by_label(label: &str) -> anyhow::Result<&'static GuestSpec> {
    GUESTS.iter().find(|g| g.label == label).ok_or_else(|| {
        anyhow::anyhow!(
            "no guest `{label}`; the guests are: {}",
            GUESTS
                .iter()
                .map(|g| g.label)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}
