//! The daemon's read-only HTTP server: `/metrics`, the live `/v1/races` and `/v1/events`
//! streams, the trace files (`/v1/traces`), `/healthz` and `/readyz`.
//!
//! Streams are NDJSON by default, Server-Sent Events when the request accepts
//! `text/event-stream`, and the readable lines of `detector run` with `?format=text`. With a
//! token every endpoint but the probes wants `Authorization: Bearer <token>`.

pub mod server;
pub mod sink;
pub mod stream;
pub mod traces;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use tokio::net::TcpListener;

use crate::k8s::Kube;
use crate::telemetry::metrics::{self, Metrics};
use stream::{Channel, Frame, Hub};

/// Default address of `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";
/// Records a stream client may fall behind before it gets a `lagged` marker.
pub const CLIENT_BACKLOG: usize = 4096;

/// The HTTP settings of `detector run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HTTP server address (metrics, live streams, health) [default: 127.0.0.1:9477]; `off`
    /// disables it. A DaemonSet binds 0.0.0.0:9477 for a Service or `kubectl port-forward`.
    /// When the default address is taken the server is left off with a warning; an address
    /// given here must bind.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// File holding a bearer token that every endpoint but /healthz and /readyz requires.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    /// Races replayed to a stream client when it connects (kept in memory: at most 10000).
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub replay: u32,
    /// HTTP connections open at most; more are answered 503 (counted in
    /// `detector_http_limits_total`).
    #[arg(long, default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub http_max_connections: u32,
    /// Streams (`/v1/races`, `/v1/events`) open at most; more are answered 503.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub http_max_streams: u32,
}

impl ServeArgs {
    /// The address to bind and whether it was given, or `None` for `off`.
    pub fn addr(&self) -> Result<Option<(SocketAddr, bool)>> {
        let Some(listen) = self.listen.as_deref() else {
            return Ok(Some((DEFAULT_LISTEN.parse()?, false)));
        };
        if listen == "off" {
            return Ok(None);
        }
        let addr = listen.parse().map_err(|_| {
            anyhow::anyhow!(
                "--listen {listen}: not an address; give IP:PORT (e.g. 127.0.0.1:9477 or \
                 0.0.0.0:9477) or `off`"
            )
        })?;
        Ok(Some((addr, true)))
    }

    /// Starts the server for `services` when enabled; returns the address it serves on.
    pub async fn start(&self, services: &mut RunServices) -> Result<Option<SocketAddr>> {
        let Some((addr, given)) = self.addr()? else {
            return Ok(None);
        };
        let token = self.token()?;
        let listener = match bind(addr).await {
            Ok(l) => l,
            Err(e) if !given => {
                tracing::warn!("HTTP server off: {e:#}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let local = listener.local_addr()?;
        if token.is_none() && !local.ip().is_loopback() {
            tracing::warn!(
                "--listen {local}: serving beyond this host without --token-file; anyone who \
                 can reach it reads the races and events"
            );
        }
        let limits = server::Limits {
            max_connections: self.http_max_connections as usize,
            max_streams: self.http_max_streams as usize,
            ..server::Limits::default()
        };
        services.server = Some(spawn_with(
            listener,
            router_with_traces(
                services.hub.clone(),
                services.metrics.clone(),
                token,
                services.trace_dir.clone(),
            ),
            limits,
            services.metrics.clone(),
        ));
        Ok(Some(local))
    }

    pub fn token(&self) -> Result<Option<String>> {
        self.token_file.as_deref().map(read_token_file).transpose()
    }
}

/// The bearer token in `path` (a --token-file of the server or of `detector watch`), trimmed;
/// an unreadable or empty file is an error that names it.
pub fn read_token_file(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}: cannot read it", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        anyhow::bail!(
            "--token-file {}: the file is empty; put the bearer token in it",
            path.display()
        );
    }
    Ok(t)
}

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
    traces: Option<std::path::PathBuf>,
}

/// The router over a hub and metrics (tests serve it on their own listener).
pub fn router(hub: Arc<Hub>, metrics: Arc<Metrics>, token: Option<String>) -> Router {
    router_with_traces(hub, metrics, token, None)
}

/// [`router`] that also serves the trace files of `traces` on `/v1/traces`.
pub fn router_with_traces(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    token: Option<String>,
    traces: Option<std::path::PathBuf>,
) -> Router {
    let state = AppState {
        hub,
        metrics,
        token: token.map(Arc::from),
        traces,
    };
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/v1/races", get(races))
        .route("/v1/events", get(events))
        .route(
            "/v1/traces",
            get(|State(st): State<AppState>| traces::list_handler(st.traces)),
        )
        .route(
            "/v1/traces/{name}",
            get(
                |State(st): State<AppState>, UrlPath(name): UrlPath<String>| {
                    traces::file_handler(st.traces, name)
                },
            ),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` with an error that names it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("--listen {addr}: cannot bind (in use, or not an address of this host?); pick another or `off`")
    })
}

/// A running server.
pub struct ServerHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stops accepting and waits up to `grace` for open connections to finish (streams end
    /// once their hub is closed).
    pub async fn stop(self, grace: std::time::Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::debug!("HTTP connections still open at exit");
        }
    }
}

/// Serves `router` on `listener` with the default limits, their counts in a metrics registry
/// of their own (tests).
pub fn spawn(listener: TcpListener, router: Router) -> ServerHandle {
    spawn_with(
        listener,
        router,
        server::Limits::default(),
        Arc::new(Metrics::new()),
    )
}

/// Serves `router` on `listener` within `limits` until stopped (or, if the handle is dropped,
/// until the process ends).
pub fn spawn_with(
    listener: TcpListener,
    router: Router,
    limits: server::Limits,
    metrics: Arc<Metrics>,
) -> ServerHandle {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        // A dropped handle leaves the server running: the receiver then never sees `true`.
        server::serve(listener, router, limits, metrics, stopped).await;
    });
    ServerHandle { stop, task }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token: send `Authorization: Bearer <token>` \
                 (detector watch --token-file PATH)\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.metrics.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: probes attaching or start-up snapshots running\n",
        )
            .into_response()
    }
}

async fn metrics_handler(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        st.metrics.encode(),
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct StreamQuery {
    /// `text`: readable lines; default NDJSON.
    format: Option<String>,
    /// Seconds: an empty line after each this long with no record (NDJSON and text; SSE
    /// always has its keep-alive comments).
    keepalive: Option<u64>,
}

async fn races(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    stream_response(&st.hub.races, "races", &st.metrics, &headers, &q)
}

async fn events(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    stream_response(&st.hub.events, "events", &st.metrics, &headers, &q)
}

fn stream_response(
    chan: &Channel,
    name: &'static str,
    metrics: &Arc<Metrics>,
    headers: &HeaderMap,
    q: &StreamQuery,
) -> Response {
    let sub = chan.subscribe();
    let frames =
        futures_util::stream::unfold((sub, metrics.clone()), move |(mut sub, m)| async move {
            let f = sub.next().await?;
            if let Frame::Lagged(n) = f {
                m.lagged(name, n);
            }
            Some((f, (sub, m)))
        });
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if sse {
        let kind = if name == "races" { "race" } else { "event" };
        let events = frames.map(move |f| {
            let ev = match &f {
                Frame::Item(_) => SseEvent::default().event(kind),
                Frame::Lagged(_) => SseEvent::default().event("lagged"),
            };
            Ok::<_, Infallible>(ev.data(f.json()))
        });
        return Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let text = q.format.as_deref() == Some("text");
    let lines = frames.map(move |f| format!("{}\n", if text { f.text() } else { f.json() }));
    let lines = match q.keepalive {
        None => lines.boxed(),
        Some(secs @ 1..=stream::MAX_KEEPALIVE_SECS) => {
            stream::with_keepalive(lines, Duration::from_secs(secs)).boxed()
        }
        Some(secs) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "keepalive={secs}: give seconds from 1 to {}\n",
                    stream::MAX_KEEPALIVE_SECS
                ),
            )
                .into_response();
        }
    };
    let ctype = if text {
        "text/plain; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    let body = Body::from_stream(lines.map(Ok::<_, Infallible>));
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

/// The services a run feeds besides stdout and the trace files: the HTTP streams and the server
/// that reads them, the metrics, and the Kubernetes client (pods and Events).
pub struct RunServices {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub kube: Option<Kube>,
    pub server: Option<ServerHandle>,
    /// The directory `/v1/traces` serves (the run's --trace-dir).
    pub trace_dir: Option<std::path::PathBuf>,
}

impl RunServices {
    pub fn new(replay: usize) -> Self {
        Self {
            hub: Arc::new(Hub::new(replay, 0, CLIENT_BACKLOG)),
            metrics: Arc::new(Metrics::new()),
            kube: None,
            server: None,
            trace_dir: None,
        }
    }

    /// At exit: streams end cleanly after the last records, then the server stops.
    pub async fn shutdown(&mut self) {
        self.metrics.set_ready(false);
        self.hub.close_clients();
        if let Some(s) = self.server.take() {
            s.stop(std::time::Duration::from_secs(1)).await;
        }
    }
}
