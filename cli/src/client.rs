//! A small HTTP/1.1 client for the admin API and `gpuwasm invoke`.

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use gpuwasm_server::api::{ADMIN_PREFIX, ErrorBody};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

/// A response read to the end.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Talks to one gpuwasm server.
pub struct Api {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, BoxBody<Bytes, std::convert::Infallible>>,
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request to `path` (which starts with `/`) and reads the reply.
    pub async fn send(&self, method: Method, path: &str, headers: &[(String, String)], body: Bytes) -> Result<Reply> {
        self.send_body(method, path, headers, Full::new(body).boxed()).await
    }

    /// Uploads `bytes` with `PUT` to the admin API at `path`, drawing a
    /// progress bar for `label` on stderr as the server takes them (on a
    /// terminal; elsewhere one line when done).
    pub async fn upload<T: DeserializeOwned>(&self, path: &str, bytes: Bytes, label: &str) -> Result<T> {
        let terminal = std::io::stderr().is_terminal();
        let body = Progress { total: bytes.len(), rest: bytes, label: label.to_string(), shown: None, terminal }.boxed();
        let reply = self.send_body(Method::PUT, &format!("{ADMIN_PREFIX}{path}"), &[], body).await;
        if terminal {
            eprintln!();
        } else if reply.is_ok() {
            eprintln!("  {label}: sent");
        }
        typed(parse_admin_reply(reply?)?)
    }

    async fn send_body(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: BoxBody<Bytes, std::convert::Infallible>,
    ) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder.body(body).with_context(|| format!("invalid request to {url}"))?;
        let response = self.client.request(request).await.map_err(|e| {
            anyhow!("cannot reach the gpuwasm server at {}: {e} (is `gpuwasm serve` running? see --server)", self.base)
        })?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.with_context(|| format!("reading the reply from {url}"))?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// Calls the admin API and reads its reply as `T` (the types of
    /// `gpuwasm_server::api`), turning API errors into readable ones.
    pub async fn admin<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> Result<T> {
        typed(self.admin_json(method, path, &[], body).await?)
    }

    /// [`Api::admin`] with a JSON request body.
    pub async fn admin_send<B: Serialize, T: DeserializeOwned>(&self, method: Method, path: &str, body: &B) -> Result<T> {
        self.admin(method, path, Bytes::from(serde_json::to_vec(body)?)).await
    }

    /// The admin API's reply as JSON as it came (for `--json`), with extra
    /// request headers.
    pub async fn admin_json(&self, method: Method, path: &str, headers: &[(String, String)], body: Bytes) -> Result<serde_json::Value> {
        let reply = self.send(method, &format!("{ADMIN_PREFIX}{path}"), headers, body).await?;
        parse_admin_reply(reply)
    }
}

/// A JSON reply as the type the API documents for it.
pub fn typed<T: DeserializeOwned>(json: serde_json::Value) -> Result<T> {
    serde_json::from_value(json).context("unexpected reply from the server (is it another gpuwasm version?)")
}

/// An admin API reply as JSON, or its error as a readable one.
fn parse_admin_reply(reply: Reply) -> Result<serde_json::Value> {
    let json: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|_| {
        anyhow!("unexpected reply (HTTP {}): {}", reply.status, String::from_utf8_lossy(&reply.body).trim())
    })?;
    if reply.status.is_success() {
        return Ok(json);
    }
    match serde_json::from_value::<ErrorBody>(json) {
        Ok(ErrorBody { error }) => Err(anyhow!("{} [{}, HTTP {}]", error.message, error.code, reply.status.as_u16())),
        Err(_) => Err(anyhow!("HTTP {} without the documented error body", reply.status.as_u16())),
    }
}

/// A request body handed out in 1 MiB chunks, drawing progress as they go.
struct Progress {
    rest: Bytes,
    total: usize,
    label: String,
    /// The percentage last drawn.
    shown: Option<usize>,
    /// Whether stderr is a terminal (else nothing is drawn).
    terminal: bool,
}

impl http_body::Body for Progress {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(1 << 20);
        let chunk = self.rest.split_to(n);
        // Handed to the connection: counted as sent.
        let sent = self.total - self.rest.len();
        let percent = sent * 100 / self.total.max(1);
        if self.terminal && self.shown != Some(percent) {
            self.shown = Some(percent);
            let bar: String = (0..30).map(|i| if i * 100 < percent * 30 { '#' } else { '.' }).collect();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r  {} [{bar}] {percent:>3}%", self.label);
            let _ = err.flush();
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}
