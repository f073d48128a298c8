//! Kernel BTF (vmlinux and a module's split BTF) and resolving the detector's member paths in
//! it. Input: a 4-byte little-endian length of the base blob, the base blob, then the split blob
//! (absent when empty); with no valid length prefix, the whole input is the base.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/btf_offsets.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
