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
}
