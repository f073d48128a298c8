//! Ring-buffer records: whatever the kernel side writes (or a corrupted ring) must decode to an
//! event or an error, never a panic.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/record_decode.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
