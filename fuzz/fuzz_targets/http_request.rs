//! Requests to the detector's HTTP server (what `detector watch`, Prometheus and probes send):
//! any request line target and bearer token routes to an answer, never a panic. The first
//! input line is the request target (path and query), the second the Authorization header.
//!
//! The body is in fuzz/checks/, shared with the corpus run of `cargo test`
//! (detector/tests/fuzz_corpus.rs).
#![no_main]

include!("../checks/http_request.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
