//! The model registry: models pushed by tenants (`gpuwasm model push`),
//! stored as content-addressed blobs (`models/<namespace>/<sha256>` in the
//! [`BlobStore`]) and recorded in the control store. A tenant's models
//! live in its own namespace; models in `public` (pushed with the admin
//! token) can be loaded by every tenant. `load-by-name` resolves in the
//! caller's tenant first, then `public`.
//!
//! A push is checked by the engine before it is recorded: a corrupt,
//! truncated or hostile file is refused with the reason, and nothing else
//! changes.

use super::control::Caller;
use super::{ApiError, ServerInner, api_error, check_name, error_response, json_response, now};
use crate::artifacts::sha256_hex;
use crate::blobs::BlobStore;
use crate::nn::{ModelCatalog, ModelEntry, PUBLIC};
use crate::request::ResponseBody;
use crate::store::{Change, ModelRecord};
use gpuwasm_tensor::{Format, ModelFiles};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// The registry's records, readable by deployments through [`ModelCatalog`].
pub(crate) struct Registry {
    records: RwLock<BTreeMap<(String, String), Registered>>,
    blobs: Arc<dyn BlobStore>,
}

/// A record with the key of its content, computed once.
#[derive(Clone)]
struct Registered {
    record: ModelRecord,
    key: String,
}

impl Registered {
    fn new(record: ModelRecord) -> Registered {
        Registered { key: content_key(&record), record }
    }
}

/// Why a model's files could not be read.
enum ReadError {
    /// File `path` with content `sha256` is not in the blob store.
    Missing { path: String, sha256: String },
    /// The blob store failed.
    Store(String),
}

fn blob_key(namespace: &str, sha256: &str) -> String {
    format!("models/{namespace}/{sha256}")
}

/// Identifies a record's content: same files, same key.
fn content_key(record: &ModelRecord) -> String {
    let files = serde_json::to_string(&record.files).expect("file maps serialise");
    format!("{}/{}@{}", record.namespace, record.name, &sha256_hex(files.as_bytes())[..16])
}

impl Registry {
    pub fn new(records: Vec<ModelRecord>, blobs: Arc<dyn BlobStore>) -> Registry {
        let records = records.into_iter().map(|r| ((r.namespace.clone(), r.name.clone()), Registered::new(r))).collect();
        Registry { records: RwLock::new(records), blobs }
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Registered> {
        self.records.read().unwrap().get(&(namespace.to_string(), name.to_string())).cloned()
    }

    fn insert(&self, record: ModelRecord) {
        let key = (record.namespace.clone(), record.name.clone());
        self.records.write().unwrap().insert(key, Registered::new(record));
    }

    fn remove(&self, namespace: &str, name: &str) {
        self.records.write().unwrap().remove(&(namespace.to_string(), name.to_string()));
    }

    /// The blob keys every record refers to.
    pub fn blob_keys(&self) -> Vec<String> {
        let records = self.records.read().unwrap();
        records.values().flat_map(|r| r.record.files.values().map(|sha| blob_key(&r.record.namespace, sha))).collect()
    }

    /// The models `tenant` can see: its own and public ones.
    fn visible(&self, tenant: &str) -> Vec<Registered> {
        let records = self.records.read().unwrap();
        records.values().filter(|r| r.record.namespace == tenant || r.record.namespace == PUBLIC).cloned().collect()
    }

    /// The contents of `files` (path -> SHA-256) uploaded to `namespace` (blocking).
    fn read_files(&self, namespace: &str, files: &BTreeMap<String, String>) -> Result<ModelFiles, ReadError> {
        let mut contents = ModelFiles::new();
        for (path, sha256) in files {
            let bytes = self
                .blobs
                .get(&blob_key(namespace, sha256))
                .map_err(|e| ReadError::Store(e.to_string()))?
                .ok_or_else(|| ReadError::Missing { path: path.clone(), sha256: sha256.clone() })?;
            contents.insert(path.clone(), bytes);
        }
        Ok(contents)
    }
}

impl ModelCatalog for Registry {
    fn resolve(&self, tenant: &str, name: &str) -> Result<Option<ModelEntry>, String> {
        let found = match name.strip_prefix("public/") {
            Some(public) => self.get(PUBLIC, public),
            None => self.get(tenant, name).or_else(|| self.get(PUBLIC, name)),
        };
        Ok(found.map(|r| ModelEntry { key: r.key, format: r.record.format }))
    }

    fn read(&self, entry: &ModelEntry) -> Result<ModelFiles, String> {
        let record = self
            .records
            .read()
            .unwrap()
            .values()
            .find(|r| r.key == entry.key)
            .map(|r| r.record.clone())
            .ok_or_else(|| "the model was removed or replaced while loading".to_string())?;
        self.read_files(&record.namespace, &record.files).map_err(|e| match e {
            ReadError::Missing { path, sha256 } => format!("file {path} ({sha256}) is missing from the blob store"),
            ReadError::Store(message) => message,
        })
    }
}

/// The body of `PUT models/NAME`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushSpec {
    format: String,
    files: BTreeMap<String, String>,
}

impl ServerInner {
    /// `model-files/SHA256` and `models[/public]/NAME`.
    pub(super) async fn models_api(
        self: &Arc<Self>,
        caller: &Caller,
        method: Method,
        segments: &[&str],
        query: &str,
        request: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let public = |rest: &[&str]| match rest {
            ["public", name] => Some((PUBLIC.to_string(), name.to_string())),
            [name] => Some((caller.tenant.clone(), name.to_string())),
            _ => None,
        };
        match (method, segments) {
            (Method::GET, ["models"]) => {
                let visible: Vec<serde_json::Value> =
                    self.models.visible(&caller.tenant).iter().map(|r| self.with_status(caller, r)).collect();
                json_response(StatusCode::OK, &serde_json::json!({ "models": visible }))
            }
            (_, ["models"]) => api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here"),
            (Method::PUT, ["model-files", sha256]) => {
                let namespace = if super::admin::query_value(query, "namespace") == Some(PUBLIC) { PUBLIC } else { &caller.tenant };
                if namespace == PUBLIC && !caller.admin {
                    return api_error(StatusCode::FORBIDDEN, "forbidden", "public models need an admin token");
                }
                self.upload_model_file(caller, namespace, sha256, request).await.unwrap_or_else(ApiError::into_response)
            }
            (method @ (Method::PUT | Method::DELETE | Method::GET), ["models", rest @ ..]) => {
                let Some((namespace, name)) = public(rest) else {
                    return api_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint");
                };
                if namespace == PUBLIC && method != Method::GET && !caller.admin {
                    return api_error(StatusCode::FORBIDDEN, "forbidden", "public models need an admin token");
                }
                match method {
                    Method::PUT => self.push_model(namespace, name, request).await,
                    Method::DELETE => self.remove_model(namespace, name).await,
                    _ => match self.models.get(&namespace, &name) {
                        Some(registered) => json_response(StatusCode::OK, &self.with_status(caller, &registered)),
                        None => model_not_found(&name),
                    },
                }
            }
            _ => api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here"),
        }
    }

    /// A record with `loaded`: this node's counters while it is resident,
    /// else null. The counters of a public model show every tenant's use
    /// of it, so only the admin sees them.
    fn with_status(&self, caller: &Caller, registered: &Registered) -> serde_json::Value {
        let mut json = serde_json::to_value(&registered.record).expect("records serialise");
        let status = if registered.record.namespace == PUBLIC && !caller.admin { None } else { self.runtime.models().status(&registered.key) };
        json["loaded"] = serde_json::to_value(status).expect("status serialises");
        json
    }

    /// `PUT model-files/SHA256`: the file streams to disk, is checked
    /// against its hash, and is stored.
    async fn upload_model_file(
        &self,
        caller: &Caller,
        namespace: &str,
        sha256: &str,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let (max, over) = self.upload_room(caller, self.config.max_model_bytes as u64)?;
        let upload = self.uploads.receive(&caller.tenant, request.into_body(), max, "model file", &over).await?;
        if upload.sha256 != sha256 {
            return Err(ApiError::bad_request("bad_file", format!("content has SHA-256 {}, not {sha256}", upload.sha256)));
        }
        self.blobs.put_file(&blob_key(namespace, sha256), &upload.path)?;
        Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "sha256": sha256 })))
    }

    async fn push_model(self: &Arc<Self>, namespace: String, name: String, request: Request<Incoming>) -> Response<ResponseBody> {
        if let Err(e) = check_name("model", &name) {
            return error_response(e);
        }
        let body = match super::admin::read_upload(request, 1 << 20, "model description").await {
            Ok(body) => body,
            Err(e) => return e.into_response(),
        };
        let spec: PushSpec = match serde_json::from_slice(&body) {
            Ok(spec) => spec,
            Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_request", &format!("model description: {e}")),
        };
        let Some(format) = Format::from_name(&spec.format) else {
            return api_error(StatusCode::BAD_REQUEST, "bad_request", &format!("unknown format {:?}: use safetensors, onnx or gguf", spec.format));
        };
        if let Err(message) = check_layout(format, &spec.files) {
            return api_error(StatusCode::BAD_REQUEST, "invalid_model", &message);
        }
        // Read the files back and let the engine check the whole model.
        let (registry, ns, files) = (self.models.clone(), namespace.clone(), spec.files.clone());
        let budget = self.runtime.models().call_budget();
        let checked = tokio::task::spawn_blocking(move || -> Result<(u64, String), (StatusCode, String)> {
            let contents = registry.read_files(&ns, &files).map_err(|e| match e {
                ReadError::Missing { path, sha256 } => (
                    StatusCode::BAD_REQUEST,
                    format!("file {path}: content {sha256} was not uploaded (PUT model-files/SHA256 first)"),
                ),
                ReadError::Store(message) => (StatusCode::INTERNAL_SERVER_ERROR, message),
            })?;
            let size = contents.values().map(|b| b.len() as u64).sum();
            let summary = gpuwasm_tensor::check(format, &contents, &budget).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
            Ok((size, summary))
        })
        .await;
        let (size_bytes, summary) = match checked {
            Ok(Ok(checked)) => checked,
            Ok(Err((status, message))) => return api_error(status, "invalid_model", &format!("model '{name}': {message}")),
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "engine", &format!("checking the model failed: {e}")),
        };
        let record = ModelRecord { namespace, name, format, files: spec.files, size_bytes, summary, pushed_at: now() };
        let _guard = self.changes.lock().await;
        if let Err(e) = self.store.commit(&[Change::Model(record.clone())]) {
            return error_response(e);
        }
        self.models.insert(record.clone());
        tracing::info!(namespace = %record.namespace, model = %record.name, format = record.format.name(), summary = %record.summary, "model pushed");
        json_response(StatusCode::CREATED, &record)
    }

    async fn remove_model(&self, namespace: String, name: String) -> Response<ResponseBody> {
        let _guard = self.changes.lock().await;
        if self.models.get(&namespace, &name).is_none() {
            return model_not_found(&name);
        }
        if let Err(e) = self.store.commit(&[Change::RemoveModel(namespace.clone(), name.clone())]) {
            return error_response(e);
        }
        self.models.remove(&namespace, &name);
        tracing::info!(%namespace, model = %name, "model removed");
        json_response(StatusCode::OK, &serde_json::json!({ "removed": name }))
    }
}

/// Checks the files a push names fit its format.
fn check_layout(format: Format, files: &BTreeMap<String, String>) -> Result<(), String> {
    for (path, sha256) in files {
        super::files::check_file_path(path)?;
        let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(format!("file {path:?}: {sha256:?} is not a SHA-256 in lower-case hex"));
        }
    }
    match format.files() {
        None if files.len() != 1 => Err(format!("a {} model is one file, not {}", format.name(), files.len())),
        Some(known) => match files.keys().find(|p| !known.contains(&p.as_str())) {
            Some(extra) => Err(format!("unexpected file {extra:?} in a {} model (expected {})", format.name(), known.join(", "))),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

fn model_not_found(name: &str) -> Response<ResponseBody> {
    api_error(StatusCode::NOT_FOUND, "not_found", &format!("no model named '{name}'"))
}
