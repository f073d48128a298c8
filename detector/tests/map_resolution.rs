//! Privileged: the map is resolved strictly. By name only a hash/LRU-hash map of a known
//! layout is taken (a newer same-named array map is skipped, and said so); a `--layout` that
//! contradicts the map's own sizes is an error at start naming both; an explicit `--map-pin`
//! is waited for, at start and when it goes missing, and never replaced by a lookup by name.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

mod common;

use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use common::bpfmap::{AgentMap, Bpffs, unique_name};
use common::{
    DETECTOR, Detector, NetnsPair, client_key, connect_from, of_type, privileged, start_echo_server,
};
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
    // --map-name alone: by name (an explicit --map-pin would never fall back to it).
    let det = Detector::run(&[
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

/// Loads a program that returns 0 (a socket filter) and pins it at `path`.
fn pin_a_program(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    // mov r0, 0; exit
    let insns: [u64; 2] = [0xb7, 0x95];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, ...
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // BPF_PROG_TYPE_SOCKET_FILTER
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: bpf(2) reads the attr buffer and the instructions and license it points to.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_mut_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // union bpf_attr for BPF_OBJ_PIN: pathname, bpf_fd.
    let mut pin = [0u8; 128];
    pin[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: bpf(2) reads the attr buffer and the path it points to.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_mut_ptr(), pin.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: closing the fd this function opened; the pin keeps the program.
    unsafe { libc::close(fd as libc::c_int) };
}

#[test]
fn a_program_at_the_pin_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let fs = Bpffs::mount();
    let pin = fs.dir.join("not_a_map");
    pin_a_program(&pin);
    let out = Command::new(DETECTOR)
        .args(["run", "--json", "--map-pin", pin.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("holds a BPF program, not a map"),
        "{stderr}"
    );
    assert!(!stderr.contains("key "), "no garbage sizes: {stderr}");
}

/// `--map-pin` on a pin that does not exist yet: the detector says it waits (and does not take
/// the same-named, unpinned map a lookup by name would find), picks the map up once it is
/// pinned, judges a delete on it, and when the pin goes missing again it waits for it and says
/// when it is back.
#[test]
fn an_explicit_pin_is_waited_for_and_never_replaced_by_a_name() {
    if !privileged() {
        return;
    }
    let layout: Layout = "v4-24/16".parse().unwrap();
    let ns = NetnsPair::new(60);
    let fs = Bpffs::mount();
    let name = unique_name();
    let pin = fs.dir.join("pinned_later");
    // Same name and layout, never pinned: what the old fallback to a lookup by name took.
    let decoy = AgentMap::create_unpinned(layout, &fs.dir.join("never"), &name);
    let server = start_echo_server(&ns.server, ns.server_ip);
    let traces = fs.dir.with_extension("traces");
    let det = Detector::run_until(
        &[
            "--map-pin",
            pin.to_str().unwrap(),
            "--netns",
            &NetnsPair::path(&ns.server),
            "--trace-dir",
            traces.to_str().unwrap(),
            "--listen",
            "off",
            "--watermark-ms",
            "5",
        ],
        "waiting for the agent's map to be pinned",
    );
    sleep(Duration::from_millis(1500));
    assert!(
        !det.wait_for("detector: watching map", Duration::ZERO),
        "it must keep waiting while nothing is pinned"
    );
    let map = AgentMap::create_unpinned(layout, &pin, &name);
    map.pin();
    assert!(
        det.wait_for("detector: watching map", Duration::from_secs(20)),
        "the map pinned later is picked up"
    );
    let flow = connect_from(&ns.client, server);
    let key = client_key(flow.local_addr().unwrap().port(), server, None);
    map.insert(&key, 1);
    sleep(Duration::from_millis(300));
    assert_eq!(map.delete(&key), 0);
    sleep(Duration::from_millis(500));
    // The pin goes missing (an agent restart) and comes back.
    std::fs::remove_file(&pin).unwrap();
    assert!(
        det.wait_for("any more (agent restart?)", Duration::from_secs(5)),
        "the missing pin is said"
    );
    map.pin();
    assert!(
        det.wait_for("is pinned again", Duration::from_secs(5)),
        "the pin's return is said"
    );
    let (events, stderr) = det.stop();
    let _ = std::fs::remove_dir_all(&traces);
    assert_eq!(
        stderr
            .matches("waiting for the agent's map to be pinned")
            .count(),
        1,
        "one line when the wait starts: {stderr}"
    );
    assert!(stderr.contains("found by pin"), "{stderr}");
    assert!(!stderr.contains("found by name"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "is pinned again at {}: the same map",
            pin.display()
        )),
        "{stderr}"
    );
    let verdicts = of_type(&events, "verdict");
    assert_eq!(
        verdicts.len(),
        1,
        "the delete after the pick-up is judged\n{stderr}"
    );
    assert_eq!(
        verdicts[0]["verdict"]["key"]["sport"], key.sport,
        "{:#}",
        verdicts[0]
    );
    drop((flow, decoy));
}
