//! The line splitter of `detector watch`, fed a server's bytes in chunks of any size. Input: the
//! line limit (first byte), the chunk size (second byte, 0 read as 1), then the stream. The
//! lines must be the stream's, in order, and the splitter must fail exactly when a line (or the
//! unfinished tail) is longer than the limit, after yielding the lines before it.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/watch_lines.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
