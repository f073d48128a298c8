use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
#[cfg(feature = "lab")]
use detector::cli::lab;
use detector::cli::{cluster, doctor, replay, run, trace, traces, watch};

/// eBPF detector for conntrack-cache cleanup races of the AWS network policy agent.
#[derive(Debug, Parser)]
#[command(name = "detector", version, about)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `debug` or `detector=trace`.
    #[arg(long, global = true, env = "DETECTOR_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What this kernel supports, the backend `auto` would pick and why, and the BTF offsets.
    Doctor(doctor::DoctorArgs),
    /// Stream kernel conntrack inserts and destroys live.
    Trace(trace::TraceArgs),
    /// Detect races: watch conntrack and the agent's map deletes, report each delete of a
    /// live flow's key with its timeline, and write trace files.
    Run(Box<run::RunArgs>),
    /// Reproduce the race on this machine and catch it: namespaces for a node and two pods, an
    /// emulated network policy agent, the tuner, a port-reuse reproducer and the detector.
    #[cfg(feature = "lab")]
    Lab(lab::LabArgs),
    /// The lab for a fixed number of cycles; exits 0 only if no race was detected (for CI of
    /// an agent fix: `--mode fixed`), 1 with the verdicts otherwise.
    #[cfg(feature = "lab")]
    Validate(lab::LabArgs),
    /// Stream races (or every event) live from a running detector's HTTP server.
    Watch(watch::WatchArgs),
    /// A running detector's trace files over HTTP: `list`, or `pull --out DIR`.
    Traces(traces::TracesArgs),
    /// Print a running detector's Prometheus metrics (`--url`, or `--node`/`--pod` through
    /// the API server).
    Metrics(traces::Target),
    /// The cluster form of `validate`: over --duration, every node's races (its race Events,
    /// or with `--from detectors` its detector's race stream through the API server's
    /// port-forward) and the reproducer's cycles; exits 0 only if ports were reused and no
    /// race happened.
    ClusterVerdict(cluster::ClusterVerdictArgs),
    /// Race timeline pictures (HTML, with an index for a directory) or Perfetto JSON from
    /// trace files alone.
    Report(detector::postmortem::cli::ReportArgs),
    /// Judge again what `detector run --json` recorded (a file or `-`), with the same or
    /// changed judging flags, and print the verdicts as `run` would.
    Replay(replay::ReplayArgs),
}

fn main() -> ExitCode {
    // Installed as a kubectl plugin (a `kubectl-detector` link to this binary), `kubectl
    // detector watch --node N` runs it under that name: the commands are the same, only the
    // usage lines name it as kubectl does.
    let as_plugin = std::env::args_os()
        .next()
        .and_then(|a| a.into_string().ok())
        .is_some_and(|a| a.ends_with("kubectl-detector"));
    let mut command = Cli::command();
    if as_plugin {
        command = command.bin_name("kubectl detector");
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: not in files or log collectors, and
        // never when NO_COLOR is set (https://no-color.org).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();

    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
    };
    // `run` drives its event loop on the thread that polls the ring buffer and its timers:
    // on a multi-thread runtime the I/O and timer driver runs on a worker, and each wake-up
    // of the loop (a record due after the watermark, the ring buffer readable) would hop
    // threads, adding milliseconds to the delete-to-verdict latency on a busy node. The HTTP
    // server and Kubernetes tasks share the thread between the loop's batches.
    let loop_runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
    };
    let result = match cli.command {
        Command::Doctor(a) => doctor::run(a),
        Command::Trace(a) => runtime().and_then(|rt| rt.block_on(trace::run(a))),
        Command::Run(a) => loop_runtime().and_then(|rt| rt.block_on(run::run(*a))),
        #[cfg(feature = "lab")]
        Command::Lab(a) => lab::lab(a),
        Command::Watch(a) => runtime().and_then(|rt| rt.block_on(watch::run(a))),
        Command::Traces(a) => runtime().and_then(|rt| rt.block_on(traces::run(a))),
        Command::Metrics(a) => runtime().and_then(|rt| rt.block_on(traces::metrics(a))),
        Command::ClusterVerdict(a) => match runtime().and_then(|rt| rt.block_on(cluster::run(a))) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
        Command::Report(a) => detector::postmortem::cli::run(a),
        Command::Replay(a) => replay::run(a),
        #[cfg(feature = "lab")]
        Command::Validate(a) => match lab::validate(a) {
            Ok(true) => Ok(()),
            Ok(false) => {
                detector::note!("detector validate: races detected (see above)");
                return ExitCode::FAILURE;
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut msg = format!("error: {e}");
            // Our error texts already quote their source; add only causes not yet shown.
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(&format!(": {c}"));
                }
            }
            detector::note!("{msg}");
            ExitCode::FAILURE
        }
    }
}
