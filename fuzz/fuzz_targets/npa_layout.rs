//! NPA's conntrack-map keys and values, read from the agent's map, in every layout; and the
//! layout itself, detected from the map's sizes or given as `--layout` text.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/npa_layout.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
