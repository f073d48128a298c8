//! Builds the eBPF object (crate `detector-ebpf`, its own workspace with a pinned nightly) and
//! hands its path to the crate for `include_bytes_aligned!`.
//!
//! `DETECTOR_EBPF_OBJECT=/path/to/object` skips the build and embeds that file instead (for
//! cross or image builds that produced the object elsewhere, e.g. with `cargo xtask build-ebpf`).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    println!("cargo:rerun-if-env-changed=DETECTOR_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out_dir.join("detector-ebpf.o");

    if let Some(obj) = env::var_os("DETECTOR_EBPF_OBJECT") {
        let obj = PathBuf::from(obj);
        println!("cargo:rerun-if-changed={}", obj.display());
        copy(&obj, &dest);
        return;
    }

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
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }

    let target_dir = root.join("target").join("ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
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
            "\n\nbuilding the eBPF object failed ({status:?}).\n\
             It needs the nightly toolchain with rust-src and bpf-linker: run `scripts/setup.sh`,\n\
             then `cargo xtask build-ebpf` to see the build's own errors, or set\n\
             DETECTOR_EBPF_OBJECT=/path/to/detector-ebpf to embed a prebuilt object.\n\n"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/detector-ebpf");
    copy(&obj, &dest);
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!(
            "\n\ncannot read the eBPF object {}: {e}.\nBuild it with `cargo xtask build-ebpf`.\n\n",
            from.display()
        );
    }
}
