//! Inference for guests through `wasi:nn`: the host API ([`host`]), the
//! models a deployment may load and the node-wide cache that shares them
//! ([`models`]), the batching scheduler in front of each loaded graph
//! ([`batch`]), and GPU memory and time shared between tenants ([`gpu`]). The tensor engine itself is the `gpuwasm-tensor` crate.

mod batch;
mod gpu;
pub(crate) mod host;
pub(crate) mod llm;
pub(crate) mod models;

pub use batch::{BatchSettings, GenerationStatus, InferenceMemory, ModelStatus};
pub use gpu::TenantGpu;
pub use gpuwasm_tensor::backend::{DeviceInfo, DeviceKind, Devices, Target};
pub use models::{CatalogError, LlmSettings, LocalModels, ModelAccess, ModelCatalog, ModelEntry, Models, PUBLIC, ResidentModel, read_model_files};
