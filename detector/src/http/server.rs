//! The accept loop and each connection, with the limits that keep a daemon's HTTP server from
//! being held down by its clients: at most so many connections and streams (more get 503),
//! a deadline for a request's headers, idle connections closed, and running out of
//! descriptors on accept met by backing off rather than by stopping. The routes know none of
//! this.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::telemetry::metrics::Metrics;

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Open streams (`/v1/races`, `/v1/events`, any NDJSON or SSE response) at most.
    pub max_streams: usize,
    /// A request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_streams: 64,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether a response is a long-lived stream (counted against `max_streams`).
fn is_stream(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.starts_with("application/x-ndjson") || t.starts_with("text/event-stream")
        })
}

fn busy(what: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        format!("too many {what} open; try again later\n"),
    )
        .into_response()
}

/// Whether an accept error means the process or the system is out of a resource (wait for
/// one to be freed) rather than one connection having failed.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Serves `router` on `listener` until `stopped` turns true.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let streams = Arc::new(Semaphore::new(limits.max_streams.max(1)));
    let accept_errors = AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop_asked(&mut stopped) => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                metrics.http_limit("accept_errors");
                let n = accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(100) {
                    tracing::warn!("HTTP accept failed ({n} so far): {e}; backing off");
                }
                let pause = if out_of_resources(&e) { 200 } else { 10 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.http_limit("connections_refused");
            tokio::spawn(refuse(tcp));
            continue;
        };
        let conn = Connection {
            router: router.clone(),
            limits,
            metrics: metrics.clone(),
            streams: streams.clone(),
        };
        let stopped = stopped.clone();
        tokio::spawn(async move {
            conn.serve(tcp, stopped).await;
            drop(permit);
        });
    }
}

/// Resolves once a stop is asked; never if the handle was dropped (the server then runs
/// until the process ends).
async fn stop_asked(stopped: &mut watch::Receiver<bool>) {
    if stopped.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Bytes of a refused connection's request read (and discarded) before it is closed.
const REFUSED_DRAIN_BYTES: usize = 16 * 1024;

/// Answers 503 to a connection over the cap without parsing its request, then reads what the
/// client sends until it closes (at most 2 s and a few KiB): a socket closed with unread data
/// sends a reset, and a reset that arrives before the client has read the 503 destroys it.
async fn refuse(mut tcp: TcpStream) {
    let body = "too many connections open; try again later\n";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tcp.write_all(reply.as_bytes()).await;
        let _ = tcp.shutdown().await;
        let mut buf = [0u8; 1024];
        let mut left = REFUSED_DRAIN_BYTES;
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Requests in progress on one connection and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    since: std::sync::Mutex<Instant>,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.since.lock().map(|t| t.elapsed()).unwrap_or_default())
    }
}

/// Held while a request (and its response body) is in progress.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.since.lock() {
            *t = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Connection {
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    streams: Arc<Semaphore>,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, mut stopped: watch::Receiver<bool>) {
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            since: std::sync::Mutex::new(Instant::now()),
        });
        let inner = TowerToHyperService::new(self.router.clone());
        let (metrics, streams, act) =
            (self.metrics.clone(), self.streams.clone(), activity.clone());
        let service = hyper::service::service_fn(move |req| {
            let guard = InFlight::begin(&act);
            let call = hyper::service::Service::call(&inner, req);
            let (metrics, streams) = (metrics.clone(), streams.clone());
            async move {
                let resp = call.await?;
                let permit = if is_stream(&resp) {
                    let Ok(p) = streams.try_acquire_owned() else {
                        metrics.http_limit("streams_refused");
                        return Ok(busy("streams"));
                    };
                    Some(p)
                } else {
                    None
                };
                // The request counts as in progress (and a stream as open) until its body
                // is done or the client goes away.
                let (parts, body) = resp.into_parts();
                let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
                    let _held = (&guard, &permit);
                    chunk
                }));
                Ok::<_, std::convert::Infallible>(Response::from_parts(parts, body))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(tcp), service);
        let mut conn = std::pin::pin!(conn);
        let idle = self.limits.idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
        let mut closing = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => break,
                () = stop_asked(&mut stopped), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = tick.tick(), if !closing => {
                    if activity.idle_for().is_some_and(|d| d >= idle) {
                        self.metrics.http_limit("idle_closed");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    /// A client over the cap reads its 503 and then the end of the connection, whether its
    /// request came at once or in pieces after the 503 went out: the refusal keeps reading
    /// until the client closes, so neither an unread request nor one sent to a closed socket
    /// turns the connection into a reset (a broken pipe, and no 503, for the client).
    #[tokio::test]
    async fn a_refused_client_reads_its_503_whenever_its_request_comes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (_stop, stopped) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        tokio::spawn(serve(
            listener,
            Router::new(),
            limits,
            metrics.clone(),
            stopped,
        ));
        let _held = TcpStream::connect(addr).await.unwrap();
        for i in 0..6 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // Every other time the 503 is out before the request, which comes in two writes.
            let late = i % 2 == 1;
            if late {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.write_all(b"GET /metrics").await.unwrap();
            if late {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            c.write_all(b" HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("the request is sent, not refused by a reset");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut reply = Vec::new();
            c.read_to_end(&mut reply)
                .await
                .expect("the 503, then the end of the connection, not a reset");
            let reply = String::from_utf8_lossy(&reply);
            assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
        }
        assert!(
            metrics
                .encode()
                .contains("detector_http_limits_total{result=\"connections_refused\"} 6"),
            "{}",
            metrics.encode()
        );
    }
}
