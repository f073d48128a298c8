//! `detector doctor`: what this kernel supports, what `auto` picks and why, resolved offsets.

use std::path::PathBuf;

use anyhow::Result;

use crate::clock;
use crate::kernel::{Backend, BackendSupport, Probe, ProbeSettings, caps, offsets, sizing};

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// Directory with the kernel's BTF (`vmlinux` and module split BTF).
    #[arg(long, default_value = "/sys/kernel/btf", value_name = "DIR")]
    pub btf_dir: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Runs the checks. Exits non-zero (through the error) when no backend can run here.
pub fn run(args: DoctorArgs) -> Result<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let capeff = caps::effective_caps();
    let seccomp = caps::seccomp_mode();
    let bpf_errno = caps::bpf_syscall_errno();
    let seccomp_block = caps::seccomp_refusal(caps::can_load_bpf(capeff), seccomp, bpf_errno);
    // Capabilities alone do not make bpf() usable: a seccomp filter can still refuse it.
    let privileged = caps::can_load_bpf(capeff) && seccomp_block.is_none();
    let vmlinux = args.btf_dir.join("vmlinux");
    let split: Vec<String> = std::fs::read_dir(&args.btf_dir)
        .map(|d| {
            let mut v: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "vmlinux")
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default();
    let hz = clock::kernel_hz();
    let kprobe_pmu = caps::kprobe_pmu();
    let lockdown = caps::lockdown_mode();
    let ringbuf = aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false);

    let mut lines: Vec<(String, String)> = vec![
        ("kernel".into(), kernel.clone()),
        (
            "privileges".into(),
            format!(
                "{} (CapEff {capeff:#x}; needs CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN)",
                if privileged {
                    "ok"
                } else if seccomp_block.is_some() {
                    "capabilities ok, bpf() REFUSED"
                } else {
                    "INSUFFICIENT"
                }
            ),
        ),
        (
            "seccomp".into(),
            match seccomp {
                Some(m) => format!(
                    "{}{}",
                    m.describe(),
                    if seccomp_block.is_some() {
                        ": REFUSES bpf()"
                    } else {
                        ""
                    }
                ),
                None => "unknown (no Seccomp: in /proc/self/status)".to_string(),
            },
        ),
        (
            "BTF".into(),
            format!("{}: {}", vmlinux.display(), yes(vmlinux.exists())),
        ),
        (
            "split BTF".into(),
            if split.is_empty() {
                "none (no module BTF)".into()
            } else {
                format!(
                    "{} module(s), e.g. {}",
                    split.len(),
                    split.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                )
            },
        ),
        (
            "nf_conntrack".into(),
            format!(
                "{}{}",
                caps::conntrack_presence(&args.btf_dir),
                if split.iter().any(|s| s == "nf_conntrack") {
                    " (split BTF present)"
                } else {
                    ""
                }
            ),
        ),
        (
            "lockdown".into(),
            lockdown.clone().map_or_else(
                || "unknown (no /sys/kernel/security/lockdown)".into(),
                |m| {
                    if m == "confidentiality" {
                        format!("{m} (kernel memory reads by BPF are refused)")
                    } else {
                        m
                    }
                },
            ),
        ),
        ("HZ".into(), hz.map_or("unknown".into(), |h| h.to_string())),
        ("kprobe PMU".into(), yes(kprobe_pmu).into()),
        ("ringbuf".into(), yes(ringbuf).into()),
    ];

    let mut report = serde_json::json!({
        "kernel": kernel, "privileged": privileged, "capeff": format!("{capeff:#x}"),
        "seccomp_blocks_bpf": seccomp_block.is_some(),
        "btf": vmlinux.exists(), "split_btf": split, "hz": hz, "kprobe_pmu": kprobe_pmu,
        "ringbuf": ringbuf, "lockdown": lockdown,
        "seccomp": seccomp.map(|m| m.describe()),
        "nf_conntrack": caps::conntrack_presence(&args.btf_dir),
    });

    // The tables as `run` sizes them by default.
    let node_max = sizing::node_conntrack_max();
    let (max_entries, sized_by) = sizing::MaxEntries::Auto.resolve(node_max);
    let settings = ProbeSettings {
        btf_dir: args.btf_dir.clone(),
        max_entries,
        sized_by,
        ..ProbeSettings::default()
    };
    let outcome = if privileged {
        match Probe::open(&settings) {
            Ok(mut probe) => {
                let (tables, _) = sizing::describe(
                    &sizing::Sizing {
                        max_entries,
                        sized_by,
                        preallocated: probe.tables_preallocated(),
                        ring_bytes: settings.ring_bytes,
                        node_max,
                    },
                    sizing::possible_cpus(),
                );
                let tables = tables.replace("detector: kernel tables hold ", "");
                report["kernel_tables"] = serde_json::json!({
                    "max_entries": max_entries,
                    "preallocated": probe.tables_preallocated(),
                    "nf_conntrack_max": node_max,
                });
                lines.push(("kernel tables".into(), tables));
                let survey = probe.survey();
                Ok((
                    survey,
                    probe.offsets.clone(),
                    probe
                        .kernel_btf()
                        .and_then(|b| b.struct_home("nf_conn"))
                        .map(str::to_string),
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    } else if let Some(why) = &seccomp_block {
        Err(why.clone())
    } else {
        Err("not privileged: programs cannot be test-loaded (run as root)".to_string())
    };

    let mut auto = None;
    match &outcome {
        Ok((survey, offs, home)) => {
            let get = |b: Backend| survey.iter().find(|s| s.backend == b);
            let tp = get(Backend::Tracepoint).is_some_and(|s| s.ok);
            let fentry = get(Backend::Fentry).is_some_and(|s| s.ok);
            lines.push(("tp_btf".into(), yes(tp).into()));
            lines.push(("fentry".into(), yes(fentry).into()));
            lines.push((
                "nf_conn BTF in".into(),
                home.clone().unwrap_or_else(|| "not found".into()),
            ));
            auto = survey.iter().find(|s| s.ok).map(|s| s.backend);
            report["tp_btf"] = tp.into();
            report["fentry"] = fentry.into();
            report["backends"] = serde_json::to_value(survey)?;
            report["offsets"] = serde_json::to_value(offs)?;
        }
        Err(e) => {
            lines.push(("programs".into(), format!("not checked: {e}")));
            report["error"] = e.clone().into();
        }
    }
    report["auto"] = auto.map(|b| b.name()).into();
    if let (Some(b), Ok((survey, _, _))) = (auto, &outcome) {
        report["auto_reason"] = auto_reason(b, survey).into();
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (k, v) in &lines {
            println!("{k:<16}{v}");
        }
        if let Ok((survey, offs, _)) = &outcome {
            println!("backends (most precise first):");
            for BackendSupport {
                backend,
                ok,
                reason,
            } in survey
            {
                println!(
                    "  {:<12}{:<4}{reason}",
                    backend.name(),
                    if *ok { "yes" } else { "no" }
                );
            }
            match auto {
                Some(b) => println!("auto picks      {}", auto_reason(b, survey)),
                None => println!("auto picks      nothing: no backend loads on this kernel"),
            }
            println!("offsets (bytes, from BTF):");
            for o in offs {
                println!(
                    "  {:<44}{:>5}",
                    format!("{}.{}", o.strukt, o.path),
                    o.offset
                );
            }
            let _ = offsets::BTF_MODULES;
        }
    }
    match (&outcome, auto) {
        (Ok(_), Some(_)) => Ok(()),
        (Ok(_), None) => anyhow::bail!("no probe backend works on this kernel (see above)"),
        (Err(e), _) => anyhow::bail!("{e}"),
    }
}

/// Why `auto` picked `b`: the more precise backends that do not load here (with their reason),
/// then `b` as the most precise one that does.
fn auto_reason(b: Backend, survey: &[BackendSupport]) -> String {
    let skipped: Vec<String> = survey
        .iter()
        .take_while(|s| s.backend != b)
        .filter(|s| !s.ok)
        .map(|s| format!("{} does not load ({})", s.backend, s.reason))
        .collect();
    let mut why = format!("{b}: the most precise backend whose programs load here");
    if !skipped.is_empty() {
        why.push_str("; ");
        why.push_str(&skipped.join("; "));
    }
    why
}
