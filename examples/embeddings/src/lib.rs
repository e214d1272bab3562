//! OpenAI-compatible embeddings: `POST /v1/embeddings` and `GET /v1/models`,
//! computed by the host's engine through wasi-nn.
//!
//! The models served are named in the `MODELS` environment variable
//! (gpuwasm.toml `[env]`) and must be allowed under `[models]`.
//! Requests follow the OpenAI API: `input` is a string or an array of
//! strings, `encoding_format` is `float` (default) or `base64`
//! (little-endian f32, what the official clients ask for), and `usage`
//! counts the tokens the model saw.

use gpuwasm_guest::nn::{Graph, Tensor};
use gpuwasm_guest::{Request, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// Strings one request may embed (OpenAI allows 2048).
const MAX_INPUTS: usize = 2048;

fn handle(request: Request) -> Response {
    match (request.method().as_str(), request.path().as_str()) {
        ("GET", "/v1/models") => models(),
        ("POST", "/v1/embeddings") => match request.body() {
            Ok(body) => embeddings(&body).unwrap_or_else(|e| e),
            Err(e) => error(400, "invalid_request_error", None, &format!("reading the body: {e}")),
        },
        (_, "/v1/models" | "/v1/embeddings") => error(405, "invalid_request_error", None, "method not allowed"),
        _ => error(404, "invalid_request_error", None, "unknown endpoint: try POST /v1/embeddings or GET /v1/models"),
    }
}

fn served() -> Vec<String> {
    std::env::var("MODELS").unwrap_or_default().split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect()
}

fn models() -> Response {
    let data: Vec<Value> =
        served().iter().map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "gpuwasm"})).collect();
    Response::json(200, json!({"object": "list", "data": data}).to_string())
}

/// An OpenAI-style error answer.
fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Response::json(status, body.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingRequest {
    input: Value,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

fn embeddings(body: &[u8]) -> Result<Response, Response> {
    let bad = |m: &str| error(400, "invalid_request_error", None, m);
    let req: EmbeddingRequest = serde_json::from_slice(body).map_err(|e| bad(&format!("invalid JSON body: {e}")))?;
    let texts: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad("`input` must be a string or an array of strings (token arrays are not supported)")),
            })
            .collect::<Result<_, _>>()?,
        Value::Array(_) => return Err(bad("`input` must not be empty")),
        _ => return Err(bad("`input` must be a string or an array of strings")),
    };
    if texts.len() > MAX_INPUTS {
        return Err(bad(&format!("at most {MAX_INPUTS} inputs per request")));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(bad(&format!("`encoding_format` must be float or base64, not {other:?}"))),
    };
    if !served().contains(&req.model) {
        let message = format!("The model `{}` does not exist or you do not have access to it.", req.model);
        return Err(error(404, "invalid_request_error", Some("model_not_found"), &message));
    }
    let engine = |e: gpuwasm_guest::nn::Error| match e.code {
        "invalid-argument" => bad(&e.message),
        "not-found" => error(404, "invalid_request_error", Some("model_not_found"), &e.to_string()),
        _ => error(500, "server_error", None, &e.to_string()),
    };
    let graph = Graph::load_by_name(&req.model).map_err(engine)?;
    let outputs = graph.compute(&[("text", Tensor::texts(&texts).map_err(engine)?)]).map_err(engine)?;
    let vectors = outputs.get("embeddings").and_then(Tensor::to_f32).map_err(engine)?;
    let tokens: i64 = outputs.get("token_counts").and_then(Tensor::to_i64).map_err(engine)?.iter().sum();
    let dim = vectors.len() / texts.len();
    if let Some(d) = req.dimensions.filter(|&d| d != dim as u64) {
        return Err(bad(&format!("model `{}` has {dim} dimensions and cannot shorten them to {d}", req.model)));
    }
    let data: Vec<Value> = vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                Value::String(base64_encode(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(Response::json(200, body.to_string()))
}

/// Standard base64 with padding.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

gpuwasm_guest::export!(handle);
