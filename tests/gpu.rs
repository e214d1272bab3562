//! The GPU path end to end, on whatever GPU the machine has; in CI, Mesa's
//! lavapipe (a Vulkan device that computes on the CPU) through the wgpu
//! backend, with `serve --gpus software`. Models run where the manifest
//! says, GPU memory is a budget per device and a quota per tenant, and an
//! out-of-room load fails that request alone.
//!
//! Without a GPU backend these tests say so and do not run, unless
//! `GPUWASM_REQUIRE_BACKENDS` names `wgpu` (scripts/test.sh sets it), in
//! which case they fail.

mod support;
#[path = "test_models.rs"]
mod test_models;

use serde_json::Value;
use std::path::Path;
use support::{Server, get, stdout_of};
use test_models::model_path;

/// The GPU `serve --gpus software` would use, or `None` (said out loud).
fn gpu() -> Option<String> {
    let out = support::gpuwasm().args(["info", "--gpus", "software", "--json"]).output().unwrap();
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu = info["devices"].as_array().unwrap().iter().find(|d| d["kind"] != "cpu").map(|d| d["name"].as_str().unwrap().to_string());
    if gpu.is_none() {
        let required = std::env::var("GPUWASM_REQUIRE_BACKENDS").unwrap_or_default();
        assert!(!required.split(',').any(|k| k == "wgpu"), "GPUWASM_REQUIRE_BACKENDS names wgpu, and there is no GPU: {}", info["notes"]);
        eprintln!("gpu tests: NOT RUN: no GPU backend here ({})", info["notes"]);
    }
    gpu
}

/// Deploys nn-probe as `name` for `token` with `[models]` `allow` and `target`.
fn deploy_probe(server: &Server, token: &str, name: &str, allow: &[&str], target: &str, dir: &Path) {
    let manifest = dir.join(format!("{name}.toml"));
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(&manifest, format!("[models]\nallow = [{}]\ntarget = \"{target}\"\nfrom_bytes = true\n", allow.join(", "))).unwrap();
    let wasm = support::wasm("nn_probe");
    // On a node's first wgpu inference lavapipe compiles its shaders with
    // LLVM: with a cold Mesa shader cache (a fresh machine) that took more
    // than the default 5 s of CPU, which inference counts against.
    let args = ["deploy", wasm.to_str().unwrap(), "--name", name, "--manifest", manifest.to_str().unwrap(), "--cpu-ms", "60000"];
    stdout_of(&server.cli_as(token, &args));
}

fn resident(server: &Server, token: &str) -> Value {
    serde_json::from_str(&stdout_of(&server.cli_as(token, &["model", "list", "--resident", "--json"]))).unwrap()
}

/// A copy of MiniLM that differs in one byte of config.json (a space), so
/// it is another model to the registry, of the same size.
fn minilm_copy(dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("minilm-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(model_path("minilm")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
    }
    let config = std::fs::read_to_string(copy.join("config.json")).unwrap();
    std::fs::write(copy.join("config.json"), format!("{config} ")).unwrap();
    copy
}

#[tokio::test]
async fn models_run_where_the_manifest_says() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--gpus", "software"]);
    stdout_of(&server.cli(&["model", "push", "minilm", model_path("minilm").to_str().unwrap()]));
    deploy_probe(&server, support::TOKEN, "on-gpu", &["minilm"], "gpu", dir.path());
    deploy_probe(&server, support::TOKEN, "on-cpu", &["minilm"], "cpu", dir.path());
    let url = |name: &str, path: &str| format!("{}/default/{name}{path}", server.url);

    assert_eq!(get(&url("on-gpu", "/embed?minilm")).await.body, "ok tokens 4");
    assert_eq!(get(&url("on-cpu", "/embed?minilm")).await.body, "ok tokens 4");
    // Graphs from bytes load and run under either target.
    assert_eq!(get(&url("on-gpu", "/onnx-bytes-gpu")).await.body, "ok 10 probabilities summing to 1.000");
    assert_eq!(get(&url("on-cpu", "/onnx-bytes-gpu")).await.body, "ok 10 probabilities summing to 1.000");

    // The same weights are resident twice: on the GPU, charged to the
    // tenant, and on the CPU.
    let listed = resident(&server, support::TOKEN);
    let models = listed["models"].as_array().unwrap();
    let on = |device: &str| models.iter().find(|m| m["device"] == device && m["names"][0] == "default/minilm");
    let on_gpu = on(&gpu).unwrap_or_else(|| panic!("minilm is not on {gpu}: {listed}"));
    assert_eq!(on_gpu["tenants"], serde_json::json!(["default"]));
    let bytes = on_gpu["bytes"].as_u64().unwrap();
    assert!((80 << 20..100 << 20).contains(&bytes), "MiniLM's f32 weights are about 87 MiB, not {bytes}");
    assert!(on("cpu").is_some(), "{listed}");
    let device = listed["devices"].as_array().unwrap().iter().find(|d| d["device"] == gpu.as_str()).unwrap();
    assert_eq!(device["used_bytes"].as_u64().unwrap(), bytes, "{listed}");
    let text = stdout_of(&server.cli(&["model", "list", "--resident"]));
    assert!(text.contains(&format!("GPU {gpu}: models hold")) && text.contains("tenants: default"), "{text}");

    // A node without a GPU refuses a GPU-only deployment's models, clearly.
    drop(server);
    let server = Server::start_with(&dir.path().join("data"), &["--gpus", "none"]);
    let refused = get(&format!("{}/default/on-gpu/embed?minilm", server.url)).await.body;
    assert!(refused.starts_with("error unsupported-operation: unsupported: this deployment runs its models on a GPU"), "{refused}");
    assert_eq!(get(&format!("{}/default/on-cpu/embed?minilm", server.url)).await.body, "ok tokens 4");
}

#[tokio::test]
async fn gpu_memory_quotas_budgets_and_eviction() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Room for one MiniLM (about 87 MiB) on the device, not two.
    let server = Server::start_with(&dir.path().join("data"), &["--gpus", "software", "--gpu-memory-mb", "150"]);
    let minilm = model_path("minilm");
    stdout_of(&server.cli(&["model", "push", "public/minilm", minilm.to_str().unwrap()]));
    stdout_of(&server.cli(&["model", "push", "public/other", minilm_copy(dir.path()).to_str().unwrap()]));
    let acme = server.tenant("acme").await;
    deploy_probe(&server, support::TOKEN, "probe", &["minilm", "other"], "gpu", dir.path());
    deploy_probe(&server, &acme, "probe", &["minilm", "other"], "gpu", dir.path());
    let probe = |tenant: &str, path: &str| format!("{}/{tenant}/probe{path}", server.url);

    // acme's quota is smaller than the model: its load fails with a clear
    // error before anything is loaded or evicted for it, and does not
    // disturb the default tenant.
    let set = stdout_of(&server.cli(&["tenant", "gpu", "acme", "--memory-mb", "50"]));
    assert!(set.contains("tenant acme: GPU 50 MiB, weight 1"), "{set}");
    let refused = get(&probe("acme", "/embed?minilm")).await.body;
    assert!(refused.starts_with("error too-large: too large: tenant 'acme' holds 0.0 of its 50.0 MiB of GPU memory"), "{refused}");
    assert_eq!(resident(&server, support::TOKEN)["models"], serde_json::json!([]), "nothing loaded for a refused tenant");
    assert_eq!(get(&probe("default", "/embed?minilm")).await.body, "ok tokens 4");
    // Setting one GPU setting keeps the other.
    let set = stdout_of(&server.cli(&["tenant", "gpu", "acme", "--weight", "3"]));
    assert!(set.contains("tenant acme: GPU 50 MiB, weight 3"), "{set}");
    // The same weights, already resident, are shared once the quota allows.
    stdout_of(&server.cli(&["tenant", "gpu", "acme", "--memory-mb", "100"]));
    assert_eq!(get(&probe("acme", "/embed?minilm")).await.body, "ok tokens 4");
    let listed = resident(&server, support::TOKEN);
    let shared = &listed["models"][0];
    assert_eq!((shared["names"][0].as_str(), shared["tenants"].clone()), (Some("public/minilm"), serde_json::json!(["acme", "default"])), "{listed}");
    // A tenant sees itself among the tenants, not others.
    let as_acme = resident(&server, &acme);
    assert_eq!(as_acme["models"][0]["tenants"], serde_json::json!(["acme"]), "{as_acme}");

    // Another model that does not fit beside the first: the idle one is
    // evicted (least recently used) to make room.
    assert_eq!(get(&probe("default", "/embed?other")).await.body, "ok tokens 4");
    let listed = resident(&server, support::TOKEN);
    let names: Vec<&str> = listed["models"].as_array().unwrap().iter().filter(|m| m["device"] == gpu.as_str()).map(|m| m["names"][0].as_str().unwrap()).collect();
    assert_eq!(names, ["public/other"], "{listed}");

    // A model larger than the device's whole budget fails that request
    // with too-large, evicting nothing for it; the server and the other
    // models carry on.
    drop(server);
    let server = Server::start_with(&dir.path().join("data"), &["--gpus", "software", "--gpu-memory-mb", "40"]);
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx");
    stdout_of(&server.cli(&["model", "push", "public/digits", digits.to_str().unwrap()]));
    deploy_probe(&server, support::TOKEN, "probe", &["minilm", "digits"], "gpu", dir.path());
    assert_eq!(get(&format!("{}/default/probe/load?digits", server.url)).await.body, "ok loaded");
    let refused = get(&format!("{}/default/probe/embed?minilm", server.url)).await.body;
    assert!(refused.starts_with(&format!("error too-large: too large: {gpu} has 40.0 of its 40.0 MiB of model memory free")), "{refused}");
    let again = get(&format!("{}/default/probe/embed?minilm", server.url)).await.body;
    assert_eq!(again, refused, "the failure is not remembered as a broken model, and is the same again");
    let listed = resident(&server, support::TOKEN);
    assert_eq!(listed["models"][0]["names"], serde_json::json!(["public/digits"]), "the idle classifier stays: {listed}");
    assert_eq!(get(&format!("{}/default/probe/onnx-bytes-gpu", server.url)).await.body, "ok 10 probabilities summing to 1.000");
}
