#![warn(missing_docs)]
//! gpuwasm's control plane and HTTP server: the multi-tenant server behind
//! `gpuwasm serve`, built on the `gpuwasm` core's public API.
//!
//! Tenants own deployments; requests reach them by path prefix,
//! `/<tenant>/<deployment>/rest` arriving as `/rest`, or by `Host` header for
//! deployments that claim a host ([`hosts`]). The admin API ([`api`]) lives
//! under `/_gpuwasm/v1/` and authenticates every call with a bearer token:
//! the bootstrap admin token (tenant `default`, may manage tenants) or a
//! tenant's token (sees and changes only its own tenant). See
//! `docs/openapi.json` for every endpoint.
//!
//! Every deploy ([`DeploymentSpec`] + component bytes, through the pipeline
//! in `deploy.rs`) creates a new immutable version; traffic switches
//! atomically, and requests already running finish on the version they
//! started on. State lives in a [`ControlStore`] (by default a redb database
//! in the data directory), uploads in a [`BlobStore`] (by default
//! content-addressed files beside it); both survive restarts and crashes.

mod admin;
pub mod api;
mod artifacts;
pub mod blobs;
mod connections;
mod control;
pub mod control_store;
mod deploy;
mod deployments;
mod durable;
mod error;
mod files;
mod follow;
mod gc;
pub mod hex;
pub mod hosts;
mod logs;
pub mod manifest;
mod metering;
mod metrics;
mod models;
pub mod postgres_store;
mod quotas;
mod rates;
mod routing;
pub mod s3_blobs;
mod tls;
mod trace;
pub mod spec;
mod uploads;

pub use api::ADMIN_PREFIX;
pub use connections::{ConnectionLimits, RequestBody, serve_connections};
pub use tls::Tls;
pub use control::DEFAULT_TENANT;
pub use error::Error;
pub use metering::{GroupBy, Prices, Totals, parse_duration};
pub use spec::{DeploymentSpec, SPEC_HEADER, SandboxSpec};

use artifacts::ArtifactStore;
pub use artifacts::CompileCache;
use blobs::{BlobStore, LocalBlobStore};
use control::{Control, Entry};
use control_store::{Change, ControlState, ControlStore, RedbStore, TenantRecord, VersionRecord};
use postgres_store::PgStore;
use s3_blobs::S3BlobStore;
use files::FileStore;
use gpuwasm::{ResponseBody, Runtime, text_response};
use http::{Request, Response, StatusCode, Uri};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tracing::Instrument;
use trace::TraceContext;
use uploads::Uploads;

/// Settings of a [`Server`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where this node keeps its state database, blobs and caches (one
    /// node at a time).
    pub data_dir: PathBuf,
    /// A PostgreSQL URL: the control state lives there, shared with the
    /// other nodes that name it, rather than in `data_dir/state.redb`.
    pub state_url: Option<String>,
    /// Where blobs (components, files, models) are shared with the other
    /// nodes, rather than `data_dir/blobs`: `s3://BUCKET/PREFIX` (an
    /// S3-compatible store, configured from the environment), or a
    /// directory such as a network file system.
    pub blobs: Option<String>,
    /// The URL (`http://HOST:PORT`) the other nodes sharing the state reach
    /// this one at, for model-aware routing (docs/scale-out.md). `None`:
    /// requests are not routed between nodes.
    pub advertise: Option<String>,
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
    /// Metering of every request (`None`: no usage records, no request
    /// metrics).
    pub usage: Option<UsageConfig>,
}

/// How a [`Server`] meters requests (see `docs/usage.md`).
#[derive(Clone, Debug)]
pub struct UsageConfig {
    /// Days of usage files kept (default 90).
    pub retention_days: u32,
    /// What usage reports price it at.
    pub prices: Prices,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig { retention_days: 90, prices: Prices::default() }
    }
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
    /// Bytes a second all of a tenant's uploads in progress receive
    /// together at most (default 64 MiB; `None`: as fast as they come).
    /// Receiving, hashing and writing uploads as fast as a client on the
    /// same machine sends them took a core's worth of the server and its
    /// client, and added milliseconds to other tenants' requests.
    pub upload_bytes_per_sec: Option<u64>,
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas { deployments: 100, storage_bytes: 10 << 30, uploads: 2, upload_bytes_per_sec: Some(64 << 20) }
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
    /// Deploys and model pushes in progress: each holds its bytes in
    /// memory and compiles or checks them, so a few run at once (the
    /// others wait their turn).
    building: tokio::sync::Semaphore,
    metering: Option<metering::Metering>,
    metrics: metrics::Metrics,
    /// Tenants' request-rate quotas.
    rates: rates::RequestRates,
    /// What guests printed, per deployment.
    logs: logs::GuestLogs,
    /// Held while the server runs, when it owns its data directory.
    _data_dir_lock: Option<std::fs::File>,
    /// The other nodes, when requests are routed between nodes.
    peers: Option<routing::Peers>,
}

/// What a node has beyond its stores when it owns its data directory and
/// shares a state.
#[derive(Default)]
struct NodeParts {
    data_dir_lock: Option<std::fs::File>,
    /// Where every node's usage goes.
    usage: Option<Arc<dyn metering::SharedUsage>>,
    peers: Option<routing::Peers>,
}

/// Deploys and model pushes that run at once.
const BUILDS_AT_ONCE: usize = 4;

impl Server {
    /// Opens (or creates) the state: in `config.data_dir` (a redb database,
    /// `state.redb`, and the blob directory), or where `config.state_url`
    /// and `config.blobs` say; then loads every active deployment.
    pub async fn open(runtime: Runtime, config: ServerConfig) -> Result<Server, Error> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::io("creating the data directory", &config.data_dir, e))?;
        let lock = lock_data_dir(&config.data_dir)?;
        let mut node = NodeParts { data_dir_lock: Some(lock), ..NodeParts::default() };
        let store: Box<dyn ControlStore> = match &config.state_url {
            None => Box::new(RedbStore::open(&config.data_dir.join("state.redb"))?),
            Some(url) => {
                let store = PgStore::connect(url)?;
                node.usage = Some(Arc::new(store.usage()));
                if let Some(url) = &config.advertise {
                    let peers = routing::Peers::new(url.clone(), store.nodes(), config.admin_token.clone()).map_err(|e| Error::io("making a node id", "/dev/urandom", e))?;
                    node.peers = Some(peers);
                }
                Box::new(store)
            }
        };
        // The data directory is ours now: no other server writes here.
        durable::sweep_temporaries(&config.data_dir);
        let blobs: Arc<dyn BlobStore> = match config.blobs.as_deref() {
            None => Arc::new(LocalBlobStore::open(config.data_dir.join("blobs"))?),
            Some(url) if url.starts_with("s3://") => Arc::new(S3BlobStore::open(url, std::env::vars())?),
            Some(dir) => Arc::new(LocalBlobStore::open(dir.into())?),
        };
        Self::start(runtime, config, store, blobs, node).await
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
        Self::start(runtime, config, store, blobs, NodeParts::default()).await
    }

    async fn start(
        runtime: Runtime,
        config: ServerConfig,
        store: Box<dyn ControlStore>,
        blobs: Arc<dyn BlobStore>,
        node: NodeParts,
    ) -> Result<Server, Error> {
        let artifacts = ArtifactStore::open(config.data_dir.join("artifacts"), &runtime, blobs.clone())?;
        let files = FileStore::open(config.data_dir.join("files"), blobs.clone())?;
        let quotas = &config.quotas;
        let uploads = Uploads::open(config.data_dir.join("uploads"), quotas.uploads * 4, quotas.uploads, quotas.upload_bytes_per_sec)?;
        let mut state = with_default_tenant(store.as_ref())?;
        let models = Arc::new(models::Registry::new(std::mem::take(&mut state.models), blobs.clone()));
        for tenant in &state.tenants {
            runtime.models().set_tenant_gpu(&tenant.name, tenant.gpu);
            runtime.set_tenant_instances(&tenant.name, tenant.limits.instances);
        }
        let metering = match &config.usage {
            Some(usage) => {
                let dir = config.data_dir.join("usage");
                Some(metering::Metering::start(dir.clone(), usage.retention_days, node.usage).map_err(|e| Error::io("starting metering", &dir, e))?)
            }
            None => None,
        };
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
            building: tokio::sync::Semaphore::new(BUILDS_AT_ONCE),
            metering,
            metrics: metrics::Metrics::new(),
            rates: rates::RequestRates::default(),
            logs: logs::GuestLogs::default(),
            _data_dir_lock: node.data_dir_lock,
            peers: node.peers,
        });
        let loader = inner.clone();
        let control = tokio::task::spawn_blocking(move || {
            Control::from_state(state, &loader.config.server_names, |version| loader.load_logged(version))
        })
        .await
        .map_err(|e| Error::Task(format!("loading task failed: {e}")))?;
        *inner.control.write().unwrap() = Arc::new(control);
        inner.start_collector();
        inner.warm_active();
        inner.follow_store()?;
        Ok(Server { inner })
    }

    /// The active version of every deployment, over all tenants.
    pub fn deployments(&self) -> Vec<VersionRecord> {
        self.inner.control().deployments.values().filter_map(|e| e.active().cloned()).collect()
    }

    /// Answers one HTTP request: the admin API under its prefix (on any
    /// host, so that no claim can intercept an admin token); else routed to
    /// a deployment, by its host when a deployment claimed it, else by its
    /// path. A guest request joins the trace its `traceparent` names (or
    /// starts one), gets a request id that every log line it causes
    /// carries, and answers with both (`traceparent`, `x-request-id`).
    pub async fn handle(&self, mut request: Request<RequestBody>) -> Response<ResponseBody> {
        let host = match hosts::of_request(&request) {
            Ok(host) => host,
            Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
        };
        if request.uri().path().starts_with(ADMIN_PREFIX) {
            return self.inner.admin(request).await;
        }
        let trace = TraceContext::of(request.headers().get(trace::TRACEPARENT));
        request.headers_mut().insert(trace::TRACEPARENT, trace.traceparent());
        request.extensions_mut().insert(gpuwasm::RequestId(trace.span_id.clone()));
        // At the error level, so that it is there whatever level RUST_LOG
        // lets through: it is the context of the request's lines.
        let span = tracing::error_span!("request", id = %trace.span_id, trace = %trace.trace_id);
        let mut response = self.route(request, host).instrument(span).await;
        let headers = response.headers_mut();
        headers.insert(trace::TRACEPARENT, trace.traceparent());
        headers.insert(trace::REQUEST_ID, trace.request_id());
        response
    }

    /// Hands a guest request to the deployment its host or path names.
    async fn route(&self, request: Request<RequestBody>, host: Option<String>) -> Response<ResponseBody> {
        let control = self.inner.control();
        if let Some(entry) = host.and_then(|h| control.by_host(&h)) {
            let request = match self.inner.elsewhere(entry, request).await {
                Ok(answered) => return answered,
                Err(request) => request,
            };
            return self.invoke(&control, entry, request).await;
        }
        let path = request.uri().path().to_string();
        let (tenant, rest) = split_prefix(&path);
        let (name, rest) = split_prefix(rest);
        match control.deployments.get(&(tenant.to_string(), name.to_string())) {
            Some(entry) if entry.active().is_some_and(|v| v.spec.host.is_none()) => {
                let request = match self.inner.elsewhere(entry, request).await {
                    Ok(answered) => return answered,
                    Err(request) => request,
                };
                let request = match rewrite_path(request, rest) {
                    Ok(r) => r,
                    Err(message) => return text_response(StatusCode::BAD_REQUEST, message),
                };
                self.invoke(&control, entry, request).await
            }
            _ => text_response(StatusCode::NOT_FOUND, format!("no deployment serves {path}")),
        }
    }

    /// The node's metrics in the OpenMetrics text format, read now.
    /// Blocking: the metering writer counts requests into the request
    /// metrics as it takes their records (once a second), so it is asked
    /// to take them first (not waiting for them to be written, only for a
    /// write under way), and every request whose record was made before
    /// the call is counted.
    pub fn metrics_text(&self) -> String {
        let inner = &self.inner;
        // The backlog as the scrape found it, before the writer takes it.
        let (metering_backlog, metering_dropped) = inner.metering.as_ref().map_or((0, 0), |m| (m.backlog(), m.dropped()));
        if let Some(metering) = &inner.metering {
            metering.count();
        }
        let control = inner.control();
        let queued = control
            .deployments
            .values()
            .filter_map(|entry| match (&entry.live, entry.active()) {
                (Some(Ok(live)), Some(v)) => Some((v.tenant.clone(), v.name.clone(), live.queued() as u64)),
                _ => None,
            })
            .collect();
        let mut resident: std::collections::BTreeMap<String, u64> = Default::default();
        for model in inner.runtime.models().resident() {
            *resident.entry(model.device).or_default() += model.bytes;
        }
        inner.metrics.render(metrics::Snapshot {
            instances: inner.runtime.instances_running() as u64,
            queued,
            resident: resident.into_iter().collect(),
            model_loads: inner.runtime.models().loads(),
            metering_backlog,
            metering_dropped,
        })
    }

    /// Serves `GET /metrics` (Prometheus, OpenMetrics text) on `listener`
    /// until `stop` completes.
    pub async fn serve_metrics(self, listener: TcpListener, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let handler = move |req: Request<RequestBody>| {
            let server = self.clone();
            async move {
                match (req.method(), req.uri().path()) {
                    (&http::Method::GET, "/metrics") => {
                        use http_body_util::BodyExt;
                        let text = tokio::task::spawn_blocking(move || server.metrics_text()).await.unwrap_or_default();
                        // Exactly the text: nothing may follow its `# EOF`.
                        let body = http_body_util::Full::new(bytes::Bytes::from(text)).map_err(|never| match never {}).boxed_unsync();
                        let mut response = Response::new(body);
                        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(metrics::CONTENT_TYPE));
                        response
                    }
                    _ => text_response(StatusCode::NOT_FOUND, "this listener serves GET /metrics only".into()),
                }
            }
        };
        serve_connections(listener, handler, ConnectionLimits::default(), stop).await
    }

    /// Writes the usage records made so far (metering writes them once a
    /// second; call this before exiting).
    pub async fn flush_usage(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(metering) = &inner.metering {
                metering.flush();
            }
        })
        .await;
    }

    /// Serves HTTP/1.1 connections from `listener` within `limits` until
    /// `stop` completes, then drains them (see [`serve_connections`]).
    pub async fn serve(self, listener: TcpListener, limits: ConnectionLimits, stop: impl Future<Output = ()>) -> std::io::Result<()> {
        let handler = move |req| {
            let server = self.clone();
            async move { server.handle(req).await }
        };
        serve_connections(listener, handler, limits, stop).await
    }
}

impl ServerInner {
    fn control(&self) -> Arc<Control> {
        self.control.read().unwrap().clone()
    }
}

/// Seconds since the Unix epoch.
/// Runs `f` on a scoped thread, off any tokio runtime's thread: for the
/// clients (PostgreSQL, S3) that drive a runtime of their own, which cannot
/// be entered from a thread that already drives one.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

/// Takes the lock on `data_dir` that says a server uses it; a clear error
/// while another process holds it.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, Error> {
    let path = data_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("opening the data directory's lock", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::StateInUse(path)),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("locking the data directory", &path, e)),
    }
}

/// The stored state, with the tenant the admin token acts for created if
/// it is missing (once, whichever node starts first).
fn with_default_tenant(store: &dyn ControlStore) -> Result<ControlState, Error> {
    loop {
        let mut state = store.load()?;
        if state.tenants.iter().any(|t| t.name == DEFAULT_TENANT) {
            return Ok(state);
        }
        let tenant = TenantRecord { name: DEFAULT_TENANT.into(), created_at: now(), domains: Vec::new(), gpu: Default::default(), limits: Default::default() };
        match store.commit(state.revision, &[Change::Tenant(tenant.clone())]) {
            Ok(revision) => {
                state.revision = revision;
                state.tenants.push(tenant);
                return Ok(state);
            }
            Err(Error::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Server {
    /// Hands `request` to `entry`'s deployment, within its tenant's
    /// request rate: beyond it, `429` with `Retry-After`, after the
    /// runtime's refusal delay.
    async fn invoke(&self, control: &Control, entry: &Entry, request: Request<RequestBody>) -> Response<ResponseBody> {
        let tenant = &entry.state.tenant;
        if let Some(rate) = control.tenants.get(tenant).and_then(|t| t.limits.requests_per_second)
            && let Err(wait) = self.inner.rates.take(tenant, rate)
        {
            self.inner.metrics.rejected(tenant, "rate");
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = text_response(
                StatusCode::TOO_MANY_REQUESTS,
                format!("tenant '{tenant}' is over its quota of {rate} requests per second; retry after {secs} s"),
            );
            response.headers_mut().insert(http::header::RETRY_AFTER, secs.into());
            // Paced like the runtime's own refusals: a client retrying at
            // once gets about one answer a second per request it holds open.
            drop(request);
            self.inner.runtime.pause_refusal(std::time::Instant::now()).await;
            return response;
        }
        invoke(entry, request).await
    }
}

async fn invoke(entry: &Entry, request: Request<RequestBody>) -> Response<ResponseBody> {
    match &entry.live {
        Some(Ok(deployment)) => deployment.handle(request).await,
        Some(Err(why)) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("deployment '{}' failed to load: {why}", entry.state.name),
        ),
        None => text_response(StatusCode::NOT_FOUND, "no deployment serves this path".into()),
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
