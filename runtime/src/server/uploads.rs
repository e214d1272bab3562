//! Uploads of files and model files, streamed to disk: the body is hashed
//! and written to a temporary file as it arrives, under a size cap, so a
//! large upload never sits in memory; and uploads in progress are capped
//! per tenant and per node.

use super::{ApiError, random_hex};
use crate::error::Error;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where uploads land while they arrive, and how many may.
pub(crate) struct Uploads {
    dir: PathBuf,
    node: Arc<Semaphore>,
    per_tenant: usize,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A body received whole into a temporary file (removed on drop unless
/// stored).
pub(crate) struct Upload {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    _permits: [OwnedSemaphorePermit; 2],
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Uploads {
    /// Uploads go to `dir`; at most `per_node` at once, `per_tenant` per tenant.
    pub fn open(dir: PathBuf, per_node: usize, per_tenant: usize) -> Result<Uploads, Error> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the uploads directory", &dir, e))?;
        Ok(Uploads { dir, node: Arc::new(Semaphore::new(per_node.max(1))), per_tenant: per_tenant.max(1), tenants: Mutex::default() })
    }

    /// Receives `body` for `tenant` into a temporary file: at most `max`
    /// bytes (`what` names the upload, `over` says why past `max`).
    pub async fn receive(&self, tenant: &str, body: Incoming, max: u64, what: &str, over: &str) -> Result<Upload, ApiError> {
        let tenant_slots =
            self.tenants.lock().unwrap().entry(tenant.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant))).clone();
        let busy = |whose: &str| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_uploads", format!("{whose} uploads in progress; retry when one ends"))
                .retry_after(1)
        };
        let tenant_permit = tenant_slots.try_acquire_owned().map_err(|_| busy(&format!("tenant '{tenant}' has {} other", self.per_tenant)))?;
        let node_permit = self.node.clone().try_acquire_owned().map_err(|_| busy("this server has too many other"))?;
        let name = random_hex(12).map_err(|e| ApiError::internal(format!("naming an upload: {e}")))?;
        let path = self.dir.join(format!(".upload.tmp-{name}"));
        let file = std::fs::File::create(&path).map_err(|e| ApiError::internal(format!("creating an upload file: {e}")))?;
        let mut upload = Upload { path, sha256: String::new(), size: 0, _permits: [tenant_permit, node_permit] };
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request("bad_upload", format!("reading the {what} failed: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            upload.size += data.len() as u64;
            if upload.size > max {
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", format!("{what} is larger than {over}")));
            }
            hasher.update(&data);
            writer.write_all(&data).map_err(|e| ApiError::internal(format!("writing an upload: {e}")))?;
        }
        writer.flush().map_err(|e| ApiError::internal(format!("writing an upload: {e}")))?;
        upload.sha256 = crate::artifacts::hex(&hasher.finalize());
        Ok(upload)
    }
}
