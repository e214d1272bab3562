//! Inference through `wasi:nn`: load a model the deployment may use,
//! compute, read the outputs.
//!
//! ```ignore
//! use gpuwasm_guest::nn::{Graph, Tensor};
//!
//! let model = Graph::load_by_name("minilm")?;          // [models] allow = ["minilm"]
//! let outputs = model.compute(&[("text", Tensor::texts(&["hello", "world"])?)])?;
//! let embeddings = outputs.get("embeddings")?.to_f32()?; // [2, 384]
//! ```
//!
//! Tensors here are plain guest-side values; they cross to the host only
//! when `compute` runs, so building and reading them is cheap.


#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({
        path: "../wit/deps/nn.wit",
        world: "ml",
        default_bindings_module: "gpuwasm_guest::nn::bindings",
    });
}

use bindings::wasi::nn::{errors, graph, inference, tensor};

pub use tensor::TensorType;

pub use crate::Error;

impl From<errors::Error> for Error {
    fn from(e: errors::Error) -> Self {
        use errors::ErrorCode as C;
        let code = match e.code() {
            C::InvalidArgument => "invalid-argument",
            C::InvalidEncoding => "invalid-encoding",
            C::Timeout => "timeout",
            C::RuntimeError => "runtime-error",
            C::UnsupportedOperation => "unsupported-operation",
            C::TooLarge => "too-large",
            C::NotFound => "not-found",
            C::Security => "security",
            C::Unknown => "unknown",
        };
        Error { code, message: e.data() }
    }
}

fn guest_error(message: impl Into<String>) -> Error {
    Error { code: "invalid-argument", message: message.into() }
}

/// A tensor: dimensions, element type and little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub dims: Vec<u32>,
    /// Element type.
    pub ty: TensorType,
    /// Row-major little-endian elements.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor from raw parts (the host checks sizes at `compute`).
    pub fn new(dims: Vec<u32>, ty: TensorType, data: Vec<u8>) -> Tensor {
        Tensor { dims, ty, data }
    }

    /// An `FP32` tensor.
    pub fn f32(dims: &[u32], values: &[f32]) -> Tensor {
        Tensor::new(dims.to_vec(), TensorType::Fp32, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An `I64` tensor.
    pub fn i64(dims: &[u32], values: &[i64]) -> Tensor {
        Tensor::new(dims.to_vec(), TensorType::I64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Texts for an encoder's `text` input: a `U8 [n, width]` tensor of
    /// UTF-8 rows padded with zero bytes (so texts cannot contain NUL).
    pub fn texts<S: AsRef<str>>(texts: &[S]) -> Result<Tensor, Error> {
        let width = texts.iter().map(|t| t.as_ref().len()).max().unwrap_or(0).max(1);
        let mut data = vec![0u8; texts.len() * width];
        for (row, text) in data.chunks_exact_mut(width).zip(texts) {
            let text = text.as_ref().as_bytes();
            if text.contains(&0) {
                return Err(guest_error("a text contains a NUL character"));
            }
            row[..text.len()].copy_from_slice(text);
        }
        Ok(Tensor::new(vec![texts.len() as u32, width as u32], TensorType::U8, data))
    }

    /// The elements as `f32`, if this is an `FP32` tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        match self.ty {
            TensorType::Fp32 => Ok(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            other => Err(guest_error(format!("tensor is {other:?}, not FP32"))),
        }
    }

    /// The elements as `i64`, if this is an `I64` tensor.
    pub fn to_i64(&self) -> Result<Vec<i64>, Error> {
        match self.ty {
            TensorType::I64 => Ok(self.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            other => Err(guest_error(format!("tensor is {other:?}, not I64"))),
        }
    }
}

/// The named outputs of one `compute`.
#[derive(Debug)]
pub struct Outputs(pub Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor, Error> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| Error {
            code: "runtime-error",
            message: format!("the graph gave no output {name:?}"),
        })
    }
}

/// A loaded model with its execution context.
pub struct Graph {
    // Field order is drop order: the context before its graph.
    context: inference::GraphExecutionContext,
    _graph: graph::Graph,
}

impl Graph {
    /// Loads a model from the registry by name: the deployment's tenant
    /// first, then `public/`. Only names in the manifest's
    /// `[models] allow` load (`security` otherwise; `not-found` when
    /// there is no such model).
    pub fn load_by_name(name: &str) -> Result<Graph, Error> {
        Graph::ready(graph::load_by_name(name)?)
    }

    /// Loads an ONNX model from its bytes (say, embedded in the component),
    /// to run on the CPU.
    pub fn load_onnx(bytes: &[u8]) -> Result<Graph, Error> {
        Graph::ready(graph::load(&[bytes.to_vec()], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Cpu)?)
    }

    /// Loads an ONNX model from its bytes to run on a GPU: the node's GPU
    /// when it has one; otherwise the CPU, or `unsupported-operation` when
    /// the deployment's manifest says `[models] target = "gpu"`.
    pub fn load_onnx_on_gpu(bytes: &[u8]) -> Result<Graph, Error> {
        Graph::ready(graph::load(&[bytes.to_vec()], graph::GraphEncoding::Onnx, graph::ExecutionTarget::Gpu)?)
    }

    fn ready(graph: graph::Graph) -> Result<Graph, Error> {
        Ok(Graph { context: graph.init_execution_context()?, _graph: graph })
    }

    /// Runs the model on named inputs. Concurrent calls from many
    /// instances are batched by the host.
    pub fn compute(&self, inputs: &[(&str, Tensor)]) -> Result<Outputs, Error> {
        let named: Vec<(String, tensor::Tensor)> = inputs
            .iter()
            .map(|(name, t)| (name.to_string(), tensor::Tensor::new(&t.dims, t.ty, &t.data)))
            .collect();
        let outputs = self.context.compute(named)?;
        Ok(Outputs(
            outputs.into_iter().map(|(name, t)| (name, Tensor { dims: t.dimensions(), ty: t.ty(), data: t.data() })).collect(),
        ))
    }
}
