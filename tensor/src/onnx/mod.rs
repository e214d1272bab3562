//! ONNX graphs on the CPU: a checked decoder of the model file and an
//! interpreter for the operators small networks use (see [`OPERATORS`]).
//!
//! Loading decodes every node, attribute and initializer, checks each
//! initializer's data against its dimensions, that every node's inputs are
//! defined before use, and that every operator is supported; a model that
//! loads only fails at run time on inputs that do not fit its declared
//! inputs (names, element types, ranks, fixed dimensions) or on shapes
//! its operators reject.

mod ops;
mod proto;

use crate::backend::{Array, Pass, SharedBackend};
use crate::budget::Budget;
use crate::error::{Error, invalid_input, invalid_model};
use crate::model::Graph;
use crate::tensor::{Data, Tensor, element_count};
use proto::Fields;
use std::collections::{HashMap, HashSet};

pub use ops::OPERATORS;

/// An attribute value.
#[derive(Debug, Clone)]
pub(crate) enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Str(String),
    Tensor(Tensor),
}

/// One operator application.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: HashMap<String, Attr>,
}

/// A declared graph input: name, element type and dimensions (`None` for
/// symbolic ones).
#[derive(Debug, Clone)]
struct Input {
    name: String,
    elem: i64,
    dims: Option<Vec<Option<usize>>>,
}

/// A loaded ONNX model, on one backend.
pub struct Model {
    inputs: Vec<Input>,
    outputs: Vec<String>,
    initializers: HashMap<String, Tensor>,
    nodes: Vec<Node>,
    backend: SharedBackend,
    /// Initializers that are the right-hand side of products, on the
    /// backend's device once (empty on the CPU, which reads them in place).
    prepared: HashMap<String, Array>,
}

const FLOAT: i64 = 1;
const INT32: i64 = 6;
const INT64: i64 = 7;
const DOUBLE: i64 = 11;

fn elem_name(elem: i64) -> &'static str {
    match elem {
        FLOAT => "FP32",
        INT32 => "I32",
        INT64 => "I64",
        DOUBLE => "FP64",
        _ => "another type",
    }
}

/// Decodes a `TensorProto`.
fn tensor(bytes: &[u8]) -> Result<(String, Tensor), Error> {
    let (mut dims, mut name, mut elem) = (Vec::new(), String::new(), 0);
    let (mut raw, mut floats, mut ints) = (None, Vec::new(), Vec::new());
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field()? {
        match field {
            1 => v.push_ints(&mut dims)?,
            2 => elem = v.int()?,
            4 => v.push_floats(&mut floats)?,
            5 | 7 => v.push_ints(&mut ints)?,
            8 => name = v.string()?,
            9 => raw = Some(v.bytes()?),
            13 | 14 => return Err(Error::Unsupported(format!("onnx: tensor {name:?} keeps its data in an external file"))),
            _ => {}
        }
    }
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| invalid_model(format!("onnx: tensor {name:?} has dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let count = element_count(&shape).ok_or_else(|| invalid_model(format!("onnx: tensor {name:?} dimensions overflow")))?;
    let size = match elem {
        FLOAT | INT32 => 4,
        INT64 | DOUBLE => 8,
        other => return Err(Error::Unsupported(format!("onnx: tensor {name:?} has element type {other}"))),
    };
    let mismatch = |have: usize| {
        invalid_model(format!("onnx: tensor {name:?} of dimensions {shape:?} holds {have} elements, not {count}"))
    };
    let data = match raw {
        Some(raw) => {
            if count.checked_mul(size) != Some(raw.len()) {
                return Err(mismatch(raw.len() / size));
            }
            match elem {
                FLOAT => Data::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
                DOUBLE => Data::F32(raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect()),
                INT32 => Data::I64(raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
                _ => Data::I64(raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            }
        }
        None if elem == FLOAT => {
            if floats.len() != count {
                return Err(mismatch(floats.len()));
            }
            Data::F32(floats)
        }
        None if elem == INT32 || elem == INT64 => {
            if ints.len() != count {
                return Err(mismatch(ints.len()));
            }
            Data::I64(ints)
        }
        None => return Err(Error::Unsupported(format!("onnx: tensor {name:?} stores doubles outside raw_data"))),
    };
    Ok((name, Tensor::new(shape, data).map_err(|e| invalid_model(e.to_string()))?))
}

fn attribute(bytes: &[u8]) -> Result<(String, Attr), Error> {
    let (mut name, mut kind) = (String::new(), 0);
    let (mut f32v, mut intv, mut s, mut t) = (None, None, None, None);
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field()? {
        match field {
            1 => name = v.string()?,
            2 => {
                let mut one = Vec::new();
                v.push_floats(&mut one)?;
                f32v = one.first().copied();
            }
            3 => intv = Some(v.int()?),
            4 => s = Some(v.string()?),
            5 => t = Some(tensor(v.bytes()?)?.1),
            7 => v.push_floats(&mut floats)?,
            8 => v.push_ints(&mut ints)?,
            20 => kind = v.int()?,
            _ => {}
        }
    }
    let attr = match kind {
        1 => Attr::Float(f32v.unwrap_or(0.0)),
        2 => Attr::Int(intv.unwrap_or(0)),
        3 => Attr::Str(s.unwrap_or_default()),
        4 => Attr::Tensor(t.ok_or_else(|| invalid_model(format!("onnx: attribute {name:?} has no tensor")))?),
        6 => Attr::Floats(floats),
        7 => Attr::Ints(ints),
        other => return Err(Error::Unsupported(format!("onnx: attribute {name:?} of type {other}"))),
    };
    Ok((name, attr))
}

fn node(bytes: &[u8]) -> Result<Node, Error> {
    let mut node = Node { op: String::new(), inputs: Vec::new(), outputs: Vec::new(), attrs: HashMap::new() };
    let mut domain = String::new();
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field()? {
        match field {
            1 => node.inputs.push(v.string()?),
            2 => node.outputs.push(v.string()?),
            4 => node.op = v.string()?,
            5 => {
                let (name, attr) = attribute(v.bytes()?)?;
                node.attrs.insert(name, attr);
            }
            7 => domain = v.string()?,
            _ => {}
        }
    }
    if !domain.is_empty() && domain != "ai.onnx" {
        return Err(Error::Unsupported(format!("onnx: operator {}::{} (only the default domain)", domain, node.op)));
    }
    Ok(node)
}

/// Decodes a `ValueInfoProto` as a graph input.
fn value_info(bytes: &[u8]) -> Result<Input, Error> {
    let mut input = Input { name: String::new(), elem: 0, dims: None };
    let mut f = Fields::new(bytes);
    while let Some((field, v)) = f.next_field()? {
        match field {
            1 => input.name = v.string()?,
            2 => {
                let mut ty = Fields::new(v.bytes()?);
                while let Some((1, tensor_type)) = ty.next_field()? {
                    let mut tt = Fields::new(tensor_type.bytes()?);
                    while let Some((field, v)) = tt.next_field()? {
                        match field {
                            1 => input.elem = v.int()?,
                            2 => {
                                let mut dims = Vec::new();
                                let mut shape = Fields::new(v.bytes()?);
                                while let Some((1, dim)) = shape.next_field()? {
                                    let mut size = None;
                                    let mut d = Fields::new(dim.bytes()?);
                                    while let Some((field, v)) = d.next_field()? {
                                        if field == 1 {
                                            size = usize::try_from(v.int()?).ok();
                                        }
                                    }
                                    dims.push(size);
                                }
                                input.dims = Some(dims);
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(input)
}

impl Model {
    /// Decodes and checks an ONNX model file, to run on `backend`.
    pub fn load(bytes: &[u8], backend: SharedBackend) -> Result<Model, Error> {
        let mut graph = None;
        let mut opset = None;
        let mut f = Fields::new(bytes);
        while let Some((field, v)) = f.next_field()? {
            match field {
                7 => graph = Some(v.bytes()?),
                8 => {
                    let (mut domain, mut version) = (String::new(), 0);
                    let mut o = Fields::new(v.bytes()?);
                    while let Some((field, v)) = o.next_field()? {
                        match field {
                            1 => domain = v.string()?,
                            2 => version = v.int()?,
                            _ => {}
                        }
                    }
                    if domain.is_empty() || domain == "ai.onnx" {
                        opset = Some(version);
                    }
                }
                _ => {}
            }
        }
        let graph = graph.ok_or_else(|| invalid_model("onnx: no graph (is this an ONNX model file?)"))?;
        if opset.is_none_or(|v| v < 7) {
            return Err(Error::Unsupported(format!("onnx: opset {opset:?} (7 and later are supported)")));
        }
        let mut model =
            Model { inputs: Vec::new(), outputs: Vec::new(), initializers: HashMap::new(), nodes: Vec::new(), backend, prepared: HashMap::new() };
        let mut f = Fields::new(graph);
        while let Some((field, v)) = f.next_field()? {
            match field {
                1 => model.nodes.push(node(v.bytes()?)?),
                5 => {
                    let (name, t) = tensor(v.bytes()?)?;
                    model.initializers.insert(name, t);
                }
                11 => model.inputs.push(value_info(v.bytes()?)?),
                12 => model.outputs.push(value_info(v.bytes()?)?.name),
                _ => {}
            }
        }
        model.inputs.retain(|i| !model.initializers.contains_key(&i.name));
        model.check()?;
        model.prepare()?;
        Ok(model)
    }

    /// Puts the right-hand sides of products that are initializers on the
    /// backend's device, once (nothing to do on the CPU).
    fn prepare(&mut self) -> Result<(), Error> {
        if self.backend.info().kind == crate::backend::DeviceKind::Cpu {
            return Ok(());
        }
        for node in &self.nodes {
            // As stored: `[k, n]`, or `[n, k]` for a Gemm's transposed B.
            let Some(name) = node.inputs.get(1).filter(|_| matches!(node.op.as_str(), "MatMul" | "Gemm")) else { continue };
            let Some(t) = self.initializers.get(name) else { continue };
            let (Data::F32(values), [rows, cols]) = (t.data(), t.shape()) else { continue };
            if !self.prepared.contains_key(name) {
                let array = self.backend.upload(vec![1, *rows, *cols], values.clone())?;
                self.prepared.insert(name.clone(), array);
            }
        }
        Ok(())
    }

    /// Every node's operator is supported and its inputs are defined
    /// before it; every graph output is produced.
    fn check(&self) -> Result<(), Error> {
        if self.nodes.is_empty() || self.outputs.is_empty() {
            return Err(invalid_model("onnx: the graph has no nodes or no outputs"));
        }
        let mut defined: HashSet<&str> = self.initializers.keys().map(String::as_str).collect();
        defined.extend(self.inputs.iter().map(|i| i.name.as_str()));
        for node in &self.nodes {
            if !OPERATORS.contains(&node.op.as_str()) {
                return Err(Error::Unsupported(format!("onnx: operator {} (supported: {})", node.op, OPERATORS.join(", "))));
            }
            if let Some(missing) = node.inputs.iter().find(|i| !i.is_empty() && !defined.contains(i.as_str())) {
                return Err(invalid_model(format!("onnx: {} node reads {missing:?} before anything defines it", node.op)));
            }
            defined.extend(node.outputs.iter().map(String::as_str));
        }
        match self.outputs.iter().find(|o| !defined.contains(o.as_str())) {
            Some(missing) => Err(invalid_model(format!("onnx: graph output {missing:?} is never computed"))),
            None => Ok(()),
        }
    }

    /// Checks `given` against the declared inputs.
    fn check_inputs(&self, given: &HashMap<String, Tensor>) -> Result<(), Error> {
        for name in given.keys() {
            if !self.inputs.iter().any(|i| &i.name == name) {
                return Err(invalid_input(format!("unknown input {name:?}: the graph takes {}", self.signature())));
            }
        }
        for input in &self.inputs {
            let t = given.get(&input.name).ok_or_else(|| invalid_input(format!("missing input {:?}: the graph takes {}", input.name, self.signature())))?;
            let type_ok = match t.data() {
                Data::F32(_) => matches!(input.elem, FLOAT | DOUBLE),
                Data::I64(_) => matches!(input.elem, INT32 | INT64),
                Data::U8(_) => false,
            };
            if !type_ok {
                return Err(invalid_input(format!("input {:?} must be {}, not {}", input.name, elem_name(input.elem), t.data().type_name())));
            }
            if let Some(dims) = &input.dims {
                let fits = dims.len() == t.shape().len() && dims.iter().zip(t.shape()).all(|(d, s)| d.is_none_or(|d| d == *s));
                if !fits {
                    return Err(invalid_input(format!("input {:?} must have dimensions {}, not {:?}", input.name, dims_text(dims), t.shape())));
                }
            }
        }
        Ok(())
    }
}

impl Model {
    /// Runs each request alone, each under its share of `budget`.
    fn each(&self, requests: Vec<Vec<(String, Tensor)>>, budget: &Budget) -> Vec<Result<Vec<(String, Tensor)>, Error>> {
        let n = requests.len();
        requests.into_iter().map(|inputs| self.run(inputs, &budget.share(n))).collect()
    }

    /// Runs the graph once on zeros at its declared input shapes, every
    /// symbolic dimension at 1 (an input of any shape as `[1]`): the
    /// smallest run its declared shapes allow. Fails with
    /// [`Error::TooLarge`] when even that does not fit `budget`, and with
    /// [`Error::Unsupported`] for attributes no input could make work;
    /// other failures depend on the real inputs and pass.
    pub fn smallest_run(&self, budget: &Budget) -> Result<(), Error> {
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for input in &self.inputs {
            let shape: Vec<usize> = match &input.dims {
                Some(dims) => dims.iter().map(|d| d.unwrap_or(1)).collect(),
                None => vec![1],
            };
            let integers = matches!(input.elem, INT32 | INT64);
            // Checked before allocating; `run` then holds the inputs' room.
            drop(budget.reserve_tensor(&shape, if integers { 8 } else { 4 }, || format!("input {:?}", input.name))?);
            let n = element_count(&shape).expect("the reservation checked the size");
            let data = if integers { Data::I64(vec![0; n]) } else { Data::F32(vec![0.0; n]) };
            inputs.push((input.name.clone(), Tensor::new(shape, data)?));
        }
        match self.run(inputs, budget) {
            Ok(_) | Err(Error::InvalidInput(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The requests' inputs concatenated along the first dimension, and
    /// each request's row count; `None` when they cannot be merged.
    fn merge(&self, requests: &[Vec<(String, Tensor)>]) -> Option<(Vec<(String, Tensor)>, Vec<usize>)> {
        let batch_first = self.inputs.iter().all(|i| i.dims.as_ref().is_some_and(|d| d.first() == Some(&None)));
        if requests.len() < 2 || !batch_first {
            return None;
        }
        let first = &requests[0];
        let mut merged = Vec::new();
        for (name, t) in first {
            let mut data = Vec::new();
            let mut rows = 0;
            for request in requests {
                let (_, other) = request.iter().find(|(n, _)| n == name)?;
                let (Data::F32(v), [n, rest @ ..]) = (other.data(), other.shape()) else { return None };
                if request.len() != first.len() || rest != &t.shape()[1..] {
                    return None;
                }
                data.extend_from_slice(v);
                rows += n;
            }
            let mut shape = t.shape().to_vec();
            shape[0] = rows;
            merged.push((name.clone(), Tensor::new(shape, Data::F32(data)).ok()?));
        }
        let rows = requests.iter().map(|r| r[0].1.shape()[0]).collect();
        Some((merged, rows))
    }
}

/// Splits merged outputs back into per-request outputs by rows.
fn split_rows(outputs: Vec<(String, Tensor)>, rows: &[usize]) -> Option<Vec<Result<Vec<(String, Tensor)>, Error>>> {
    let total: usize = rows.iter().sum();
    let mut results: Vec<Vec<(String, Tensor)>> = vec![Vec::new(); rows.len()];
    for (name, t) in outputs {
        let (Data::F32(v), [n, rest @ ..]) = (t.data(), t.shape()) else { return None };
        if *n != total {
            return None;
        }
        let width: usize = rest.iter().product();
        let mut at = 0;
        for (result, &r) in results.iter_mut().zip(rows) {
            let mut shape = vec![r];
            shape.extend_from_slice(rest);
            result.push((name.clone(), Tensor::new(shape, Data::F32(v[at * width..(at + r) * width].to_vec())).ok()?));
            at += r;
        }
    }
    Some(results.into_iter().map(Ok).collect())
}

fn dims_text(dims: &[Option<usize>]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.map_or("?".into(), |d| d.to_string())).collect();
    format!("[{}]", parts.join(", "))
}

impl Graph for Model {
    fn signature(&self) -> String {
        let inputs: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{} ({} {})", i.name, elem_name(i.elem), i.dims.as_deref().map_or("any shape".into(), dims_text)))
            .collect();
        format!("ONNX graph of {} nodes: {} -> {}", self.nodes.len(), inputs.join(", "), self.outputs.join(", "))
    }

    fn device(&self) -> &crate::backend::DeviceInfo {
        self.backend.info()
    }

    /// The initializers on the device (on the CPU, where they are read in
    /// place, all of them).
    fn resident_bytes(&self) -> u64 {
        match self.prepared.is_empty() {
            true => self.initializers.values().map(Tensor::memory_bytes).sum(),
            false => self.prepared.values().map(|a| a.len() as u64 * 4).sum(),
        }
    }

    /// Calls whose inputs differ only in their first (symbolic, batch)
    /// dimension run as one pass over the rows of all of them; when that
    /// pass fails (one call's input is bad, or the merged pass does not
    /// fit the budget), each call runs alone.
    fn run_batch(&self, requests: Vec<Vec<(String, Tensor)>>, budget: &Budget) -> Vec<Result<Vec<(String, Tensor)>, Error>> {
        // The merged inputs are a copy of every request's: they count too.
        let bytes: u64 = requests.iter().flatten().map(|(_, t)| t.memory_bytes()).sum();
        let merged = match budget.reserve(bytes, || "the merged inputs of a batch".into()) {
            Ok(room) => self.merge(&requests).map(|m| (m, room)),
            Err(_) => None,
        };
        let Some(((merged, rows), _room)) = merged else { return self.each(requests, budget) };
        match self.run(merged, budget) {
            Ok(outputs) => {
                // Splitting copies the outputs once more.
                let bytes = outputs.iter().map(|(_, t)| t.memory_bytes()).sum();
                match budget.reserve(bytes, || "the split outputs of a batch".into()) {
                    Ok(_room) => split_rows(outputs, &rows).unwrap_or_else(|| self.each(requests, budget)),
                    Err(e) => requests.iter().map(|_| Err(e.clone())).collect(),
                }
            }
            Err(_) => self.each(requests, budget),
        }
    }

    fn run(&self, inputs: Vec<(String, Tensor)>, budget: &Budget) -> Result<Vec<(String, Tensor)>, Error> {
        let given: HashMap<String, Tensor> = inputs.into_iter().collect();
        self.check_inputs(&given)?;
        // Inputs and outputs stay until the pass ends, and so do their reservations.
        let mut alloc = ops::Alloc::new(budget);
        let compute = ops::Compute { pass: Pass::new(self.backend.as_ref(), budget), prepared: &self.prepared };
        for t in given.values() {
            alloc.like(t)?;
        }
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        for node in &self.nodes {
            let args: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|name| {
                    if name.is_empty() {
                        None
                    } else {
                        values.get(name.as_str()).or_else(|| given.get(name)).or_else(|| self.initializers.get(name))
                    }
                })
                .collect();
            let outputs = ops::apply(node, &args, &mut alloc, &compute).map_err(|e| match e {
                Error::InvalidInput(m) => invalid_input(format!("{} node: {m}", node.op)),
                other => other,
            })?;
            for (name, t) in node.outputs.iter().zip(outputs) {
                values.insert(name.as_str(), t);
            }
        }
        self.outputs
            .iter()
            .map(|name| {
                let t = values.remove(name.as_str()).or_else(|| given.get(name).cloned()).ok_or_else(|| invalid_model(format!("output {name:?} missing")))?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}
