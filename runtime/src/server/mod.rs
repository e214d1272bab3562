//! The multi-deployment HTTP server behind `gpuwasm serve`.
//!
//! Tenants own deployments; requests reach them by path prefix,
//! `/<tenant>/<deployment>/rest` arriving as `/rest`, or by `Host` header for
//! deployments that ask for a host. The admin API lives under
//! `/_gpuwasm/v1/` and authenticates every call with a bearer token: the
//! bootstrap admin token (tenant `default`, may manage tenants) or a
//! tenant's token (sees and changes only its own tenant). See
//! `docs/openapi.json` for every endpoint; errors answer
//! `{"error":{"code":"...","message":"..."}}`.
//!
//! Every deploy creates a new immutable version; traffic switches
//! atomically, and requests already running finish on the version they
//! started on. State lives in a [`ControlStore`] (by default a redb
//! database in the data directory), uploads in a [`BlobStore`] (by default
//! content-addressed files beside it); both survive restarts and crashes.

mod admin;
mod control;
mod files;
mod models;

pub use admin::SPEC_HEADER;
pub use control::DEFAULT_TENANT;

use crate::artifacts::{ArtifactStore, sweep_temporaries};
use crate::blobs::{BlobStore, LocalBlobStore};
use crate::error::Error;
use crate::request::{ResponseBody, full_body, text_response};
use crate::runtime::{Deployment, Runtime};
use crate::store::{Change, ControlStore, RedbStore, TenantRecord, VersionRecord};
use bytes::Bytes;
use control::{Control, Entry};
use files::FileStore;
use http::{Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// The path prefix of the admin API; no tenant can be named like it.
pub const ADMIN_PREFIX: &str = "/_gpuwasm/v1/";

/// Settings of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the state database and artifacts are stored.
    pub data_dir: PathBuf,
    /// The bootstrap admin token (acts for tenant `default`).
    pub admin_token: String,
    /// Largest component upload accepted, in bytes.
    pub max_upload_bytes: usize,
    /// Largest model file accepted, in bytes.
    pub max_model_bytes: usize,
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
    files: FileStore,
    models: Arc<models::Registry>,
    store: Box<dyn ControlStore>,
    config: ServerConfig,
    control: RwLock<Arc<Control>>,
    /// Serialises changes: one writer at a time, store first, then memory.
    changes: tokio::sync::Mutex<()>,
}

impl Server {
    /// Opens (or creates) the state in `config.data_dir` (a redb database,
    /// `state.redb`) and loads every active deployment.
    pub async fn open(runtime: Runtime, config: ServerConfig) -> Result<Server, Error> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::io("creating the data directory", &config.data_dir, e))?;
        let store = RedbStore::open(&config.data_dir.join("state.redb"))?;
        // The database is ours now: no other server writes here.
        sweep_temporaries(&config.data_dir);
        let blobs = LocalBlobStore::open(config.data_dir.join("blobs"))?;
        Self::open_with_stores(runtime, config, Box::new(store), Arc::new(blobs)).await
    }

    /// Like [`Server::open`], with state kept in `store` and blobs in
    /// `blobs` (the data directory still holds this node's caches). A
    /// deployment that fails to load is logged and answers `503` until it
    /// is deployed or rolled back; the others serve.
    pub async fn open_with_stores(
        runtime: Runtime,
        config: ServerConfig,
        store: Box<dyn ControlStore>,
        blobs: Arc<dyn BlobStore>,
    ) -> Result<Server, Error> {
        let artifacts = ArtifactStore::open(config.data_dir.join("artifacts"), &runtime, blobs.clone())?;
        let files = FileStore::open(config.data_dir.join("files"), blobs.clone())?;
        let mut state = store.load()?;
        let models = Arc::new(models::Registry::new(std::mem::take(&mut state.models), blobs));
        if !state.tenants.iter().any(|t| t.name == DEFAULT_TENANT) {
            let tenant = TenantRecord { name: DEFAULT_TENANT.into(), created_at: now() };
            store.commit(&[Change::Tenant(tenant.clone())])?;
            state.tenants.push(tenant);
        }
        let inner = Arc::new(ServerInner {
            runtime,
            artifacts,
            files,
            models,
            store,
            config,
            control: RwLock::new(Arc::default()),
            changes: tokio::sync::Mutex::new(()),
        });
        let loader = inner.clone();
        let control = tokio::task::spawn_blocking(move || {
            Control::from_state(state, |version| {
                loader.build(version).map_err(|e| {
                    tracing::error!(tenant = %version.tenant, deployment = %version.name, error = %e, "deployment failed to load");
                    e.to_string()
                })
            })
        })
        .await
        .map_err(|e| Error::Engine(format!("loading task failed: {e}")))?;
        *inner.control.write().unwrap() = Arc::new(control);
        Ok(Server { inner })
    }

    /// The active version of every deployment, over all tenants.
    pub fn deployments(&self) -> Vec<VersionRecord> {
        self.inner.control().deployments.values().filter_map(|e| e.active().cloned()).collect()
    }

    /// Answers one HTTP request: admin API, or routed to a deployment.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        if request.uri().path().starts_with(ADMIN_PREFIX) {
            return self.inner.admin(request).await;
        }
        let control = self.inner.control();
        if let Some(entry) = request_host(&request).and_then(|h| control.by_host(&h)) {
            return invoke(entry, request).await;
        }
        let path = request.uri().path().to_string();
        let (tenant, rest) = split_prefix(&path);
        let (name, rest) = split_prefix(rest);
        match control.deployments.get(&(tenant.to_string(), name.to_string())) {
            Some(entry) if entry.active().is_some_and(|v| v.host.is_none()) => {
                let request = match rewrite_path(request, rest) {
                    Ok(r) => r,
                    Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
                };
                invoke(entry, request).await
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
    fn control(&self) -> Arc<Control> {
        self.control.read().unwrap().clone()
    }

    /// Loads the deployment a version record describes (blocking).
    fn build(&self, version: &VersionRecord) -> Result<Deployment, Error> {
        let runs = version.snapshot_sha256.as_ref().unwrap_or(&version.sha256);
        let component = self.artifacts.component(&self.runtime, runs)?;
        let sandbox = self.sandbox(version)?;
        self.runtime.deployment(&version.name, &component, version.limits.clone(), sandbox)
    }

    /// The version's sandbox, with its files' directory assembled.
    fn sandbox(&self, version: &VersionRecord) -> Result<crate::Sandbox, Error> {
        let files = self.files.tree(&version.tenant, &version.files)?;
        let models = crate::nn::ModelAccess {
            tenant: version.tenant.clone(),
            allow: version.models.clone(),
            catalog: Some(self.models.clone()),
        };
        Ok(crate::Sandbox { files, models, ..version.sandbox.clone() })
    }

    /// Makes `changes` durable, then swaps in `control`. Called with
    /// `changes` (the mutex) held.
    fn commit(&self, changes: &[Change], mut control: Control) -> Result<(), Error> {
        self.store.commit(changes)?;
        control.reindex();
        *self.control.write().unwrap() = Arc::new(control);
        Ok(())
    }
}

/// Seconds since the Unix epoch.
fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn invoke(entry: &Entry, request: Request<Incoming>) -> Response<ResponseBody> {
    match &entry.live {
        Some(Ok(deployment)) => deployment.handle(request).await,
        Some(Err(why)) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("deployment '{}' failed to load: {why}", entry.state.name),
        ),
        None => text_response(StatusCode::NOT_FOUND, "no deployment serves this path".into()),
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

/// Checks a tenant or deployment name: 1-63 of `a-z 0-9 -`, starting with
/// a letter or digit.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok { Ok(()) } else { Err(Error::InvalidName(name.to_string())) }
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

/// The same answer whether the deployment never existed or belongs to
/// another tenant: nothing leaks across tenants, not even existence.
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
    fn hosts_drop_ports_and_case() {
        let req = Request::get("/x").header("host", "Api.Example.com:8080").body(()).unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("api.example.com"));
    }
}
