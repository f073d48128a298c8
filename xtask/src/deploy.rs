//! The cluster deployment's tasks: `validate-manifests`, `image`, and the deploy/ stages of
//! `test` (manifest validation, the tuner/reproducer script tests, and the image run under
//! runc).

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
    // The runtime test runs the image under runc: built only when that test is selected.
    if filter.is_none_or(|f| f.to_ascii_lowercase().contains("runc")) {
        cmd.env("DETECTOR_IMAGE_ARCHIVE", runtime_test_image()?);
    }
    cmd.current_dir(&root)
        .args(["-W", "ignore"])
        .arg(root.join("deploy/tests/run.py"));
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run_counted(&mut cmd, "deploy tests:")
}

/// The amd64 image as an OCI archive, for the runtime test (tests/test_runc.py): the static
/// binary `cargo xtask image` builds, in the same `FROM scratch` image, pushed alone to
/// target/image/detector-VERSION-amd64.oci.tar. Rebuilt only when cargo rebuilt the binary, so
/// after the first build a run costs a few seconds.
pub fn runtime_test_image() -> Result<PathBuf> {
    let root = super::root();
    let t0 = std::time::Instant::now();
    let arch = &ARCHES[0];
    let bin = static_binary(&root, arch)?;
    let built = root.join(format!("target/{}/release/detector", arch.target));
    let out = root.join("target/image");
    let archive = out.join(format!("{}-{}.oci.tar", IMAGE.replace(':', "-"), arch.oci));
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if mtime(&archive).is_some() && mtime(&archive) > mtime(&built) {
        println!(
            "deploy-test: image {} is newer than its binary: reused",
            archive.strip_prefix(&root).unwrap_or(&archive).display()
        );
        return Ok(archive);
    }
    let tag = arch_image(&out, arch, &bin)
        .context("building the image for the runtime test (needs buildah: run scripts/setup.sh)")?;
    let _ = std::fs::remove_file(&archive);
    buildah_out(
        buildah(&out)
            .args(["push", "--quiet", "--format", "oci", &tag])
            .arg(format!("oci-archive:{}:{IMAGE}", archive.display())),
        "push",
    )?;
    println!(
        "deploy-test: image {IMAGE} ({}) -> {} in {:.0} s",
        arch.oci,
        archive.strip_prefix(&root).unwrap_or(&archive).display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(archive)
}

/// Both deploy/ stages, for `cargo xtask test`.
pub fn test_stages() -> Result<(u64, u64)> {
    let (p1, f1) = validate_manifests(None)?;
    let (p2, f2) = script_tests(None)?;
    Ok((p1 + p2, f1 + f2))
}

/// One architecture of the image: the Rust target of its static binary, the OCI name of the
/// architecture, the ELF machine number the binary must carry, and the cross tools it needs
/// (none for the host's own).
struct Arch {
    target: &'static str,
    oci: &'static str,
    elf_machine: u16,
    /// Debian's cross gcc for C code in dependencies (ring), and its strip.
    cross_prefix: Option<&'static str>,
    /// How a binary of this architecture runs here: directly, or under Debian's qemu-user.
    runner: Option<&'static str>,
}

const ARCHES: [Arch; 2] = [
    Arch {
        target: MUSL,
        oci: "amd64",
        elf_machine: 62, // EM_X86_64
        cross_prefix: None,
        runner: None,
    },
    Arch {
        target: "aarch64-unknown-linux-musl",
        oci: "arm64",
        elf_machine: 183, // EM_AARCH64
        cross_prefix: Some("aarch64-linux-gnu-"),
        runner: Some("qemu-aarch64-static"),
    },
];

/// Builds the static, stripped binary of one architecture into target/image/<oci>/detector.
/// The eBPF object inside is built for that architecture by detector/build.rs (kprobe
/// argument registers differ). Cross builds link with Rust's self-contained rust-lld and the
/// target's bundled musl, and compile C with Debian's cross gcc (scripts/setup.sh installs
/// gcc-aarch64-linux-gnu and the rustup target).
fn static_binary(root: &Path, arch: &Arch) -> Result<PathBuf> {
    let mut cargo = Command::new("cargo");
    // No debug info (the binary is stripped below): the same release settings as vm-test's
    // musl build, so the two share their compiled dependencies in one test run.
    cargo
        .current_dir(root)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .args([
            "build",
            "--release",
            "-p",
            "detector",
            "--bin",
            "detector",
            "--no-default-features",
            "--target",
            arch.target,
        ]);
    let mut strip = "strip".to_string();
    if let Some(prefix) = arch.cross_prefix {
        let env_target = arch.target.replace('-', "_");
        let linker_var = format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase());
        if std::env::var_os(&linker_var).is_none() {
            cargo.env(&linker_var, "rust-lld");
        }
        for (tool, var) in [("gcc", "CC"), ("ar", "AR")] {
            let var = format!("{var}_{env_target}");
            if std::env::var_os(&var).is_none() {
                cargo.env(var, format!("{prefix}{tool}"));
            }
        }
        strip = format!("{prefix}strip");
    }
    super::run(&mut cargo).with_context(|| {
        format!(
            "building the static {} binary (needs `rustup target add {}` and, for cross \
             targets, Debian's cross gcc: run scripts/setup.sh)",
            arch.oci, arch.target
        )
    })?;
    let dir = root.join("target/image").join(arch.oci);
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("detector");
    super::run(
        Command::new(&strip)
            .arg("-o")
            .arg(&bin)
            .arg(root.join(format!("target/{}/release/detector", arch.target))),
    )
    .with_context(|| format!("stripping the {} binary ({strip}, binutils)", arch.oci))?;
    check_static(&bin, arch.elf_machine)?;
    Ok(bin)
}

/// Runs `<bin> --version` natively or under qemu-user; returns what it printed.
fn version_of(bin: &Path, arch: &Arch, chroot: Option<&Path>) -> Result<String> {
    let mut cmd = match (arch.runner, chroot) {
        (None, Some(rootfs)) => {
            let mut c = Command::new("chroot");
            c.arg(rootfs).arg("/detector");
            c
        }
        (None, None) => Command::new(bin),
        (Some(runner), _) => {
            let mut c = Command::new(runner);
            c.arg(bin);
            c
        }
    };
    let out = cmd.arg("--version").output().with_context(|| {
        format!(
            "running the {} binary ({}; Debian's qemu-user-static runs foreign ones)",
            arch.oci,
            arch.runner.unwrap_or("natively")
        )
    })?;
    if !out.status.success() {
        bail!(
            "the {} binary does not run: {}",
            arch.oci,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `cargo xtask image`: the static musl binary of each architecture (amd64, arm64), stripped,
/// each shown to run (`--version`, arm64 under qemu-user), and (when buildah is installed) an
/// OCI archive holding a two-architecture image index of `FROM scratch` images, built without
/// a daemon or registry.
pub fn image() -> Result<()> {
    let root = super::root();
    let t0 = std::time::Instant::now();
    super::build_ebpf()?;
    let mut bins = Vec::new();
    for arch in &ARCHES {
        let bin = static_binary(&root, arch)?;
        let version = version_of(&bin, arch, None)?;
        let size = std::fs::metadata(&bin)?.len();
        println!(
            "image: static {} binary {} ({:.1} MiB, {:.0} s so far); `{}{} --version` prints `{version}`",
            arch.oci,
            bin.strip_prefix(&root).unwrap_or(&bin).display(),
            size as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64(),
            arch.runner.map(|r| format!("{r} ")).unwrap_or_default(),
            bin.strip_prefix(&root).unwrap_or(&bin).display(),
        );
        bins.push((arch, bin));
    }
    let out = root.join("target/image");
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
    buildah_index(&out, &bins, &archive)?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "image: {IMAGE} -> {} ({:.1} MiB OCI archive: an image index of {}, each FROM scratch, \
         built by buildah with vfs storage, no daemon, no registry; {:.0} s in all)",
        archive.strip_prefix(&root).unwrap_or(&archive).display(),
        size as f64 / (1 << 20) as f64,
        ARCHES.map(|a| a.oci).join(" + "),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "image: push it with `skopeo copy --all oci-archive:{}:{IMAGE} docker://REGISTRY/{IMAGE}` \
         and set that name in deploy/detector/kustomization.yaml (images:)",
        archive.strip_prefix(&root).unwrap_or(&archive).display()
    );
    Ok(())
}

/// A static binary has no program interpreter (PT_INTERP), and its ELF header names the
/// machine it was built for; `file` is not needed to tell.
fn check_static(bin: &Path, machine: u16) -> Result<()> {
    let elf = std::fs::read(bin)?;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        bail!("{} is not a 64-bit ELF file", bin.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    // e_machine
    if u16_at(0x12) != usize::from(machine) {
        bail!(
            "{} is for ELF machine {}, not {machine}",
            bin.display(),
            u16_at(0x12)
        );
    }
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

/// A buildah command on the vfs storage under target/image (no overlay, no daemon).
fn buildah(out: &Path) -> Command {
    let mut c = Command::new("buildah");
    c.arg("--storage-driver")
        .arg("vfs")
        .arg("--root")
        .arg(out.join("storage"))
        .arg("--runroot")
        .arg(out.join("run"));
    c
}

/// Runs a buildah command and returns its trimmed stdout, or its stderr as the error.
fn buildah_out(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("buildah {what}"))?;
    if !out.status.success() {
        bail!(
            "buildah {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The `FROM scratch` image of one architecture, holding `bin` as /detector, committed to
/// the vfs storage under `out` as `IMAGE-<arch>`; returns that tag.
fn arch_image(out: &Path, arch: &Arch, bin: &Path) -> Result<String> {
    let tag = format!("{IMAGE}-{}", arch.oci);
    let ctr = buildah_out(
        buildah(out).args(["from", "--quiet", "scratch"]),
        "from scratch",
    )?;
    super::run(
        buildah(out)
            .args(["copy", "--quiet", "--chmod", "0755", &ctr])
            .arg(bin)
            .arg("/detector"),
    )?;
    super::run(buildah(out).args([
        "config",
        "--arch",
        arch.oci,
        "--os",
        "linux",
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
    buildah_out(
        buildah(out).args(["commit", "--quiet", "--rm", &ctr, &tag]),
        "commit",
    )?;
    Ok(tag)
}

/// One `FROM scratch` image per architecture (tagged `IMAGE-<arch>`, its config naming that
/// architecture), each shown to run from its own root filesystem, then an image index of both
/// pushed to an OCI archive.
fn buildah_index(out: &Path, bins: &[(&Arch, PathBuf)], archive: &Path) -> Result<()> {
    // A previous run's list (or single image) of the same name would make `manifest create` fail.
    let _ = buildah(out).args(["manifest", "rm", IMAGE]).output();
    let _ = buildah(out).args(["rmi", "--force", IMAGE]).output();
    buildah_out(
        buildah(out).args(["manifest", "create", IMAGE]),
        "manifest create",
    )?;
    for (arch, bin) in bins {
        let tag = arch_image(out, arch, bin)?;
        // Proof that the image runs: its root filesystem holds nothing but the binary, so
        // running that binary (chrooted there, or under qemu-user for arm64) shows it needs
        // nothing else.
        let ctr = buildah_out(buildah(out).args(["from", "--quiet", &tag]), "from")?;
        let rootfs = buildah_out(buildah(out).args(["mount", &ctr]), "mount").map(PathBuf::from);
        let checked = rootfs.and_then(|rootfs| {
            let files: Vec<String> = std::fs::read_dir(&rootfs)
                .with_context(|| format!("reading the image's root {}", rootfs.display()))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            let version = version_of(&rootfs.join("detector"), arch, Some(&rootfs))?;
            Ok((files, version))
        });
        let _ = buildah(out).args(["rm", &ctr]).output();
        let (files, version) = checked?;
        println!(
            "image: {tag}: its root holds {files:?}; its /detector --version ({}) prints `{version}`",
            arch.runner.unwrap_or("chroot")
        );
        buildah_out(
            buildah(out)
                .args([
                    "manifest", "add", "--arch", arch.oci, "--os", "linux", IMAGE,
                ])
                .arg(format!("containers-storage:localhost/{tag}")),
            "manifest add",
        )?;
    }
    let _ = std::fs::remove_file(archive);
    buildah_out(
        buildah(out)
            .args([
                "manifest", "push", "--quiet", "--all", "--format", "oci", IMAGE,
            ])
            .arg(format!("oci-archive:{}:{IMAGE}", archive.display())),
        "manifest push",
    )?;
    let index = buildah_out(
        buildah(out).args(["manifest", "inspect", IMAGE]),
        "manifest inspect",
    )?;
    println!("image: index {IMAGE}:\n{index}");
    Ok(())
}
