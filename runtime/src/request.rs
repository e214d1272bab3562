//! One request, one fresh instance: the per-request store, its limits, and
//! turning what went wrong into a clear HTTP answer.

use crate::error::chain;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Trap};
use crate::output::GuestOutput;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use crate::sandbox::{OutboundPolicy, Sandbox, SharedSandbox};
use crate::nn::Models;
use crate::nn::host::{NnCtx, NnView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// A boxed error, as carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response produced by [`Deployment::handle`](crate::Deployment::handle):
/// streamed from the guest as it writes it.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Everything one request's store holds.
pub(crate) struct RequestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundPolicy,
    nn: NnCtx,
    pub(crate) limiter: MemoryLimiter,
    output: GuestOutput,
    /// Epoch ticks observed while guest code ran.
    pub(crate) cpu_ticks: u64,
    pub(crate) cpu_exceeded: bool,
}

impl RequestState {
    pub(crate) fn new(
        memory_limit: usize,
        sandbox: &Sandbox,
        shared: &SharedSandbox,
        models: &Models,
    ) -> Result<Self, String> {
        let output = GuestOutput::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output.clone()).stderr(output.clone());
        for (key, value) in &sandbox.env {
            wasi.env(key, value);
        }
        if let Some(dir) = &sandbox.files {
            wasi.preopened_dir(dir, "/", wasmtime_wasi::FsPerms::ReadOnly)
                .map_err(|e| format!("opening the deployment's files at {}: {e}", dir.display()))?;
        }
        // No network: the default address check already refuses every
        // address; say so explicitly.
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        Ok(Self {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundPolicy { allow: shared.outbound.clone() },
            nn: NnCtx { models: models.clone(), access: shared.models.clone() },
            limiter: MemoryLimiter { limit: memory_limit, exceeded: false },
            output,
            cpu_ticks: 0,
            cpu_exceeded: false,
        })
    }

    /// The wasi-nn view of this request's state.
    pub(crate) fn nn(&mut self) -> NnView<'_> {
        NnView { ctx: &mut self.nn, table: &mut self.table }
    }

    /// Host resources the guest holds (streams, sockets, files, ...).
    pub(crate) fn open_resources(&mut self) -> usize {
        self.table.iter_mut().count()
    }

    /// What kinds of host resources the guest holds, for error messages.
    pub(crate) fn open_resource_kinds(&mut self) -> Vec<&'static str> {
        use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, TcpSocket, UdpSocket};
        let mut kinds: Vec<&'static str> = self
            .table
            .iter_mut()
            .map(|entry| {
                let entry: &dyn std::any::Any = entry;
                if entry.is::<DynOutputStream>() {
                    "an output stream: stdout/stderr after printing, or a file or HTTP body being written"
                } else if entry.is::<DynInputStream>() {
                    "an input stream"
                } else if entry.is::<DynPollable>() {
                    "a pollable (a timer or stream subscription)"
                } else if entry.is::<TcpSocket>() || entry.is::<UdpSocket>() {
                    "a socket"
                } else if entry.is::<wasmtime_wasi::filesystem::Descriptor>() {
                    "an open file or directory"
                } else {
                    "another host resource"
                }
            })
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// The end of what the guest printed to stdout and stderr.
    pub(crate) fn output_text(&self) -> String {
        self.output.text()
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Caps every linear memory of the instance and remembers when a guest hit
/// the cap, so the failure can be reported as what it is.
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) exceeded: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("linear memory limit of {limit} bytes exceeded (asked for {desired})")]
struct MemoryLimitExceeded {
    limit: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Err(MemoryLimitExceeded { limit: self.limit, desired }.into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Which pool of instances stayed full.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Saturated {
    /// The deployment's own concurrency limit.
    Deployment(u32),
    /// The tenant's share of the node's instances.
    Tenant(u32),
    /// The node's whole instance pool.
    Node(u32),
}

/// Why a request did not get the guest's response.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No instance became free in time (or the queue is full).
    Busy(Saturated),
    /// The deployment was taken out of service.
    Stopped,
    /// Reading the request body failed.
    BadBody(String),
    /// The request body is larger than the deployment allows.
    BodyTooLarge(u64),
    /// The wall-clock limit ran out.
    Timeout(u64),
    /// The guest used up its CPU time.
    CpuTime(u64),
    /// The guest grew a memory past its limit.
    Memory(u64),
    /// The guest trapped (or a host call failed fatally).
    Trap(String),
    /// The guest answered with a wasi:http error code instead of a response.
    Guest(String),
    /// The guest returned without ever setting a response.
    NoResponse,
}

impl Failure {
    /// Classifies an error returned by instantiation or the guest call.
    pub(crate) fn from_call(state: &RequestState, err: &wasmtime::Error, cpu_ms: u64, memory_mb: u64) -> Self {
        if state.cpu_exceeded {
            Failure::CpuTime(cpu_ms)
        } else if state.limiter.exceeded {
            Failure::Memory(memory_mb)
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            Failure::Trap(trap.to_string())
        } else {
            Failure::Trap(chain(err))
        }
    }

    /// The HTTP answer for this failure of deployment `name`.
    pub(crate) fn into_response(self, name: &str) -> Response<ResponseBody> {
        let (status, message) = match &self {
            Failure::Busy(Saturated::Deployment(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("deployment '{name}' is at its concurrency limit of {n} and its queue is full or waited too long; retry shortly"),
            ),
            Failure::Busy(Saturated::Tenant(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the tenant of deployment '{name}' already runs {n} instances, its share of this node; retry shortly"),
            ),
            Failure::Busy(Saturated::Node(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("all {n} instances of this node are in use; retry shortly"),
            ),
            Failure::Stopped => {
                (StatusCode::SERVICE_UNAVAILABLE, format!("deployment '{name}' was removed while this request ran"))
            }
            Failure::BadBody(why) => (StatusCode::BAD_REQUEST, format!("reading the request body failed: {why}")),
            Failure::BodyTooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {max} bytes for deployment '{name}'"),
            ),
            Failure::Timeout(ms) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("deployment '{name}' did not answer within its time limit of {ms} ms"),
            ),
            Failure::CpuTime(ms) => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("deployment '{name}' exceeded its CPU time limit of {ms} ms"),
            ),
            Failure::Memory(mb) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deployment '{name}' exceeded its memory limit of {mb} MiB"),
            ),
            Failure::Trap(msg) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deployment '{name}' failed: {msg}"),
            ),
            Failure::Guest(code) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deployment '{name}' answered with an error: {code}"),
            ),
            Failure::NoResponse => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("deployment '{name}' returned without sending a response"),
            ),
        };
        let mut resp = text_response(status, message);
        if matches!(self, Failure::Busy(_)) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A plain-text response ending in a newline.
pub(crate) fn text_response(status: StatusCode, message: String) -> Response<ResponseBody> {
    let mut resp = Response::new(full_body(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A response body holding `bytes`.
pub(crate) fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}
