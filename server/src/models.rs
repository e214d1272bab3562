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

use crate::admin::{Reply, query_value, read_json};
use crate::api::{ApiError, ModelInfo, ModelPush, Models, Removed, Uploaded, json};
use crate::blobs::BlobStore;
use crate::control::Caller;
use crate::control_store::{Change, ModelRecord};
use crate::files::store_upload;
use crate::hex::sha256_hex;
use crate::{ServerInner, check_name, now};
use gpuwasm::nn::{CatalogError, ModelCatalog, ModelEntry, PUBLIC};
use gpuwasm_tensor::{FileBytes, Format, ModelFiles};
use http::{Method, Request, StatusCode};
use crate::RequestBody;
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

/// Identifies a record's content: the same format and files (by path and
/// SHA-256) give the same key, whoever pushed them under whatever name, so
/// the node loads the weights once for every tenant that may use them.
fn content_key(record: &ModelRecord) -> String {
    let files = serde_json::to_string(&record.files).expect("file maps serialise");
    format!("{}:{}", record.format.name(), sha256_hex(files.as_bytes()))
}

fn by_name(records: Vec<ModelRecord>) -> BTreeMap<(String, String), Registered> {
    records.into_iter().map(|r| ((r.namespace.clone(), r.name.clone()), Registered::new(r))).collect()
}

impl Registry {
    pub fn new(records: Vec<ModelRecord>, blobs: Arc<dyn BlobStore>) -> Registry {
        Registry { records: RwLock::new(by_name(records)), blobs }
    }

    /// Replaces every record (with the store's, after another node changed it).
    pub fn replace(&self, records: Vec<ModelRecord>) {
        *self.records.write().unwrap() = by_name(records);
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Registered> {
        self.records.read().unwrap().get(&(namespace.to_string(), name.to_string())).cloned()
    }

    fn insert(&self, record: ModelRecord) {
        let key = (record.namespace.clone(), record.name.clone());
        self.records.write().unwrap().insert(key, Registered::new(record));
    }

    /// The content key of the model `name` resolves to for `tenant` (its
    /// own first, then `public`), as the model cache names it.
    pub(crate) fn key_of(&self, tenant: &str, name: &str) -> Option<String> {
        self.resolve(tenant, name).ok().flatten().map(|entry| entry.key)
    }

    fn remove(&self, namespace: &str, name: &str) {
        self.records.write().unwrap().remove(&(namespace.to_string(), name.to_string()));
    }

    /// The blob keys every record refers to.
    pub fn blob_keys(&self) -> Vec<String> {
        let records = self.records.read().unwrap();
        records.values().flat_map(|r| r.record.files.values().map(|sha| blob_key(&r.record.namespace, sha))).collect()
    }

    /// The names of the models `tenant` can see (every model for `None`),
    /// by content key: `NAME` for its own, `public/NAME` for public ones,
    /// `TENANT/NAME` for others' (the admin's view).
    pub(crate) fn names_by_key(&self, tenant: Option<&str>) -> std::collections::HashMap<String, Vec<String>> {
        let mut names: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        for r in self.records.read().unwrap().values() {
            let ns = r.record.namespace.as_str();
            let name = match tenant {
                Some(t) if ns == t => r.record.name.clone(),
                Some(_) if ns != PUBLIC => continue,
                _ => format!("{ns}/{}", r.record.name),
            };
            names.entry(r.key.clone()).or_default().push(name);
        }
        names
    }

    /// The models `tenant` can see: its own and public ones.
    fn visible(&self, tenant: &str) -> Vec<Registered> {
        let records = self.records.read().unwrap();
        records.values().filter(|r| r.record.namespace == tenant || r.record.namespace == PUBLIC).cloned().collect()
    }

    /// The contents of `files` (path -> SHA-256) uploaded to `namespace`
    /// (blocking): mapped where the blob is a local file (blobs are written
    /// once and renamed into place, never changed), read in whole at once
    /// when `populate` (for a load; a push's check reads only headers),
    /// read otherwise.
    fn read_files(&self, namespace: &str, files: &BTreeMap<String, String>, populate: bool) -> Result<ModelFiles, ReadError> {
        let mut contents = ModelFiles::new();
        for (path, sha256) in files {
            let key = blob_key(namespace, sha256);
            let missing = || ReadError::Missing { path: path.clone(), sha256: sha256.clone() };
            let bytes = match self.blobs.local_path(&key) {
                Some(local) => FileBytes::map(&local, populate).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => missing(),
                    _ => ReadError::Store(format!("mapping {}: {e}", local.display())),
                })?,
                None => self.blobs.get(&key).map_err(|e| ReadError::Store(e.to_string()))?.ok_or_else(missing)?.into(),
            };
            contents.insert(path.clone(), bytes);
        }
        Ok(contents)
    }
}

impl ModelCatalog for Registry {
    fn resolve(&self, tenant: &str, name: &str) -> Result<Option<ModelEntry>, CatalogError> {
        let found = match name.strip_prefix("public/") {
            Some(public) => self.get(PUBLIC, public),
            None => self.get(tenant, name).or_else(|| self.get(PUBLIC, name)),
        };
        Ok(found.map(|r| ModelEntry { key: r.key, format: r.record.format, bytes: r.record.size_bytes }))
    }

    fn read(&self, entry: &ModelEntry) -> Result<ModelFiles, CatalogError> {
        let record = self
            .records
            .read()
            .unwrap()
            .values()
            .find(|r| r.key == entry.key)
            .map(|r| r.record.clone())
            .ok_or_else(|| CatalogError("the model was removed or replaced while loading".into()))?;
        self.read_files(&record.namespace, &record.files, true).map_err(|e| match e {
            ReadError::Missing { path, sha256 } => CatalogError(format!("file {path} ({sha256}) is missing from the blob store")),
            ReadError::Store(message) => CatalogError(message),
        })
    }
}


impl ServerInner {
    /// `model-files/SHA256` and `models[/public]/NAME`.
    pub(crate) async fn models_api(
        self: &Arc<Self>,
        caller: &Caller,
        method: Method,
        segments: &[&str],
        query: &str,
        request: Request<RequestBody>,
    ) -> Reply {
        let public_only_for_the_admin = || ApiError::new(StatusCode::FORBIDDEN, "forbidden", "public models need an admin token");
        match (method, segments) {
            (Method::GET, ["models"]) => {
                let models = self.models.visible(&caller.tenant).iter().map(|r| self.info(caller, r)).collect();
                Ok(json(StatusCode::OK, &Models { models }))
            }
            (_, ["models"]) => Err(ApiError::method_not_allowed()),
            (Method::PUT, ["model-files", sha256]) => {
                let namespace = if query_value(query, "namespace") == Some(PUBLIC) { PUBLIC } else { &caller.tenant };
                if namespace == PUBLIC && !caller.admin {
                    return Err(public_only_for_the_admin());
                }
                self.upload_model_file(caller, namespace, sha256, request).await
            }
            (method @ (Method::PUT | Method::DELETE | Method::GET), ["models", rest @ ..]) => {
                let (namespace, name) = match rest {
                    ["public", name] => (PUBLIC.to_string(), name.to_string()),
                    [name] => (caller.tenant.clone(), name.to_string()),
                    _ => return Err(ApiError::not_found("no such admin endpoint")),
                };
                if namespace == PUBLIC && method != Method::GET && !caller.admin {
                    return Err(public_only_for_the_admin());
                }
                match method {
                    Method::PUT => self.push_model(namespace, name, request).await,
                    Method::DELETE => self.remove_model(namespace, name).await,
                    _ => match self.models.get(&namespace, &name) {
                        Some(registered) => Ok(json(StatusCode::OK, &self.info(caller, &registered))),
                        None => Err(model_not_found(&name)),
                    },
                }
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// A record with `loaded`: this node's counters while it is resident,
    /// else null. The counters of a public model show every tenant's use
    /// of it, so only the admin sees them.
    fn info(&self, caller: &Caller, registered: &Registered) -> ModelInfo {
        let hidden = registered.record.namespace == PUBLIC && !caller.admin;
        let loaded = if hidden { None } else { self.runtime.models().status(&registered.key) };
        ModelInfo { record: registered.record.clone(), loaded }
    }

    /// `PUT model-files/SHA256`: the file streams to disk, is checked
    /// against its hash, and is stored.
    async fn upload_model_file(self: &Arc<Self>, caller: &Caller, namespace: &str, sha256: &str, request: Request<RequestBody>) -> Reply {
        let slot = self.uploads.admit(&caller.tenant)?;
        let room = self.upload_room(caller, self.config.max_model_bytes as u64).await?;
        let upload = self.uploads.receive(&slot, request.into_body(), room, "model file").await?;
        store_upload(&self.blobs, blob_key(namespace, sha256), sha256, upload).await?;
        Ok(json(StatusCode::CREATED, &Uploaded { sha256: sha256.to_string() }))
    }

    /// `PUT models/NAME`: reads the uploaded files back and lets the engine
    /// check the whole model (as an upload, one of the tenant's slots).
    async fn push_model(self: &Arc<Self>, namespace: String, name: String, request: Request<RequestBody>) -> Reply {
        check_name("model", &name)?;
        let push: ModelPush = read_json(request, "model description", r#"{"format": "onnx", "files": {"model.onnx": "SHA256"}}"#).await?;
        let format = Format::from_name(&push.format).ok_or_else(|| {
            ApiError::bad_request("bad_request", format!("unknown format {:?}: use safetensors, onnx or gguf", push.format))
        })?;
        check_layout(format, &push.files).map_err(|m| ApiError::bad_request("invalid_model", m))?;
        // Reading and checking a model holds it in memory: a few at a time.
        let _building = self.building.acquire().await.map_err(|_| ApiError::internal("the server is shutting down"))?;
        let (registry, ns, files) = (self.models.clone(), namespace.clone(), push.files.clone());
        let budget = self.runtime.models().call_budget();
        let checked = tokio::task::spawn_blocking(move || -> Result<(u64, String), ApiError> {
            let contents = registry.read_files(&ns, &files, false).map_err(|e| match e {
                ReadError::Missing { path, sha256 } => {
                    ApiError::bad_request("invalid_model", format!("file {path}: content {sha256} was not uploaded (PUT model-files/SHA256 first)"))
                }
                ReadError::Store(message) => ApiError::internal(message),
            })?;
            let size = contents.values().map(|b| b.len() as u64).sum();
            let summary = gpuwasm_tensor::check(format, &contents, &budget).map_err(|e| ApiError::bad_request("invalid_model", e.to_string()))?;
            Ok((size, summary))
        })
        .await;
        let (size_bytes, summary) = checked
            .map_err(|e| ApiError::internal(format!("checking the model failed: {e}")))?
            .map_err(|e| e.prefixed(&format!("model '{name}': ")))?;
        let record = ModelRecord { namespace, name, format, files: push.files, size_bytes, summary, pushed_at: now() };
        self.change(|_| Ok((vec![Change::Model(record.clone())], ()))).await?;
        self.models.insert(record.clone());
        tracing::info!(namespace = %record.namespace, model = %record.name, format = record.format.name(), summary = %record.summary, "model pushed");
        Ok(json(StatusCode::CREATED, &record))
    }

    async fn remove_model(self: &Arc<Self>, namespace: String, name: String) -> Reply {
        self.change(|_| match self.models.get(&namespace, &name) {
            None => Err(model_not_found(&name)),
            Some(_) => Ok((vec![Change::RemoveModel(namespace.clone(), name.clone())], ())),
        })
        .await?;
        self.models.remove(&namespace, &name);
        tracing::info!(%namespace, model = %name, "model removed");
        Ok(json(StatusCode::OK, &Removed { removed: name }))
    }
}

/// Checks the files a push names fit its format.
fn check_layout(format: Format, files: &BTreeMap<String, String>) -> Result<(), String> {
    for (path, sha256) in files {
        crate::files::check_file_path(path)?;
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

fn model_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no model named '{name}'"))
}
