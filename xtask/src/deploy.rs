//! The cluster deployment's tasks: `validate-manifests`, `image`, and the deploy/ stages of
//! `test` (manifest validation and the tuner/reproducer script tests).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// kubernetes-validate from PyPI, pinned: its schemas decide what "valid" means.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The musl target of the static binary (installed by scripts/setup.sh).
const MUSL: &str = "x86_64-unknown-linux-musl";
/// The image's name and tag (the tag follows the workspace version).
const IMAGE: &str = concat!("detector:", env!("CARGO_PKG_VERSION"));

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("detector")
}

/// Debian's python3 (python3-venv is installed for it by scripts/setup.sh), else any python3.
fn python() -> PathBuf {
    let debian = Path::new("/usr/bin/python3");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("python3")
    }
}

/// A cached venv with kubernetes-validate; created on first use.
fn venv() -> Result<PathBuf> {
    let dir = cache_dir().join(format!("venv-{}", KUBERNETES_VALIDATE.replace("==", "-")));
    let py = dir.join("bin/python");
    let stamp = dir.join(".installed");
    if stamp.exists() && py.exists() {
        return Ok(py);
    }
    println!(
        "validate-manifests: installing {KUBERNETES_VALIDATE} into {}",
        dir.display()
    );
    super::run(Command::new(python()).args(["-m", "venv"]).arg(&dir))
        .context("creating a Python venv (Debian needs python3-venv: run scripts/setup.sh)")?;
    super::run(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(KUBERNETES_VALIDATE),
    )
    .context("installing kubernetes-validate from PyPI")?;
    std::fs::write(&stamp, KUBERNETES_VALIDATE)?;
    Ok(py)
}

/// Runs a command, echoing its output, and returns the `N passed, N failed` counts of the line
/// that starts with `label`.
fn run_counted(cmd: &mut Command, label: &str) -> Result<(u64, u64)> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut counts = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix(label) {
            // "<label> 12 passed, 0 failed"
            let n: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            if let [p, f] = n[..] {
                counts = Some((p, f));
            }
        }
    }
    let status = child.wait()?;
    match counts {
        Some(c) => Ok(c),
        None => bail!("{shown} ended ({status}) without its `{label} N passed, N failed` line"),
    }
}

/// `cargo xtask validate-manifests`: schema, kustomizations, and the detector flags of every
/// manifest against `detector <subcommand> --help` of `detector` (default: a fresh debug build).
pub fn validate_manifests(detector: Option<&Path>) -> Result<(u64, u64)> {
    let root = super::root();
    let detector = match detector {
        Some(d) => d.to_path_buf(),
        None => {
            super::run(
                Command::new("cargo")
                    .current_dir(&root)
                    .args(["build", "-p", "detector", "--bin", "detector"]),
            )?;
            root.join("target/debug/detector")
        }
    };
    let py = venv()?;
    run_counted(
        Command::new(py)
            .current_dir(&root)
            .arg(root.join("deploy/tests/validate_manifests.py"))
            .arg("--deploy")
            .arg(root.join("deploy"))
            .arg("--detector")
            .arg(&detector),
        "manifests:",
    )
}

/// The given detector binary, or a fresh debug build of it.
fn detector_bin(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    let root = super::root();
    super::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "-p", "detector", "--bin", "detector"]),
    )?;
    Ok(root.join("target/debug/detector"))
}

/// The deploy/ script tests (the tuner/reset script in network namespaces, the reproducer
/// between two namespaces, the manifest validator against broken copies). Root only.
pub fn script_tests(filter: Option<&str>) -> Result<(u64, u64)> {
    let root = super::root();
    let mut cmd = Command::new(python());
    // The validator's own tests run it with a venv and a detector binary.
    cmd.env("KV_PYTHON", venv()?)
        .env("DETECTOR_BIN", detector_bin(None)?);
    cmd.current_dir(&root)
        .args(["-W", "ignore"])
        .arg(root.join("deploy/tests/run.py"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run_counted(&mut cmd, "deploy tests:")
}

/// Both deploy/ stages, for `cargo xtask test`.
pub fn test_stages() -> Result<(u64, u64)> {
    let (p1, f1) = validate_manifests(None)?;
    let (p2, f2) = script_tests(None)?;
    Ok((p1 + p2, f1 + f2))
}

/// `cargo xtask image`: the static musl binary, stripped, and (when buildah is installed) an
/// OCI archive of a `FROM scratch` image holding only it, built without a daemon or registry.
pub fn image() -> Result<()> {
    let root = super::root();
    let t0 = std::time::Instant::now();
    super::build_ebpf()?;
    super::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "detector",
        "--bin",
        "detector",
        "--no-default-features",
        "--target",
        MUSL,
    ]))
    .with_context(|| {
        format!(
            "building the static binary (needs `rustup target add {MUSL}`: run scripts/setup.sh)"
        )
    })?;
    let out = root.join("target/image");
    std::fs::create_dir_all(&out)?;
    let bin = out.join("detector");
    super::run(
        Command::new("strip")
            .arg("-o")
            .arg(&bin)
            .arg(root.join(format!("target/{MUSL}/release/detector"))),
    )
    .context("stripping the binary (binutils)")?;
    check_static(&bin)?;
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "image: static binary {} ({:.1} MiB, {:.0} s)",
        bin.strip_prefix(&root).unwrap_or(&bin).display(),
        size as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    if Command::new("buildah")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        println!(
            "image: buildah is not installed, so no OCI archive was built. Either \
             `apt-get install buildah` and run this again, or build deploy/Dockerfile: \
             `docker build -f deploy/Dockerfile -t REGISTRY/{IMAGE} .`"
        );
        return Ok(());
    }
    let archive = out.join(format!("{}.oci.tar", IMAGE.replace(':', "-")));
    buildah_scratch(&out, &bin, &archive)?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "image: {IMAGE} -> {} ({:.1} MiB OCI archive, FROM scratch, built by buildah with vfs \
         storage, no daemon, no registry; {:.0} s in all)",
        archive.strip_prefix(&root).unwrap_or(&archive).display(),
        size as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    println!(
        "image: push it with `skopeo copy oci-archive:{}:{IMAGE} docker://REGISTRY/{IMAGE}` \
         and set that name in deploy/detector/kustomization.yaml (images:)",
        archive.strip_prefix(&root).unwrap_or(&archive).display()
    );
    Ok(())
}

/// A static binary has no program interpreter (PT_INTERP); `file` is not needed to tell.
fn check_static(bin: &Path) -> Result<()> {
    let elf = std::fs::read(bin)?;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        bail!("{} is not a 64-bit ELF file", bin.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        // PT_INTERP = 3
        if off + 4 <= elf.len()
            && u32::from_le_bytes([elf[off], elf[off + 1], elf[off + 2], elf[off + 3]]) == 3
        {
            bail!("{} is dynamically linked (has PT_INTERP)", bin.display());
        }
    }
    Ok(())
}

/// `FROM scratch` + the binary, with buildah's vfs storage under target/image (no overlay, no
/// daemon, nothing pulled), pushed to an OCI archive.
fn buildah_scratch(out: &Path, bin: &Path, archive: &Path) -> Result<()> {
    let buildah = || {
        let mut c = Command::new("buildah");
        c.arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(out.join("storage"))
            .arg("--runroot")
            .arg(out.join("run"));
        c
    };
    let from = buildah()
        .args(["from", "scratch"])
        .output()
        .context("buildah from scratch")?;
    if !from.status.success() {
        bail!(
            "buildah from scratch: {}",
            String::from_utf8_lossy(&from.stderr).trim()
        );
    }
    let ctr = String::from_utf8(from.stdout)?.trim().to_string();
    super::run(
        buildah()
            .args(["copy", "--chmod", "0755", &ctr])
            .arg(bin)
            .arg("/detector"),
    )?;
    super::run(buildah().args([
        "config",
        "--entrypoint",
        r#"["/detector"]"#,
        "--cmd",
        "run",
        "--label",
        "org.opencontainers.image.title=detector",
        "--label",
        concat!(
            "org.opencontainers.image.version=",
            env!("CARGO_PKG_VERSION")
        ),
        &ctr,
    ]))?;
    let commit = buildah()
        .args(["commit", "--quiet", "--rm", &ctr, IMAGE])
        .output()?;
    if !commit.status.success() {
        bail!(
            "buildah commit: {}",
            String::from_utf8_lossy(&commit.stderr).trim()
        );
    }
    let _ = std::fs::remove_file(archive);
    let push = buildah()
        .args(["push", "--quiet", IMAGE])
        .arg(format!("oci-archive:{}:{IMAGE}", archive.display()))
        .output()?;
    if !push.status.success() {
        bail!(
            "buildah push: {}",
            String::from_utf8_lossy(&push.stderr).trim()
        );
    }
    // Proof that the image runs: its root filesystem holds nothing but the binary, so running
    // the binary chrooted there shows it needs nothing else.
    let from = buildah().args(["from", "--quiet", IMAGE]).output()?;
    let ctr = String::from_utf8(from.stdout)?.trim().to_string();
    let mounted = buildah().args(["mount", &ctr]).output()?;
    let rootfs = PathBuf::from(String::from_utf8(mounted.stdout)?.trim());
    let files: Vec<String> = std::fs::read_dir(&rootfs)
        .with_context(|| format!("reading the image's root {}", rootfs.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let version = Command::new("chroot")
        .arg(&rootfs)
        .args(["/detector", "--version"])
        .output();
    let _ = buildah().args(["rm", &ctr]).output();
    let version = version.context("chroot into the image")?;
    if !version.status.success() {
        bail!(
            "the image's /detector does not run: {}",
            String::from_utf8_lossy(&version.stderr).trim()
        );
    }
    println!(
        "image: its root holds {files:?}; `chroot <image root> /detector --version` prints `{}`",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    Ok(())
}
