//! A small HTTP/1.1 client for the admin API and `gpuwasm invoke`.

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

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
    client: Client<HttpConnector, Full<Bytes>>,
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
        let url = format!("{}{path}", self.base);
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder.body(Full::new(body)).with_context(|| format!("invalid request to {url}"))?;
        let response = self.client.request(request).await.map_err(|e| {
            anyhow!("cannot reach the gpuwasm server at {}: {e} (is `gpuwasm serve` running? see --server)", self.base)
        })?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.with_context(|| format!("reading the reply from {url}"))?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// Calls the admin API and parses its JSON reply, turning API errors
    /// into readable ones.
    pub async fn admin(&self, method: Method, path: &str, body: Bytes) -> Result<serde_json::Value> {
        self.admin_with(method, path, &[], body).await
    }

    /// [`Api::admin`] with extra request headers.
    pub async fn admin_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<serde_json::Value> {
        let reply = self.send(method, &format!("{}{path}", gpuwasm::server::ADMIN_PREFIX), headers, body).await?;
        let json: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|_| {
            anyhow!("unexpected reply (HTTP {}): {}", reply.status, String::from_utf8_lossy(&reply.body).trim())
        })?;
        if reply.status.is_success() {
            return Ok(json);
        }
        let message = json["error"]["message"].as_str().unwrap_or("(no message)");
        let code = json["error"]["code"].as_str().unwrap_or("unknown");
        Err(anyhow!("{message} [{code}, HTTP {}]", reply.status.as_u16()))
    }
}
