//! Which models a deployment may load, where they come from, and the
//! node-wide cache that loads each one once, shares it between instances
//! and evicts it when idle.

use super::batch::{BatchSettings, Batcher, Budgets, GenerationStatus, InferenceMemory, ModelStatus};
use super::gpu::{Charge, DeviceGate, Ledger, Refused, TenantGpu, TenantSettings};
use gpuwasm_tensor::backend::{DeviceInfo, DeviceKind};
use gpuwasm_tensor::llm::Llm;
use gpuwasm_tensor::llm::engine::{Engine, EngineSettings};
use gpuwasm_tensor::backend::{Devices, SharedBackend, Target};
use gpuwasm_tensor::{FileBytes, Format, ModelFiles};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Bytes of its files (about what its weights take on a device).
    pub bytes: u64,
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

    fn size(format: Format, path: &std::path::Path) -> u64 {
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        match format.files() {
            Some(names) => names.iter().map(|n| len(&path.join(n))).sum(),
            None => len(path),
        }
    }
}

/// Reads a model's files from `path`: the known files of a directory
/// layout, or the one file. They are read, not mapped: they are the
/// user's, and may change while the model is loaded.
pub fn read_model_files(format: Format, path: &std::path::Path) -> Result<ModelFiles, CatalogError> {
    let read = |p: &std::path::Path| -> Result<FileBytes, CatalogError> {
        Ok(std::fs::read(p).map_err(|e| CatalogError(format!("reading {}: {e}", p.display())))?.into())
    };
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
        Ok(self.models.get(name).map(|(format, path)| ModelEntry {
            key: path.display().to_string(),
            format: *format,
            bytes: LocalModels::size(*format, path),
        }))
    }

    fn read(&self, entry: &ModelEntry) -> Result<ModelFiles, CatalogError> {
        read_model_files(entry.format, std::path::Path::new(&entry.key))
    }
}

/// What one deployment may load: its tenant, the names its manifest
/// allows, whether it may load graphs from bytes, and the catalog those
/// names resolve in. The default allows nothing.
#[derive(Clone, Default)]
pub struct ModelAccess {
    /// The tenant the deployment belongs to.
    pub tenant: String,
    /// Model names `load-by-name` may ask for (`[models] allow`).
    pub allow: Vec<String>,
    /// Where names resolve.
    pub catalog: Option<Arc<dyn ModelCatalog>>,
    /// Where its models may run (`[models] target`).
    pub target: Target,
    /// Whether wasi-nn `load` may build graphs from bytes the guest
    /// supplies (`[models] from_bytes`); by name only otherwise.
    pub from_bytes: bool,
    /// Models loaded before the deployment takes traffic and kept resident
    /// while it lives, whatever the idle timeout (`[models] warm`).
    pub warm: Vec<String>,
    /// How long each named model stays resident unused, overriding the
    /// node's idle timeout (`[models] idle_timeout_s`). Where deployments
    /// sharing a model differ, the longest wins while it stays loaded.
    pub idle_timeouts: BTreeMap<String, Duration>,
}

impl ModelAccess {
    /// Whether `name` is on the allow-list.
    pub fn allows(&self, name: &str) -> bool {
        self.allow.iter().any(|a| a == name)
    }

    /// Checks that the warm models and idle timeouts name allowed models.
    pub fn validate(&self) -> Result<(), String> {
        let named = self.warm.iter().map(|n| ("warm", n)).chain(self.idle_timeouts.keys().map(|n| ("idle_timeout_s", n)));
        for (setting, name) in named {
            if !self.allows(name) {
                return Err(format!("[models] {setting} names '{name}', which is not in [models] allow"));
            }
        }
        match self.idle_timeouts.iter().find(|(_, t)| t.is_zero() || **t > MAX_IDLE_TIMEOUT) {
            Some((name, t)) => Err(format!(
                "[models] idle_timeout_s for '{name}' is {} s; give 1 to {} s (7 days)",
                t.as_secs(),
                MAX_IDLE_TIMEOUT.as_secs()
            )),
            None => Ok(()),
        }
    }
}

/// The longest idle timeout a deployment may give a model.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

impl std::fmt::Debug for ModelAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelAccess")
            .field("tenant", &self.tenant)
            .field("allow", &self.allow)
            .field("target", &self.target)
            .field("from_bytes", &self.from_bytes)
            .field("warm", &self.warm)
            .field("idle_timeouts", &self.idle_timeouts)
            .finish_non_exhaustive()
    }
}

/// A model loaded on this node: a graph behind its batching scheduler,
/// or a text model with its generation engine; and, on a GPU, what it is
/// charged.
pub(crate) struct Loaded {
    work: Work,
    device: DeviceInfo,
    /// Milliseconds since the cache's epoch when it was last used.
    last_used: AtomicU64,
    /// How long it stays unused before eviction, in ms, when a deployment
    /// set it (0: the node's idle timeout).
    idle_ms: AtomicU64,
    /// Deployments keeping it warm ([`Warm`]).
    warm: AtomicUsize,
    /// Its weights' bytes on the device's budget (GPUs only).
    device_charge: Option<Charge>,
    /// What each tenant using it is charged for it (GPUs only).
    tenant_charges: Mutex<HashMap<String, Charge>>,
}

impl Loaded {
    /// A graph outside the cache (loaded by one instance from bytes, on the
    /// device it asked for), with what it is charged.
    pub(crate) fn unshared(graph: Arc<dyn gpuwasm_tensor::Graph>, models: &Models, tenant: &str, charges: Option<(Charge, Charge)>) -> Loaded {
        let gate = models.gate(graph.device());
        let (device_charge, tenant_charges) = match charges {
            Some((device, held)) => (Some(device), [(tenant.to_string(), held)].into()),
            None => (None, HashMap::new()),
        };
        Loaded {
            device: graph.device().clone(),
            work: Work::Graph(Batcher::unbatched(graph, models.inner.budgets.clone(), gate)),
            last_used: AtomicU64::new(0),
            idle_ms: AtomicU64::new(0),
            warm: AtomicUsize::new(0),
            device_charge,
            tenant_charges: Mutex::new(tenant_charges),
        }
    }

    /// The device it computes on.
    pub(crate) fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// Its bytes on a GPU, when it is on one.
    fn gpu_bytes(&self) -> Option<u64> {
        self.device_charge.as_ref().map(Charge::bytes)
    }

    /// The graph's scheduler, for a wasi-nn graph.
    pub(crate) fn batcher(&self) -> Option<&Batcher> {
        match &self.work {
            Work::Graph(batcher) => Some(batcher),
            Work::Text(_) => None,
        }
    }

    /// The text model, for one that generates.
    pub(crate) fn text(&self) -> Option<&TextModel> {
        match &self.work {
            Work::Text(text) => Some(text),
            Work::Graph(_) => None,
        }
    }

    /// Bytes it holds on its device (weights, and a text model's cache).
    pub(crate) fn resident_bytes(&self) -> u64 {
        match &self.work {
            Work::Graph(batcher) => batcher.graph().resident_bytes(),
            Work::Text(text) => text.llm.model.resident_bytes() + text.cache_bytes,
        }
    }

    fn status(&self) -> ModelStatus {
        match &self.work {
            Work::Graph(batcher) => batcher.stats.status(),
            Work::Text(text) => text.status(),
        }
    }
}

/// What a loaded model does.
enum Work {
    /// A wasi-nn graph: tensors in, tensors out.
    Graph(Batcher),
    /// A text model (`gpuwasm:llm`).
    Text(Box<TextModel>),
}

/// A text model and the engine that generates with it.
pub(crate) struct TextModel {
    /// Decoder, tokenizer and chat template.
    pub llm: Llm,
    /// The continuous-batching engine.
    pub engine: Engine,
    cache_bytes: u64,
}

impl TextModel {
    fn status(&self) -> ModelStatus {
        let s = &self.engine.stats;
        ModelStatus {
            batches: s.steps.load(Ordering::Relaxed) as usize,
            calls: s.generations.load(Ordering::Relaxed) as usize,
            largest_batch: s.largest_step.load(Ordering::Relaxed),
            generation: Some(GenerationStatus {
                running: s.running.load(Ordering::Relaxed),
                waiting: s.waiting.load(Ordering::Relaxed),
                free_blocks: s.free_blocks.load(Ordering::Relaxed),
                total_blocks: s.total_blocks.load(Ordering::Relaxed),
                generated_tokens: s.generated.load(Ordering::Relaxed),
                cancelled: s.cancelled.load(Ordering::Relaxed),
                preempted: s.preempted.load(Ordering::Relaxed),
            }),
        }
    }
}

/// How text models generate on this node.
#[derive(Clone, Debug)]
pub struct LlmSettings {
    /// Memory for each text model's key/value cache, in MiB (default 256):
    /// it decides how many tokens its running sequences may hold in all.
    pub cache_mb: u64,
    /// Sequences one model runs at once (default 64).
    pub max_seqs: usize,
    /// Tokens one step computes at most: decodes and prompt chunks (default 256).
    pub step_tokens: usize,
}

impl Default for LlmSettings {
    fn default() -> Self {
        LlmSettings { cache_mb: 256, max_seqs: 64, step_tokens: 256 }
    }
}

/// A model resident on this node (see [`Models::resident`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResidentModel {
    /// The model's content key ([`ModelEntry::key`]).
    pub key: String,
    /// The device it is on.
    pub device: String,
    /// Bytes its weights take there.
    pub bytes: u64,
    /// Tenants charged for it (GPUs only), in order.
    pub tenants: Vec<String>,
    /// What it has done since it was loaded.
    pub status: ModelStatus,
    /// Deployments keeping it warm (`[models] warm`): while any does, it
    /// is never evicted.
    pub warm: usize,
    /// How long it stays resident unused: a deployment's
    /// `[models] idle_timeout_s`, or the node's.
    pub idle_timeout: Duration,
}

/// A model a deployment keeps resident: while this lives, the model is
/// not evicted (by idle time or for room).
pub(crate) struct Warm(Arc<Loaded>);

impl Warm {
    pub(crate) fn new(loaded: Arc<Loaded>) -> Warm {
        loaded.warm.fetch_add(1, Ordering::Relaxed);
        Warm(loaded)
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        self.0.warm.fetch_sub(1, Ordering::Relaxed);
    }
}

/// GPU memory and time: a ledger for the node's GPUs, a gate for each.
struct GpuState {
    ledger: Arc<Ledger>,
    gates: HashMap<String, Arc<DeviceGate>>,
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
    llm: LlmSettings,
    devices: Devices,
    /// Tenants' GPU quotas and weights.
    tenants: Arc<TenantSettings>,
    /// The budget of each GPU's model memory, if the node sets one.
    gpu_memory: Option<u64>,
    /// The GPUs' ledger and gates, made when the devices are first needed.
    gpu: std::sync::OnceLock<GpuState>,
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

impl LoadError {
    /// What went wrong, for people.
    pub(crate) fn message(&self) -> String {
        match self {
            LoadError::NotFound(m) | LoadError::Denied(m) | LoadError::Io(m) => m.clone(),
            LoadError::Failed(e) => e.to_string(),
        }
    }
}

impl Models {
    /// A cache that evicts a model `idle` after its last use, whose
    /// passes run within `memory` on `devices`; models on a GPU may hold
    /// `gpu_memory` bytes of it (default: 90% of what the device has;
    /// unlimited when it does not say).
    pub(crate) fn new(idle: Duration, batch: BatchSettings, memory: InferenceMemory, llm: LlmSettings, devices: Devices, gpu_memory: Option<u64>) -> Models {
        Models {
            inner: Arc::new(ModelsInner {
                idle,
                batch,
                budgets: Budgets::new(&memory),
                llm,
                devices,
                tenants: Arc::default(),
                gpu_memory,
                gpu: std::sync::OnceLock::new(),
                epoch: Instant::now(),
                slots: Mutex::default(),
                failed: Mutex::default(),
                sweeper: std::sync::Once::new(),
                loads: AtomicU64::new(0),
            }),
        }
    }

    /// The node's devices.
    pub fn devices(&self) -> &Devices {
        &self.inner.devices
    }

    /// Sets `tenant`'s GPU memory quota and share of GPU time (from then
    /// on: models it already holds stay).
    pub fn set_tenant_gpu(&self, tenant: &str, settings: TenantGpu) {
        self.inner.tenants.set(tenant, settings);
    }

    /// Each GPU's (name, budget, bytes held by models).
    pub fn gpu_memory(&self) -> Vec<(String, u64, u64)> {
        self.gpu().ledger.devices()
    }

    /// The GPUs' ledger and gates (finding the devices, the first time).
    fn gpu(&self) -> &GpuState {
        self.inner.gpu.get_or_init(|| {
            let gpus = self.inner.devices.gpus();
            let budget = |info: &gpuwasm_tensor::backend::DeviceInfo| {
                self.inner.gpu_memory.or(info.memory_bytes.map(|b| b / 10 * 9)).unwrap_or(u64::MAX)
            };
            let tenants = &self.inner.tenants;
            GpuState {
                ledger: Ledger::new(gpus.iter().map(|g| (g.info().name.clone(), budget(g.info()))), tenants.clone()),
                gates: gpus.iter().map(|g| (g.info().name.clone(), Arc::new(DeviceGate::new(tenants.clone())))).collect(),
            }
        })
    }

    /// The models resident on this node, by key and device.
    pub fn resident(&self) -> Vec<ResidentModel> {
        let slots = self.inner.slots.lock().unwrap();
        let mut all: Vec<ResidentModel> = slots
            .iter()
            .filter_map(|(key, slot)| {
                let loaded = slot.get()?;
                let mut tenants: Vec<String> = loaded.tenant_charges.lock().unwrap().keys().cloned().collect();
                tenants.sort();
                Some(ResidentModel {
                    key: key.rsplit_once('@').map_or(key.as_str(), |(k, _)| k).to_string(),
                    device: loaded.device.name.clone(),
                    bytes: loaded.gpu_bytes().unwrap_or_else(|| loaded.resident_bytes()),
                    tenants,
                    status: loaded.status(),
                    warm: loaded.warm.load(Ordering::Relaxed),
                    idle_timeout: Duration::from_millis(self.idle_ms(loaded)),
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.key, &a.device).cmp(&(&b.key, &b.device)));
        all
    }

    /// The turns of a graph's device, when it is a GPU.
    fn gate(&self, device: &DeviceInfo) -> Option<Arc<DeviceGate>> {
        match device.kind {
            DeviceKind::Cpu => None,
            _ => self.gpu().gates.get(&device.name).cloned(),
        }
    }

    /// `bytes` on `device`'s budget, evicting idle models of that device,
    /// least recently used first, until they fit (nothing is evicted for
    /// a charge larger than the whole budget). `None` for the CPU, which
    /// has no such budget.
    pub(crate) fn charge_device(&self, device: &DeviceInfo, bytes: u64) -> Result<Option<Charge>, gpuwasm_tensor::Error> {
        if device.kind == DeviceKind::Cpu {
            return Ok(None);
        }
        loop {
            match self.gpu().ledger.charge_device(&device.name, bytes) {
                Ok(charge) => return Ok(Some(charge)),
                Err(Refused::Full(why)) => {
                    if !self.evict_one(|loaded| loaded.device.name == device.name) {
                        return Err(Refused::Full(why).into_error());
                    }
                }
                Err(never) => return Err(never.into_error()),
            }
        }
    }

    /// `bytes` on `tenant`'s quota on a GPU: when it does not fit, the
    /// tenant lets go of idle models it holds on that device (evicted when
    /// no tenant holds them any more), least recently used first, `keep`
    /// excepted. `None` for the CPU.
    pub(crate) fn charge_tenant(&self, tenant: &str, device: &DeviceInfo, bytes: u64, keep: Option<&Loaded>) -> Result<Option<Charge>, gpuwasm_tensor::Error> {
        if device.kind == DeviceKind::Cpu {
            return Ok(None);
        }
        loop {
            match self.gpu().ledger.charge_tenant(tenant, &device.name, bytes) {
                Ok(charge) => return Ok(Some(charge)),
                Err(never @ Refused::Never(_)) => return Err(never.into_error()),
                Err(refused) => {
                    let released = {
                        let slots = self.inner.slots.lock().unwrap();
                        // Idle: held by the cache alone, no load of it in flight.
                        let mut idle: Vec<&Arc<Loaded>> = slots
                            .values()
                            .filter(|slot| Arc::strong_count(slot) == 1)
                            .filter_map(|slot| slot.get())
                            .filter(|l| Arc::strong_count(l) == 1 && !keep.is_some_and(|k| std::ptr::eq(k, l.as_ref())))
                            .filter(|l| l.device.name == device.name)
                            .filter(|l| l.tenant_charges.lock().unwrap().contains_key(tenant))
                            .collect();
                        idle.sort_by_key(|l| l.last_used.load(Ordering::Relaxed));
                        idle.first().and_then(|l| l.tenant_charges.lock().unwrap().remove(tenant))
                    };
                    match released {
                        Some(charge) => drop(charge),
                        None => return Err(refused.into_error()),
                    }
                    self.evict_unheld();
                }
            }
        }
    }

    /// Evicts the least recently used idle model that `which` picks;
    /// whether there was one.
    fn evict_one(&self, which: impl Fn(&Loaded) -> bool) -> bool {
        let mut slots = self.inner.slots.lock().unwrap();
        let victim = slots
            .iter()
            .filter_map(|(key, slot)| slot.get().filter(|l| Arc::strong_count(l) == 1 && Arc::strong_count(slot) == 1 && which(l)).map(|l| (key, l)))
            .min_by_key(|(_, l)| l.last_used.load(Ordering::Relaxed))
            .map(|(key, _)| key.clone());
        match victim {
            Some(key) => {
                tracing::info!(%key, "model evicted to make room on its device");
                slots.remove(&key);
                true
            }
            None => false,
        }
    }

    /// Evicts idle GPU models no tenant holds any more.
    fn evict_unheld(&self) {
        while self.evict_one(|l| l.device_charge.is_some() && l.tenant_charges.lock().unwrap().is_empty()) {}
    }

    /// The backend for a graph a guest asked to run on a GPU or not,
    /// under the deployment's target.
    pub(crate) fn backend(&self, wants_gpu: bool, target: Target) -> Result<SharedBackend, gpuwasm_tensor::Error> {
        self.inner.devices.select(wants_gpu, target)
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

    /// The model of `key` (a [`ModelEntry::key`]), if it is resident on a
    /// device: what it has done since it was loaded (summed over devices).
    pub fn status(&self, key: &str) -> Option<ModelStatus> {
        let slots = self.inner.slots.lock().unwrap();
        let prefix = format!("{key}@");
        slots
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(_, slot)| slot.get().map(|loaded| loaded.status()))
            .reduce(|a, b| ModelStatus {
                batches: a.batches + b.batches,
                calls: a.calls + b.calls,
                largest_batch: a.largest_batch.max(b.largest_batch),
                generation: a.generation.or(b.generation),
            })
    }

    /// The model `name` for a deployment with `access`: checked against
    /// the allow-list, resolved, and loaded (once per node and device) on a
    /// blocking thread, on the GPU when the node has one and the target
    /// allows it (`load-by-name` cannot ask for a device).
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
        let backend = self.backend(true, access.target).map_err(LoadError::Failed)?;
        let key = format!("{}@{}", entry.key, backend.info().name);
        if let Some(why) = self.inner.failed.lock().unwrap().get(&key) {
            return Err(LoadError::Failed(why.clone()));
        }
        let device = backend.info().clone();
        let slot = self.inner.slots.lock().unwrap().entry(key.clone()).or_default().clone();
        // On a GPU the tenant's quota comes first: nothing is loaded or
        // evicted for a tenant that could not hold the model.
        let resident = slot.get().cloned();
        let paid = resident.as_ref().is_some_and(|l| l.tenant_charges.lock().unwrap().contains_key(&access.tenant));
        let estimate = resident.as_ref().and_then(|l| l.gpu_bytes()).unwrap_or(entry.bytes);
        let mut quota =
            if paid { None } else { self.charge_tenant(&access.tenant, &device, estimate, resident.as_deref()).map_err(LoadError::Failed)? };
        drop(resident);
        let loaded = slot
            .get_or_try_init(|| async {
                let (catalog, entry2, models, device2) = (catalog.clone(), entry.clone(), self.clone(), device.clone());
                let started = Instant::now();
                let loaded = tokio::task::spawn_blocking(move || {
                    let files = catalog.read(&entry2).map_err(|e| LoadError::Io(e.0))?;
                    // Room for the files' bytes (about what the weights take)
                    // before loading, for the exact bytes after.
                    let estimate = models.charge_device(&device2, files.values().map(|f| f.len() as u64).sum()).map_err(LoadError::Failed)?;
                    let work = models.load_work(entry2.format, &files, backend).map_err(LoadError::Failed)?;
                    drop(estimate);
                    let loaded = Loaded {
                        work,
                        device: device2,
                        last_used: AtomicU64::new(0),
                        idle_ms: AtomicU64::new(0),
                        warm: AtomicUsize::new(0),
                        device_charge: None,
                        tenant_charges: Mutex::default(),
                    };
                    let charge = models.charge_device(&loaded.device, loaded.resident_bytes()).map_err(LoadError::Failed)?;
                    Ok(Loaded { device_charge: charge, ..loaded })
                })
                .await
                .map_err(|e| LoadError::Io(format!("loading task failed: {e}")))?;
                let loaded = loaded.inspect_err(|e| {
                    // Content that cannot be a model fails the same way
                    // again; a device without room may have it later.
                    if let LoadError::Failed(why @ (gpuwasm_tensor::Error::InvalidModel(_) | gpuwasm_tensor::Error::Unsupported(_))) = e {
                        self.remember_failure(&key, why);
                    }
                })?;
                self.inner.loads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(model = %name, %key, ms = started.elapsed().as_millis() as u64, bytes = loaded.resident_bytes(), "model loaded");
                Ok::<_, LoadError>(Arc::new(loaded))
            })
            .await?
            .clone();
        loaded.last_used.store(self.now_ms(), Ordering::Relaxed);
        if let Some(idle) = access.idle_timeouts.get(name) {
            loaded.idle_ms.fetch_max(idle.as_millis() as u64, Ordering::Relaxed);
        }
        // The tenant pays for the weights it uses, once, at their exact bytes.
        let paid = loaded.tenant_charges.lock().unwrap().contains_key(&access.tenant);
        if let Some(bytes) = loaded.gpu_bytes().filter(|_| !paid) {
            let charge = match quota.take().filter(|c| c.bytes() == bytes) {
                Some(charge) => Some(charge),
                None => match self.charge_tenant(&access.tenant, &device, bytes, Some(&loaded)) {
                    Ok(charge) => charge,
                    Err(e) => {
                        // Loaded for a tenant that cannot hold it after all:
                        // not kept unless another tenant holds it.
                        drop(loaded);
                        self.evict_unheld();
                        return Err(LoadError::Failed(e));
                    }
                },
            };
            if let Some(charge) = charge {
                loaded.tenant_charges.lock().unwrap().entry(access.tenant.clone()).or_insert(charge);
            }
        }
        Ok(loaded)
    }

    /// Loads a model's files onto `backend`: a GGUF file as a text model
    /// with its engine, anything else as a graph behind its scheduler.
    fn load_work(&self, format: Format, files: &ModelFiles, backend: SharedBackend) -> Result<Work, gpuwasm_tensor::Error> {
        let gate = self.gate(backend.info());
        if format != Format::Gguf {
            let graph = gpuwasm_tensor::load(format, files, backend)?;
            return Ok(Work::Graph(Batcher::start(graph, self.inner.batch.clone(), self.inner.budgets.clone(), gate)));
        }
        let file = gpuwasm_tensor::single_file(files)?;
        let llm = Llm::load(&gpuwasm_tensor::gguf::Gguf::parse(file)?, backend)?;
        let settings = &self.inner.llm;
        // The cache: as many positions as its memory holds (keys and values, f32).
        let per_token = (llm.model.config.layers * llm.model.config.kv_width() * 8) as u64;
        let cache_tokens = (settings.cache_mb.saturating_mul(1 << 20) / per_token).max(16) as usize;
        let engine_settings =
            EngineSettings { cache_tokens, max_seqs: settings.max_seqs, step_tokens: settings.step_tokens, ..EngineSettings::default() };
        let engine = Engine::start(llm.model.clone(), llm.tokenizer.clone(), engine_settings, self.inner.budgets.for_calls(1))?;
        let cache_bytes = engine.stats.total_blocks.load(Ordering::Relaxed) as u64 * EngineSettings::default().block as u64 * per_token;
        Ok(Work::Text(Box::new(TextModel { llm, engine, cache_bytes })))
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

    /// How long `loaded` stays resident unused, in ms.
    fn idle_ms(&self, loaded: &Loaded) -> u64 {
        match loaded.idle_ms.load(Ordering::Relaxed) {
            0 => self.inner.idle.as_millis() as u64,
            ms => ms,
        }
    }

    /// Drops models unused for their idle timeout and held by no instance
    /// or deployment.
    pub fn evict_idle(&self) -> usize {
        let now = self.now_ms();
        let mut slots = self.inner.slots.lock().unwrap();
        let before = slots.len();
        slots.retain(|key, slot| {
            let keep = match slot.get() {
                // Still loading, or held by a live instance (table entry).
                None => Arc::strong_count(slot) > 1,
                Some(loaded) => {
                    Arc::strong_count(loaded) > 1 || now.saturating_sub(loaded.last_used.load(Ordering::Relaxed)) < self.idle_ms(loaded)
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
