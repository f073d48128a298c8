//! tracefs `events/<category>/<name>/format` files: the field-offset parser over any text. The
//! first line of the input is the field asked for, the rest the format file.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/tracefs_format.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
