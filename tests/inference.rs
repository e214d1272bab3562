//! Inference end to end: a real server, models pushed with the real CLI,
//! the embeddings example answering over HTTP, compared with
//! sentence-transformers' embeddings and called by the official `openai`
//! Python client; wasi-nn errors as guests see them.

mod support;
#[path = "test_models.rs"]
mod test_models;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use support::{Server, get, python, send, stdout_of};
use test_models::model_path;

fn manifest(example: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/{example}/gpuwasm.toml"))
}

/// A server with MiniLM pushed as `minilm` and the embeddings example deployed.
fn embeddings_server(dir: &tempfile::TempDir, flags: &[&str]) -> Server {
    let server = Server::start_with(&dir.path().join("data"), flags);
    let minilm = model_path("minilm");
    let pushed = stdout_of(&server.cli(&["model", "push", "minilm", minilm.to_str().unwrap()]));
    assert!(pushed.contains("pushed model minilm (safetensors): BERT encoder, 6 layers, dimension 384"), "{pushed}");
    server.deploy("embeddings", "embeddings", &["--manifest", manifest("embeddings").to_str().unwrap()]);
    server
}

async fn embed(server: &Server, body: Value) -> (u16, Value) {
    embed_on(server, "embeddings", body.to_string()).await
}

/// Sends `body` to `/v1/embeddings` of `deployment` (default tenant).
async fn embed_on(server: &Server, deployment: &str, body: String) -> (u16, Value) {
    let url = format!("{}/default/{deployment}/v1/embeddings", server.url);
    let reply = send("POST", &url, &[("content-type", "application/json")], body).await;
    (reply.status, serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("not JSON: {}", reply.body)))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("an array of numbers").iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[tokio::test]
async fn embeddings_over_http_match_sentence_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &[]);
    let fixture: Value = serde_json::from_str(include_str!("fixtures/minilm-embeddings.json")).unwrap();
    let sentences = fixture["sentences"].clone();
    let (status, reply) = embed(&server, json!({"model": "minilm", "input": sentences})).await;
    assert_eq!(status, 200, "{reply}");
    let data = reply["data"].as_array().unwrap();
    assert_eq!(data.len(), fixture["sentences"].as_array().unwrap().len());
    for (i, (item, reference)) in data.iter().zip(fixture["embeddings"].as_array().unwrap()).enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["object"], "embedding");
        let c = cosine(&floats(&item["embedding"]), &floats(reference));
        assert!(c >= 0.999, "sentence {i}: cosine {c}");
    }
    assert_eq!(reply["model"], "minilm");
    let tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 52 * 3 && reply["usage"]["total_tokens"] == tokens, "{}", reply["usage"]);

    // One string, and base64 (little-endian f32) giving the same vector.
    let (_, float) = embed(&server, json!({"model": "minilm", "input": "hello world"})).await;
    let (_, b64) = embed(&server, json!({"model": "minilm", "input": "hello world", "encoding_format": "base64"})).await;
    let bytes = base64_decode(b64["data"][0]["embedding"].as_str().unwrap());
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(decoded, floats(&float["data"][0]["embedding"]));
    assert_eq!(float["usage"]["prompt_tokens"], 4, "[CLS] hello world [SEP]");

    let models: Value = serde_json::from_str(&get(&format!("{}/default/embeddings/v1/models", server.url)).await.body).unwrap();
    assert_eq!(models["data"][0]["id"], "minilm");
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    } as u32;
    let mut out = Vec::new();
    for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
        let n = chunk.iter().enumerate().fold(0, |n, (i, &c)| n | value(c) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[tokio::test]
async fn embedding_requests_with_bad_input_get_openai_style_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &[]);
    for (body, status, want) in [
        (json!({"model": "nope", "input": "x"}), 404, "model_not_found"),
        (json!({"model": "minilm", "input": []}), 400, "must not be empty"),
        (json!({"model": "minilm", "input": [1, 2, 3]}), 400, "token arrays are not supported"),
        (json!({"model": "minilm", "input": "x", "encoding_format": "int8"}), 400, "float or base64"),
        (json!({"model": "minilm", "input": "x", "dimensions": 128}), 400, "cannot shorten"),
        (json!({"input": "x"}), 400, "missing field `model`"),
    ] {
        let (got, reply) = embed(&server, body.clone()).await;
        assert_eq!(got, status, "{body}: {reply}");
        assert!(reply["error"].to_string().contains(want), "{body}: {reply}");
    }
}

/// The JavaScript template that calls a model (`gpuwasm new js-embeddings`,
/// built by componentize-js, wasi-nn through its WIT bindings) answers as
/// the Rust example does: the same vectors to the bit, the same token
/// counts, the same statuses and error codes for bad requests.
#[tokio::test]
async fn the_javascript_embeddings_template_answers_as_the_rust_example_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &[]);
    let project = dir.path().join("js-embed");
    let out = support::gpuwasm().args(["new", "js-embeddings", "js-embed", "--dir"]).arg(&project).output().unwrap();
    assert!(out.status.success(), "gpuwasm new: {}", String::from_utf8_lossy(&out.stderr));
    let out = support::gpuwasm().arg("build").arg(&project).output().unwrap();
    assert!(out.status.success(), "gpuwasm build: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let out = server.cli(&["deploy", project.to_str().unwrap()]);
    assert!(out.status.success(), "deploy: {}", String::from_utf8_lossy(&out.stderr));

    let fixture: Value = serde_json::from_str(include_str!("fixtures/minilm-embeddings.json")).unwrap();
    let requests = [
        json!({"model": "minilm", "input": fixture["sentences"]}),
        json!({"model": "minilm", "input": "hello world", "encoding_format": "base64"}),
        json!({"model": "minilm", "input": ["héllo wörld ✓", ""], "dimensions": 384}),
    ];
    for body in requests {
        let (rust_status, rust) = embed_on(&server, "embeddings", body.to_string()).await;
        let (js_status, js) = embed_on(&server, "js-embed", body.to_string()).await;
        assert_eq!((rust_status, js_status), (200, 200), "{body}:\nrust {rust}\njs {js}");
        assert_eq!(js["usage"], rust["usage"], "{body}");
        assert_eq!(js["model"], "minilm");
        let (rust_data, js_data) = (rust["data"].as_array().unwrap(), js["data"].as_array().unwrap());
        assert_eq!(js_data.len(), rust_data.len(), "{body}");
        for (r, j) in rust_data.iter().zip(js_data) {
            assert_eq!((&j["index"], &j["object"]), (&r["index"], &r["object"]));
            match &r["embedding"] {
                // JavaScript prints an f32 as the f64 it widens to: the same
                // number once read back as f32.
                Value::Array(_) => assert_eq!(floats(&j["embedding"]), floats(&r["embedding"]), "{body}"),
                base64 => assert_eq!(&j["embedding"], base64, "{body}"),
            }
        }
    }

    for body in [
        json!({"model": "nope", "input": "x"}).to_string(),
        json!({"model": "minilm", "input": []}).to_string(),
        json!({"model": "minilm", "input": [1, 2, 3]}).to_string(),
        json!({"model": "minilm", "input": "x", "encoding_format": "int8"}).to_string(),
        json!({"model": "minilm", "input": "x", "dimensions": 128}).to_string(),
        json!({"model": "minilm", "input": "a\u{0}b"}).to_string(),
        json!({"input": "x"}).to_string(),
        "{not json".to_string(),
    ] {
        let (rust_status, rust) = embed_on(&server, "embeddings", body.clone()).await;
        let (js_status, js) = embed_on(&server, "js-embed", body.clone()).await;
        assert!(rust_status >= 400, "{body}: {rust}");
        assert_eq!(js_status, rust_status, "{body}:\nrust {rust}\njs {js}");
        assert_eq!((&js["error"]["type"], &js["error"]["code"]), (&rust["error"]["type"], &rust["error"]["code"]), "{body}:\n{rust}\n{js}");
    }
    let models = |name: &str| format!("{}/default/{name}/v1/models", server.url);
    let (rust, js) = (get(&models("embeddings")).await, get(&models("js-embed")).await);
    assert_eq!((js.status, serde_json::from_str::<Value>(&js.body).unwrap()), (rust.status, serde_json::from_str::<Value>(&rust.body).unwrap()));
}

#[tokio::test]
async fn the_official_openai_python_client_works_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &[]);
    let script = r#"
import sys
from openai import OpenAI, NotFoundError
client = OpenAI(base_url=sys.argv[1], api_key="unused")
r = client.embeddings.create(model="minilm", input=["hello world", "the quick brown fox"])
assert len(r.data) == 2 and len(r.data[0].embedding) == 384, r
assert r.usage.prompt_tokens == 10, r.usage
f = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
assert max(abs(a - b) for a, b in zip(f.data[0].embedding, r.data[0].embedding)) < 1e-6
assert [m.id for m in client.models.list()] == ["minilm"]
try:
    client.embeddings.create(model="gpt-4", input="x")
    raise SystemExit("expected NotFoundError")
except NotFoundError:
    pass
print("openai client ok")
"#;
    let out = python().args(["-c", script, &format!("{}/default/embeddings/v1", server.url)]).output().expect("running python");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("openai client ok"));
}

/// Deploys the nn-probe guest as `name` for `token`'s tenant with `allow`.
fn deploy_probe(server: &Server, token: &str, name: &str, allow: &[&str], dir: &Path) {
    let manifest = dir.join(format!("{name}.toml"));
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(&manifest, format!("[models]\nallow = [{}]\nfrom_bytes = true\n", allow.join(", "))).unwrap();
    let wasm = support::wasm("nn_probe");
    let out = support::gpuwasm()
        .args(["deploy", wasm.to_str().unwrap(), "--name", name, "--manifest", manifest.to_str().unwrap()])
        .env("GPUWASM_SERVER", &server.url)
        .env("GPUWASM_TOKEN", token)
        .output()
        .unwrap();
    stdout_of(&out);
}

#[tokio::test]
async fn models_are_tenant_scoped_public_models_are_shared_and_manifests_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let minilm = model_path("minilm");
    let minilm = minilm.to_str().unwrap();
    stdout_of(&server.cli(&["model", "push", "minilm", minilm]));
    let created = stdout_of(&server.cli(&["tenant", "create", "acme"]));
    let acme = created.lines().find_map(|l| l.strip_prefix("token (shown only once): ")).unwrap().trim().to_string();
    deploy_probe(&server, support::TOKEN, "probe", &["minilm"], dir.path());
    deploy_probe(&server, support::TOKEN, "closed", &[], dir.path());
    deploy_probe(&server, &acme, "probe", &["minilm"], dir.path());
    let probe = |tenant: &str, name: &str, path: &str| format!("{}/{tenant}/{name}{path}", server.url);

    assert_eq!(get(&probe("default", "probe", "/embed?minilm")).await.body, "ok tokens 4");
    // Not on the manifest's allow-list: denied, even though it exists.
    let denied = get(&probe("default", "closed", "/load?minilm")).await.body;
    assert!(denied.starts_with("error security: model 'minilm' is not allowed"), "{denied}");
    // Another tenant's private model does not exist for acme.
    let hidden = get(&probe("acme", "probe", "/load?minilm")).await.body;
    assert!(hidden.starts_with("error not-found:"), "{hidden}");
    // Tenants cannot push public models; the admin can, and then acme loads it.
    let refused = support::gpuwasm()
        .args(["model", "push", "public/minilm", minilm])
        .env("GPUWASM_SERVER", &server.url)
        .env("GPUWASM_TOKEN", &acme)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("public models need an admin token"));
    stdout_of(&server.cli(&["model", "push", "public/minilm", minilm]));
    assert_eq!(get(&probe("acme", "probe", "/embed?minilm")).await.body, "ok tokens 4");
    let listed = support::gpuwasm().args(["model", "list"]).env("GPUWASM_SERVER", &server.url).env("GPUWASM_TOKEN", &acme).output().unwrap();
    let listed = stdout_of(&listed);
    assert!(listed.contains("public/minilm") && !listed.lines().any(|l| l.starts_with("minilm ")), "{listed}");

    // Removing the admin's private model leaves the public one for everyone.
    stdout_of(&server.cli(&["model", "rm", "minilm"]));
    assert_eq!(get(&probe("default", "probe", "/embed?minilm")).await.body, "ok tokens 4");
    let missing = get(&probe("default", "probe", "/load?other")).await.body;
    assert!(missing.starts_with("error security:"), "not allowed comes before not found: {missing}");
}

/// A graph built from the guest's own bytes (wasi-nn `load`) needs the
/// manifest's `[models] from_bytes = true`, and counts against the
/// request's memory limit with the tensors it holds: with 15 MiB of
/// tensors held it fits a 16 MiB limit, with 16 MiB it does not.
#[tokio::test]
async fn graphs_from_bytes_need_the_manifest_and_count_against_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    for (name, manifest) in [("closed", "[models]\nallow = []\n"), ("open", "[limits]\nmemory_mb = 16\n[models]\nfrom_bytes = true\n")] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, manifest).unwrap();
        server.deploy(name, "nn_probe", &["--manifest", path.to_str().unwrap()]);
    }
    let url = |name: &str, path: &str| format!("{}/default/{name}{path}", server.url);
    let refused = get(&url("closed", "/onnx-bytes")).await.body;
    assert!(refused.starts_with("error security: this deployment may not load graphs from bytes"), "{refused}");
    assert_eq!(get(&url("open", "/onnx-bytes")).await.body, "ok 10 probabilities summing to 1.000");
    assert_eq!(get(&url("open", "/hoard-then-onnx?15")).await.body, "ok loaded");
    let full = get(&url("open", "/hoard-then-onnx?16")).await.body;
    assert!(
        full.starts_with("error too-large: the graph: wasi-nn tensors and graphs held by this request would take 16793"),
        "{full}"
    );
    assert!(full.ends_with("over its memory limit of 16777216 bytes"), "{full}");
    // A loaded graph stays charged after it is dropped (a context could
    // keep its weights alive): loading again and again runs out.
    let looped = get(&url("open", "/hoard-then-onnx-loop?15")).await.body;
    assert!(looped.starts_with("ok after ") && looped.contains("TooLarge") && looped.contains("over its memory limit"), "{looped}");
    let loads: usize = looped["ok after ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!((1..200).contains(&loads), "{looped}");

    // Usage records hold the graphs' bytes (written within about a second).
    let graph_bytes = |deployment: &str| -> Vec<u64> {
        let mut all = Vec::new();
        for file in std::fs::read_dir(server.data_dir.join("usage")).into_iter().flatten().flatten() {
            if file.file_name().to_string_lossy().starts_with("requests-") {
                for line in std::fs::read_to_string(file.path()).unwrap().lines() {
                    let record: Value = serde_json::from_str(line).unwrap();
                    if record["deployment"] == deployment {
                        all.push(record["graph_bytes"].as_u64().unwrap());
                    }
                }
            }
        }
        all
    };
    let start = std::time::Instant::now();
    while graph_bytes("open").len() < 4 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "usage records never came: {:?}", graph_bytes("open"));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let open = graph_bytes("open");
    assert!(open.iter().filter(|&&b| b > 0).count() >= 3, "onnx-bytes, hoard 15 and the loop held graphs: {open:?}");
    assert_eq!(graph_bytes("closed"), vec![0], "its load was refused");
}

#[tokio::test]
async fn bad_tensors_get_invalid_argument_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    stdout_of(&server.cli(&["model", "push", "minilm", model_path("minilm").to_str().unwrap()]));
    deploy_probe(&server, support::TOKEN, "probe", &["minilm", "absent"], dir.path());
    let probe = |path: &str| format!("{}/default/probe{path}", server.url);
    for (path, want) in [
        ("/wrong-type?minilm", "error invalid-argument: invalid input: `text` must be a U8 tensor of UTF-8, not FP32"),
        ("/wrong-size?minilm", "error invalid-argument: input \"text\": invalid input: dimensions [4, 4] of U8 need 16 bytes, the data has 3"),
        ("/wrong-name?minilm", "error invalid-argument: invalid input: unknown input \"words\""),
        ("/load?absent", "error not-found: no model named 'absent'"),
        ("/onnx-garbage", "error invalid-encoding: invalid model: onnx:"),
        ("/onnx-bytes", "ok 10 probabilities summing to 1.000"),
    ] {
        let body = get(&probe(path)).await.body;
        assert!(body.starts_with(want), "{path}: {body}");
    }
    // Errors name what the graph takes.
    assert!(get(&probe("/wrong-type?minilm")).await.body.contains("the graph takes BERT encoder"));
}

#[tokio::test]
async fn corrupt_truncated_and_hostile_model_files_fail_the_push_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let minilm = model_path("minilm");
    // A MiniLM directory with its weights cut in half.
    let truncated = dir.path().join("truncated");
    std::fs::create_dir(&truncated).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(minilm.join(f), truncated.join(f)).unwrap();
    }
    let weights = std::fs::read(minilm.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    // A safetensors header claiming a 2^60-element tensor.
    let hostile = dir.path().join("hostile");
    std::fs::create_dir(&hostile).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(minilm.join(f), hostile.join(f)).unwrap();
    }
    let header = r#"{"embeddings.word_embeddings.weight":{"dtype":"F32","shape":[1073741824,1073741824],"data_offsets":[0,16]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&[0; 16]);
    std::fs::write(hostile.join("model.safetensors"), file).unwrap();
    // A GGUF file claiming 2^62 tensors, and an ONNX file of noise.
    let gguf = dir.path().join("huge.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend((1u64 << 62).to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    std::fs::write(&gguf, bytes).unwrap();
    let onnx = dir.path().join("noise.onnx");
    std::fs::write(&onnx, (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>()).unwrap();

    for (name, path, want) in [
        ("truncated", &truncated, "do not hold shape"),
        ("hostile", &hostile, "do not hold shape [1073741824, 1073741824]"),
        ("huge", &gguf, "tensor count 4611686018427387904 cannot fit"),
        ("noise", &onnx, "invalid model: onnx:"),
    ] {
        let out = server.cli(&["model", "push", name, path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want) && stderr.contains("invalid_model"), "{name}: {stderr}");
    }
    // Nothing was recorded, and the server still works.
    assert!(stdout_of(&server.cli(&["model", "list"])).contains("no models"));
    stdout_of(&server.cli(&["model", "push", "minilm", minilm.to_str().unwrap()]));
    let listed = stdout_of(&server.cli(&["model", "list", "--json"]));
    assert!(listed.contains("\"name\": \"minilm\""), "{listed}");
}

async fn loaded(server: &Server) -> Value {
    let reply = send("GET", &format!("{}/_gpuwasm/v1/models/minilm", server.url), &[("authorization", &format!("Bearer {}", support::TOKEN))], "").await;
    serde_json::from_str::<Value>(&reply.body).unwrap()["loaded"].clone()
}

#[tokio::test]
async fn idle_models_are_evicted_and_load_again_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &["--model-idle-secs", "1"]);
    assert!(loaded(&server).await.is_null(), "models load lazily");
    let (status, _) = embed(&server, json!({"model": "minilm", "input": "first"})).await;
    assert_eq!(status, 200);
    assert_eq!(loaded(&server).await["calls"], 1);
    let start = std::time::Instant::now();
    while !loaded(&server).await.is_null() {
        assert!(start.elapsed().as_secs() < 15, "the idle model was never evicted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (status, reply) = embed(&server, json!({"model": "minilm", "input": "again"})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(loaded(&server).await["calls"], 1, "a fresh load counts from zero");
}

/// The embeddings example's manifest with `models` settings added.
fn manifest_with(dir: &tempfile::TempDir, name: &str, models: &str) -> String {
    let base = std::fs::read_to_string(manifest("embeddings")).unwrap().replace("name = \"embeddings\"", &format!("name = \"{name}\""));
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, format!("{base}{models}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// `[models] warm`: the model loads when the deployment deploys and stays
/// resident past the node's idle timeout for as long as the deployment
/// is active; removed, the model is evicted like any other. A per-model
/// `idle_timeout_s` keeps a model past the node's timeout too. Both show
/// in `model list --resident`. Warm names must be allowed models that load.
#[tokio::test]
async fn warm_models_stay_resident_past_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &["--model-idle-secs", "1"]);
    let warm = manifest_with(&dir, "pinned", "warm = [\"minilm\"]");
    server.deploy("pinned", "embeddings", &["--manifest", &warm]);
    assert_eq!(loaded(&server).await["calls"], 0, "loaded at deploy, before any request");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(loaded(&server).await["calls"], 0, "a warm model outlives the 1 s idle timeout");
    let listed = stdout_of(&server.cli(&["model", "list", "--resident"]));
    assert!(listed.contains("kept warm by 1 deployment"), "{listed}");
    let (status, reply) = embed(&server, json!({"model": "minilm", "input": "warm already"})).await;
    assert_eq!((status, loaded(&server).await["calls"].as_u64()), (200, Some(1)), "{reply}");

    // Removed, the deployment lets go: the model is evicted when idle.
    stdout_of(&server.cli(&["rm", "pinned"]));
    let start = std::time::Instant::now();
    while !loaded(&server).await.is_null() {
        assert!(start.elapsed().as_secs() < 15, "the model was never evicted after its warm deployment went");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // An idle timeout of an hour for this model, on a node of 1 s.
    let patient = manifest_with(&dir, "patient", "idle_timeout_s = { minilm = 3600 }");
    server.deploy("patient", "embeddings", &["--manifest", &patient]);
    assert!(loaded(&server).await.is_null(), "not warm: loaded on first use");
    let (status, reply) = embed_on(&server, "patient", json!({"model": "minilm", "input": "hello"}).to_string()).await;
    assert_eq!(status, 200, "{reply}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(loaded(&server).await["calls"], 1, "kept past the node's idle timeout");
    let listed: Value = serde_json::from_str(&stdout_of(&server.cli(&["model", "list", "--resident", "--json"]))).unwrap();
    assert_eq!((listed["models"][0]["idle_timeout_s"].as_u64(), listed["models"][0]["warm"].as_u64()), (Some(3600), Some(0)), "{listed}");

    // Warm names are checked: allowed, and loadable.
    let wrong = manifest_with(&dir, "wrong", "warm = [\"other\"]");
    let out = server.cli(&["deploy", support::wasm("embeddings").to_str().unwrap(), "--name", "wrong", "--manifest", &wrong]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`models.warm`: 'other' is not in `models.allow`"), "{out:?}");
    let ghost = manifest_with(&dir, "ghost", "");
    let text = std::fs::read_to_string(&ghost).unwrap().replace("allow = [\"minilm\"]", "allow = [\"ghost\"]\nwarm = [\"ghost\"]");
    std::fs::write(&ghost, text).unwrap();
    let out = server.cli(&["deploy", support::wasm("embeddings").to_str().unwrap(), "--name", "ghost", "--manifest", &ghost]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("'ghost', kept warm by [models] warm, could not be loaded: no model named 'ghost'"), "{stderr}");
}

#[tokio::test]
async fn concurrent_requests_share_one_loaded_model_and_are_batched() {
    let dir = tempfile::tempdir().unwrap();
    let server = embeddings_server(&dir, &[]);
    let requests = (0..48).map(|i| {
        let url = format!("{}/default/embeddings/v1/embeddings", server.url);
        let body = json!({"model": "minilm", "input": format!("sentence number {i} about batching")}).to_string();
        tokio::spawn(async move { send("POST", &url, &[], body).await })
    });
    for reply in futures_join(requests).await {
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let status = loaded(&server).await;
    assert_eq!(status["calls"], 48);
    assert!(status["largest_batch"].as_u64().unwrap() > 1, "no call was batched with another: {status}");
    assert!(status["batches"].as_u64().unwrap() < 48, "{status}");
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn the_onnx_classifier_matches_onnxruntime_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx");
    let pushed = stdout_of(&server.cli(&["model", "push", "digits", model.to_str().unwrap()]));
    assert!(pushed.contains("pushed model digits (onnx): ONNX graph of 15 nodes"), "{pushed}");
    server.deploy("classify", "classify", &["--manifest", manifest("classify").to_str().unwrap()]);
    let reference: Value = serde_json::from_str(include_str!("fixtures/digits-reference.json")).unwrap();
    let url = format!("{}/default/classify/classify", server.url);
    let reply = send("POST", &url, &[], json!({"images": reference["images"]}).to_string()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let predictions: Value = serde_json::from_str(&reply.body).unwrap();
    let predictions = predictions["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 64);
    let mut correct = 0;
    for (i, (p, want)) in predictions.iter().zip(reference["probabilities"].as_array().unwrap()).enumerate() {
        let (got, want) = (floats(&p["probabilities"]), floats(want));
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "digit {i}: differs from onnxruntime by {diff}");
        correct += (p["digit"] == reference["labels"][i]) as usize;
    }
    assert!(correct >= 56, "{correct}/64");
    // One bad image: a clear 400.
    let bad = send("POST", &url, &[], json!({"images": [[1, 2, 3]]}).to_string()).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
}

#[tokio::test]
async fn run_serves_local_models_named_on_the_command_line() {
    let minilm = model_path("minilm");
    let mut child = support::gpuwasm()
        .arg("run")
        .arg(support::wasm("nn_probe"))
        .args(["--listen", "127.0.0.1:0", "--model"])
        .arg(format!("minilm={}", minilm.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("gpuwasm listening on ").unwrap().to_string();
    let embedded = get(&format!("{url}/embed?minilm")).await.body;
    let other = get(&format!("{url}/load?other")).await.body;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(embedded, "ok tokens 4");
    assert!(other.starts_with("error security:"), "{other}");
    // A bad flag is a clear error.
    let out = support::gpuwasm().args(["run", "x.wasm", "--model", "minilm"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model \"minilm\": use NAME=PATH"), "{out:?}");
}
