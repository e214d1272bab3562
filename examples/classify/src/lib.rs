//! Handwritten digit recognition with an ONNX model through wasi-nn.
//!
//! `POST /classify` with `{"images": [[64 pixel values 0-16], ...]}` (8x8
//! images, row by row, as scikit-learn's digits dataset has them) answers
//! `{"predictions": [{"digit": 3, "probabilities": [...10 values]}, ...]}`.
//! The model is `digits` from the registry (examples/classify/make-model.py
//! makes it).

use gpuwasm_guest::nn::{Graph, Tensor};
use gpuwasm_guest::{Request, Response};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Classify {
    images: Vec<Vec<f32>>,
}

fn error(status: u16, message: &str) -> Response {
    Response::json(status, json!({"error": message}).to_string())
}

fn handle(request: Request) -> Response {
    if request.path() != "/classify" {
        return error(404, "POST /classify with {\"images\": [[64 pixels], ...]}");
    }
    if request.method() != "POST" {
        return error(405, "use POST");
    }
    let body = match request.body() {
        Ok(body) => body,
        Err(e) => return error(400, &format!("reading the body: {e}")),
    };
    let input: Classify = match serde_json::from_slice(&body) {
        Ok(input) => input,
        Err(e) => return error(400, &format!("invalid JSON: {e}")),
    };
    if input.images.is_empty() || input.images.iter().any(|i| i.len() != 64) {
        return error(400, "each image is 64 pixel values (8x8, row by row)");
    }
    let n = input.images.len() as u32;
    let pixels = Tensor::f32(&[n, 1, 8, 8], &input.images.concat());
    let result = Graph::load_by_name("digits").and_then(|model| {
        let outputs = model.compute(&[("pixels", pixels)])?;
        outputs.get("probabilities")?.to_f32()
    });
    let probabilities = match result {
        Ok(p) => p,
        Err(e) if e.code == "invalid-argument" => return error(400, &e.to_string()),
        Err(e) => return error(500, &e.to_string()),
    };
    let predictions: Vec<_> = probabilities
        .chunks_exact(10)
        .map(|p| {
            let digit = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(d, _)| d);
            json!({"digit": digit, "probabilities": p})
        })
        .collect();
    Response::json(200, json!({ "predictions": predictions }).to_string())
}

gpuwasm_guest::export!(handle);
