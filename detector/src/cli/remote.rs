//! One request to a detector's HTTP server: the plain GETs of the client commands
//! (`detector traces`), with the bearer token of `--token-file`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;

/// A detector reached at `--url`.
pub struct Remote {
    /// `host:port` to connect to.
    authority: String,
    token: Option<String>,
}

/// The token in `path`, trimmed.
pub fn read_token(path: Option<&Path>) -> Result<Option<String>> {
    let Some(p) = path else { return Ok(None) };
    let t = std::fs::read_to_string(p)
        .with_context(|| format!("--token-file {}: cannot read it", p.display()))?;
    Ok(Some(t.trim().to_string()))
}

impl Remote {
    pub fn new(url: &str, token: Option<String>) -> Result<Self> {
        let uri: Uri = url.parse().map_err(|_| {
            anyhow::anyhow!("--url {url}: not a URL; give e.g. http://127.0.0.1:9477")
        })?;
        let Some(auth) = uri.authority().filter(|_| uri.scheme_str() == Some("http")) else {
            bail!("--url {url}: only http://HOST:PORT is supported");
        };
        let authority = if auth.port().is_some() {
            auth.to_string()
        } else {
            format!("{auth}:80")
        };
        Ok(Self { authority, token })
    }

    /// GETs `path`; the body of a 200, an error naming the status otherwise.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot reach the detector at {}", self.authority))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let mut req = Request::get(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        match status {
            StatusCode::OK => Ok(body),
            StatusCode::UNAUTHORIZED => bail!(
                "{path}: 401 Unauthorized: {}",
                if self.token.is_some() {
                    "the token was refused"
                } else {
                    "the detector wants a bearer token; pass --token-file"
                }
            ),
            s => bail!(
                "{path}: HTTP {s}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        }
    }
}
