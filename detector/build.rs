//! Builds the eBPF objects (crate `detector-ebpf`, its own workspace with a pinned nightly) and
//! hands their paths to the crate for `include_bytes_aligned!`:
//!
//! - `$OUT_DIR/detector-ebpf.o`: the production object (every backend's programs);
//! - `$OUT_DIR/detector-lab-ebpf.o`: the lab's emulated NPA datapath (TC classifiers), only
//!   with the `lab` feature.
//!
//! `DETECTOR_EBPF_OBJECT=/path/to/object` (and `DETECTOR_LAB_EBPF_OBJECT` for the lab's) skips
//! the build and embeds that file instead (for cross or image builds that produced the objects
//! elsewhere, e.g. with `cargo xtask build-ebpf`).
//!
//! Architecture: BPF bytecode is the same everywhere, but kprobe programs read their arguments
//! from the kernel's `struct pt_regs`, whose layout is per architecture. aya-ebpf picks the
//! registers by its `bpf_target_arch` cfg, which its build script takes from
//! `AYA_BPF_TARGET_ARCH` or else from the host. So the object is built for the detector's
//! target architecture (`CARGO_CFG_TARGET_ARCH`): on an x86_64 host building for aarch64 the
//! child build gets `AYA_BPF_TARGET_ARCH=aarch64` and its own target directory. (Not
//! `RUSTFLAGS=--cfg bpf_target_arch=...`: RUSTFLAGS replaces the `[target]` rustflags of
//! detector-ebpf/.cargo/config.toml, which ask the linker for the BTF the loader needs.)

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a build script reports failure by panicking with a message"
)]

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const OBJECT: &str = "detector-ebpf";
const LAB_OBJECT: &str = "detector-lab-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=DETECTOR_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=DETECTOR_LAB_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lab = env::var_os("CARGO_FEATURE_LAB").is_some();

    let given = env::var_os("DETECTOR_EBPF_OBJECT").map(PathBuf::from);
    let given_lab = env::var_os("DETECTOR_LAB_EBPF_OBJECT").map(PathBuf::from);
    let built = if given.is_none() || (lab && given_lab.is_none()) {
        Some(build_objects())
    } else {
        None
    };
    let pick = |given: Option<PathBuf>, name: &str| -> PathBuf {
        match (given, &built) {
            (Some(path), _) => {
                println!("cargo:rerun-if-changed={}", path.display());
                path
            }
            (None, Some(dir)) => dir.join(name),
            (None, None) => unreachable!("built whenever an object is not given"),
        }
    };
    copy(&pick(given, OBJECT), &out_dir.join(format!("{OBJECT}.o")));
    if lab {
        copy(
            &pick(given_lab, LAB_OBJECT),
            &out_dir.join(format!("{LAB_OBJECT}.o")),
        );
    }
}

/// Builds both objects (the crate's two binaries); returns the directory that holds them.
fn build_objects() -> PathBuf {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest
        .parent()
        .expect("detector/ lives in the workspace root");
    let ebpf = root.join("detector-ebpf");
    for watched in [
        ebpf.join("src"),
        ebpf.join("Cargo.toml"),
        ebpf.join("rust-toolchain.toml"),
        ebpf.join(".cargo/config.toml"),
        root.join("detector-common/src"),
        root.join("detector-common/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }

    // The detector's target architecture decides aya-ebpf's pt_regs layout (see the module
    // doc). x86_64 keeps the historical target directory, which `cargo xtask build-ebpf` shares.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let target_dir = if arch == "x86_64" {
        root.join("target").join("ebpf")
    } else {
        root.join("target").join(format!("ebpf-{arch}"))
    };
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        .env("AYA_BPF_TARGET_ARCH", &arch);
    // The outer cargo's toolchain and flags must not leak into the nightly eBPF build: its
    // rust-toolchain.toml decides the toolchain.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().to_string();
        if key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status();
    let ok = matches!(&status, Ok(s) if s.success());
    if !ok {
        panic!(
            "\n\nbuilding the eBPF objects failed ({status:?}).\n\
             It needs the nightly toolchain with rust-src and bpf-linker: run `scripts/setup.sh`,\n\
             then `cargo xtask build-ebpf` to see the build's own errors, or set\n\
             DETECTOR_EBPF_OBJECT=/path/to/detector-ebpf (and DETECTOR_LAB_EBPF_OBJECT=\n\
             /path/to/detector-lab-ebpf with the `lab` feature) to embed prebuilt objects.\n\n"
        );
    }
    target_dir.join("bpfel-unknown-none/release")
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!(
            "\n\ncannot read the eBPF object {}: {e}.\nBuild it with `cargo xtask build-ebpf`.\n\n",
            from.display()
        );
    }
}
