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
    mode: Option<SeccompMode>,
    bpf_errno: Option<i32>,
) -> Option<String> {
    let mode = mode.filter(|m| *m != SeccompMode::Disabled)?;
    (privileged && bpf_errno == Some(libc::EPERM)).then(|| {
        format!(
            "bpf() is refused with EPERM although the capabilities are there, and seccomp is \
             active ({}): the container's seccomp profile blocks bpf or perf_event_open \
             (RuntimeDefault-style profiles allow them only with CAP_SYS_ADMIN); use the \
             shipped profile deploy/detector/seccomp.json (seccompProfile type Localhost) or \
             Unconfined",
            mode.describe()
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

/// The kernel lockdown mode (`none`, `integrity` or `confidentiality`), the bracketed word of
/// /sys/kernel/security/lockdown; None when the LSM is absent or securityfs is not mounted.
/// Under `confidentiality` the kernel refuses BPF programs that read kernel memory
/// (bpf_probe_read_kernel), which every backend needs.
pub fn lockdown_mode() -> Option<String> {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .ok()
        .and_then(|text| parse_lockdown(&text))
}

fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(text[start..start + len].to_string())
}

/// This process's seccomp mode, from the `Seccomp:` line of /proc/self/status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// 0: no seccomp.
    Disabled,
    /// 1: strict mode (read/write/exit only).
    Strict,
    /// 2: a filter, e.g. the container runtime's default profile, which may deny bpf(2).
    Filter,
}

impl SeccompMode {
    pub fn describe(self) -> &'static str {
        match self {
            SeccompMode::Disabled => "disabled (Seccomp: 0)",
            SeccompMode::Strict => "strict (Seccomp: 1; bpf(2) is denied)",
            SeccompMode::Filter => "filter (Seccomp: 2; the filter may deny bpf(2))",
        }
    }
}

/// This process's seccomp mode; None when the kernel does not report it.
pub fn seccomp_mode() -> Option<SeccompMode> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_seccomp(&status))
}

fn parse_seccomp(status: &str) -> Option<SeccompMode> {
    let value = status.lines().find_map(|l| l.strip_prefix("Seccomp:"))?;
    match value.trim() {
        "0" => Some(SeccompMode::Disabled),
        "1" => Some(SeccompMode::Strict),
        "2" => Some(SeccompMode::Filter),
        _ => None,
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
        let filter = Some(SeccompMode::Filter);
        let hint = seccomp_refusal(true, filter, Some(libc::EPERM)).unwrap_or_default();
        assert!(
            hint.contains("seccomp") && hint.contains("Seccomp: 2"),
            "{hint}"
        );
        // Without a filter, without the capabilities, or when bpf() answers: not seccomp.
        let off = Some(SeccompMode::Disabled);
        assert!(seccomp_refusal(true, off, Some(libc::EPERM)).is_none());
        assert!(seccomp_refusal(false, filter, Some(libc::EPERM)).is_none());
        assert!(seccomp_refusal(true, filter, Some(libc::EINVAL)).is_none());
    }

    #[test]
    fn lockdown_is_the_bracketed_word() {
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(
            parse_lockdown("[none] integrity confidentiality").as_deref(),
            Some("none")
        );
        assert_eq!(parse_lockdown("none integrity"), None);
    }

    #[test]
    fn seccomp_line_of_status() {
        let status = "Name:\tdetector\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(parse_seccomp(status), Some(SeccompMode::Filter));
        assert_eq!(parse_seccomp("Seccomp:\t0\n"), Some(SeccompMode::Disabled));
        assert_eq!(parse_seccomp("Seccomp:\t1\n"), Some(SeccompMode::Strict));
        assert_eq!(parse_seccomp("Name:\tx\n"), None);
        // This test process's own line parses (every supported kernel has it).
        assert!(seccomp_mode().is_some());
    }
}
