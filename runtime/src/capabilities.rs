//! What a deployment's instances may reach beyond their own memory. The
//! default allows nothing: no environment, no files, no outbound HTTP, no
//! models. Each capability opens exactly what it names.

use crate::error::Error;
use crate::nn::ModelAccess;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// What a deployment's instances may reach. The default allows nothing.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    /// Environment variables the handler sees.
    pub env: BTreeMap<String, String>,
    /// Hosts outbound HTTP(S) may reach: `host` (any port) or `host:port`.
    /// Everything else is refused with `HTTP-request-denied`.
    pub outbound: Vec<String>,
    /// A host directory the handler sees, read-only, at `/` (cap-std:
    /// nothing outside it is reachable, through `..` or symlinks).
    pub files: Option<PathBuf>,
    /// The models `wasi:nn` may load, where their names resolve, and the
    /// tenant the deployment belongs to (it also names the deployment's
    /// share of the instance pool).
    pub models: ModelAccess,
}

impl Capabilities {
    /// Checks every entry, naming the bad one.
    pub fn validate(&self) -> Result<(), Error> {
        check_env(&self.env)?;
        check_outbound(&self.outbound)?;
        self.models.validate().map_err(Error::InvalidCapabilities)
    }
}

/// Checks environment variables: names non-empty without `=` or NUL,
/// values without NUL.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), Error> {
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(Error::InvalidCapabilities(format!("invalid environment variable name {key:?}")));
        }
        if value.contains('\0') {
            return Err(Error::InvalidCapabilities(format!("environment variable {key}: the value contains a NUL byte")));
        }
    }
    Ok(())
}

/// Checks an outbound allow-list: each entry `host` or `host:port`.
pub fn check_outbound(outbound: &[String]) -> Result<(), Error> {
    for entry in outbound {
        check_host_pattern(entry, true).map_err(|e| Error::InvalidCapabilities(format!("outbound allow-list: {e}")))?;
    }
    Ok(())
}

/// What every instance of a deployment shares from its capabilities,
/// built once per deployment so that a request only clones two `Arc`s.
#[derive(Clone, Default)]
pub(crate) struct SharedCapabilities {
    /// The outbound allow-list.
    pub outbound: Arc<Vec<String>>,
    /// The models wasi-nn may load.
    pub models: Arc<ModelAccess>,
}

impl SharedCapabilities {
    pub(crate) fn of(capabilities: &Capabilities) -> SharedCapabilities {
        SharedCapabilities { outbound: Arc::new(capabilities.outbound.clone()), models: Arc::new(capabilities.models.clone()) }
    }
}

/// Checks a host name (and, when `port_allowed`, an optional `:port`):
/// dot-separated labels of 1-63 letters, digits and `-`.
pub fn check_host_pattern(pattern: &str, port_allowed: bool) -> Result<(), Error> {
    let (host, port) = match pattern.rsplit_once(':') {
        Some((h, p)) if port_allowed => (h, Some(p)),
        _ => (pattern, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else if port_allowed {
        Err(Error::InvalidHost(format!("{pattern:?}: use a DNS name or IP address, with an optional :port")))
    } else {
        Err(Error::InvalidHost(format!("{pattern:?}: use a plain DNS name")))
    }
}

/// Whether `authority` (`host[:port]` of a request) is on `allow`.
fn allowed(allow: &[String], authority: &str, default_port: u16) -> bool {
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(0)),
        None => (authority.clone(), default_port),
    };
    allow.iter().any(|entry| match entry.rsplit_once(':') {
        Some((h, p)) => *h == host && p.parse() == Ok(port),
        None => *entry == host,
    })
}

/// The wasi:http hooks of one request: outbound HTTP only to the
/// deployment's allow-list, carrying the request's trace context.
pub(crate) struct OutboundPolicy {
    pub allow: Arc<Vec<String>>,
    /// The incoming request's `traceparent`, added to outgoing requests
    /// that have none.
    pub traceparent: Option<http::HeaderValue>,
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _io: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        let uri = request.uri();
        let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
        let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
        if !allowed(&self.allow, &authority, default_port) {
            tracing::info!(%authority, "outbound HTTP request denied: not on the allow-list");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        if let Some(traceparent) = &self.traceparent
            && !request.headers().contains_key("traceparent")
        {
            request.headers_mut().insert("traceparent", traceparent.clone());
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matching() {
        let allow = vec!["api.example.com".to_string(), "127.0.0.1:8080".to_string()];
        assert!(allowed(&allow, "api.example.com", 443));
        assert!(allowed(&allow, "API.example.com:8443", 443));
        assert!(allowed(&allow, "127.0.0.1:8080", 80));
        assert!(!allowed(&allow, "127.0.0.1:8081", 80));
        assert!(!allowed(&allow, "127.0.0.1", 80));
        assert!(!allowed(&allow, "evil.example.com", 443));
        assert!(!allowed(&allow, "", 80));
    }

    #[test]
    fn host_patterns() {
        assert!(check_host_pattern("example.com", false).is_ok());
        assert!(check_host_pattern("example.com:80", false).is_err());
        assert!(check_host_pattern("example.com:80", true).is_ok());
        assert!(check_host_pattern("example.com:0", true).is_err());
        assert!(check_host_pattern("a b", true).is_err());
        assert!(check_host_pattern("", true).is_err());
        for bad in ["a..b", ".a", "a.", "-a.com", "a-.com", &format!("{}.com", "x".repeat(64))] {
            assert!(check_host_pattern(bad, false).is_err(), "{bad}");
        }
    }
}
