#!/usr/bin/env bash
# Installs what building and testing the detector needs on a Debian machine, as root:
#   - Debian packages: those the tests drive (iproute2, nftables, conntrack, util-linux, procps,
#     kmod), C toolchains for linking and for C in dependencies (gcc, libc6-dev, musl-tools,
#     gcc-aarch64-linux-gnu) and qemu-user-static for the arm64 binary,
#     deploy/'s tests (python3-venv, busybox, buildah, runc) and the qemu guest stage
#     (qemu-system-x86, qemu-system-arm, xz-utils, zstd, binutils), chromium for the report's
#     screenshot test; see APT_PACKAGES below;
#   - the pinned stable toolchain (rust-toolchain.toml) with the musl targets, and the pinned
#     nightly with rust-src (detector-ebpf/rust-toolchain.toml), with rustup;
#   - bpf-linker, built from crates.io against that nightly's own libLLVM;
#   - cargo-fuzz from crates.io (`cargo xtask fuzz` builds fuzz/ with that nightly).
# Fetched on first use, not here: the guest's Debian kernel and static busybox (apt-get
# download, never installed; cargo xtask vm-test) and kubernetes-validate (PyPI, in a cached
# venv; cargo xtask validate-manifests).
# Idempotent: each step checks first, so a second run takes about a second.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
toolchain_of() { sed -n 's/^channel *= *"\(.*\)"/\1/p' "$1"; }
STABLE=$(toolchain_of "$root/rust-toolchain.toml")
NIGHTLY=$(toolchain_of "$root/detector-ebpf/rust-toolchain.toml")
BPF_LINKER_VERSION=0.13.0
# gcc/libc6-dev link build scripts and test binaries; kmod lets the kernel load
# nf_conntrack and nf_conntrack_netlink where they are modules.
APT_PACKAGES=(iproute2 nftables conntrack util-linux procps kmod gcc libc6-dev)
# deploy/: python3-venv for the manifest validator's venv (kubernetes-validate from PyPI),
# busybox to test the tuner script under the shell of its busybox image.
APT_PACKAGES+=(python3-venv busybox)
# `cargo xtask vm-test` (the Debian guests: 6.1 and 6.12 amd64, 6.1 arm64): qemu for both
# architectures, xz and zstd to unpack kernel images and modules, binutils' strip and readelf
# (the arm64 payload is stripped with gcc-aarch64-linux-gnu's binutils, below). (The guests'
# kernels, static busybox and arm64 tools are fetched with apt-get download into
# ~/.cache/detector/vm, never installed; arm64 through a private apt state there.)
APT_PACKAGES+=(qemu-system-x86 qemu-system-arm xz-utils zstd binutils)
# musl-tools: C code in dependencies (ring, under the Kubernetes client's rustls) built for the
# static musl target (x86_64-linux-musl-gcc).
APT_PACKAGES+=(musl-tools)
# The arm64 (Graviton) static binary of `cargo xtask image`: Debian's aarch64 cross gcc for the
# same C code (it links with Rust's self-contained rust-lld and bundled musl, so no aarch64 musl
# gcc is needed), its libc headers (ring's C includes <stdint.h>; only a Recommends of the gcc
# package, so a machine that installs without recommends lacks it), its binutils' strip, and
# qemu-user-static to run the result here.
APT_PACKAGES+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
# chromium: detector/tests/report.rs renders a race page headless and checks the screenshot.
APT_PACKAGES+=(chromium)
# deploy-test's runtime test: buildah builds the image (no daemon) and Debian's runc runs it
# with the DaemonSet's security context (deploy/tests/test_runc.py).
APT_PACKAGES+=(buildah runc)
# The fuzz stage of `cargo xtask test`: libfuzzer-sys compiles libFuzzer's C++ sources.
APT_PACKAGES+=(g++)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/detector
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

command -v rustup >/dev/null || die "rustup is not installed (https://rustup.rs); it installs the pinned toolchains"
[ "$(id -u)" -eq 0 ] || step "not root: skipping apt packages (tests need root anyway)"

# 1. Debian packages.
if [ "$(id -u)" -eq 0 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# 2. Toolchains (RUSTUP_AUTO_INSTALL may be off: install explicitly).
installed() { rustup toolchain list | grep -q "^$1"; }
if ! installed "$STABLE"; then
  step "rustup: installing $STABLE"
  rustup toolchain install "$STABLE" --profile minimal --component rustfmt,clippy --no-self-update
fi
for c in rustfmt clippy; do
  rustup component list --installed --toolchain "$STABLE" 2>/dev/null | grep -q "^$c" \
    || rustup component add --toolchain "$STABLE" "$c" >/dev/null
done
if ! installed "$NIGHTLY"; then
  step "rustup: installing $NIGHTLY with rust-src"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --no-self-update
fi
rustup component list --installed --toolchain "$NIGHTLY" 2>/dev/null | grep -q '^rust-src' \
  || rustup component add --toolchain "$NIGHTLY" rust-src >/dev/null

# The static (musl) target: `cargo xtask image`, and the vm-test guest's test binaries
# (the initramfs has no glibc for them).
# aarch64-unknown-linux-musl: the arm64 image's binary.
for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  rustup target list --installed --toolchain "$STABLE" 2>/dev/null | grep -q "^$target\$" \
    || rustup target add --toolchain "$STABLE" "$target" >/dev/null
done

# 3. bpf-linker against the nightly's libLLVM. The stamp records which nightly it was built
#    for, so changing the pinned nightly rebuilds it.
sysroot=$(rustc +"$NIGHTLY" --print sysroot)
lib=$(cd "$sysroot/lib" && ls libLLVM.so.* 2>/dev/null | head -n1) \
  || die "$NIGHTLY has no libLLVM.so in $sysroot/lib"
major=$(printf '%s' "$lib" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
stamp="$CACHE/bpf-linker.stamp"
want="bpf-linker $BPF_LINKER_VERSION $NIGHTLY $lib"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$CARGO_BIN/bpf-linker" --version >/dev/null 2>&1; then
  step "cargo install bpf-linker $BPF_LINKER_VERSION (llvm-$major, against $NIGHTLY; about a minute)"
  llvm="$CACHE/llvm-$NIGHTLY"
  mkdir -p "$llvm/lib"
  ln -sf "$sysroot/lib/$lib" "$llvm/lib/libLLVM.so"
  ln -sf "$sysroot/lib/$lib" "$llvm/lib/$lib"
  LLVM_PREFIX="$llvm" cargo +"$NIGHTLY" install "bpf-linker@$BPF_LINKER_VERSION" --locked --force \
    --no-default-features --features "llvm-$major" --root "${CARGO_HOME:-$HOME/.cargo}" >&2
  mkdir -p "$CACHE"
  printf '%s' "$want" > "$stamp"
fi

# 4. cargo-fuzz (the fuzz targets build with the pinned nightly above).
"$CARGO_BIN/cargo-fuzz" --version >/dev/null 2>&1 || { step "cargo install cargo-fuzz"; cargo install cargo-fuzz --locked --root "${CARGO_HOME:-$HOME/.cargo}" >&2; }

step "setup complete: $STABLE, $NIGHTLY + rust-src, $("$CARGO_BIN/bpf-linker" --version)"
