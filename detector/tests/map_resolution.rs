//! Privileged: the map is resolved strictly. By name only a hash/LRU-hash map of a known
//! layout is taken (a newer same-named array map is skipped, and said so); a `--layout` that
//! contradicts the map's own sizes is an error at start naming both.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::process::Command;

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::{DETECTOR, Detector, privileged};
use detector::npa::Layout;
use testbed::bpfmap::{BpfMap, MapSpec};

/// `BPF_MAP_TYPE_ARRAY`.
const ARRAY: u32 = 2;

#[test]
fn lookup_by_name_takes_the_lru_map_not_a_newer_same_named_array() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let fs = Bpffs::mount();
    let name = unique_name();
    let lru = AgentMap::create(layout, &fs.dir.join("lru"), &name);
    // Created after the LRU map: the newer of the two, which the old lookup took.
    let _array = BpfMap::create(&MapSpec {
        map_type: ARRAY,
        key_size: 4,
        value_size: 16,
        max_entries: 4,
        name: &name,
    })
    .unwrap();
    let traces = fs.dir.with_extension("traces");
    let det = Detector::run(&[
        "--map-pin",
        fs.dir.join("absent").to_str().unwrap(),
        "--map-name",
        &name,
        "--trace-dir",
        traces.to_str().unwrap(),
        "--listen",
        "off",
        "--watermark-ms",
        "5",
    ]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, stderr) = det.stop();
    let _ = std::fs::remove_dir_all(&traces);
    assert!(
        stderr.contains(&format!("`{name}` (found by name, layout v4-24/16")),
        "{stderr}"
    );
    assert!(
        stderr.contains("skipped"),
        "the array map is named as skipped: {stderr}"
    );
    drop(lru);
}

#[test]
fn a_layout_that_contradicts_the_maps_sizes_is_an_error_at_start() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let fs = Bpffs::mount();
    let map = AgentMap::create(layout, &fs.dir.join("m"), &unique_name());
    let out = Command::new(DETECTOR)
        .args([
            "run",
            "--json",
            "--map-pin",
            map.pin.to_str().unwrap(),
            "--layout",
            "v4-20/1",
            "--duration",
            "5",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--layout v4-20/1 does not match") && stderr.contains("v4-24/16"),
        "{stderr}"
    );
}
