//! Why a request did not get its guest's response, and the clear HTTP
//! answer for each reason.

use crate::error::chain;
use crate::host_state::RequestState;
use crate::usage::Outcome;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use wasmtime::Trap;

/// A boxed error, as carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a response produced by [`Deployment::handle`](crate::Deployment::handle):
/// streamed from the guest as it writes it.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Which pool of instances stayed full.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Saturated {
    /// The deployment's own concurrency limit.
    Deployment(u32),
    /// The tenant's share of the node's instances.
    Tenant(u32),
    /// The node's whole instance pool.
    Node(u32),
    /// The deployment's allowance of requests whose bodies still arrive.
    SlowBodies(u32),
    /// The tenant's allowance of requests whose bodies still arrive.
    TenantSlowBodies(u32),
    /// The node's allowance of requests whose bodies still arrive.
    NodeSlowBodies(u32),
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
        if state.cpu.exceeded {
            Failure::CpuTime(cpu_ms)
        } else if state.limiter.exceeded {
            Failure::Memory(memory_mb)
        } else if let Some(trap) = err.downcast_ref::<Trap>() {
            Failure::Trap(trap.to_string())
        } else {
            Failure::Trap(chain(err))
        }
    }

    /// How a request that failed so ended, for its usage record.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Failure::Busy(_) | Failure::Stopped => Outcome::Busy,
            Failure::BadBody(_) => Outcome::ClientGone,
            Failure::BodyTooLarge(_) | Failure::CpuTime(_) | Failure::Memory(_) => Outcome::Limit,
            Failure::Timeout(_) => Outcome::Timeout,
            Failure::Trap(_) | Failure::Guest(_) | Failure::NoResponse => Outcome::Trap,
        }
    }

    /// The HTTP answer for this failure of deployment `name`.
    pub(crate) fn into_response(self, name: &str) -> Response<ResponseBody> {
        let (status, message) = self.explain(name);
        let mut resp = text_response(status, message);
        if matches!(self, Failure::Busy(_)) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        resp
    }

    /// The HTTP status and the message for people of this failure of
    /// deployment `name`.
    pub(crate) fn explain(&self, name: &str) -> (StatusCode, String) {
        match self {
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
            Failure::Busy(Saturated::SlowBodies(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("deployment '{name}' already runs {n} requests whose bodies are still arriving, half its concurrency; retry shortly"),
            ),
            Failure::Busy(Saturated::TenantSlowBodies(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the tenant of deployment '{name}' already runs {n} requests whose bodies are still arriving, half its share of this node; retry shortly"),
            ),
            Failure::Busy(Saturated::NodeSlowBodies(n)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this node already runs {n} requests whose bodies are still arriving, half its instances; retry shortly"),
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
        }
    }
}

/// A plain-text response ending in a newline.
pub fn text_response(status: StatusCode, message: String) -> Response<ResponseBody> {
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
