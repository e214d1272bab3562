//! The embeddable runtime: an engine with its instance pool and epoch
//! ticker, a linker with WASI, wasi:http and wasi:nn, and the steps that
//! turn component bytes into a [`Deployment`]: validate, pre-initialise,
//! compile (or map a compiled artifact), link.

use crate::capabilities::Capabilities;
use crate::deployment::Deployment;
use crate::engine::{self, PoolSettings};
use crate::error::{Error, chain};
use crate::host_state::RequestState;
use crate::limits::Limits;
use crate::nn::{BatchSettings, InferenceMemory, LlmSettings, Models};
use crate::preinit;
use gpuwasm_tensor::backend::Devices;
use crate::capabilities::SharedCapabilities;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, UpdateDeadline};

/// Builds a [`Runtime`]. Obtain one with [`Runtime::builder`].
#[derive(Clone, Debug)]
pub struct RuntimeBuilder {
    pool: PoolSettings,
    ceilings: Limits,
    tenant_instances: Option<u32>,
    refusal_delay: std::time::Duration,
    model_idle: std::time::Duration,
    batch: BatchSettings,
    inference: InferenceMemory,
    devices: Option<Devices>,
    gpu_memory: Option<u64>,
    llm: LlmSettings,
}

/// The default of [`RuntimeBuilder::keep_resident_mb`].
pub const DEFAULT_KEEP_RESIDENT_MB: u64 = 16;

/// The default of [`RuntimeBuilder::refusal_delay`]: one second, what the
/// refusals' `Retry-After` asks for.
pub const DEFAULT_REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

impl RuntimeBuilder {
    /// Instances that may be live at once over all deployments (default
    /// 256). Requests beyond it wait in their deployment's queue.
    pub fn max_instances(mut self, n: u32) -> Self {
        self.pool.max_instances = n.max(1);
        self
    }

    /// Instances one tenant's deployments may hold at once (default: half
    /// of [`max_instances`](Self::max_instances)), so that one tenant
    /// cannot fill the node. The tenant of a deployment is the one its
    /// [`Capabilities`]' model access names.
    pub fn max_instances_per_tenant(mut self, n: u32) -> Self {
        self.tenant_instances = Some(n.max(1));
        self
    }

    /// The highest limits any deployment may be given (default
    /// [`Limits::default_ceilings`]); deployments asking for more are
    /// refused, naming the limit. Every memory slot of the instance pool
    /// is sized for `memory_mb` (as reserved address space, not resident
    /// memory).
    pub fn max_limits(mut self, ceilings: Limits) -> Self {
        self.pool.max_memory_mb = ceilings.memory_mb.max(1);
        self.ceilings = ceilings;
        self
    }

    /// How soon after its arrival a request refused for want of room (a
    /// full queue, too many slow bodies: `503`) gets its answer at the
    /// earliest (default [`DEFAULT_REFUSAL_DELAY`]; zero answers at once);
    /// each waits up to half as long again, at random, so that refused
    /// clients retrying at once drift out of step. A client that retries
    /// the moment it is refused, on as many connections as it may open,
    /// then gets one refusal per delay for each request it holds open (an
    /// HTTP/1 connection, or an HTTP/2 stream: up to 128 a connection),
    /// each costing the node a timer, instead of as many as it can send: a
    /// storm on one deployment leaves the cores to the others. A client
    /// that hangs up instead of waiting is not slowed. Requests refused
    /// after waiting in the queue for the pause or longer are answered
    /// at once.
    pub fn refusal_delay(mut self, delay: std::time::Duration) -> Self {
        self.refusal_delay = delay;
        self
    }

    /// Memory, in MiB, each memory and table slot of the instance pool may
    /// keep resident between instances (default
    /// [`DEFAULT_KEEP_RESIDENT_MB`]). Where Linux offers `PAGEMAP_SCAN`
    /// (6.7 and later) the pages an instance wrote, up to this much, are
    /// reset by copying them back from the snapshot instead of being
    /// unmapped, which would interrupt every core to flush its TLB; the
    /// cost is up to this much resident memory per slot that has run a
    /// large instance. 0 unmaps everything at each reset.
    pub fn keep_resident_mb(mut self, mb: u64) -> Self {
        self.pool.keep_resident_mb = mb;
        self
    }

    /// Host memory inference may allocate: per call and over the node
    /// (defaults 512 MiB and 4 GiB). A call that would need more fails
    /// with wasi-nn `too-large`; nothing else is affected.
    pub fn inference_memory(mut self, memory: InferenceMemory) -> Self {
        self.inference = memory;
        self
    }

    /// How long a model stays loaded after its last use (default 10
    /// minutes): the scale-down window of inference. It is loaded again on
    /// the next request that asks for it.
    pub fn model_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.model_idle = idle;
        self
    }

    /// The devices models run on (default: the CPU only). Give
    /// [`Devices::discover`] to use the node's GPUs.
    pub fn devices(mut self, devices: Devices) -> Self {
        self.devices = Some(devices);
        self
    }

    /// GPU memory models may hold on each GPU, in bytes (default: 90% of
    /// the device's memory; unlimited for a device that does not say, such
    /// as a software Vulkan device). Loading past it evicts idle models,
    /// least recently used first, or fails that load with `too-large`.
    pub fn gpu_memory(mut self, bytes: u64) -> Self {
        self.gpu_memory = Some(bytes);
        self
    }

    /// How text models generate: their key/value cache and step sizes.
    pub fn llm(mut self, settings: LlmSettings) -> Self {
        self.llm = settings;
        self
    }

    /// How concurrent inference calls on one model are batched.
    pub fn batching(mut self, batch: BatchSettings) -> Self {
        self.batch = batch;
        self
    }

    /// Creates the engine, its instance pool and its epoch ticker.
    pub fn build(self) -> Result<Runtime, Error> {
        let llm = &self.llm;
        if llm.cache_mb == 0 || llm.max_seqs == 0 || llm.step_tokens < llm.max_seqs {
            return Err(Error::InvalidLimits(format!(
                "text generation needs a key/value cache of at least 1 MiB, 1 sequence, and a step of at least one token for each \
                 sequence (got {} MiB, {} sequences, {} tokens a step)",
                llm.cache_mb, llm.max_seqs, llm.step_tokens
            )));
        }
        let engine = engine::new_engine(&self.pool).map_err(|e| Error::Engine(chain(&e)))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .and_then(|()| crate::nn::host::add_to_linker(&mut linker, RequestState::nn))
            .and_then(|()| crate::nn::llm::add_to_linker(&mut linker, RequestState::nn))
            .map_err(|e| Error::Engine(chain(&e)))?;
        engine::start_ticker(&engine);
        let per_tenant = self.tenant_instances.unwrap_or(self.pool.max_instances.div_ceil(2)).min(self.pool.max_instances);
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                instances: Arc::new(Semaphore::new(self.pool.max_instances as usize)),
                tenants: Mutex::default(),
                per_tenant,
                slow_bodies: AtomicU32::new(0),
                refusal_delay: self.refusal_delay,
                engine,
                linker,
                models: Models::new(self.model_idle, self.batch, self.inference, self.llm, self.devices.unwrap_or_else(Devices::cpu_only), self.gpu_memory),
                pool: self.pool,
                ceilings: self.ceilings,
            }),
        })
    }
}

/// One tenant's share of the instance pool.
pub(crate) struct TenantShare {
    /// One permit per instance it may hold.
    pub(crate) permits: Arc<Semaphore>,
    /// How many permits it has (for messages).
    pub(crate) size: AtomicU32,
    /// Its requests admitted while their bodies still arrive.
    pub(crate) slow_bodies: AtomicU32,
}

/// A WebAssembly component runtime for HTTP handlers.
///
/// Cheap to clone; clones share the engine and its instance pool. See the
/// crate documentation for an example.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<RuntimeInner>,
}

/// A component compiled for this runtime's engine, ready to link into
/// deployments with [`Runtime::deployment`]. Cheap to clone: clones share
/// the compiled code (and, for one mapped from a file, the mapping).
#[derive(Clone)]
pub struct Compiled(pub(crate) Component);

pub(crate) struct RuntimeInner {
    engine: Engine,
    linker: Linker<RequestState>,
    /// One permit per pool slot, so requests queue rather than fail when
    /// the pool is full.
    pub(crate) instances: Arc<Semaphore>,
    /// Each tenant's share of the pool: `per_tenant` permits unless
    /// [`Runtime::set_tenant_instances`] says otherwise.
    tenants: Mutex<HashMap<String, Arc<TenantShare>>>,
    per_tenant: u32,
    /// Requests admitted while their bodies still arrive, node-wide.
    pub(crate) slow_bodies: AtomicU32,
    /// See [`RuntimeBuilder::refusal_delay`].
    pub(crate) refusal_delay: std::time::Duration,
    pub(crate) pool: PoolSettings,
    ceilings: Limits,
    models: Models,
}

impl Runtime {
    /// A builder with the default settings.
    pub fn builder() -> RuntimeBuilder {
        let ceilings = Limits::default_ceilings();
        RuntimeBuilder {
            pool: PoolSettings {
                max_instances: 256,
                max_memory_mb: ceilings.memory_mb,
                keep_resident_mb: DEFAULT_KEEP_RESIDENT_MB,
            },
            ceilings,
            tenant_instances: None,
            refusal_delay: DEFAULT_REFUSAL_DELAY,
            model_idle: std::time::Duration::from_secs(600),
            batch: BatchSettings::default(),
            inference: InferenceMemory::default(),
            devices: None,
            gpu_memory: None,
            llm: LlmSettings::default(),
        }
    }

    /// Validates `wasm`, a component targeting the `wasi:http/proxy` world,
    /// pre-initialises it when it exports an init function (see
    /// `wit/init.wit`), compiles it, and checks that it instantiates under
    /// `limits`: the result is a deployment called `name`, ready to serve,
    /// that may reach nothing outside itself.
    ///
    /// The CPU-heavy parts run on tokio's blocking threads.
    pub async fn load(&self, name: &str, wasm: &[u8], limits: Limits) -> Result<Deployment, Error> {
        self.load_with(name, wasm, limits, Capabilities::default()).await
    }

    /// [`Runtime::load`] for a deployment with `capabilities`
    /// (environment, files, outbound hosts, models).
    pub async fn load_with(&self, name: &str, wasm: &[u8], limits: Limits, capabilities: Capabilities) -> Result<Deployment, Error> {
        self.load_compiling(name, wasm, limits, capabilities, |runtime, wasm| {
            let compiled = Component::new(&runtime.inner.engine, wasm);
            return_freed_memory();
            compiled.map(Compiled).map_err(|e| Error::InvalidComponent(chain(&e)))
        })
        .await
    }

    /// [`Runtime::load_with`], compiling the component (pre-initialised
    /// when it exports an init function) with `compile`: through a cache
    /// of compiled artifacts, for example, which calls [`Runtime::compile`]
    /// only for a component it has not seen.
    pub async fn load_compiling<C, E>(&self, name: &str, wasm: &[u8], limits: Limits, capabilities: Capabilities, compile: C) -> Result<Deployment, E>
    where
        C: FnOnce(&Runtime, &[u8]) -> Result<Compiled, E> + Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let runtime = self.clone();
        let (wasm, memory, caps) = (wasm.to_vec(), limits.clone(), capabilities.clone());
        let compiled = tokio::task::spawn_blocking(move || -> Result<Compiled, E> {
            let wasm = runtime.preinitialize(&wasm, &memory, &caps)?.unwrap_or(wasm);
            compile(&runtime, &wasm)
        })
        .await
        .map_err(|e| Error::Engine(format!("compile task failed: {e}")))??;
        let deployment = self.deployment(name, &compiled, limits, capabilities)?;
        deployment.check().await?;
        deployment.warm().await?;
        Ok(deployment)
    }

    /// When `wasm` exports an init function, runs it once (with the
    /// capabilities' environment, files and models, without network) and
    /// returns the snapshotted component; `None` when there is nothing to
    /// run. Blocking: call it from a blocking thread inside a tokio runtime.
    pub fn preinitialize(&self, wasm: &[u8], limits: &Limits, capabilities: &Capabilities) -> Result<Option<Vec<u8>>, Error> {
        check_header(wasm)?;
        limits.validate(self.max_limits())?;
        capabilities.validate()?;
        let no_network = Capabilities { outbound: Vec::new(), ..capabilities.clone() };
        match preinit::init_export(wasm)? {
            Some(init_func) => preinit::snapshot(self, wasm, init_func, limits, &no_network).map(Some),
            None => Ok(None),
        }
    }

    /// Checks that `wasm` is a well-formed, valid component, without
    /// compiling it: what a deploy checks before it builds or stores
    /// anything. (Compiling checks again, with this engine's exact features.)
    pub fn validate(&self, wasm: &[u8]) -> Result<(), Error> {
        check_header(wasm)?;
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
            .validate_all(wasm)
            .map(drop)
            .map_err(|e| Error::InvalidComponent(e.to_string()))
    }

    /// A store for one instance: WASI context, memory limit, and an epoch
    /// callback that yields every tick and stops the guest after `cpu_ms`.
    pub(crate) fn new_store(
        &self,
        memory_bytes: usize,
        cpu_ms: u64,
        capabilities: &Capabilities,
        shared: &SharedCapabilities,
    ) -> Result<Store<RequestState>, String> {
        let state = RequestState::new(memory_bytes, cpu_ms, capabilities, shared, &self.inner.models)?;
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            if ctx.data_mut().cpu.tick() {
                return Ok(UpdateDeadline::Interrupt);
            }
            Ok(UpdateDeadline::Yield(1))
        });
        Ok(store)
    }

    /// The node's model cache, shared by every deployment.
    pub fn models(&self) -> &Models {
        &self.inner.models
    }

    pub(crate) fn linker(&self) -> &Linker<RequestState> {
        &self.inner.linker
    }

    /// Instances running now (requests' and deploy checks').
    pub fn instances_running(&self) -> u32 {
        self.inner.pool.max_instances.saturating_sub(self.inner.instances.available_permits() as u32)
    }

    /// Instances that may be live at once over all deployments.
    pub fn pool_size(&self) -> u32 {
        self.inner.pool.max_instances
    }

    /// Waits until it is time to answer a request that `arrived` and is
    /// refused: the [refusal delay](RuntimeBuilder::refusal_delay) after
    /// its arrival and up to half of it again, varying from call to call
    /// (refusals paced by a fixed delay would keep a storm's clients in
    /// step, each wave of retries arriving at once, ahead of other
    /// tenants' requests). With no delay it returns at once.
    pub async fn pause_refusal(&self, arrived: std::time::Instant) {
        let delay = self.inner.refusal_delay;
        if delay.is_zero() {
            return;
        }
        // The clock's nanoseconds vary enough between calls to spread them.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let pause = delay + delay.mul_f64(f64::from(nanos.wrapping_mul(2_654_435_761) >> 22) / 2048.0);
        tokio::time::sleep_until(tokio::time::Instant::from_std(arrived) + pause).await;
    }

    /// The highest limits a deployment may ask for.
    pub fn max_limits(&self) -> &Limits {
        &self.inner.ceilings
    }

    /// `tenant`'s share of the instance pool.
    pub(crate) fn tenant_share(&self, tenant: &str) -> Arc<TenantShare> {
        let mut tenants = self.inner.tenants.lock().unwrap();
        let per_tenant = self.inner.per_tenant;
        let new = || Arc::new(TenantShare {
            permits: Arc::new(Semaphore::new(per_tenant as usize)),
            size: AtomicU32::new(per_tenant),
            slow_bodies: AtomicU32::new(0),
        });
        tenants.entry(tenant.to_string()).or_insert_with(new).clone()
    }

    /// Sets how many instances `tenant`'s deployments may hold at once
    /// (at most the pool's size); `None` restores the node's
    /// [`max_instances_per_tenant`](RuntimeBuilder::max_instances_per_tenant).
    /// A lower number takes effect as running instances end: no request
    /// is stopped for it. Call it within a tokio runtime.
    pub fn set_tenant_instances(&self, tenant: &str, instances: Option<u32>) {
        let share = self.tenant_share(tenant);
        let size = instances.unwrap_or(self.inner.per_tenant).clamp(1, self.inner.pool.max_instances);
        let before = share.size.swap(size, Ordering::SeqCst);
        if size > before {
            share.permits.add_permits((size - before) as usize);
        } else if size < before {
            // Free permits go now; the rest as the instances holding them end.
            let fewer = (before - size) as usize;
            let owed = fewer - share.permits.forget_permits(fewer);
            if owed > 0 {
                let permits = share.permits.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = permits.acquire_many_owned(owed as u32).await {
                        permits.forget();
                    }
                });
            }
        }
    }


    /// Compiles `wasm` ahead of time into the bytes of an artifact, for
    /// [`Runtime::deserialize_file`] (by this engine, or one with the same
    /// [`compatibility_key`](Runtime::compatibility_key)).
    pub fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, Error> {
        check_header(wasm)?;
        let artifact = self.inner.engine.precompile_component(wasm);
        return_freed_memory();
        artifact.map_err(|e| Error::InvalidComponent(chain(&e)))
    }

    /// Identifies what this engine's compiled artifacts are compatible
    /// with (wasmtime version, target, settings): a cache of artifacts keyed
    /// by it is never loaded by an engine that cannot run them.
    pub fn compatibility_key(&self) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.inner.engine.precompile_compatibility_hash().hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }

    /// Maps an artifact [`Runtime::compile`] wrote to `path`.
    ///
    /// # Safety
    ///
    /// The file must hold bytes produced by [`Runtime::compile`] of an
    /// engine with this [`compatibility_key`](Runtime::compatibility_key),
    /// unchanged (check a digest recorded when it was written), and must
    /// not be modified while the result lives: it is mapped and its code
    /// run as is. (wasmtime refuses artifacts of another engine, but cannot
    /// tell a tampered one from a good one.)
    pub unsafe fn deserialize_file(&self, path: &Path) -> Result<Compiled, Error> {
        // SAFETY: the caller's contract above is wasmtime's.
        unsafe { Component::deserialize_file(&self.inner.engine, path) }.map(Compiled).map_err(|e| Error::InvalidComponent(chain(&e)))
    }

    /// Links a compiled component into a deployment called `name`, under
    /// `limits` and with `capabilities`: checks that every import is
    /// provided and that it exports the HTTP handler. Call
    /// [`Deployment::check`] before serving it to catch a component that
    /// cannot start.
    pub fn deployment(&self, name: &str, compiled: &Compiled, limits: Limits, capabilities: Capabilities) -> Result<Deployment, Error> {
        limits.validate(self.max_limits())?;
        capabilities.validate()?;
        let instance_pre = self.inner.linker.instantiate_pre(&compiled.0).map_err(|e| Error::UnsupportedImport(chain(&e)))?;
        Deployment::new(self, name, instance_pre, limits, capabilities)
    }
}

/// Rejects bytes that are not a WebAssembly component, naming what they
/// are; the first 8 bytes are enough.
pub fn check_header(wasm: &[u8]) -> Result<(), Error> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(Error::NotWasm);
    }
    match wasm[4..8] {
        [1, 0, 0, 0] => Err(Error::CoreModule),
        [0x0d, 0, 1, 0] => Ok(()),
        _ => Err(Error::InvalidComponent(format!(
            "unknown WebAssembly version/layer bytes {:02x?}",
            &wasm[4..8]
        ))),
    }
}

/// Compiling a big component allocates and frees hundreds of MiB (a 13 MB
/// JavaScript component: 230 MiB), which glibc's allocator keeps for
/// reuse; give it back to the system once compilation is done.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}
