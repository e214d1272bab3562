//! gpuwasm's tensor engine.
//!
//! Models arrive as bytes in one of three formats ([`Format`]) and become a
//! [`Graph`]: named tensors in, named tensors out. Loading parses and
//! checks everything up front (sizes, offsets, shapes, operators), so a
//! corrupt or hostile file fails with [`Error::InvalidModel`] before any
//! large allocation, and running a graph only fails on bad input
//! ([`Error::InvalidInput`]).
//!
//! - [`bert`]: BERT-style sentence encoders from `model.safetensors`,
//!   `config.json` and `tokenizer.json` (sentence-transformers layout):
//!   text in, pooled embeddings out.
//! - [`onnx`]: an interpreter for ONNX graphs with the operators small
//!   classifiers use.
//! - [`gguf`]: GGUF (llama.cpp) files: metadata, tensor directory and
//!   dequantisation.
//! - [`llm`]: text generation with llama-family GGUF models: the decoder,
//!   tokenizer, chat template, sampling and a continuous-batching engine.
//!
//! Models are written once over the [`backend`] seam: the CPU always, and
//! GPUs through wgpu (feature `wgpu`) and CUDA (feature `cuda`); a graph is
//! loaded onto one backend ([`load`]), which [`backend::Devices`] picks.
//!
//! Every pass runs under a [`Budget`] of host memory: buffers are reserved
//! before they are allocated, so a model whose shapes ask for more than the
//! budget fails that call with [`Error::TooLarge`] instead of exhausting
//! the host.

pub mod backend;
pub mod bert;
mod budget;
mod error;
pub mod gguf;
pub mod llm;
mod model;
pub mod onnx;
pub mod quant;
pub mod safetensors;
mod tensor;
pub mod turns;

pub use budget::{Budget, MemoryPool, Reservation};
pub use error::Error;
pub use model::{FileBytes, Format, Graph, ModelFiles, check, load, single_file};
pub use tensor::{DType, Data, Tensor};
