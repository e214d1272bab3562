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
mod hosts;
mod models;
mod uploads;

pub use admin::SPEC_HEADER;
pub use control::DEFAULT_TENANT;
pub(crate) use control::random_hex;
pub use hosts::normalize as normalize_host;

use crate::artifacts::{ArtifactStore, sweep_temporaries};
use crate::blobs::{BlobStore, LocalBlobStore};
use crate::error::Error;
use crate::request::{ResponseBody, full_body, text_response};
use crate::runtime::{Deployment, Runtime};
use crate::store::{Change, ControlStore, RedbStore, TenantRecord, VersionRecord};
use bytes::Bytes;
use control::{Control, Entry};
use files::FileStore;
use uploads::Uploads;
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
    /// Names this server answers on (besides IP addresses and
    /// `localhost`, which are never claimable): no deployment may claim
    /// them as its host.
    pub server_names: Vec<String>,
    /// What each tenant may hold.
    pub quotas: TenantQuotas,
    /// How old an unreferenced blob or file tree must be before it is
    /// removed (default an hour): uploads come before the deploy or push
    /// that uses them.
    pub gc_grace: Duration,
}

/// What each tenant may hold on a server.
#[derive(Clone, Debug)]
pub struct TenantQuotas {
    /// Active deployments (default 100).
    pub deployments: usize,
    /// Bytes of uploaded deployment files and model files (default 10 GiB).
    pub storage_bytes: u64,
    /// File and model uploads in progress at once (default 2; the server
    /// takes at most 4 times this over all tenants).
    pub uploads: usize,
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas { deployments: 100, storage_bytes: 10 << 30, uploads: 2 }
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
    files: FileStore,
    blobs: Arc<dyn BlobStore>,
    uploads: Uploads,
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
        let uploads = Uploads::open(config.data_dir.join("uploads"), config.quotas.uploads * 4, config.quotas.uploads)?;
        let mut state = store.load()?;
        let models = Arc::new(models::Registry::new(std::mem::take(&mut state.models), blobs.clone()));
        if !state.tenants.iter().any(|t| t.name == DEFAULT_TENANT) {
            let tenant = TenantRecord { name: DEFAULT_TENANT.into(), created_at: now(), domains: Vec::new() };
            store.commit(&[Change::Tenant(tenant.clone())])?;
            state.tenants.push(tenant);
        }
        let inner = Arc::new(ServerInner {
            runtime,
            artifacts,
            files,
            blobs,
            uploads,
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
        inner.start_collector();
        Ok(Server { inner })
    }

    /// The active version of every deployment, over all tenants.
    pub fn deployments(&self) -> Vec<VersionRecord> {
        self.inner.control().deployments.values().filter_map(|e| e.active().cloned()).collect()
    }

    /// Answers one HTTP request: admin API, or routed to a deployment: by
    /// its host when a deployment claimed it, else by its path.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let host = match hosts::of_request(&request) {
            Ok(host) => host,
            Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
        };
        let control = self.inner.control();
        if let Some(entry) = host.and_then(|h| control.by_host(&h)) {
            return invoke(entry, request).await;
        }
        if request.uri().path().starts_with(ADMIN_PREFIX) {
            return self.inner.admin(request).await;
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

    /// Starts the task that removes what nothing uses, now and then
    /// periodically, until the server is dropped.
    fn start_collector(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = (self.config.gc_grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = tokio::task::spawn_blocking(move || inner.collect_garbage()).await {
                    tracing::error!(error = %e, "garbage collection failed");
                }
                tokio::time::sleep(period).await;
            }
        });
    }

    /// Removes file trees no active deployment uses, blobs no record
    /// refers to (deployment files, model files, components: all older
    /// than the grace period), and forgets compiled components no active
    /// deployment runs. Versions keep what they refer to, for rollback.
    fn collect_garbage(&self) {
        let control = self.control();
        let active: Vec<&VersionRecord> = control.deployments.values().filter_map(Entry::active).collect();
        self.files.remove_unused_trees(active.iter().map(|v| (v.tenant.as_str(), &v.files)), self.config.gc_grace);
        let running: std::collections::HashSet<&str> =
            active.iter().map(|v| v.snapshot_sha256.as_deref().unwrap_or(&v.sha256)).collect();
        self.artifacts.retain_loaded(&running);

        let mut referenced = std::collections::HashSet::new();
        for v in control.deployments.values().flat_map(|e| e.versions.values()) {
            referenced.extend(v.files.values().map(|sha| FileStore::blob_key(&v.tenant, sha)));
            referenced.extend([&v.sha256].into_iter().chain(&v.snapshot_sha256).map(|sha| crate::artifacts::source_key(sha)));
        }
        referenced.extend(self.models.blob_keys());
        for prefix in ["files/", "models/", "components/"] {
            let blobs = match self.blobs.list(prefix) {
                Ok(blobs) => blobs,
                Err(e) => {
                    tracing::warn!(error = %e, "listing blobs for garbage collection failed");
                    continue;
                }
            };
            for blob in blobs {
                let old = blob.stored_at.elapsed().is_ok_and(|age| age >= self.config.gc_grace);
                if old && !referenced.contains(&blob.key) {
                    match self.blobs.delete(&blob.key) {
                        Ok(()) => tracing::info!(key = %blob.key, bytes = blob.size, "removed a blob nothing refers to"),
                        Err(e) => tracing::warn!(key = %blob.key, error = %e, "removing an unreferenced blob failed"),
                    }
                }
            }
        }
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

/// Checks a name of a `kind` of thing (`tenant`, `deployment`, `model`):
/// 1-63 of `a-z 0-9 -`, starting with a letter or digit.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok { Ok(()) } else { Err(Error::InvalidName { kind, name: name.to_string() }) }
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

fn error_response(e: Error) -> Response<ResponseBody> {
    ApiError::from(e).into_response()
}

/// An admin API failure: its status and the documented error body
/// `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A failure of the server itself: logged whole, answered without
    /// details of the server (paths) beyond `message`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(%message, "admin API request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = api_error(self.status, self.code, &self.message);
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

impl From<Error> for ApiError {
    /// Client errors answer 400 with their message; the server's own
    /// failures answer 500 naming what failed, never a path on the server
    /// (the log has the whole error).
    fn from(e: Error) -> ApiError {
        if e.is_client_error() {
            return ApiError::bad_request(e.code(), e.to_string());
        }
        tracing::error!(error = %e, "admin API request failed");
        let message = match &e {
            Error::Io { context, source, .. } => format!("{context} failed: {source}"),
            Error::CorruptState { .. } => "the server's stored state is damaged; the server log names the file".into(),
            other => other.to_string(),
        };
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), message)
    }
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
            assert!(check_name("deployment", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "Hello", "_gpuwasm", "a/b", "a.b", &"x".repeat(64)] {
            assert!(check_name("deployment", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn name_errors_say_what_the_name_is_for() {
        let e = check_name("model", "Bad Name").unwrap_err();
        assert!(e.to_string().starts_with("invalid model name \"Bad Name\""), "{e}");
    }

    #[test]
    fn prefixes() {
        assert_eq!(split_prefix("/hello"), ("hello", "/"));
        assert_eq!(split_prefix("/hello/"), ("hello", "/"));
        assert_eq!(split_prefix("/hello/a/b"), ("hello", "/a/b"));
        assert_eq!(split_prefix("/"), ("", "/"));
    }

}
