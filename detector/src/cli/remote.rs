//! One request to a detector's HTTP server: the plain GETs of the client commands
//! (`detector traces`) and a stream read for a while (`detector cluster-verdict`), with the
//! bearer token of `--token-file`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri, header};
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

    /// Sends a GET of `path` and returns the response with the connection's driver.
    async fn request(
        &self,
        path: &str,
        accept: &str,
    ) -> Result<(
        Response<Incoming>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    )> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot reach the detector at {}", self.authority))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let mut req = Request::get(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, accept);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
        Ok((resp, driver))
    }

    /// GETs `path`; the body of a 200, an error naming the status otherwise.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        let (resp, driver) = self.request(path, "application/json").await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        self.checked(path, status, body)
    }

    /// Reads the NDJSON stream at `path` until `until`, handing each line to `line`. Ok when
    /// the deadline came with the stream open; an error when it could not be opened or ended
    /// early (the detector stopped: what it saw after that is unknown).
    pub async fn stream_until(
        &self,
        path: &str,
        until: tokio::time::Instant,
        mut line: impl FnMut(&str),
    ) -> Result<()> {
        let (resp, driver) = self.request(path, "application/x-ndjson").await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = resp.into_body().collect().await?.to_bytes();
            driver.abort();
            return self.checked(path, status, body).map(|_| ());
        }
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        let ended = loop {
            let frame = match tokio::time::timeout_at(until, body.frame()).await {
                Err(_) => break None,
                Ok(None) => break Some("the detector closed the stream".to_string()),
                Ok(Some(Err(e))) => break Some(format!("the stream broke: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = pending.drain(..=nl).collect();
                line(String::from_utf8_lossy(&l[..l.len() - 1]).trim());
            }
        };
        driver.abort();
        match ended {
            None => Ok(()),
            Some(why) => bail!("{path}: {why} before the end of the window"),
        }
    }

    fn checked(&self, path: &str, status: StatusCode, body: Bytes) -> Result<Bytes> {
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
