//! `detector traces`: the trace files of a running detector over its HTTP server, listed or
//! pulled into a local directory (the runbook's `kubectl debug` + `kubectl cp` in one step).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::remote::{Remote, read_token};
use crate::http::DEFAULT_LISTEN;
use crate::http::traces::{TraceEntry, servable_name};

#[derive(Debug, Clone, clap::Args)]
pub struct TracesArgs {
    #[command(subcommand)]
    pub command: TracesCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TracesCommand {
    /// List the detector's trace files, newest first.
    List(Target),
    /// Fetch every trace file into a directory, skipping the ones already there.
    Pull {
        #[command(flatten)]
        target: Target,
        /// Directory to write the traces to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Where the detector is.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The detector's HTTP server (its --listen address, a Service, or a port-forward).
    #[arg(long, default_value_t = format!("http://{DEFAULT_LISTEN}"), value_name = "URL")]
    pub url: String,
    /// File holding the bearer token of the detector's --token-file.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub kube: super::forward::KubeTarget,
}

impl Target {
    async fn remote(&self) -> Result<Remote> {
        let url = if self.kube.wanted() {
            self.kube.forward().await?
        } else {
            self.url.clone()
        };
        Remote::new(&url, read_token(self.token_file.as_deref())?)
    }
}

/// The listing of `/v1/traces`.
pub async fn list(remote: &Remote) -> Result<Vec<TraceEntry>> {
    let body = remote.get("/v1/traces").await?;
    serde_json::from_slice(&body).context("/v1/traces: not a trace listing")
}

/// What a pull did.
#[derive(Debug, Default)]
pub struct Pulled {
    pub fetched: usize,
    pub skipped: usize,
    pub bytes: u64,
}

/// Fetches every listed trace not yet in `out`.
pub async fn pull(remote: &Remote, out: &std::path::Path) -> Result<Pulled> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut done = Pulled::default();
    for e in list(remote).await? {
        // The listing comes from outside: never write a name that could leave `out`.
        if !servable_name(&e.name) {
            bail!("/v1/traces listed {:?}, not a trace file name", e.name);
        }
        let dest = out.join(&e.name);
        if dest.exists() {
            done.skipped += 1;
            continue;
        }
        let body = remote.get(&format!("/v1/traces/{}", e.name)).await?;
        crate::report::trace_file::write_atomic(&dest, &body)?;
        done.fetched += 1;
        done.bytes += body.len() as u64;
    }
    Ok(done)
}

/// `detector metrics`: the detector's `/metrics` text (e.g. through `--node`).
pub async fn metrics(target: Target) -> Result<()> {
    let body = target.remote().await?.get("/metrics").await?;
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}

pub async fn run(args: TracesArgs) -> Result<()> {
    match args.command {
        TracesCommand::List(t) => {
            for e in list(&t.remote().await?).await? {
                println!("{}  {:<12} {:>9}  {}", e.time, e.class, e.size, e.name);
            }
        }
        TracesCommand::Pull { target, out } => {
            let p = pull(&target.remote().await?, &out).await?;
            crate::note!(
                "detector traces: fetched {} ({} bytes), {} already in {}",
                p.fetched,
                p.bytes,
                p.skipped,
                out.display()
            );
        }
    }
    Ok(())
}
