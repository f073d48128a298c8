//! `detector lab` and `detector validate`: the command lines and their output; the lab run
//! itself is `crate::lab::session`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::lab::agent::CleanupMode;
use crate::lab::session::{LabReport, LabSettings, run_lab};
use crate::lab::topology;
use crate::npa::Layout;

#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// The emulated agent's cleanup: legacy (#246), two-phase (#256) or fixed (#610).
    #[arg(long, value_enum, default_value = "legacy")]
    pub mode: CleanupMode,
    /// Client source ports reused each cycle (from 42000 up).
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=20_000))]
    pub ports: u16,
    /// Ports connected once and then left idle for good: their keys are deleted rightfully
    /// (a fixed cleanup must still delete them, and the detector must not flag them).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub idle_ports: u16,
    /// Ports whose connection is reset between the cleanup's dump and its deletes: the
    /// cleanup deletes keys of closed flows (conntrack CLOSE), which the detector must report
    /// as closed-flow deletes, not races. Also sets the node's CLOSE timeout to `--timeout`.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub reset_ports: u16,
    /// Cleanup cycles.
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub cycles: u32,
    /// The node's nf_conntrack_tcp_timeout_established during the lab (the tuner), seconds.
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    pub timeout: u32,
    /// Pause between the cleanup's dump and its deletes (a large map makes it long), ms.
    #[arg(long, default_value_t = 150, value_name = "MS")]
    pub delay_ms: u64,
    /// Cleanup period, ms (default: the timeout plus 700 ms, so entries expire between runs;
    /// shorter than the timeout and nothing expires: no race).
    #[arg(long, value_name = "MS")]
    pub period_ms: Option<u64>,
    /// The emulated agent's map layout: v4-24/16 (NPA v1.3.7+ with #610's value) or v4-20/1.
    #[arg(long, default_value = "v4-24/16", value_name = "LAYOUT")]
    pub layout: Layout,
    /// Where the detector writes its trace files.
    #[arg(long, default_value = "detector-lab-traces", value_name = "DIR")]
    pub trace_dir: PathBuf,
    /// Print the summary as one JSON object (with the verdicts and the ground truth).
    #[arg(long)]
    pub json: bool,
    /// Only remove what earlier labs left behind (namespaces), then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// The detector's HTTP server address (`detector run --listen`): watch the lab's races
    /// with `detector watch` or curl while it runs.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Bearer token file for the detector's HTTP server (`detector run --token-file`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Keep the detector's NDJSON stream in this file, as `detector run --json` printed it
    /// (what `detector replay` reads).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

impl LabArgs {
    fn settings(&self) -> LabSettings {
        LabSettings {
            mode: self.mode,
            ports: self.ports,
            idle_ports: self.idle_ports,
            reset_ports: self.reset_ports,
            cycles: self.cycles,
            timeout: self.timeout,
            delay_ms: self.delay_ms,
            period_ms: self.period_ms,
            layout: self.layout,
            trace_dir: self.trace_dir.clone(),
            json: self.json,
            listen: self.listen.clone(),
            token_file: self.token_file.clone(),
            record: self.record.clone(),
        }
    }
}

pub fn lab(args: LabArgs) -> Result<()> {
    if args.cleanup {
        let left = topology::leftovers();
        for ns in &left {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // The bpffs each lab mounts under the temporary directory.
        let mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.contains("/detector-lab-"))
            // A running lab's directory is named by its pid: leave its bpffs mounted (other
            // users' labs on the same machine must survive a cleanup).
            .filter(|m| {
                let pid = m
                    .rsplit("/detector-lab-")
                    .next()
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|id| id.parse::<u32>().ok());
                !pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            })
            .map(str::to_string)
            .collect();
        for m in &mounts {
            let _ = Command::new("umount").arg(m).status();
        }
        crate::note!(
            "detector lab: removed {} leftover namespace(s) and {} mount(s)",
            left.len(),
            mounts.len()
        );
        return Ok(());
    }
    let report = run_lab(&args.settings())?;
    print_report(&report, args.json)
}

/// `validate`: the lab for a fixed number of cycles; success only when every cycle ran,
/// ports were reused, and no race was found.
pub fn validate(args: LabArgs) -> Result<bool> {
    let report = run_lab(&args.settings())?;
    print_report(&report, args.json)?;
    if report.cycles < args.cycles || report.reproducer.reuses == 0 {
        bail!(
            "validate ran {} of {} cycles with {} port reuses: no verdict either way",
            report.cycles,
            args.cycles,
            report.reproducer.reuses
        );
    }
    Ok(report.verdicts.is_empty())
}

fn print_report(r: &LabReport, json_out: bool) -> Result<()> {
    if json_out {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let classes = if r.races_by_class.is_empty() {
        "none".to_string()
    } else {
        r.races_by_class
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "lab summary ({:?} cleanup, {} cycles, {:.1} s)",
        r.mode, r.cycles, r.seconds
    );
    println!(
        "  port reuses made                   {}",
        r.reproducer.reuses
    );
    println!(
        "  races detected                     {} ({classes})",
        r.verdicts.len()
    );
    println!(
        "    confirmed by a denied packet     {} (unconfirmed {})",
        r.races_confirmed, r.races_unconfirmed
    );
    println!(
        "  closed-flow deletes (not races)    {}",
        r.closed_flow_deletes.len()
    );
    println!(
        "  emulator's wrongful deletes        {} (of {} deletes)",
        r.wrongful_deletes, r.cleanup_deletes
    );
    println!(
        "  reproducer's failed requests       {} (of {})",
        r.reproducer.failed, r.reproducer.requests
    );
    println!("  events lost                        {}", r.events_lost);
    Ok(())
}
