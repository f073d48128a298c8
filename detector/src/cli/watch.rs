//! `detector watch`: streams races (or every event) from a running detector's HTTP server, in
//! the same readable lines or NDJSON as `detector run` prints locally. Reconnects with backoff
//! when the stream ends; races replayed on reconnect that were already shown are skipped.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::http::DEFAULT_LISTEN;

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// The detector's HTTP server (its --listen address, a Service, or a
    /// `kubectl port-forward`).
    #[arg(long, default_value_t = format!("http://{DEFAULT_LISTEN}"), value_name = "URL")]
    pub url: String,
    /// File holding the bearer token of the detector's --token-file.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// NDJSON, as `detector run --json`.
    #[arg(long)]
    pub json: bool,
    /// Every event (conntrack, agent deletes, drops, verdicts), not only races.
    #[arg(long)]
    pub events: bool,
    #[command(flatten)]
    pub kube: super::forward::KubeTarget,
}

/// Why one connection ended.
enum End {
    /// The server closed the stream (the detector stopped or restarted).
    Closed,
    /// Could not connect, or the connection broke.
    Failed(String),
    /// Retrying will not help.
    Fatal(anyhow::Error),
    /// stdout was closed (e.g. `| head`): nothing more to show, a normal end.
    OutputClosed,
}

/// Lines already shown, so a replay after a reconnect does not repeat them.
struct Seen {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Seen {
    const CAP: usize = 10_000;

    fn new() -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// True the first time a line is seen.
    fn first(&mut self, line: &str) -> bool {
        let mut h = DefaultHasher::new();
        line.hash(&mut h);
        let h = h.finish();
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

pub async fn run(mut args: WatchArgs) -> Result<()> {
    if args.kube.wanted() {
        args.url = args.kube.forward().await?;
    }
    let token = match &args.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--token-file {}: cannot read it", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let base = args.url.trim_end_matches('/');
    let url = format!(
        "{base}{}{}",
        if args.events {
            "/v1/events"
        } else {
            "/v1/races"
        },
        if args.json { "" } else { "?format=text" }
    );
    let uri: Uri = url.parse().map_err(|_| {
        anyhow::anyhow!(
            "--url {}: not a URL; give e.g. http://127.0.0.1:9477",
            args.url
        )
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        bail!(
            "--url {}: only http://HOST:PORT is supported (reach a cluster's detector with \
             `kubectl port-forward`)",
            args.url
        );
    }
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut seen = Seen::new();
    let mut connected_once = false;
    let mut backoff = Duration::from_secs(1);
    let stdout = std::io::stdout();
    loop {
        let end = stream_once(
            &client,
            &uri,
            token.as_deref(),
            !args.events,
            &mut seen,
            &mut connected_once,
            &mut stdout.lock(),
        )
        .await;
        let why = match end {
            End::OutputClosed => return Ok(()),
            End::Fatal(e) => return Err(e),
            End::Failed(e) if !connected_once => bail!(
                "cannot reach the detector at {url}: {e}; check that it runs with --listen on \
                 that address, or that `kubectl port-forward` is up"
            ),
            End::Failed(e) => format!("no stream from {url}: {e}"),
            End::Closed => {
                backoff = Duration::from_secs(1);
                format!("the detector at {url} closed the stream")
            }
        };
        eprintln!(
            "detector watch: {why}; reconnecting in {} s",
            backoff.as_secs()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn stream_once(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: &Uri,
    token: Option<&str>,
    dedupe: bool,
    seen: &mut Seen,
    connected_once: &mut bool,
    out: &mut impl Write,
) -> End {
    let mut req = Request::get(uri.clone()).header(header::ACCEPT, "application/x-ndjson");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match req.body(Empty::new()) {
        Ok(r) => r,
        Err(e) => return End::Fatal(e.into()),
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return End::Failed(error_chain(&e)),
    };
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            return End::Fatal(anyhow::anyhow!(
                "{uri}: 401 Unauthorized: {}; pass --token-file with the detector's token",
                if token.is_some() {
                    "the token was refused"
                } else {
                    "the detector wants a bearer token"
                }
            ));
        }
        s => return End::Fatal(anyhow::anyhow!("{uri}: unexpected HTTP status {s}")),
    }
    if *connected_once {
        eprintln!("detector watch: reconnected to {uri}");
    }
    *connected_once = true;
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let frame = match body.frame().await {
            None => return End::Closed,
            Some(Err(e)) => return End::Failed(error_chain(&e)),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]);
            if dedupe
                && !line.starts_with("LAGGED")
                && !line.contains("\"lagged\"")
                && !seen.first(&line)
            {
                continue;
            }
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return End::OutputClosed;
            }
        }
    }
}

/// An error with its causes on one line (hyper's own message alone says little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
