//! Facts about the running kernel and process that decide what can be loaded.

use std::collections::HashSet;
use std::path::Path;

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// True when this process may load tracing programs: CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON.
pub fn can_load_bpf(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// The `Seccomp:` mode of a /proc/PID/status text: 0 off, 1 strict, 2 filter.
pub fn seccomp_mode_in(status: &str) -> Option<u8> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// This process's seccomp mode.
pub fn seccomp_mode() -> Option<u8> {
    seccomp_mode_in(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The errno of a `bpf(BPF_MAP_CREATE)` with an all-zero (invalid) attribute: the kernel
/// answers EINVAL to a caller allowed to use bpf(), EPERM to one that is not (no capability,
/// or a seccomp filter or LSM refusing the call). Nothing is created.
pub fn bpf_syscall_errno() -> Option<i32> {
    let attr = [0u8; 128];
    // SAFETY: bpf(2) reads `attr.len()` bytes from a live buffer of that size; an invalid
    // attribute only makes it fail.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0 as libc::c_long,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    (r < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Why loading fails with EPERM although the capabilities are there, when seccomp is the
/// likely cause: a filter is active (mode 2) and bpf() is refused with EPERM.
pub fn seccomp_refusal(
    privileged: bool,
    mode: Option<u8>,
    bpf_errno: Option<i32>,
) -> Option<String> {
    (privileged && bpf_errno == Some(libc::EPERM) && mode.is_some_and(|m| m != 0)).then(|| {
        format!(
            "bpf() is refused with EPERM although the capabilities are there, and a seccomp \
             filter is active (Seccomp: {}): the container's seccomp profile blocks bpf or \
             perf_event_open (RuntimeDefault-style profiles allow them only with \
             CAP_SYS_ADMIN); use the shipped profile deploy/detector/seccomp.json \
             (seccompProfile type Localhost) or Unconfined",
            mode.unwrap_or(0)
        )
    })
}

/// The kprobe PMU exists only with CONFIG_KPROBES; aya attaches through it.
pub fn kprobe_pmu() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// Names of the given functions that are present in /proc/kallsyms (module symbols included).
pub fn kallsyms_present(names: &[&str]) -> HashSet<String> {
    let wanted: HashSet<&str> = names.iter().copied().collect();
    let mut found = HashSet::new();
    if let Ok(text) = std::fs::read_to_string("/proc/kallsyms") {
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (_, _, Some(sym)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if wanted.contains(sym) {
                found.insert(sym.to_string());
            }
        }
    }
    found
}

/// Where nf_conntrack lives: built in, a loaded module, or absent.
pub fn conntrack_presence(btf_dir: &Path) -> &'static str {
    if btf_dir.join("nf_conntrack").exists() || Path::new("/sys/module/nf_conntrack").exists() {
        if Path::new("/sys/module/nf_conntrack/initstate").exists() {
            "loaded module"
        } else {
            "built in"
        }
    } else if !kallsyms_present(&["nf_ct_destroy"]).is_empty() {
        "built in"
    } else {
        "not loaded (modprobe nf_conntrack, or add a conntrack rule)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_rules() {
        assert!(can_load_bpf(1 << CAP_SYS_ADMIN));
        assert!(can_load_bpf((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!can_load_bpf(1 << CAP_BPF));
        assert!(!can_load_bpf(0));
    }

    #[test]
    fn seccomp_named_only_when_it_explains_an_eperm() {
        let status = "Name:\tdetector\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(seccomp_mode_in(status), Some(2));
        assert_eq!(seccomp_mode_in("Name:\tx\n"), None);
        let hint = seccomp_refusal(true, Some(2), Some(libc::EPERM)).unwrap_or_default();
        assert!(
            hint.contains("seccomp") && hint.contains("Seccomp: 2"),
            "{hint}"
        );
        // Without a filter, without the capabilities, or when bpf() answers: not seccomp.
        assert!(seccomp_refusal(true, Some(0), Some(libc::EPERM)).is_none());
        assert!(seccomp_refusal(false, Some(2), Some(libc::EPERM)).is_none());
        assert!(seccomp_refusal(true, Some(2), Some(libc::EINVAL)).is_none());
    }
}
