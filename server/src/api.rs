//! The admin API's requests and replies, typed once for the server and its
//! clients (the `gpuwasm` CLI), and [`ApiError`], which every handler
//! returns and which answers the documented error shape
//! `{"error": {"code", "message"}}`. `docs/openapi.json` describes the same
//! types; a test checks it against the server.

use crate::control_store::{ModelRecord, TenantRecord, VersionRecord};
use crate::error::Error;
use crate::metering::{Prices, Totals};
use bytes::Bytes;
use gpuwasm::ResponseBody;
use gpuwasm::nn::ModelStatus;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The path prefix of the admin API; no tenant can be named like it.
pub const ADMIN_PREFIX: &str = "/_gpuwasm/v1/";

/// `GET health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// `GET whoami`: who a token acts for.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The tenant.
    pub tenant: String,
    /// Whether it is the admin token.
    pub admin: bool,
    /// The token's id.
    pub token_id: String,
}

/// `POST tenants`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// The tenant's name.
    pub name: String,
    /// Domains its deployments may claim host names in.
    #[serde(default)]
    pub domains: Vec<String>,
}

/// `GET tenants`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tenants {
    /// Every tenant.
    pub tenants: Vec<TenantRecord>,
}

/// `PUT tenants/NAME/domains`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domains {
    /// The domains, replacing the tenant's.
    pub domains: Vec<String>,
}

/// A token just made (`POST tenants`, `POST tokens`): the only time the
/// token itself is shown.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewToken {
    /// Its tenant.
    pub tenant: String,
    /// Its id (the public part).
    pub token_id: String,
    /// The token.
    pub token: String,
}

/// A token as `GET tokens` lists it (never the token itself).
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Whether it may manage tenants.
    pub admin: bool,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// `GET tokens`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tokens {
    /// The caller's tenant's tokens, oldest first.
    pub tokens: Vec<TokenInfo>,
}

/// `DELETE tokens/ID`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Revoked {
    /// The id revoked.
    pub revoked: String,
}

/// `DELETE deployments/NAME`, `DELETE models/NAME`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Removed {
    /// The name removed.
    pub removed: String,
}

/// `PUT files/SHA256`, `PUT model-files/SHA256`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Uploaded {
    /// The content's SHA-256.
    pub sha256: String,
}

/// `GET deployments`: the active version of each.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deployments {
    /// Active versions.
    pub deployments: Vec<VersionRecord>,
}

/// `GET deployments/NAME/logs?after=SEQ`: what its guests printed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Logs {
    /// Entries numbered after `after`, oldest first (at most 1000).
    pub entries: Vec<LogEntry>,
    /// The number to ask after next time: the last entry's, or `after`.
    pub next: u64,
}

/// What the guest printed while serving one request, or why it failed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    /// Its number: numbers grow over the node, so later entries have
    /// higher ones.
    pub seq: u64,
    /// When the request arrived, in ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// The version that served it.
    pub version: u64,
    /// The request id (its `x-request-id` response header).
    pub request_id: Option<String>,
    /// Its stdout and stderr, interleaved (the last 64 KiB).
    pub output: String,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

impl LogEntry {
    /// When the request arrived, in UTC: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    pub fn arrived(&self) -> String {
        let (secs, ms) = (self.at_unix_ms / 1000, self.at_unix_ms % 1000);
        let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
        format!("{}T{h:02}:{m:02}:{s:02}.{ms:03}Z", crate::metering::date(secs / 86_400))
    }
}

/// `GET deployments/NAME/versions`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Versions {
    /// The version serving traffic, if any.
    pub active: Option<u64>,
    /// Every version, oldest first.
    pub versions: Vec<VersionRecord>,
}

/// `PUT models/NAME`: the files of a model (uploaded first) and its format.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPush {
    /// `safetensors`, `onnx` or `gguf`.
    pub format: String,
    /// Path inside the model -> SHA-256 of the uploaded content.
    pub files: BTreeMap<String, String>,
}

/// A model as the registry lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Its record.
    #[serde(flatten)]
    pub record: ModelRecord,
    /// What it has done on this node while resident; `null` when it is not
    /// loaded (and, for public models, for anyone but the admin).
    pub loaded: Option<ModelStatus>,
}

/// `GET usage`: what requests used and cost, grouped.
#[derive(Debug, Serialize, Deserialize)]
pub struct UsageReport {
    /// The tenant reported on (`null`: every tenant).
    pub tenant: Option<String>,
    /// The start of the period (the start of its first minute), seconds
    /// since the Unix epoch.
    pub since_unix: u64,
    /// Its end: now.
    pub until_unix: u64,
    /// How rows are grouped: `deployment`, `model`, `day` or `tenant`.
    pub by: String,
    /// The server's price table.
    pub prices: Prices,
    /// One row per group.
    pub rows: Vec<UsageRow>,
    /// The sum of the rows (`key` is `total`).
    pub total: UsageRow,
}

/// Usage of one group of requests and what it cost.
#[derive(Debug, Serialize, Deserialize)]
pub struct UsageRow {
    /// The group: `tenant/deployment`, models `+`-joined (`(none)`), a
    /// `YYYY-MM-DD` day, or a tenant.
    pub key: String,
    /// What its requests used.
    #[serde(flatten)]
    pub totals: Totals,
    /// What that cost at the server's prices.
    pub cost: f64,
}

/// `GET resident-models`: what is loaded on this node's devices.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResidentModels {
    /// Each GPU's model memory.
    pub devices: Vec<GpuMemory>,
    /// The resident models the caller can see.
    pub models: Vec<Resident>,
}

/// One GPU's memory for models.
#[derive(Debug, Serialize, Deserialize)]
pub struct GpuMemory {
    /// The device.
    pub device: String,
    /// What models may hold on it (`null`: no limit).
    pub budget_bytes: Option<u64>,
    /// What resident models hold now.
    pub used_bytes: u64,
}

/// A model resident on a device.
#[derive(Debug, Serialize, Deserialize)]
pub struct Resident {
    /// The names the caller knows it by (`public/NAME` for public ones;
    /// for the admin, `TENANT/NAME` for tenants' ones).
    pub names: Vec<String>,
    /// The device (`cpu`, or the GPU's name).
    pub device: String,
    /// Bytes its weights take there.
    pub bytes: u64,
    /// Tenants charged for it on a GPU (for a tenant: itself, if it is).
    pub tenants: Vec<String>,
    /// What it has done since it was loaded.
    pub status: gpuwasm::nn::ModelStatus,
    /// Deployments keeping it warm (`[models] warm`); while any does, it
    /// is not evicted.
    pub warm: usize,
    /// Seconds it stays resident unused (a deployment's
    /// `[models] idle_timeout_s`, or the node's).
    pub idle_timeout_s: u64,
}

/// `GET models`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Models {
    /// The caller's models and public ones.
    pub models: Vec<ModelInfo>,
}

/// The error body of every failed admin call.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A machine-readable code and a message for people.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// `not_found`, `invalid_limits`, `host_taken`, ...
    pub code: String,
    /// What went wrong, and what to do.
    pub message: String,
}

/// An admin API failure: its status and the documented error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error answered with `status`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    /// A `400`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A `404 not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A `403 forbidden` for what needs the admin token.
    pub fn forbidden() -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this needs an admin token")
    }

    /// A `405`.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
    }

    /// A failure of the server itself: logged whole, answered with
    /// `message` (which must not name paths on the server).
    pub fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        tracing::error!(%message, "admin API request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The same error with `prefix` before its message.
    pub fn prefixed(mut self, prefix: &str) -> ApiError {
        self.message.insert_str(0, prefix);
        self
    }

    /// Adds `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// The HTTP answer.
    pub fn into_response(self) -> Response<ResponseBody> {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut response = json(self.status, &body);
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
        match &e {
            Error::Conflict(_) => return ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string()),
            Error::Store(_) | Error::Blobs(_) => {
                tracing::error!(error = %e, "admin API request failed");
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string()).retry_after(1);
            }
            _ => {}
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

impl From<gpuwasm::Error> for ApiError {
    fn from(e: gpuwasm::Error) -> ApiError {
        Error::from(e).into()
    }
}

/// `value` as a pretty JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec_pretty(value).expect("response serialises");
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}
