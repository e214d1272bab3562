//! Which models a deployment may load, where they come from, and the
//! node-wide cache that loads each one once, shares it between instances
//! and evicts it when idle.

use super::batch::{BatchSettings, Batcher, Budgets, InferenceMemory, ModelStatus};
use gpuwasm_tensor::{Format, ModelFiles};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The namespace every tenant can read models from.
pub const PUBLIC: &str = "public";

/// A model as a catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    /// Identifies the content: the same key always means the same weights
    /// (the node shares one loaded copy per key).
    pub key: String,
    /// Its format.
    pub format: Format,
}

/// Why a catalog could not resolve or read a model.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CatalogError(pub String);

/// Where models come from: the server's registry, or local files.
pub trait ModelCatalog: Send + Sync {
    /// The model called `name` as `tenant` sees it: its own first, then
    /// the `public/` namespace. `Ok(None)` when there is none.
    fn resolve(&self, tenant: &str, name: &str) -> Result<Option<ModelEntry>, CatalogError>;

    /// Reads the files of a model `resolve` returned (blocking).
    fn read(&self, entry: &ModelEntry) -> Result<ModelFiles, CatalogError>;
}

/// Models given as local paths by name (`gpuwasm run --model NAME=PATH`):
/// a directory for safetensors models, a file for ONNX and GGUF.
#[derive(Debug, Default)]
pub struct LocalModels {
    models: HashMap<String, (Format, PathBuf)>,
}

impl LocalModels {
    /// Adds `name`, stored at `path` in `format`.
    pub fn add(&mut self, name: &str, format: Format, path: PathBuf) {
        self.models.insert(name.to_string(), (format, path));
    }
}

/// Reads a model's files from `path`: the known files of a directory
/// layout, or the one file.
pub fn read_model_files(format: Format, path: &std::path::Path) -> Result<ModelFiles, CatalogError> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| CatalogError(format!("reading {}: {e}", p.display())));
    match format.files() {
        Some(names) => {
            let mut files = ModelFiles::new();
            for name in names {
                let file = path.join(name);
                if file.is_file() {
                    files.insert(name.to_string(), read(&file)?);
                }
            }
            Ok(files)
        }
        None => {
            let name = path.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned());
            Ok([(name, read(path)?)].into())
        }
    }
}

impl ModelCatalog for LocalModels {
    fn resolve(&self, _tenant: &str, name: &str) -> Result<Option<ModelEntry>, CatalogError> {
        Ok(self.models.get(name).map(|(format, path)| ModelEntry { key: path.display().to_string(), format: *format }))
    }

    fn read(&self, entry: &ModelEntry) -> Result<ModelFiles, CatalogError> {
        read_model_files(entry.format, std::path::Path::new(&entry.key))
    }
}

/// What one deployment may load: its tenant, the names its manifest
/// allows, and the catalog those names resolve in. The default allows
/// nothing.
#[derive(Clone, Default)]
pub struct ModelAccess {
    /// The tenant the deployment belongs to.
    pub tenant: String,
    /// Model names `load-by-name` may ask for (`[models] allow`).
    pub allow: Vec<String>,
    /// Where names resolve.
    pub catalog: Option<Arc<dyn ModelCatalog>>,
}

impl ModelAccess {
    /// Whether `name` is on the allow-list.
    pub fn allows(&self, name: &str) -> bool {
        self.allow.iter().any(|a| a == name)
    }
}

impl std::fmt::Debug for ModelAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelAccess").field("tenant", &self.tenant).field("allow", &self.allow).finish_non_exhaustive()
    }
}

/// A model loaded on this node: its graph behind a batching scheduler.
pub(crate) struct Loaded {
    pub batcher: Batcher,
    /// Milliseconds since the cache's epoch when it was last used.
    last_used: AtomicU64,
}

impl Loaded {
    /// A graph outside the cache (loaded by one instance from bytes).
    pub(crate) fn unshared(graph: Arc<dyn gpuwasm_tensor::Graph>, models: &Models) -> Loaded {
        Loaded { batcher: Batcher::unbatched(graph, models.inner.budgets.clone()), last_used: AtomicU64::new(0) }
    }
}

/// The node-wide model cache. Cheap to clone.
#[derive(Clone)]
pub struct Models {
    inner: Arc<ModelsInner>,
}

struct ModelsInner {
    idle: Duration,
    batch: BatchSettings,
    budgets: Budgets,
    epoch: Instant,
    slots: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Arc<Loaded>>>>>,
    /// Why models failed to load, by content key: the same content fails
    /// the same way, so it is not read and parsed again on every request.
    failed: Mutex<HashMap<String, gpuwasm_tensor::Error>>,
    sweeper: std::sync::Once,
    loads: AtomicU64,
}

/// Failed loads remembered at most (past that, all are forgotten and
/// remembered anew).
const FAILED_KEPT: usize = 1024;

/// Why a model could not be had.
#[derive(Debug)]
pub(crate) enum LoadError {
    /// No model by that name for this tenant.
    NotFound(String),
    /// The manifest does not allow it.
    Denied(String),
    /// The model is unusable (corrupt, unsupported, unreadable).
    Failed(gpuwasm_tensor::Error),
    /// Reading it failed.
    Io(String),
}

impl Models {
    /// A cache that evicts a model `idle` after its last use, whose
    /// passes run within `memory`.
    pub(crate) fn new(idle: Duration, batch: BatchSettings, memory: InferenceMemory) -> Models {
        Models {
            inner: Arc::new(ModelsInner {
                idle,
                batch,
                budgets: Budgets::new(&memory),
                epoch: Instant::now(),
                slots: Mutex::default(),
                failed: Mutex::default(),
                sweeper: std::sync::Once::new(),
                loads: AtomicU64::new(0),
            }),
        }
    }

    /// The budget of one compute call: what checking a model at push
    /// runs under, so that a model that could never run one call is
    /// refused there.
    pub fn call_budget(&self) -> gpuwasm_tensor::Budget {
        self.inner.budgets.for_calls(1)
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// How many times a model was loaded from its files (a cache miss).
    pub fn loads(&self) -> u64 {
        self.inner.loads.load(Ordering::Relaxed)
    }

    /// The model loaded under `key` (a [`ModelEntry::key`]), if it is
    /// resident: what it has done since it was loaded.
    pub fn status(&self, key: &str) -> Option<ModelStatus> {
        let slots = self.inner.slots.lock().unwrap();
        slots.get(key)?.get().map(|loaded| loaded.batcher.stats.status())
    }

    /// Models loaded on this node now.
    pub fn resident(&self) -> usize {
        self.inner.slots.lock().unwrap().values().filter(|s| s.initialized()).count()
    }

    /// The model `name` for a deployment with `access`: checked against
    /// the allow-list, resolved, and loaded (once per node) on a blocking
    /// thread.
    pub(crate) async fn get(&self, access: &ModelAccess, name: &str) -> Result<Arc<Loaded>, LoadError> {
        if !access.allows(name) {
            return Err(LoadError::Denied(format!(
                "model '{name}' is not allowed for this deployment (add it to [models] allow in gpuwasm.toml)"
            )));
        }
        let catalog = access.catalog.clone().ok_or_else(|| LoadError::NotFound(format!("no model named '{name}'")))?;
        let entry = catalog
            .resolve(&access.tenant, name)
            .map_err(|e| LoadError::Io(e.0))?
            .ok_or_else(|| LoadError::NotFound(format!("no model named '{name}' in tenant '{}' or in public/", access.tenant)))?;
        self.start_sweeper();
        if let Some(why) = self.inner.failed.lock().unwrap().get(&entry.key) {
            return Err(LoadError::Failed(why.clone()));
        }
        let slot = self.inner.slots.lock().unwrap().entry(entry.key.clone()).or_default().clone();
        let loaded = slot
            .get_or_try_init(|| async {
                let (catalog, entry2) = (catalog.clone(), entry.clone());
                let started = Instant::now();
                let graph = tokio::task::spawn_blocking(move || {
                    let files = catalog.read(&entry2).map_err(|e| LoadError::Io(e.0))?;
                    gpuwasm_tensor::load(entry2.format, &files).map_err(LoadError::Failed)
                })
                .await
                .map_err(|e| LoadError::Io(format!("loading task failed: {e}")))?;
                let graph = graph.inspect_err(|e| {
                    if let LoadError::Failed(why) = e {
                        self.remember_failure(&entry.key, why);
                    }
                })?;
                self.inner.loads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %name, key = %entry.key, ms = started.elapsed().as_millis() as u64, "model loaded");
                Ok::<_, LoadError>(Arc::new(Loaded {
                    batcher: Batcher::start(graph, self.inner.batch.clone(), self.inner.budgets.clone()),
                    last_used: AtomicU64::new(0),
                }))
            })
            .await?
            .clone();
        loaded.last_used.store(self.now_ms(), Ordering::Relaxed);
        Ok(loaded)
    }

    fn remember_failure(&self, key: &str, why: &gpuwasm_tensor::Error) {
        tracing::warn!(key = %key, error = %why, "model failed to load; later loads of the same content fail at once");
        let mut failed = self.inner.failed.lock().unwrap();
        if failed.len() >= FAILED_KEPT {
            failed.clear();
        }
        failed.insert(key.to_string(), why.clone());
    }

    /// Marks `loaded` as used now.
    pub(crate) fn touch(&self, loaded: &Loaded) {
        loaded.last_used.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Drops models unused for the idle timeout and held by no instance.
    pub fn evict_idle(&self) -> usize {
        let now = self.now_ms();
        let idle = self.inner.idle.as_millis() as u64;
        let mut slots = self.inner.slots.lock().unwrap();
        let before = slots.len();
        slots.retain(|key, slot| {
            let keep = match slot.get() {
                // Still loading, or held by a live instance (table entry).
                None => Arc::strong_count(slot) > 1,
                Some(loaded) => {
                    Arc::strong_count(loaded) > 1 || now.saturating_sub(loaded.last_used.load(Ordering::Relaxed)) < idle
                }
            };
            if !keep {
                tracing::info!(key = %key, "model evicted after being idle");
            }
            keep
        });
        before - slots.len()
    }

    /// Starts the task that evicts idle models, once, in the current
    /// tokio runtime; it ends when the cache is dropped.
    fn start_sweeper(&self) {
        let weak: Weak<ModelsInner> = Arc::downgrade(&self.inner);
        let period = (self.inner.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        self.inner.sweeper.call_once(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let Some(inner) = weak.upgrade() else { break };
                    Models { inner }.evict_idle();
                }
            });
        });
    }
}
