//! `detector watch`: streams races (or every event) from a running detector's HTTP server, in
//! the same readable lines or NDJSON as `detector run` prints locally. Reconnects with backoff
//! when the stream ends; races replayed on reconnect that were already shown are skipped. A
//! line longer than [`lines::MAX_LINE`] or a server silent for `--timeout` ends it with an
//! error: the detector asks for a keep-alive line at half the timeout, so a quiet healthy
//! detector never trips it.

pub mod lines;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::http::{DEFAULT_LISTEN, read_token_file};
use lines::{LineSplitter, MAX_LINE, Seen};

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
    /// Seconds without a byte from the server before giving up with an error (the detector
    /// is asked for a keep-alive line every half of it while it has nothing to send).
    #[arg(long, default_value_t = 30, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub timeout: u64,
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

/// One watch: where it reads from and what it has shown.
struct Watcher {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// The stream's URL as messages name it.
    url: String,
    uri: Uri,
    token: Option<String>,
    /// Skip lines already shown (races only: events are never replayed twice as the same).
    dedupe: bool,
    timeout: Duration,
    seen: Seen,
    connected_once: bool,
}

pub async fn run(mut args: WatchArgs) -> Result<()> {
    if args.kube.wanted() {
        args.url = args.kube.forward().await?;
    }
    let (url, uri) = stream_urls(&args)?;
    let mut w = Watcher {
        client: Client::builder(TokioExecutor::new()).build_http(),
        url,
        uri,
        token: args
            .token_file
            .as_deref()
            .map(read_token_file)
            .transpose()?,
        dedupe: !args.events,
        timeout: Duration::from_secs(args.timeout),
        seen: Seen::default(),
        connected_once: false,
    };
    let url = &w.url.clone();
    let mut backoff = Duration::from_secs(1);
    let stdout = std::io::stdout();
    loop {
        let why = match w.stream_once(&mut stdout.lock()).await {
            End::OutputClosed => return Ok(()),
            End::Fatal(e) => return Err(e),
            End::Failed(e) if !w.connected_once => bail!(
                "cannot reach the detector at {url}: {e}; check that it runs with --listen on \
                 that address, or that `kubectl port-forward` is up"
            ),
            End::Failed(e) => format!("no stream from {url}: {e}"),
            End::Closed => {
                backoff = Duration::from_secs(1);
                format!("the detector at {url} closed the stream")
            }
        };
        crate::note!(
            "detector watch: {why}; reconnecting in {} s",
            backoff.as_secs()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// The stream's URL, as messages name it (races or events, readable lines or NDJSON), and the
/// request's, which also asks for keep-alives at half the timeout.
fn stream_urls(args: &WatchArgs) -> Result<(String, Uri)> {
    let path = if args.events {
        "/v1/events"
    } else {
        "/v1/races"
    };
    let url = format!(
        "{}{path}{}",
        args.url.trim_end_matches('/'),
        if args.json { "" } else { "?format=text" }
    );
    let sep = if args.json { '?' } else { '&' };
    let uri: Uri = format!("{url}{sep}keepalive={}", (args.timeout / 2).max(1))
        .parse()
        .map_err(|_| {
            anyhow!(
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
    Ok((url, uri))
}

impl Watcher {
    fn silent(&self, what: &str) -> End {
        End::Fatal(anyhow!(
            "{what} from {} for {} s (--timeout): the detector sends a keep-alive line within \
             that when it is up, so it or the path to it is stuck",
            self.url,
            self.timeout.as_secs()
        ))
    }

    async fn stream_once(&mut self, out: &mut impl Write) -> End {
        let mut req = Request::get(self.uri.clone()).header(header::ACCEPT, "application/x-ndjson");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return End::Fatal(e.into()),
        };
        let resp = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => return self.silent("no response"),
            Ok(Err(e)) => return End::Failed(error_chain(&e)),
            Ok(Ok(r)) => r,
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => {
                return End::Fatal(anyhow!(
                    "{}: 401 Unauthorized: {}; pass --token-file with the detector's token",
                    self.url,
                    if self.token.is_some() {
                        "the token was refused"
                    } else {
                        "the detector wants a bearer token"
                    }
                ));
            }
            s => return End::Fatal(anyhow!("{}: unexpected HTTP status {s}", self.url)),
        }
        if self.connected_once {
            crate::note!("detector watch: reconnected to {}", self.url);
        }
        self.connected_once = true;
        let mut body = resp.into_body();
        let mut splitter = LineSplitter::new(MAX_LINE);
        loop {
            let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                Err(_) => return self.silent("nothing"),
                Ok(None) => return End::Closed,
                Ok(Some(Err(e))) => return End::Failed(error_chain(&e)),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let lines = match splitter.push(&data) {
                Ok(lines) => lines,
                Err(e) => return End::Fatal(anyhow!("{}: {e}", self.url)),
            };
            for line in lines {
                if !self.shows(&line) {
                    continue;
                }
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return End::OutputClosed;
                }
            }
        }
    }

    /// Whether a line is shown: not a keep-alive (empty), and not a race already shown
    /// (lagged markers always are).
    fn shows(&mut self, line: &str) -> bool {
        if line.is_empty() {
            return false;
        }
        !self.dedupe
            || line.starts_with("LAGGED")
            || line.contains("\"lagged\"")
            || self.seen.first(line)
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
