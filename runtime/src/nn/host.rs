//! The host side of `wasi:nn@0.2.0-rc-2024-10-28`, generated as async
//! bindings from the vendored WIT (wit/deps/nn.wit): loading and compute
//! await the model cache and the batching scheduler, never blocking a
//! tokio worker.

use super::batch::{Batcher, Tensors};
use super::gpu::Charge;
use super::models::{LoadError, Loaded, ModelAccess, Models};
use crate::host_state::CpuBudget;
use crate::usage::Meter;
use gpuwasm_tensor::backend::{DeviceInfo, DeviceKind};
use gpuwasm_tensor::{DType, Format, Tensor};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/deps/nn.wit",
        world: "ml",
        imports: { default: async | trappable },
        with: {
            "wasi:nn/graph.graph": super::GraphResource,
            "wasi:nn/tensor.tensor": super::TensorResource,
            "wasi:nn/inference.graph-execution-context": super::ContextResource,
            "wasi:nn/errors.error": super::ErrorResource,
        },
    });
}

use generated::wasi::nn::{errors, graph, inference, tensor};
use errors::ErrorCode;
use graph::{ExecutionTarget, GraphEncoding};
use tensor::TensorType;

/// A graph a guest holds: a shared model (or one it loaded from bytes,
/// whose weights count against the request's memory limit until the
/// request ends); never a text model (`load-by-name` refuses those).
pub struct GraphResource(Arc<Loaded>);

/// The scheduler of a graph resource's model.
fn batcher(loaded: &Loaded) -> &Batcher {
    loaded.batcher().expect("graph resources hold graphs: load-by-name refuses text models")
}

/// A tensor a guest built or received.
pub struct TensorResource {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// An execution context: counts towards the graph's expected company
/// while it lives.
pub struct ContextResource(Arc<Loaded>);

impl Drop for ContextResource {
    fn drop(&mut self) {
        batcher(&self.0).contexts.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An error with its wasi-nn code and a message for the guest.
pub struct ErrorResource {
    code: ErrorCode,
    message: String,
}

/// Per-instance wasi-nn state: the node's model cache, what this
/// deployment may load (shared by its instances), and the bytes of tensor
/// data the guest holds on the host, which count against its memory limit.
pub(crate) struct NnCtx {
    pub models: Models,
    pub access: Arc<ModelAccess>,
    /// Bytes of tensors and graphs from bytes held in the resource table.
    pub held: usize,
    /// The most that may be held: the instance's memory limit.
    pub limit: usize,
    /// What a generation may do (`None`: the instance serves no request,
    /// as at pre-initialisation, and may not generate).
    pub generation: Option<GenerationLimits>,
    /// Where the request's inference is metered, when it is.
    pub meter: Option<Arc<Meter>>,
}

/// The deployment's limits on text generation, for one request.
pub(crate) struct GenerationLimits {
    /// Tokens one generation may produce.
    pub max_tokens: u32,
    /// The request's wall-clock time once it generates.
    pub stream_ms: u64,
    /// The request's deadline, which a generation moves.
    pub deadline: Arc<crate::deadline::Deadline>,
    /// Generations the request has started.
    pub started: u32,
}

impl NnCtx {
    /// Counts `bytes` more tensor data held for the guest, if they fit.
    fn hold(&mut self, bytes: usize) -> Result<(), String> {
        match self.held.checked_add(bytes).filter(|&n| n <= self.limit) {
            Some(n) => {
                self.held = n;
                Ok(())
            }
            None => Err(format!(
                "wasi-nn tensors and graphs held by this request would take {} bytes, over its memory limit of {} bytes",
                self.held.saturating_add(bytes),
                self.limit
            )),
        }
    }

    fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
    }
}

/// A device as usage records name it: `cpu`, `wgpu:NAME`, `cuda:NAME`.
pub(crate) fn device_label(device: &DeviceInfo) -> String {
    match device.kind {
        DeviceKind::Cpu => "cpu".into(),
        kind => format!("{}:{}", kind.name(), device.name),
    }
}

impl NnView<'_> {
    /// The trap that ends a request whose inference took it past its CPU
    /// time limit (classified as the CPU limit, like guest CPU).
    fn cpu_exceeded(&self) -> wasmtime::Error {
        wasmtime::Error::msg(format!("CPU time limit of {} ms reached (guest CPU plus inference)", self.cpu.limit_ms))
    }
}

/// What the generated traits are implemented on.
pub(crate) struct NnView<'a> {
    pub ctx: &'a mut NnCtx,
    pub table: &'a mut ResourceTable,
    /// The request's CPU time, which inference counts against.
    pub cpu: &'a mut CpuBudget,
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds wasi-nn to `linker`, with `view` finding the state in a store.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, HasNn>(linker, view)?;
    tensor::add_to_linker::<T, HasNn>(linker, view)?;
    inference::add_to_linker::<T, HasNn>(linker, view)?;
    errors::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

type Fallible<T> = wasmtime::Result<Result<T, Resource<ErrorResource>>>;

impl NnView<'_> {
    fn fail<T>(&mut self, code: ErrorCode, message: String) -> Fallible<T> {
        tracing::debug!(?code, %message, "wasi-nn error for the guest");
        Ok(Err(self.table.push(ErrorResource { code, message })?))
    }

    fn engine_error<T>(&mut self, err: gpuwasm_tensor::Error) -> Fallible<T> {
        let code = match err {
            gpuwasm_tensor::Error::InvalidInput(_) => ErrorCode::InvalidArgument,
            gpuwasm_tensor::Error::InvalidModel(_) => ErrorCode::InvalidEncoding,
            gpuwasm_tensor::Error::Unsupported(_) => ErrorCode::UnsupportedOperation,
            gpuwasm_tensor::Error::TooLarge(_) => ErrorCode::TooLarge,
        };
        self.fail(code, err.to_string())
    }
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builders: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> Fallible<Resource<GraphResource>> {
        let format = match encoding {
            GraphEncoding::Onnx | GraphEncoding::Autodetect => Format::Onnx,
            GraphEncoding::Ggml => {
                return self.fail(ErrorCode::UnsupportedOperation, "GGUF models load by name from the registry".into());
            }
            other => return self.fail(ErrorCode::InvalidEncoding, format!("no backend for {other:?} graphs; ONNX is supported")),
        };
        if !self.ctx.access.from_bytes {
            return self.fail(
                ErrorCode::Security,
                "this deployment may not load graphs from bytes: push the model (gpuwasm model push) and load it by name, \
                 or allow it with `[models] from_bytes = true` in gpuwasm.toml"
                    .into(),
            );
        }
        let mut builders = builders;
        let (Some(bytes), None) = (builders.pop(), builders.pop()) else {
            return self.fail(ErrorCode::InvalidArgument, "an ONNX graph is one builder: the model file's bytes".into());
        };
        let wants_gpu = match target {
            ExecutionTarget::Cpu => false,
            ExecutionTarget::Gpu => true,
            ExecutionTarget::Tpu => return self.fail(ErrorCode::UnsupportedOperation, "no TPU backend: ask for cpu or gpu".into()),
        };
        let backend = match self.ctx.models.backend(wants_gpu, self.ctx.access.target) {
            Ok(backend) => backend,
            Err(e) => return self.engine_error(e),
        };
        // The graph is the request's: its file's size counts against the
        // memory limit while it loads, its weights' bytes once loaded.
        let estimate = bytes.len();
        if let Err(why) = self.ctx.hold(estimate) {
            return self.fail(ErrorCode::TooLarge, format!("the graph: {why}"));
        }
        // On a GPU, the tenant's quota and then the device are charged the
        // file's size (about its weights') before it loads, the weights'
        // exact bytes after.
        let (models, tenant, device) = (self.ctx.models.clone(), self.ctx.access.tenant.clone(), backend.info().clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let charge = |size: u64| -> Result<Option<(Charge, Charge)>, gpuwasm_tensor::Error> {
                let quota = models.charge_tenant(&tenant, &device, size, None)?;
                Ok(models.charge_device(&device, size)?.zip(quota))
            };
            let estimate = charge(bytes.len() as u64)?;
            let graph = gpuwasm_tensor::load(format, &[("model.onnx".into(), bytes.into())].into(), backend)?;
            drop(estimate);
            let charges = charge(graph.resident_bytes())?;
            Ok::<_, gpuwasm_tensor::Error>(Loaded::unshared(graph, &models, &tenant, charges))
        })
        .await?;
        self.ctx.release(estimate);
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => return self.engine_error(err),
        };
        let held = loaded.resident_bytes() as usize;
        if let Err(why) = self.ctx.hold(held) {
            return self.fail(ErrorCode::TooLarge, format!("the graph: {why}"));
        }
        if let Some(meter) = &self.ctx.meter {
            meter.add_graph_bytes(held as u64);
        }
        // Held until the request ends, even once the graph is dropped: an
        // execution context made from it keeps its weights alive.
        Ok(Ok(self.table.push(GraphResource(Arc::new(loaded)))?))
    }

    async fn load_by_name(&mut self, name: String) -> Fallible<Resource<GraphResource>> {
        match self.ctx.models.get(&self.ctx.access, &name).await {
            Ok(loaded) if loaded.batcher().is_none() => self.fail(
                ErrorCode::UnsupportedOperation,
                format!("model '{name}' generates text: load it with gpuwasm:llm (docs/llm.md), not wasi-nn"),
            ),
            Ok(loaded) => {
                if let Some(meter) = &self.ctx.meter {
                    meter.add_model(&name);
                }
                Ok(Ok(self.table.push(GraphResource(loaded))?))
            }
            Err(LoadError::Denied(m)) => self.fail(ErrorCode::Security, m),
            Err(LoadError::NotFound(m)) => self.fail(ErrorCode::NotFound, m),
            Err(LoadError::Io(m)) => self.fail(ErrorCode::RuntimeError, format!("model '{name}': {m}")),
            Err(LoadError::Failed(e)) => self.engine_error(e),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    async fn init_execution_context(&mut self, graph: Resource<GraphResource>) -> Fallible<Resource<ContextResource>> {
        let loaded = self.table.get(&graph)?.0.clone();
        batcher(&loaded).contexts.fetch_add(1, Ordering::Relaxed);
        Ok(Ok(self.table.push(ContextResource(loaded))?))
    }

    async fn drop(&mut self, graph: Resource<GraphResource>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

fn dtype(ty: TensorType) -> DType {
    match ty {
        TensorType::Fp16 => DType::F16,
        TensorType::Fp32 => DType::F32,
        TensorType::Fp64 => DType::F64,
        TensorType::Bf16 => DType::BF16,
        TensorType::U8 => DType::U8,
        TensorType::I32 => DType::I32,
        TensorType::I64 => DType::I64,
    }
}

fn tensor_type(ty: DType) -> TensorType {
    match ty {
        DType::F16 => TensorType::Fp16,
        DType::F32 => TensorType::Fp32,
        DType::F64 => TensorType::Fp64,
        DType::BF16 => TensorType::Bf16,
        DType::U8 => TensorType::U8,
        DType::I32 => TensorType::I32,
        DType::I64 => TensorType::I64,
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        context: Resource<ContextResource>,
        inputs: Vec<(String, Resource<TensorResource>)>,
    ) -> Fallible<Vec<(String, Resource<TensorResource>)>> {
        let loaded = self.table.get(&context)?.0.clone();
        let mut tensors: Tensors = Vec::with_capacity(inputs.len());
        for (name, resource) in inputs {
            let t = self.table.delete(resource)?;
            self.ctx.release(t.data.len());
            let dims = t.dims.iter().map(|&d| d as usize).collect();
            match Tensor::from_bytes(dims, dtype(t.ty), &t.data) {
                Ok(tensor) => tensors.push((name, tensor)),
                Err(err) => {
                    let message = format!("input {name:?}: {err}; the graph takes {}", batcher(&loaded).signature());
                    return self.fail(ErrorCode::InvalidArgument, message);
                }
            }
        }
        self.ctx.models.touch(&loaded);
        if self.cpu.exceeded {
            return Err(self.cpu_exceeded());
        }
        match batcher(&loaded).compute(self.ctx.access.tenant.as_str().into(), tensors).await {
            Ok((outputs, time)) => {
                if let Some(meter) = &self.ctx.meter {
                    meter.add_inference(&device_label(loaded.device()), time);
                }
                if self.cpu.charge_inference(time) {
                    return Err(self.cpu_exceeded());
                }
                let bytes: usize = outputs.iter().map(|(_, t)| t.memory_bytes() as usize).sum();
                if let Err(why) = self.ctx.hold(bytes) {
                    return self.fail(ErrorCode::TooLarge, format!("the outputs: {why}"));
                }
                let mut named = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    let (ty, data) = tensor.to_bytes();
                    let dims = tensor.shape().iter().map(|&d| d as u32).collect();
                    named.push((name, self.table.push(TensorResource { dims, ty: tensor_type(ty), data })?));
                }
                Ok(Ok(named))
            }
            Err(err @ gpuwasm_tensor::Error::InvalidInput(_)) => {
                let message = format!("{err}; the graph takes {}", batcher(&loaded).signature());
                self.fail(ErrorCode::InvalidArgument, message)
            }
            Err(err) => self.engine_error(err),
        }
    }

    async fn drop(&mut self, context: Resource<ContextResource>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    async fn new(&mut self, dims: Vec<u32>, ty: TensorType, data: Vec<u8>) -> wasmtime::Result<Resource<TensorResource>> {
        // `new` cannot fail in wasi-nn: a guest past its limit traps.
        self.ctx.hold(data.len()).map_err(wasmtime::Error::msg)?;
        Ok(self.table.push(TensorResource { dims, ty, data })?)
    }

    async fn dimensions(&mut self, tensor: Resource<TensorResource>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dims.clone())
    }

    async fn ty(&mut self, tensor: Resource<TensorResource>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    async fn data(&mut self, tensor: Resource<TensorResource>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<TensorResource>) -> wasmtime::Result<()> {
        let t = self.table.delete(tensor)?;
        self.ctx.release(t.data.len());
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    async fn code(&mut self, error: Resource<ErrorResource>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    async fn data(&mut self, error: Resource<ErrorResource>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    async fn drop(&mut self, error: Resource<ErrorResource>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}
