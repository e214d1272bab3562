//! Inference for guests through `wasi:nn`: the host API ([`host`]), the
//! models a deployment may load and the node-wide cache that shares them
//! ([`models`]), and the batching scheduler in front of each loaded graph
//! ([`batch`]). The tensor engine itself is the `gpuwasm-tensor` crate.

mod batch;
pub(crate) mod host;
mod models;

pub use batch::{BatchSettings, InferenceMemory, ModelStatus};
pub use models::{CatalogError, LocalModels, ModelAccess, ModelCatalog, ModelEntry, Models, PUBLIC, read_model_files};
