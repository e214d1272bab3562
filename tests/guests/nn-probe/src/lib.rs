//! Exercises wasi-nn from a guest and answers what happened, as
//! `ok ...` or `error CODE: MESSAGE`, for the inference tests.
//!
//! - `/load?NAME`: load-by-name.
//! - `/embed?NAME`: embed the text "hello world"; answers the token count.
//! - `/wrong-type?NAME`: send `text` as FP32.
//! - `/wrong-size?NAME`: a tensor whose data is shorter than its dimensions.
//! - `/wrong-name?NAME`: an input the graph does not take.
//! - `/onnx-garbage`: load bytes that are not ONNX.
//! - `/onnx-bytes`: load examples/classify/digits.onnx from bytes built
//!   into the component and classify an empty image; `/onnx-bytes-gpu`
//!   the same, asking for a GPU.
//! - `POST /embed-lines?NAME`: embed each line of the body in one call
//!   (the benchmark's wasi-nn path); answers the token count.
//! - `POST /timed-embed-lines?NAME`: as `/embed-lines`, timing the
//!   compute call with the guest's own clock; answers `compute_ns N`.
//! - `POST /zeros?NAME`: compute on the input `text`, FP32 of dimensions
//!   `[n]` (n, the body) holding zeros; answers the outputs' sizes.
//! - `POST /twice?NAME`: loads NAME once and computes on the input `text`,
//!   FP32 `[4]` of zeros, twice, `ms` (the body) apart; answers the sums
//!   of the two outputs `out` (a model replaced in between must not
//!   change what this graph computes).
//! - `POST /raw-tensor?NAME`: one tensor as tests/corpus/tensors and the
//!   `guest_tensor` fuzz target write it (byte 0 the type, byte 1 the rank
//!   mod 5, two little-endian bytes per dimension, a byte choosing the
//!   input's name, then the data), given to NAME as its input; answers
//!   the outputs' names.
//! - `/hoard`: makes 1 MiB tensors and keeps them, 1000 of them (the host
//!   holds their bytes; a request may hold no more than its memory limit).

use gpuwasm_guest::nn::{Error, Graph, Tensor, TensorType};

/// The raw wasi-nn imports: a hostile guest holds host tensors directly.
mod raw {
    wit_bindgen::generate!({ path: "../../../wit/deps/nn.wit", world: "ml" });
}
use gpuwasm_guest::{Request, Response};

fn probe(path: &str, name: &str, body: &[u8]) -> Result<String, Error> {
    let compute = |inputs: &[(&str, Tensor)]| Graph::load_by_name(name)?.compute(inputs).map(|_| ());
    match path {
        "/load" => Graph::load_by_name(name).map(|_| "loaded".into()),
        "/embed" => {
            let out = Graph::load_by_name(name)?.compute(&[("text", Tensor::texts(&["hello world"])?)])?;
            Ok(format!("tokens {}", out.get("token_counts")?.to_i64()?[0]))
        }
        "/wrong-type" => compute(&[("text", Tensor::f32(&[2], &[1.0, 2.0]))]).map(|()| "computed".into()),
        "/wrong-size" => compute(&[("text", Tensor::new(vec![4, 4], TensorType::U8, vec![65; 3]))]).map(|()| "computed".into()),
        "/wrong-name" => compute(&[("words", Tensor::texts(&["x"])?)]).map(|()| "computed".into()),
        "/embed-lines" => {
            let text = String::from_utf8_lossy(body);
            let lines: Vec<&str> = text.lines().collect();
            let out = Graph::load_by_name(name)?.compute(&[("text", Tensor::texts(&lines)?)])?;
            Ok(format!("tokens {}", out.get("token_counts")?.to_i64()?.iter().sum::<i64>()))
        }
        "/onnx-bytes" | "/onnx-bytes-gpu" => {
            let bytes = include_bytes!("../../../../examples/classify/digits.onnx");
            let model = if path == "/onnx-bytes" { Graph::load_onnx(bytes)? } else { Graph::load_onnx_on_gpu(bytes)? };
            let out = model.compute(&[("pixels", Tensor::f32(&[1, 1, 8, 8], &[0.0; 64]))])?;
            let p = out.get("probabilities")?.to_f32()?;
            Ok(format!("{} probabilities summing to {:.3}", p.len(), p.iter().sum::<f32>()))
        }
        "/onnx-garbage" => Graph::load_onnx(b"this is not a model").map(|_| "loaded".into()),
        "/hoard-then-onnx" => {
            // Holds `name` MiB of tensors, then loads a graph from bytes.
            use raw::wasi::nn::tensor;
            let chunk = vec![7u8; 1 << 20];
            let count: usize = name.parse().unwrap_or(0);
            let _kept: Vec<tensor::Tensor> = (0..count).map(|_| tensor::Tensor::new(&[1 << 20], tensor::TensorType::U8, &chunk)).collect();
            Graph::load_onnx(include_bytes!("../../../../examples/classify/digits.onnx")).map(|_| "loaded".into())
        }
        "/hoard-then-onnx-loop" => {
            // Holds `name` MiB of tensors, then loads a graph from bytes,
            // makes a context and drops both, 200 times.
            use raw::wasi::nn::tensor;
            let chunk = vec![7u8; 1 << 20];
            let count: usize = name.parse().unwrap_or(0);
            let _kept: Vec<tensor::Tensor> = (0..count).map(|_| tensor::Tensor::new(&[1 << 20], tensor::TensorType::U8, &chunk)).collect();
            let bytes = include_bytes!("../../../../examples/classify/digits.onnx");
            for i in 0..200 {
                let graph = raw::wasi::nn::graph::load(&[bytes.to_vec()], raw::wasi::nn::graph::GraphEncoding::Onnx, raw::wasi::nn::graph::ExecutionTarget::Cpu);
                match graph.and_then(|g| g.init_execution_context()) {
                    Ok(context) => drop(context),
                    Err(e) => return Ok(format!("after {i} loads: {:?}: {}", e.code(), e.data())),
                }
            }
            Ok("loaded 200 times".into())
        }
        "/hoard" => {
            use raw::wasi::nn::tensor;
            let chunk = vec![7u8; 1 << 20];
            let kept: Vec<tensor::Tensor> = (0..1000).map(|_| tensor::Tensor::new(&[1 << 20], tensor::TensorType::U8, &chunk)).collect();
            Ok(format!("kept {} tensors", kept.len()))
        }
        "/timed-embed-lines" => {
            let text = String::from_utf8_lossy(body);
            let lines: Vec<&str> = text.lines().collect();
            let (graph, input) = (Graph::load_by_name(name)?, Tensor::texts(&lines)?);
            let started = std::time::Instant::now();
            graph.compute(&[("text", input)])?;
            Ok(format!("compute_ns {}", started.elapsed().as_nanos()))
        }
        "/zeros" => {
            let n: u32 = String::from_utf8_lossy(body).trim().parse().unwrap_or(1);
            let out = Graph::load_by_name(name)?.compute(&[("text", Tensor::f32(&[n], &vec![0.0; n as usize]))])?;
            Ok(format!("{} output values", out.get("out")?.to_f32()?.len()))
        }
        "/twice" => {
            let ms: u64 = String::from_utf8_lossy(body).trim().parse().unwrap_or(0);
            let graph = Graph::load_by_name(name)?;
            let sum = || -> Result<f32, Error> {
                let out = graph.compute(&[("text", Tensor::f32(&[4], &[0.0; 4]))])?;
                Ok(out.get("out")?.to_f32()?.iter().sum())
            };
            let first = sum()?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(format!("sums {first} {}", sum()?))
        }
        "/raw-tensor" => {
            let short = || Error { code: "invalid-argument", message: "the tensor's description is cut short".into() };
            let [ty, rank, rest @ ..] = body else { return Err(short()) };
            let types = [TensorType::Fp16, TensorType::Fp32, TensorType::Fp64, TensorType::Bf16, TensorType::U8, TensorType::I32, TensorType::I64];
            let rank = (*rank % 5) as usize;
            if rest.len() < rank * 2 + 1 {
                return Err(short());
            }
            let dims = rest[..rank * 2].chunks(2).map(|d| u32::from(u16::from_le_bytes([d[0], d[1]]))).collect();
            let input = ["pixels", "text", "other"][rest[rank * 2] as usize % 3];
            let tensor = Tensor::new(dims, types[*ty as usize % types.len()], rest[rank * 2 + 1..].to_vec());
            let out = Graph::load_by_name(name)?.compute(&[(input, tensor)])?;
            Ok(format!("outputs {}", out.0.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" ")))
        }
        _ => Ok("unknown probe".into()),
    }
}

fn handle(request: Request) -> Response {
    let (name, path) = (request.query().unwrap_or_default(), request.path());
    let body = request.body().unwrap_or_default();
    match probe(&path, &name, &body) {
        Ok(what) => Response::text(200, format!("ok {what}")),
        Err(e) => Response::text(200, format!("error {}: {}", e.code, e.message)),
    }
}

gpuwasm_guest::export!(handle);
