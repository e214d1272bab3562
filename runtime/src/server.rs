//! The multi-deployment HTTP server behind `gpuwasm serve`.
//!
//! Requests are routed to deployments by `Host` header (for deployments
//! that ask for a host) or by path prefix: `/<deployment>/rest` reaches the
//! deployment as `/rest`. The admin API lives under `/_gpuwasm/v1/` and
//! needs `Authorization: Bearer <admin token>`:
//!
//! | method and path                         | does                                   |
//! |-----------------------------------------|----------------------------------------|
//! | `GET /_gpuwasm/v1/health`               | `{"status":"ok"}`, no token needed     |
//! | `GET /_gpuwasm/v1/deployments`          | lists deployments                      |
//! | `GET /_gpuwasm/v1/deployments/NAME`     | one deployment                         |
//! | `PUT /_gpuwasm/v1/deployments/NAME`     | deploys the component in the body; query parameters `host`, `preinit=false` and any [`Limits`] field |
//! | `DELETE /_gpuwasm/v1/deployments/NAME`  | removes a deployment                   |
//!
//! Errors answer `{"error":{"code":"...","message":"..."}}`.
//! Deployments and compiled artifacts persist in the data directory and
//! are served again after a restart.

use crate::artifacts::{ArtifactStore, write_atomic};
use crate::error::Error;
use crate::limits::Limits;
use crate::request::{ResponseBody, full_body, text_response};
use crate::runtime::{Deployment, Runtime};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// The path prefix of the admin API; no deployment can be named like it.
pub const ADMIN_PREFIX: &str = "/_gpuwasm/v1/";

/// Settings of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where deployments and artifacts are stored.
    pub data_dir: PathBuf,
    /// The bearer token the admin API requires.
    pub admin_token: String,
    /// Largest component upload accepted, in bytes.
    pub max_upload_bytes: usize,
}

/// A deployment as recorded in the server's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The deployment's name, also its path prefix.
    pub name: String,
    /// SHA-256 of the uploaded component.
    pub sha256: String,
    /// SHA-256 of the pre-initialised snapshot that actually runs, when the
    /// component has an init function and pre-initialisation was not
    /// turned off.
    pub snapshot_sha256: Option<String>,
    /// Size of the uploaded component in bytes.
    pub size_bytes: u64,
    /// Host name routed to this deployment, if any.
    pub host: Option<String>,
    /// Limits its requests run under.
    pub limits: Limits,
    /// When it was deployed, in seconds since the Unix epoch.
    pub deployed_at: u64,
}

/// The persisted state file.
#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    deployments: Vec<DeploymentRecord>,
}

/// A routable deployment, or why it could not be loaded.
#[derive(Clone)]
struct Route {
    record: DeploymentRecord,
    deployment: Result<Deployment, String>,
}

/// An immutable routing table, replaced whole on every change.
#[derive(Default)]
struct Routes {
    by_name: BTreeMap<String, Route>,
    /// Host name -> deployment name, for deployments routed by host.
    hosts: HashMap<String, String>,
}

impl Routes {
    fn from_routes(by_name: BTreeMap<String, Route>) -> Self {
        let hosts = by_name
            .values()
            .filter_map(|r| Some((r.record.host.clone()?, r.record.name.clone())))
            .collect();
        Routes { by_name, hosts }
    }

    fn by_host(&self, host: &str) -> Option<&Route> {
        self.by_name.get(self.hosts.get(host)?)
    }

    fn records(&self) -> Vec<DeploymentRecord> {
        self.by_name.values().map(|r| r.record.clone()).collect()
    }
}

/// The gpuwasm HTTP server: routing, admin API and durable state.
///
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    runtime: Runtime,
    artifacts: ArtifactStore,
    state_path: PathBuf,
    config: ServerConfig,
    routes: RwLock<Arc<Routes>>,
    /// Serialises changes to the routing table and the state file.
    changes: tokio::sync::Mutex<()>,
}

impl Server {
    /// Opens (or creates) the state in `config.data_dir` and loads every
    /// recorded deployment. A deployment that fails to load is logged and
    /// answers `503` until it is deployed again; the others serve.
    pub async fn open(runtime: Runtime, config: ServerConfig) -> Result<Server, Error> {
        let artifacts = ArtifactStore::open(config.data_dir.join("artifacts"), &runtime)?;
        let state_path = config.data_dir.join("deployments.json");
        let state: StateFile = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::CorruptState {
                path: state_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(Error::io("reading the state file", &state_path, e)),
        };
        let inner = Arc::new(ServerInner {
            runtime,
            artifacts,
            state_path,
            config,
            routes: RwLock::new(Arc::default()),
            changes: tokio::sync::Mutex::new(()),
        });
        let mut routes = BTreeMap::new();
        for record in state.deployments {
            let loader = inner.clone();
            let r = record.clone();
            let deployment = tokio::task::spawn_blocking(move || loader.build(&r))
                .await
                .map_err(|e| Error::Engine(format!("loading task failed: {e}")))?
                .map_err(|e| {
                    tracing::error!(deployment = %record.name, error = %e, "deployment failed to load");
                    e.to_string()
                });
            routes.insert(record.name.clone(), Route { record, deployment });
        }
        *inner.routes.write().unwrap() = Arc::new(Routes::from_routes(routes));
        Ok(Server { inner })
    }

    /// The deployments currently recorded.
    pub fn deployments(&self) -> Vec<DeploymentRecord> {
        self.inner.routes().records()
    }

    /// Answers one HTTP request: admin API, or routed to a deployment.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        if request.uri().path().starts_with(ADMIN_PREFIX) {
            return self.inner.admin(request).await;
        }
        let routes = self.inner.routes();
        let host = request_host(&request);
        if let Some(route) = host.as_deref().and_then(|h| routes.by_host(h)) {
            return invoke(route, request).await;
        }
        let path = request.uri().path().to_string();
        let (name, rest) = split_prefix(&path);
        match routes.by_name.get(name) {
            Some(route) if route.record.host.is_none() => {
                let request = match rewrite_path(request, rest) {
                    Ok(r) => r,
                    Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
                };
                invoke(route, request).await
            }
            _ => text_response(StatusCode::NOT_FOUND, format!("no deployment serves {path}")),
        }
    }

    /// Serves HTTP/1.1 connections from `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        serve_connections(listener, move |req| {
            let server = self.clone();
            async move { server.handle(req).await }
        })
        .await
    }
}

impl ServerInner {
    fn routes(&self) -> Arc<Routes> {
        self.routes.read().unwrap().clone()
    }

    fn build(&self, record: &DeploymentRecord) -> Result<Deployment, Error> {
        let runs = record.snapshot_sha256.as_ref().unwrap_or(&record.sha256);
        let component = self.artifacts.component(&self.runtime, runs)?;
        self.runtime.deployment(&record.name, &component, record.limits.clone())
    }

    async fn admin(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let path = &request.uri().path()[ADMIN_PREFIX.len()..];
        if path == "health" {
            return json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        if !self.authorized(&request) {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong admin token (send `Authorization: Bearer <token>`)",
            );
        }
        let method = request.method().clone();
        match (method, path.split('/').collect::<Vec<_>>().as_slice()) {
            (Method::GET, ["deployments"]) => {
                json_response(StatusCode::OK, &serde_json::json!({ "deployments": self.routes().records() }))
            }
            (Method::GET, ["deployments", name]) => match self.routes().by_name.get(*name) {
                Some(route) => json_response(StatusCode::OK, &route.record),
                None => not_found(name),
            },
            (Method::PUT, ["deployments", name]) => {
                let name = name.to_string();
                self.deploy(name, request).await
            }
            (Method::DELETE, ["deployments", name]) => self.remove(name).await,
            (_, ["deployments"] | ["deployments", _]) => {
                api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
            }
            _ => api_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn authorized<B>(&self, request: &Request<B>) -> bool {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), self.config.admin_token.as_bytes())
    }

    async fn deploy(self: &Arc<Self>, name: String, request: Request<Incoming>) -> Response<ResponseBody> {
        if let Err(e) = check_name(&name) {
            return error_response(&e);
        }
        let (limits, host, preinit) = match parse_deploy_query(request.uri().query().unwrap_or("")) {
            Ok(v) => v,
            Err(message) => return api_error(StatusCode::BAD_REQUEST, "invalid_limits", &message),
        };
        let max = self.config.max_upload_bytes;
        let wasm = match Limited::new(request.into_body(), max).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload_too_large",
                    &format!("component is larger than this server's upload limit of {max} bytes"),
                );
            }
            Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_upload", &format!("reading the upload failed: {e}")),
        };
        let record = DeploymentRecord {
            name: name.clone(),
            sha256: String::new(),
            snapshot_sha256: None,
            size_bytes: wasm.len() as u64,
            host,
            limits,
            deployed_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let me = self.clone();
        let built = tokio::task::spawn_blocking(move || -> Result<(DeploymentRecord, Deployment), Error> {
            let snapshot = if preinit { me.runtime.preinitialize(&wasm, &record.limits)? } else { None };
            let (record, component) = match snapshot {
                None => {
                    let (sha256, component) = me.artifacts.store(&me.runtime, &wasm)?;
                    (DeploymentRecord { sha256, ..record }, component)
                }
                Some(snapshot) => {
                    let (snapshot_sha256, component) = me.artifacts.store(&me.runtime, &snapshot)?;
                    let sha256 = me.artifacts.put_source(&wasm)?;
                    (DeploymentRecord { sha256, snapshot_sha256: Some(snapshot_sha256), ..record }, component)
                }
            };
            let deployment = me.runtime.deployment(&record.name, &component, record.limits.clone())?;
            Ok((record, deployment))
        })
        .await;
        let route = match built {
            Ok(Ok((record, deployment))) => match deployment.check().await {
                Ok(()) => Route { record, deployment: Ok(deployment) },
                Err(e) => return error_response(&e),
            },
            Ok(Err(e)) => return error_response(&e),
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &format!("deploy task failed: {e}")),
        };
        let _guard = self.changes.lock().await;
        let routes = self.routes();
        if let Some(host) = &route.record.host {
            if let Some(other) = routes.by_host(host).filter(|o| o.record.name != name) {
                let message = format!("host {host:?} is already routed to deployment '{}'", other.record.name);
                return api_error(StatusCode::CONFLICT, "host_taken", &message);
            }
        }
        let record = route.record.clone();
        let mut by_name = routes.by_name.clone();
        let status = if by_name.insert(name, route).is_some() { StatusCode::OK } else { StatusCode::CREATED };
        if let Err(e) = self.commit(by_name) {
            return error_response(&e);
        }
        tracing::info!(deployment = %record.name, sha256 = %record.sha256, "deployed");
        json_response(status, &record)
    }

    async fn remove(&self, name: &str) -> Response<ResponseBody> {
        let _guard = self.changes.lock().await;
        let mut by_name = self.routes().by_name.clone();
        if by_name.remove(name).is_none() {
            return not_found(name);
        }
        if let Err(e) = self.commit(by_name) {
            return error_response(&e);
        }
        tracing::info!(deployment = %name, "removed");
        json_response(StatusCode::OK, &serde_json::json!({ "removed": name }))
    }

    /// Persists the new set of routes durably, then makes it live. Called
    /// with `changes` held.
    fn commit(&self, by_name: BTreeMap<String, Route>) -> Result<(), Error> {
        let routes = Routes::from_routes(by_name);
        let state = StateFile { deployments: routes.records() };
        let json = serde_json::to_vec_pretty(&state).expect("state serialises");
        write_atomic(&self.state_path, &json)?;
        *self.routes.write().unwrap() = Arc::new(routes);
        Ok(())
    }
}

async fn invoke(route: &Route, request: Request<Incoming>) -> Response<ResponseBody> {
    match &route.deployment {
        Ok(deployment) => deployment.handle(request).await,
        Err(why) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("deployment '{}' failed to load: {why}", route.record.name),
        ),
    }
}

/// Serves HTTP/1.1 connections from `listener`, answering each request with
/// `handler`, until the returned future is dropped.
pub async fn serve_connections<H, F>(listener: TcpListener, handler: H) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Running out of file descriptors must not end the server.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Checks a deployment name: 1-63 of `a-z 0-9 -`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok { Ok(()) } else { Err(Error::InvalidName(name.to_string())) }
}

/// Parses `host=...`, `preinit=true|false` and limit fields from a deploy
/// query string.
fn parse_deploy_query(query: &str) -> Result<(Limits, Option<String>, bool), String> {
    let mut limits = Limits::default();
    let mut host = None;
    let mut preinit = true;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("query parameter {pair:?} has no value"))?;
        match key {
            "host" => {
                let h = value.to_ascii_lowercase();
                if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                    return Err(format!("invalid host {value:?}: use a plain DNS name"));
                }
                host = Some(h);
            }
            "preinit" => {
                preinit = value.parse().map_err(|_| format!("preinit must be true or false, got {value:?}"))?;
            }
            _ => limits.set(key, value)?,
        }
    }
    Ok((limits, host, preinit))
}

/// The request's host name, lower-cased, without a port.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let raw = request
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok().map(str::to_string))?;
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw.as_str(),
    };
    Some(host.to_ascii_lowercase())
}

/// Splits `/name/rest` into `("name", "/rest")`.
fn split_prefix(path: &str) -> (&str, &str) {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, "/"),
    }
}

/// Gives the request the path `rest`, keeping its query.
fn rewrite_path<B>(request: Request<B>, rest: &str) -> Result<Request<B>, String> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(path_and_query.parse().map_err(|e| format!("invalid request path: {e}"))?);
    parts.uri = Uri::from_parts(uri).map_err(|e| format!("invalid request URI: {e}"))?;
    Ok(Request::from_parts(parts, body))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec_pretty(value).expect("response serialises");
    body.push(b'\n');
    let mut resp = Response::new(full_body(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    json_response(status, &serde_json::json!({ "error": { "code": code, "message": message } }))
}

fn error_response(e: &Error) -> Response<ResponseBody> {
    let status = if e.is_client_error() { StatusCode::BAD_REQUEST } else { StatusCode::INTERNAL_SERVER_ERROR };
    api_error(status, e.code(), &e.to_string())
}

fn not_found(name: &str) -> Response<ResponseBody> {
    api_error(StatusCode::NOT_FOUND, "not_found", &format!("no deployment named '{name}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["hello", "a", "my-app-2", "0x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "Hello", "_gpuwasm", "a/b", "a.b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix("/hello"), ("hello", "/"));
        assert_eq!(split_prefix("/hello/"), ("hello", "/"));
        assert_eq!(split_prefix("/hello/a/b"), ("hello", "/a/b"));
        assert_eq!(split_prefix("/"), ("", "/"));
    }

    #[test]
    fn deploy_query() {
        let (l, h, p) = parse_deploy_query("host=API.example.com&memory_mb=32&cpu_ms=100").unwrap();
        assert_eq!((l.memory_mb, l.cpu_ms, h.as_deref(), p), (32, 100, Some("api.example.com"), true));
        assert!(!parse_deploy_query("preinit=false").unwrap().2);
        assert!(parse_deploy_query("preinit=no").unwrap_err().contains("preinit"));
        assert!(parse_deploy_query("memory_mb").unwrap_err().contains("no value"));
        assert!(parse_deploy_query("nope=1").unwrap_err().contains("unknown limit"));
        assert!(parse_deploy_query("host=a/b").unwrap_err().contains("invalid host"));
    }

    #[test]
    fn hosts_drop_ports_and_case() {
        let req = Request::get("/x").header("host", "Api.Example.com:8080").body(()).unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("api.example.com"));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
