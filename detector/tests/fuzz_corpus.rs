//! The committed fuzz corpus (fuzz/corpus/<target>/) through each fuzz target's body, in a
//! plain build: a regression run of every input the fuzzers were seeded with or found, in
//! `cargo test`, without the nightly sanitizer build that `cargo xtask fuzz` needs.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::path::Path;

mod btf_offsets {
    include!("../../fuzz/checks/btf_offsets.rs");
}
mod ctnetlink_decode {
    include!("../../fuzz/checks/ctnetlink_decode.rs");
}
mod http_request {
    include!("../../fuzz/checks/http_request.rs");
}
mod npa_layout {
    include!("../../fuzz/checks/npa_layout.rs");
}
mod record_decode {
    include!("../../fuzz/checks/record_decode.rs");
}
mod tracefs_format {
    include!("../../fuzz/checks/tracefs_format.rs");
}
mod watch_lines {
    include!("../../fuzz/checks/watch_lines.rs");
}

/// A fuzz target's body.
type Check = fn(&[u8]);

/// Every fuzz target, by the name of its file in fuzz/fuzz_targets/.
const TARGETS: [(&str, Check); 7] = [
    ("btf_offsets", btf_offsets::check),
    ("ctnetlink_decode", ctnetlink_decode::check),
    ("http_request", http_request::check),
    ("npa_layout", npa_layout::check),
    ("record_decode", record_decode::check),
    ("tracefs_format", tracefs_format::check),
    ("watch_lines", watch_lines::check),
];

#[test]
fn every_committed_fuzz_input_runs_clean() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut names: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let listed: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    assert_eq!(names, listed, "a fuzz target without its corpus run here");
    for (name, check) in TARGETS {
        let dir = fuzz.join("corpus").join(name);
        let mut runs = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(|| check(&input));
            assert!(result.is_ok(), "{name}: {} panics", path.display());
            runs += 1;
        }
        assert!(runs > 0, "{name}: no inputs in {}", dir.display());
        // Shown by `cargo xtask test` (the test runs with --nocapture there).
        println!("fuzz corpus {name}: {runs} inputs, 0 crashes");
    }
}
