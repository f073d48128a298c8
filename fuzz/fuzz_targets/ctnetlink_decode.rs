//! ctnetlink dump datagrams as the kernel (or anything on the netlink socket) sends them.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/ctnetlink_decode.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
