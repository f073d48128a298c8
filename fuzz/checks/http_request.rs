// Requests to the detector's HTTP server (what `detector watch`, Prometheus and probes send):
// any request line target and bearer token routes to an answer, never a panic. The first
// input line is the request target (path and query), the second the Authorization header.
//
// The `http_request` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

const TOKEN: &str = "fuzz-token";

struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let services = detector::http::RunServices::new(16);
        Server {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime"),
            router: detector::http::router(
                services.hub.clone(),
                services.metrics.clone(),
                Some(TOKEN.into()),
            ),
        }
    })
}

fn request(data: &[u8]) -> Option<Request<Body>> {
    let mut lines = data.splitn(2, |&b| b == b'\n');
    let target = lines.next()?;
    let auth = lines.next().unwrap_or(b"Bearer fuzz-token");
    Request::get(target)
        .header(header::AUTHORIZATION, auth)
        .header(header::ACCEPT, "application/x-ndjson")
        .body(Body::empty())
        .ok()
}

pub fn check(data: &[u8]) {
    // Targets the http crate rejects never reach the detector's code.
    let Some(req) = request(data) else {
        return;
    };
    let s = server();
    let resp = s.runtime.block_on(s.router.clone().oneshot(req));
    let Ok(resp) = resp;
    let status = resp.status();
    // Unready is the only server-side failure the detector answers with.
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}"
    );
}
