//! Uploads (components, deployment files, model files) and model pushes:
//! how many may be in progress per tenant and per node, and bodies streamed
//! to disk: hashed and written to a temporary file as they arrive, under a
//! size cap, the tenant's storage quota and its upload rate, so a large
//! upload never sits in memory, one tenant's uploads take a bounded share
//! of the node, and a client that stops sending is cut off.

use crate::api::ApiError;
use crate::hex::{hex, random_hex};
use http::StatusCode;
use http_body_util::BodyExt;
use crate::RequestBody;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an upload may go without receiving a byte.
const IDLE: Duration = Duration::from_secs(30);

/// Bytes an upload hashes and writes before it lets other tasks of its
/// worker run: a fast client always has the next bytes ready, and hashing
/// megabytes in one poll held other tenants' requests for milliseconds.
const YIELD_BYTES: u64 = 256 << 10;

/// How far ahead of its rate an idle tenant's next upload may start.
const BURST: Duration = Duration::from_millis(100);

/// Where uploads land while they arrive, and how many may.
pub(crate) struct Uploads {
    dir: PathBuf,
    node: Arc<Semaphore>,
    per_tenant: usize,
    /// Bytes a second one tenant's uploads receive together at most.
    rate: Option<u64>,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
}

/// One tenant's uploads in progress.
struct Tenant {
    slots: Arc<Semaphore>,
    /// Bytes its uploads in progress have received.
    receiving: AtomicU64,
    /// When the bytes its uploads received so far will have been paid for
    /// at its rate; an upload that gets ahead of it waits.
    paid_until: Mutex<Instant>,
}

impl Tenant {
    /// Counts `n` bytes received against the tenant's `rate`; returns when
    /// to read on, if the uploads have got ahead of it.
    fn pace(&self, n: u64, rate: u64) -> Option<Instant> {
        let now = Instant::now();
        let mut paid_until = self.paid_until.lock().unwrap();
        // Time not used by an idle tenant is not saved up beyond a burst.
        *paid_until = (*paid_until).max(now.checked_sub(BURST).unwrap_or(now)) + Duration::from_secs_f64(n as f64 / rate as f64);
        (*paid_until > now).then_some(*paid_until)
    }
}

/// Leave to upload (or push) for one tenant, held until dropped.
pub(crate) struct Slot {
    tenant: Arc<Tenant>,
    _permits: [OwnedSemaphorePermit; 2],
}

/// How much an upload may hold: the server's limit, and the tenant's
/// storage quota (its bytes stored when the upload began, plus what all its
/// uploads in progress receive).
pub(crate) struct Room {
    pub max: u64,
    pub quota: Option<Quota>,
}

/// A tenant's storage quota and what it had stored.
pub(crate) struct Quota {
    pub bytes: u64,
    pub stored: u64,
}

/// A body received whole into a temporary file (removed on drop unless
/// stored).
pub(crate) struct Upload {
    pub path: PathBuf,
    pub sha256: String,
    received: u64,
    tenant: Arc<Tenant>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.tenant.receiving.fetch_sub(self.received, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Uploads {
    /// Uploads go to `dir`; at most `per_node` at once, `per_tenant` per
    /// tenant, and one tenant's together at `rate` bytes a second at most.
    pub fn open(dir: PathBuf, per_node: usize, per_tenant: usize, rate: Option<u64>) -> Result<Uploads, crate::Error> {
        std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io("creating the uploads directory", &dir, e))?;
        let node = Arc::new(Semaphore::new(per_node.max(1)));
        Ok(Uploads { dir, node, per_tenant: per_tenant.max(1), rate: rate.filter(|&r| r > 0), tenants: Mutex::default() })
    }

    /// Leave for `tenant` to upload or push now, or `429` with
    /// `Retry-After` when it (or the node) has as many in progress as it may.
    pub fn admit(&self, tenant: &str) -> Result<Slot, ApiError> {
        let state = self
            .tenants
            .lock()
            .unwrap()
            .entry(tenant.to_string())
            .or_insert_with(|| {
                let slots = Arc::new(Semaphore::new(self.per_tenant));
                Arc::new(Tenant { slots, receiving: AtomicU64::new(0), paid_until: Mutex::new(Instant::now()) })
            })
            .clone();
        let busy = |whose: String| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_uploads", format!("{whose} uploads in progress; retry when one ends"))
                .retry_after(1)
        };
        let tenant_permit =
            state.slots.clone().try_acquire_owned().map_err(|_| busy(format!("tenant '{tenant}' has {} other", self.per_tenant)))?;
        let node_permit = self.node.clone().try_acquire_owned().map_err(|_| busy("this server has too many other".into()))?;
        Ok(Slot { tenant: state, _permits: [tenant_permit, node_permit] })
    }

    /// Bytes `tenant`'s uploads in progress have received so far.
    pub fn receiving(&self, tenant: &str) -> u64 {
        self.tenants.lock().unwrap().get(tenant).map_or(0, |t| t.receiving.load(Ordering::Relaxed))
    }

    /// Receives `body` into a temporary file under `slot`, within `room`
    /// (`what` names the upload in errors).
    pub async fn receive(&self, slot: &Slot, body: RequestBody, room: Room, what: &str) -> Result<Upload, ApiError> {
        let name = random_hex(12).map_err(|e| ApiError::internal(format!("naming an upload: {e}")))?;
        let path = self.dir.join(format!(".upload.tmp-{name}"));
        let file = tokio::fs::File::create(&path).await.map_err(|e| ApiError::internal(format!("creating an upload file: {e}")))?;
        let mut upload = Upload { path, sha256: String::new(), received: 0, tenant: slot.tenant.clone() };
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut body = body;
        let write_failed = |e: std::io::Error| ApiError::internal(format!("writing an upload: {e}"));
        loop {
            let frame = match tokio::time::timeout(IDLE, body.frame()).await {
                Err(_) => {
                    let message = format!("the {what} sent nothing for {} s; upload it again", IDLE.as_secs());
                    return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload_timeout", message));
                }
                Ok(None) => break,
                Ok(Some(frame)) => frame.map_err(|e| ApiError::bad_request("bad_upload", format!("reading the {what} failed: {e}")))?,
            };
            let Ok(data) = frame.into_data() else { continue };
            let n = data.len() as u64;
            upload.received += n;
            let receiving = slot.tenant.receiving.fetch_add(n, Ordering::Relaxed) + n;
            room.check(upload.received, receiving, what)?;
            hasher.update(&data);
            writer.write_all(&data).await.map_err(write_failed)?;
            if let Some(until) = self.rate.and_then(|rate| slot.tenant.pace(n, rate)) {
                // Unread, the next bytes fill the connection's window and
                // hold the client back.
                tokio::time::sleep_until(until.into()).await;
            } else if upload.received / YIELD_BYTES != (upload.received - n) / YIELD_BYTES {
                tokio::task::yield_now().await;
            }
        }
        writer.flush().await.map_err(write_failed)?;
        writer.into_inner().sync_all().await.map_err(write_failed)?;
        upload.sha256 = hex(&hasher.finalize());
        Ok(upload)
    }
}

impl Room {
    /// Fails once this upload holds `received` bytes over the limit, or all
    /// the tenant's uploads in progress (`receiving`) take it past its quota.
    fn check(&self, received: u64, receiving: u64, what: &str) -> Result<(), ApiError> {
        let too_large = |message: String| Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", message));
        if received > self.max {
            return too_large(format!("{what} is larger than this server's limit of {} bytes", self.max));
        }
        match &self.quota {
            Some(quota) if quota.stored + receiving > quota.bytes => too_large(format!(
                "{what} does not fit the tenant's storage quota of {} bytes ({} stored, {receiving} arriving in uploads in progress)",
                quota.bytes, quota.stored
            )),
            _ => Ok(()),
        }
    }
}
