//! The attacks from the security review (docs/security.md), each against a
//! real server on 127.0.0.1 with two tenants, acme and mallory: the server
//! survives, other tenants are answered normally, memory and disk stay
//! bounded (measured from /proc and the data directory), and the error is
//! the right one.

mod support;
#[path = "hostile.rs"]
mod hostile;
#[path = "test_models.rs"]
mod test_models;

use bytes::Bytes;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const HELLO: &str = "hello from gpuwasm! you asked for GET /\n";

/// Uploads `bytes` as a model file and pushes model `name` of `format`
/// with `token`; returns the push's (status, JSON).
async fn push_model(server: &Server, token: &str, name: &str, format: &str, bytes: Vec<u8>) -> (u16, serde_json::Value) {
    let sha = sha256(&bytes);
    let namespace = if name.starts_with("public/") { "?namespace=public" } else { "" };
    let (status, json) = server.api(token, "PUT", &format!("model-files/{sha}{namespace}"), bytes).await;
    assert_eq!(status, 201, "{json}");
    let spec = serde_json::json!({ "format": format, "files": { format!("model.{format}"): sha } });
    server.api(token, "PUT", &format!("models/{name}"), spec.to_string()).await
}

/// Deploys the nn-probe guest as `name` for `token`, allowed to load `model`.
async fn deploy_probe(server: &Server, token: &str, name: &str, model: &str) {
    let spec = serde_json::json!({ "models": [model] }).to_string();
    let bytes = std::fs::read(wasm("nn_probe")).unwrap();
    let url = format!("{}/_gpuwasm/v1/deployments/{name}", server.url);
    let reply = send("PUT", &url, &[("authorization", &format!("Bearer {token}")), ("gpuwasm-spec", &spec)], bytes).await;
    assert!(reply.status == 201 || reply.status == 200, "{}", reply.body);
}

/// Deploys `wasm_name` as `name` with `token` and query `settings`.
async fn deploy(server: &Server, token: &str, name: &str, wasm_name: &str, settings: &str) -> (u16, serde_json::Value) {
    let bytes = std::fs::read(wasm(wasm_name)).unwrap();
    server.api(token, "PUT", &format!("deployments/{name}?{settings}"), bytes).await
}

/// Another tenant's handler still answers at once.
async fn acme_is_served(server: &Server) {
    let started = Instant::now();
    let reply = get(&format!("{}/acme/hello/", server.url)).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, HELLO));
    assert!(started.elapsed() < Duration::from_secs(2), "acme waited {:?}", started.elapsed());
}

/// Starts a server with `flags`, tenants acme (with hello deployed) and
/// mallory; returns it with mallory's and acme's tokens.
async fn two_tenants(dir: &tempfile::TempDir, flags: &[&str]) -> (Server, String, String) {
    let server = Server::start_with(&dir.path().join("data"), flags);
    let (acme, mallory) = (server.tenant("acme").await, server.tenant("mallory").await);
    assert_eq!(deploy(&server, &acme, "hello", "hello", "").await.0, 201);
    (server, mallory, acme)
}

#[tokio::test]
async fn attack_1_an_onnx_model_asking_for_80_gb_never_crashes_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &[]).await;

    // The reviewed model: its smallest run already needs 37 GiB, so the
    // push is refused, naming the node.
    let (status, json) = push_model(&server, &mallory, "bomb", "onnx", hostile::broadcast_bomb()).await;
    assert_eq!(status, 400, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("too large: the Add node's output of dimensions [100000, 100000, 1] needs 37.3 GiB"), "{message}");

    // A model harmless at its smallest, 40 GB for a chosen input: pushed,
    // then every call with that input fails alone with too-large.
    let (status, json) = push_model(&server, &mallory, "sized", "onnx", hostile::input_sized_bomb()).await;
    assert_eq!(status, 201, "{json}");
    deploy_probe(&server, &mallory, "probe", "sized").await;
    let url = format!("{}/mallory/probe/zeros?sized", server.url);
    assert_eq!(send("POST", &url, &[], "1").await.body, "ok 100000 output values");
    for _ in 0..3 {
        let reply = send("POST", &url, &[], "100000").await;
        assert!(reply.body.starts_with("error too-large: too large: the Add node's output of dimensions [100000, 100000] needs 37.3 GiB"), "{}", reply.body);
        acme_is_served(&server).await;
    }
    let peak = server.peak_rss();
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    eprintln!("server peak RSS after the attack: {} MiB", peak >> 20);
}

/// Sends a raw HTTP/1.1 request and returns the status line and body.
fn raw_request(server: &Server, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(server.url.strip_prefix("http://").unwrap()).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = stream.read_to_string(&mut reply);
    reply
}

#[tokio::test]
async fn attack_2_claiming_a_host_name_never_captures_other_tenants_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, acme) = two_tenants(&dir, &["--server-name", "gpuwasm.example.net"]).await;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_lowercase();
    // A host name that is not a DNS name is refused as a host anyway.
    let hostname_is_dns = hostname.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let set = stdout_of(&server.cli(&["tenant", "domains", "acme", "Example.com"]));
    assert_eq!(set, "tenant acme may claim host names in example.com\n");
    let (status, json) = server.api(TOKEN, "PUT", "tenants/mallory/domains", r#"{"domains": ["mallory.test"]}"#).await;
    assert_eq!((status, json["domains"].clone()), (200, serde_json::json!(["mallory.test"])));
    let (status, json) = server.api(TOKEN, "PUT", "tenants/mallory/domains", r#"{"domains": ["127.0.0.1"]}"#).await;
    assert_eq!((status, json["error"]["code"].as_str()), (400, Some("invalid_domain")), "{json}");
    let (status, _) = server.api(&mallory, "PUT", "tenants/mallory/domains", r#"{"domains": ["example.com"]}"#).await;
    assert_eq!(status, 403, "a tenant cannot grant itself domains");
    let listed = stdout_of(&server.cli(&["tenant", "list"]));
    assert!(listed.lines().any(|l| l.starts_with("acme") && l.ends_with("example.com")), "{listed}");

    // The server's own names, IP literals and loopback names: never.
    let mut forbidden = vec!["127.0.0.1", "localhost", "LOCALHOST.", "app.localhost", "gpuwasm.example.net"];
    if hostname_is_dns {
        forbidden.push(hostname.as_str());
    }
    for host in forbidden {
        let (status, json) = deploy(&server, &mallory, "trap", "behaviors", &format!("host={host}")).await;
        assert_eq!(status, 403, "{host}: {json}");
        assert_eq!(json["error"]["code"], "host_not_allowed", "{host}");
    }
    let (status, json) = deploy(&server, &mallory, "trap", "behaviors", "host=[::1]").await;
    assert_eq!((status, json["error"]["code"].as_str()), (400, Some("invalid_spec")), "not even a DNS name: {json}");
    // Not even the admin may take them.
    assert_eq!(deploy(&server, TOKEN, "trap", "behaviors", "host=localhost").await.0, 403);
    // Outside mallory's domains; acme's own claim works.
    let (status, json) = deploy(&server, &mallory, "trap", "behaviors", "host=api.example.com.").await;
    assert_eq!(status, 403, "{json}");
    assert!(json["error"]["message"].as_str().unwrap().contains("outside this tenant's domains (mallory.test)"), "{json}");
    assert_eq!(deploy(&server, &acme, "api", "hello", "host=api.example.com").await.0, 201);
    // The same name spelled differently is the same name.
    for spelling in ["API.EXAMPLE.COM", "api.example.com.", "Api.Example.Com."] {
        let (status, json) = deploy(&server, TOKEN, "grab", "behaviors", &format!("host={spelling}")).await;
        assert_eq!((status, json["error"]["code"].as_str()), (409, Some("host_taken")), "{spelling}");
    }
    for host in ["api.example.com", "API.example.com.", "api.example.com.:80"] {
        let reply = send("GET", &format!("{}/x", server.url), &[("host", host)], Bytes::new()).await;
        assert_eq!(reply.body, "hello from gpuwasm! you asked for GET /x\n", "{host}");
    }
    // Path routes on the server's names still reach their deployments.
    let reply = get(&format!("{}/acme/hello/", server.url)).await;
    assert_eq!(reply.body, HELLO);
    let invoked = stdout_of(&server.cli_as(&acme, &["invoke", "hello"]));
    assert_eq!(invoked, HELLO);
    // The admin API answers on every name, a claimed one too: a claim can
    // never receive an admin token.
    let reply = send("GET", &format!("{}/_gpuwasm/v1/whoami", server.url), &[("host", "api.example.com"), ("authorization", &format!("Bearer {TOKEN}"))], Bytes::new()).await;
    assert!(reply.body.contains("\"admin\": true"), "{}", reply.body);
    // Taking a domain back stops its claims routing at once; a rollback
    // cannot bring one back either.
    assert_eq!(server.api(TOKEN, "PUT", "tenants/acme/domains", r#"{"domains": []}"#).await.0, 200);
    let reply = send("GET", &format!("{}/x", server.url), &[("host", "api.example.com")], Bytes::new()).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(deploy(&server, &acme, "api", "behaviors", "").await.0, 200);
    let (status, json) = server.api(&acme, "POST", "deployments/api/rollback", Bytes::new()).await;
    assert_eq!((status, json["error"]["code"].as_str()), (403, Some("host_not_allowed")), "{json}");
    // Two Host headers: 400, routed nowhere.
    let reply = raw_request(&server, "GET /acme/hello/ HTTP/1.1\r\nHost: api.example.com\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("more than one Host header"), "{reply}");
}

#[tokio::test]
async fn attack_3_limits_have_ceilings_and_guests_end_with_their_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &["--max-instances", "16", "--max-tenant-instances", "6"]).await;

    // Limits past the server's maxima are refused, naming the limit.
    for (settings, limit) in [("timeout_ms=18446744073709551615", "timeout_ms"), ("concurrency=1000", "concurrency"), ("cpu_ms=600001", "cpu_ms")] {
        let (status, json) = deploy(&server, &mallory, "greedy", "behaviors", settings).await;
        assert_eq!((status, json["error"]["code"].as_str()), (400, Some("invalid_limits")), "{settings}");
        assert!(json["error"]["message"].as_str().unwrap().contains(&format!("`{limit}` =")), "{json}");
    }
    let settings = "timeout_ms=600000&cpu_ms=60000&concurrency=64&queue_timeout_ms=300";
    assert_eq!(deploy(&server, &mallory, "sleepy", "behaviors", settings).await.0, 201);

    // 40 clients start sleeping requests and leave. Mallory's share (6)
    // fills; acme is served throughout.
    let authority = server.url.strip_prefix("http://").unwrap().to_string();
    let mut leaving = Vec::new();
    for _ in 0..40 {
        let mut stream = std::net::TcpStream::connect(&authority).unwrap();
        stream.write_all(b"GET /mallory/sleepy/sleep?ms=600000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        leaving.push(stream);
    }
    std::thread::sleep(Duration::from_millis(500));
    acme_is_served(&server).await;
    let busy = get(&format!("{}/mallory/sleepy/", server.url)).await;
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(busy.body.contains("already runs 6 instances, its share of this node"), "{}", busy.body);
    drop(leaving);

    // Their guests stop with them: mallory's share is free again at once.
    let started = Instant::now();
    loop {
        let reply = get(&format!("{}/mallory/sleepy/sleep?ms=1", server.url)).await;
        if reply.status == 200 {
            break;
        }
        // Each refused try takes the refusal delay (1-1.5 s).
        assert!(started.elapsed() < Duration::from_secs(5), "instances still held {:?} after the clients left: {}", started.elapsed(), reply.body);
    }

    // Endless loops whose clients left do not keep burning CPU.
    let mut loops = Vec::new();
    for _ in 0..4 {
        let mut stream = std::net::TcpStream::connect(&authority).unwrap();
        stream.write_all(b"GET /mallory/sleepy/loop HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        loops.push(stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(loops);
    std::thread::sleep(Duration::from_millis(300));
    let before = server.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let burnt = server.cpu_seconds() - before;
    assert!(burnt < 0.2, "the server used {burnt:.2} s of CPU in 1 s after the loops' clients left");
    acme_is_served(&server).await;

    // Removing a deployment ends the requests running on it (or waiting
    // for a slot). With room for one instance and one in the queue, a
    // second request's 503 shows the first one has its place.
    let settings = "timeout_ms=600000&concurrency=1&queue=1&queue_timeout_ms=300";
    assert_eq!(deploy(&server, &mallory, "single", "behaviors", settings).await.0, 201);
    let url = format!("{}/mallory/single/sleep?ms=600000", server.url);
    let running = tokio::spawn(async move { get(&url).await });
    let started = Instant::now();
    while get(&format!("{}/mallory/single/", server.url)).await.status != 503 {
        assert!(started.elapsed() < Duration::from_secs(5), "the sleeping request never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.api(&mallory, "DELETE", "deployments/single", Bytes::new()).await.0, 200);
    let ended = tokio::time::timeout(Duration::from_secs(3), running).await.expect("the request ended with its deployment").unwrap();
    assert_eq!(ended.status, 503);
    assert!(ended.body.contains("was removed while this request ran"), "{}", ended.body);
}

#[tokio::test]
async fn attack_4_model_files_cost_memory_in_proportion_to_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &["--tenant-uploads", "2"]).await;
    let idle = server.peak_rss();

    // Uploads stream to disk, at most two per tenant at once: two 64 MiB
    // uploads held open add little to the server's memory.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut sender, authority) = streaming_connection(&server).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let request = http::Request::put(format!("/_gpuwasm/v1/model-files/{}", "0".repeat(64)))
            .header("host", &authority)
            .header("authorization", format!("Bearer {mallory}"))
            .body(ChannelBody(rx))
            .unwrap();
        let response = tokio::spawn(async move { sender.send_request(request).await.unwrap() });
        for _ in 0..64 {
            tx.send(Bytes::from(vec![7u8; 1 << 20])).await.unwrap();
        }
        held.push((tx, response));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, json) = server.api(&mallory, "PUT", &format!("model-files/{}", "1".repeat(64)), "x").await;
    assert_eq!((status, json["error"]["code"].as_str()), (429, Some("too_many_uploads")), "{json}");
    let during = server.peak_rss().saturating_sub(idle);
    assert!(during < 48 << 20, "two 64 MiB uploads in flight grew the peak RSS by {} MiB", during >> 20);
    eprintln!("two 64 MiB uploads in flight grew the server's peak RSS by {} MiB", during >> 20);
    for (tx, response) in held {
        drop(tx);
        let response = response.await.unwrap();
        assert_eq!(response.status(), 400, "the hash does not match, so nothing is stored");
    }

    // 128 MB of one metadata array: parsed in place (34x its size before).
    let before = server.peak_rss();
    let file = hostile::gguf_with_u8_array(128 << 20);
    let (status, json) = push_model(&server, &mallory, "junk", "gguf", file).await;
    assert_eq!(status, 201, "{json}");
    let grown = server.peak_rss().saturating_sub(before);
    assert!(grown < 400 << 20, "the push grew the peak RSS by {} MiB", grown >> 20);
    eprintln!("a 128 MiB GGUF push grew the server's peak RSS by {} MiB", grown >> 20);

    // A failed load is remembered: the next request does not read the file
    // again (it is even gone from disk here).
    deploy_probe(&server, &mallory, "probe", "junk").await;
    let url = format!("{}/mallory/probe/load?junk", server.url);
    let first = get(&url).await.body;
    assert!(first.starts_with("error unsupported-operation"), "{first}");
    let blobs = server.data_dir.join("blobs/models/mallory");
    for blob in std::fs::read_dir(&blobs).unwrap() {
        std::fs::remove_file(blob.unwrap().path()).unwrap();
    }
    assert_eq!(get(&url).await.body, first);

    // Tensors a guest holds on the host count against its memory limit
    // (128 MiB here): 1000 tensors of 1 MiB trap the request, nothing else.
    let reply = get(&format!("{}/mallory/probe/hoard", server.url)).await;
    assert_eq!(reply.status, 500, "{}", reply.body);
    assert!(reply.body.contains("wasi-nn tensors and graphs held by this request would take"), "{}", reply.body);
    acme_is_served(&server).await;
}

/// MiniLM grown to 1 GiB in `dir`: a vocabulary of 699051 rows (its
/// tokenizer uses the first 30522; the rest are zeros, written sparse).
fn gigabyte_minilm(dir: &Path) -> std::path::PathBuf {
    const ROWS: u64 = 699_051;
    let minilm = test_models::model_path("minilm");
    let out = dir.join("big-minilm");
    std::fs::create_dir_all(out.join("1_Pooling")).unwrap();
    for name in ["tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
        std::fs::copy(minilm.join(name), out.join(name)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(minilm.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = ROWS.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    // The same tensors, the word embeddings last and taller.
    let st = std::fs::read(minilm.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let (mut new_header, mut data) = (serde_json::Map::new(), Vec::new());
    let (words, kept): (Vec<_>, Vec<_>) = header.into_iter().filter(|(name, _)| name != "__metadata__").partition(|(name, _)| name.ends_with("word_embeddings.weight"));
    for (name, info) in kept {
        let [start, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
        let at = data.len();
        data.extend_from_slice(&st[8 + header_len + start..8 + header_len + end]);
        new_header.insert(name, serde_json::json!({"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [at, data.len()]}));
    }
    let (name, _) = &words[0];
    let end = data.len() as u64 + ROWS * 384 * 4;
    new_header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": [ROWS, 384], "data_offsets": [data.len(), end]}));
    let header = serde_json::to_vec(&new_header).unwrap();
    let mut file = std::fs::File::create(out.join("model.safetensors")).unwrap();
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(&header).unwrap();
    file.write_all(&data).unwrap();
    file.set_len(8 + header.len() as u64 + end).unwrap();
    out
}

/// A 1 GiB model pushed with the CLI: streamed to disk and checked from
/// its header, the server's peak memory grows by a fixed bound, not by
/// the model's size, while the tenant's upload rate (64 MiB/s by default)
/// holds the client back; the model then serves like any other.
#[tokio::test]
async fn attack_4_a_gigabyte_model_push_takes_bounded_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &[]).await;
    let big = gigabyte_minilm(dir.path());
    let before = server.peak_rss();
    let started = Instant::now();
    let pushed = stdout_of(&server.cli_as(&mallory, &["model", "push", "big", big.to_str().unwrap()]));
    let took = started.elapsed();
    // 1 GiB at 64 MiB/s, less the 100 ms burst a tenant may start with.
    assert!(took >= Duration::from_secs(15), "a 1 GiB push took {took:?}, faster than the upload rate");
    assert!(pushed.contains("pushed model big (safetensors): BERT encoder, 6 layers, dimension 384"), "{pushed}");
    let grown = server.peak_rss().saturating_sub(before);
    eprintln!("a 1 GiB model push grew the server's peak RSS by {} MiB (from {} MiB)", grown >> 20, before >> 20);
    assert!(grown < 96 << 20, "a 1 GiB push grew the server's peak RSS by {} MiB", grown >> 20);
    deploy_probe(&server, &mallory, "probe", "big").await;
    let reply = get(&format!("{}/mallory/probe/embed?big", server.url)).await;
    assert_eq!(reply.body, "ok tokens 4", "the pushed model loads and embeds");
    acme_is_served(&server).await;
}

/// Eight pushes of one model name at once, each of other content (its
/// file uploaded first: a tenant uploads two files at a time): each is
/// answered 201 with its own record, one wins whole, and the model
/// serves that content.
#[tokio::test]
async fn concurrent_pushes_of_one_name_end_with_one_whole_version() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &[]).await;
    let mut shas = Vec::new();
    for i in 1..=8 {
        let bytes = hostile::adds(i as f32);
        shas.push(sha256(&bytes));
        assert_eq!(server.api(&mallory, "PUT", &format!("model-files/{}", shas[i - 1]), bytes).await.0, 201);
    }
    let pushes: Vec<_> = (1..=8)
        .map(|i| {
            let (server_url, token, sha) = (server.url.clone(), mallory.clone(), shas[i - 1].clone());
            tokio::spawn(async move {
                let auth = format!("Bearer {token}");
                let spec = serde_json::json!({ "format": "onnx", "files": { "model.onnx": sha } }).to_string();
                let reply = send("PUT", &format!("{server_url}/_gpuwasm/v1/models/same"), &[("authorization", &auth)], spec).await;
                assert_eq!(reply.status, 201, "{}", reply.body);
                let record: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
                assert_eq!(record["files"]["model.onnx"], sha.as_str(), "each push is answered with its own record");
                (i, sha)
            })
        })
        .collect();
    let mut pushed = Vec::new();
    for push in pushes {
        pushed.push(push.await.unwrap());
    }
    let (status, record) = server.api(&mallory, "GET", "models/same", Bytes::new()).await;
    assert_eq!(status, 200, "{record}");
    let &(winner, _) = pushed.iter().find(|(_, sha)| record["files"]["model.onnx"] == sha.as_str()).expect("the record is one of the pushes");
    deploy_probe(&server, &mallory, "probe", "same").await;
    let reply = send("POST", &format!("{}/mallory/probe/twice?same", server.url), &[], "0").await;
    let sum = 4 * winner;
    assert_eq!(reply.body, format!("ok sums {sum} {sum}"), "the model serves the winning push's weights");
    acme_is_served(&server).await;
}

/// Bytes of the files under `dir`, recursively, each inode counted once
/// (hard links share their bytes).
fn disk_usage(dir: &Path) -> u64 {
    fn walk(dir: &Path, seen: &mut std::collections::HashSet<u64>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let meta = entry.metadata().unwrap();
            total += if meta.is_dir() {
                walk(&entry.path(), seen)
            } else if seen.insert(meta.ino()) {
                meta.len()
            } else {
                0
            };
        }
        total
    }
    walk(dir, &mut Default::default())
}

#[tokio::test]
async fn attack_5_deploys_and_uploads_cannot_fill_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &["--tenant-storage-mb", "4"]).await;
    let file = vec![b'x'; 1 << 20];
    let sha = sha256(&file);
    assert_eq!(server.api(&mallory, "PUT", &format!("files/{sha}"), file).await.0, 201);
    let before = disk_usage(&server.data_dir);

    // Garbage that maps 200 paths to the file: refused before any tree is built.
    let files: serde_json::Map<String, serde_json::Value> = (0..200).map(|i| (format!("copy{i}"), sha.clone().into())).collect();
    let spec = serde_json::json!({ "files": files }).to_string();
    let url = format!("{}/_gpuwasm/v1/deployments/garbage", server.url);
    let reply = send("PUT", &url, &[("authorization", &format!("Bearer {mallory}")), ("gpuwasm-spec", &spec)], vec![0u8; 4096]).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("not_wasm"), "{}", reply.body);
    let grown = disk_usage(&server.data_dir) - before;
    assert!(grown < 64 << 10, "a refused deploy left {grown} bytes on disk");

    // A real deploy of the same 200 paths: hard links, not 200 MiB of copies.
    let bytes = std::fs::read(wasm("behaviors")).unwrap();
    let url = format!("{}/_gpuwasm/v1/deployments/files", server.url);
    let reply = send("PUT", &url, &[("authorization", &format!("Bearer {mallory}")), ("gpuwasm-spec", &spec)], bytes).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let grown = disk_usage(&server.data_dir) - before;
    assert!(grown < 4 << 20, "a deploy of 200 paths to a 1 MiB file added {} MiB", grown >> 20);
    let reply = get(&format!("{}/mallory/files/read?/copy199", server.url)).await;
    assert_eq!(reply.body.len(), 1 << 20);

    // The tenant's storage quota (4 MiB, 1 used) holds at upload time.
    let second = vec![b'y'; 7 << 19];
    let (status, json) = server.api(&mallory, "PUT", &format!("files/{}", sha256(&second)), second).await;
    assert_eq!((status, json["error"]["code"].as_str()), (413, Some("upload_too_large")), "{json}");
    assert!(json["error"]["message"].as_str().unwrap().contains("storage quota"), "{json}");
    acme_is_served(&server).await;
}

#[tokio::test]
async fn attack_5_what_nothing_refers_to_is_collected() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &["--gc-grace-secs", "1"]).await;
    // A rejected model push leaves nothing behind after the grace period.
    let noise = vec![3u8; 1 << 20];
    let (status, _) = push_model(&server, &mallory, "noise", "onnx", noise.clone()).await;
    assert_eq!(status, 400);
    let blob = server.data_dir.join(format!("blobs/models/mallory/{}", sha256(&noise)));
    assert!(blob.exists());
    let started = Instant::now();
    while blob.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "the rejected model's blob was never collected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What active deployments use stays: their component (mallory's own,
    // behaviors, which acme does not run), their files and file tree.
    let file = b"kept".to_vec();
    let sha = sha256(&file);
    assert_eq!(server.api(&mallory, "PUT", &format!("files/{sha}"), file).await.0, 201);
    let spec = serde_json::json!({ "files": { "kept.txt": sha } }).to_string();
    let url = format!("{}/_gpuwasm/v1/deployments/beh", server.url);
    let bytes = std::fs::read(wasm("behaviors")).unwrap();
    let reply = send("PUT", &url, &[("authorization", &format!("Bearer {mallory}")), ("gpuwasm-spec", &spec)], bytes.clone()).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(get(&format!("{}/mallory/beh/read?/kept.txt", server.url)).await.body, "kept");
    assert!(server.data_dir.join(format!("blobs/components/{}.wasm", sha256(&bytes))).exists());
    // Purged, it goes: component, files and compiled artifact.
    let artifacts = || std::fs::read_dir(server.data_dir.join("artifacts")).unwrap().count();
    let with_beh = artifacts();
    assert_eq!(server.api(&mallory, "DELETE", "deployments/beh?purge=true", Bytes::new()).await.0, 200);
    let started = Instant::now();
    while server.data_dir.join(format!("blobs/components/{}.wasm", sha256(&bytes))).exists() || artifacts() == with_beh {
        assert!(started.elapsed() < Duration::from_secs(10), "a purged deployment's component and artifact were never collected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!server.data_dir.join(format!("blobs/files/mallory/{sha}")).exists());
    acme_is_served(&server).await;
}

#[tokio::test]
async fn attack_6_deployments_do_not_each_hold_a_file_open() {
    let dir = tempfile::tempdir().unwrap();
    // Started under a soft limit of 256 open files, which it lifts.
    let server = Server::start_under(&dir.path().join("data"), support::Launch { flags: &["--tenant-deployments", "30"], soft_nofile: Some(256), ..Default::default() });
    let (acme, mallory) = (server.tenant("acme").await, server.tenant("mallory").await);
    assert_eq!(deploy(&server, &acme, "hello", "hello", "").await.0, 201);
    let before = server.open_fds();
    for i in 0..30 {
        assert_eq!(deploy(&server, &mallory, &format!("app{i}"), "hello", "").await.0, 201);
    }
    // Connections of the deploys may take a moment to close.
    let started = Instant::now();
    let grown = loop {
        let grown = server.open_fds() as i64 - before as i64;
        if grown < 5 || started.elapsed() > Duration::from_secs(5) {
            break grown;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(grown < 5, "30 deployments of one component opened {grown} files");
    let (status, json) = deploy(&server, &mallory, "one-too-many", "hello", "").await;
    assert_eq!((status, json["error"]["code"].as_str()), (403, Some("quota_exceeded")), "{json}");
    assert_eq!(deploy(&server, &mallory, "app3", "behaviors", "").await.0, 200, "a new version of an existing one still deploys");
    // A rollback activates a removed deployment like a deploy would: within the quota.
    assert_eq!(server.api(&mallory, "DELETE", "deployments/app0", Bytes::new()).await.0, 200);
    assert_eq!(deploy(&server, &mallory, "fresh", "hello", "").await.0, 201);
    let (status, json) = server.api(&mallory, "POST", "deployments/app0/rollback?to=1", Bytes::new()).await;
    assert_eq!((status, json["error"]["code"].as_str()), (403, Some("quota_exceeded")), "{json}");
    // Concurrent deploys of new names cannot all slip under it either.
    for i in 1..=3 {
        assert_eq!(server.api(&mallory, "DELETE", &format!("deployments/app{i}"), Bytes::new()).await.0, 200);
    }
    let racing = (0..8).map(|i| {
        let (url, token) = (server.url.clone(), mallory.clone());
        tokio::spawn(async move {
            let bytes = std::fs::read(wasm("hello")).unwrap();
            send("PUT", &format!("{url}/_gpuwasm/v1/deployments/race{i}"), &[("authorization", &format!("Bearer {token}"))], bytes).await.status
        })
    });
    let mut created = 0;
    for race in racing {
        created += (race.await.unwrap() == 201) as usize;
    }
    assert_eq!(created, 3, "3 places were free");
    let (_, listed) = server.api(&mallory, "GET", "deployments", Bytes::new()).await;
    assert_eq!(listed["deployments"].as_array().unwrap().len(), 30);
    let limit = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files = limit.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let soft_and_hard: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_ne!(soft_and_hard[0], "256", "{open_files}");
    assert_eq!(soft_and_hard[0], soft_and_hard[1], "the soft limit was raised to the hard one: {open_files}");
    acme_is_served(&server).await;
}

#[tokio::test]
async fn attack_7_bad_input_gets_the_right_error_and_nothing_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, acme) = two_tenants(&dir, &[]).await;
    let file = b"content".to_vec();
    let sha = sha256(&file);
    server.api(&mallory, "PUT", &format!("files/{sha}"), file).await;
    let data_dir = server.data_dir.to_string_lossy().to_string();
    let component = std::fs::read(wasm("behaviors")).unwrap();
    let deploy_spec = |spec: serde_json::Value| {
        let (url, token, component) = (format!("{}/_gpuwasm/v1/deployments/x", server.url), mallory.clone(), component.clone());
        async move { send("PUT", &url, &[("authorization", &format!("Bearer {token}")), ("gpuwasm-spec", &spec.to_string())], component).await }
    };
    for (spec, code, want) in [
        (serde_json::json!({"files": {"a": sha, "a/b": sha}}), "invalid_files", "file path \\\"a\\\" is also the folder of \\\"a/b\\\""),
        (serde_json::json!({"files": {"x".repeat(300): sha}}), "invalid_files", "names at most 255 bytes"),
        (serde_json::json!({"sandbox": {"env": {"A": "x\u{0}y"}}}), "invalid_spec", "environment variable A: the value contains a NUL byte"),
    ] {
        let reply = deploy_spec(spec).await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert!(reply.body.contains(code) && reply.body.contains(want), "{}", reply.body);
        assert!(!reply.body.contains(&data_dir), "a server path leaked: {}", reply.body);
    }
    let (status, json) = server.api(&mallory, "PUT", "models/Bad_Name", "{}").await;
    assert_eq!(status, 400);
    assert!(json["error"]["message"].as_str().unwrap().starts_with("invalid model name \"Bad_Name\""), "{json}");

    // A chunked body over a small limit: a clean 413, not a 200 cut off.
    assert_eq!(deploy(&server, &mallory, "echo", "behaviors", "max_body_bytes=1000").await.0, 201);
    let mut stream = std::net::TcpStream::connect(server.url.strip_prefix("http://").unwrap()).unwrap();
    stream.write_all(b"POST /mallory/echo/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    // One 64 KiB chunk, already over the limit; the rest of a 5 MB body
    // would follow, but the answer comes first.
    let chunk = [format!("{:x}\r\n", 64 << 10).into_bytes(), vec![b'z'; 64 << 10], b"\r\n".to_vec()].concat();
    stream.write_all(&chunk).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "a 5 MB chunked body to a 1000-byte limit");

    // A public model's counters show every tenant's use: the admin's only.
    let digits = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx")).unwrap();
    assert_eq!(push_model(&server, TOKEN, "public/digits", "onnx", digits).await.0, 201);
    deploy_probe(&server, TOKEN, "probe", "digits").await;
    get(&format!("{}/default/probe/load?digits", server.url)).await;
    let (_, theirs) = server.api(&acme, "GET", "models/public/digits", Bytes::new()).await;
    assert!(theirs["loaded"].is_null(), "{theirs}");
    let (_, admins) = server.api(TOKEN, "GET", "models/public/digits", Bytes::new()).await;
    assert!(admins["loaded"].is_object(), "{admins}");
}

/// Models loaded (`gpuwasm_model_loads_total`) as the metrics at `addr` say.
async fn model_loads(addr: &str) -> u64 {
    let text = get(&format!("http://{addr}/metrics")).await.body;
    let line = text.lines().find(|l| l.starts_with("gpuwasm_model_loads_total ")).unwrap_or_else(|| panic!("no model loads in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What the 32 clients of the model-change test saw: each answer, counted.
type Seen = std::collections::BTreeMap<String, usize>;

/// One client of the model-change test: `/twice?m` (one load, two passes
/// 30 ms apart) until `stop`, at the times `waves` gives (back to back
/// when empty); every answer must come within 10 s, as 200.
async fn model_user(url: String, waves: Vec<Instant>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Seen {
    let mut seen = Seen::new();
    let mut waves = waves.into_iter();
    loop {
        match waves.next() {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None if stop.load(std::sync::atomic::Ordering::Relaxed) => return seen,
            None => {}
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), send("POST", &url, &[], "30")).await.expect("a request hung");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let what = if reply.body.starts_with("error not-found: no model named 'm'") { "not-found".to_string() } else { reply.body };
        *seen.entry(what).or_default() += 1;
    }
}

/// Merges what `clients` saw.
async fn seen_by(clients: Vec<tokio::task::JoinHandle<Seen>>) -> Seen {
    let mut all = Seen::new();
    for client in clients {
        for (what, n) in client.await.unwrap() {
            *all.entry(what).or_default() += n;
        }
    }
    all
}

/// A model removed, re-pushed with other weights and evicted while 32
/// requests use it: each request computes with the weights it loaded
/// (both of its passes agree) or gets a clean not-found; none crashes,
/// hangs or mixes versions.
#[tokio::test]
async fn attack_8_models_change_under_load_without_mixing_weights() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_address();
    let (server, mallory, _) = two_tenants(&dir, &["--model-idle-secs", "1", "--metrics-listen", &metrics]).await;
    let (one, two) = (hostile::adds(1.0), hostile::adds(2.0));
    assert_eq!(push_model(&server, &mallory, "m", "onnx", one.clone()).await.0, 201);
    deploy_probe(&server, &mallory, "probe", "m").await;
    let url = format!("{}/mallory/probe/twice?m", server.url);
    let (v1, v2) = ("ok sums 4 4".to_string(), "ok sums 8 8".to_string());

    // Removed and pushed again, twice over, under back-to-back requests.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..32).map(|_| tokio::spawn(model_user(url.clone(), Vec::new(), stop.clone()))).collect();
    let pause = || tokio::time::sleep(Duration::from_millis(700));
    for (model, bytes) in [(None, None), (Some("m"), Some(&two)), (Some("m"), Some(&one)), (None, None), (Some("m"), Some(&two))] {
        pause().await;
        let (status, json) = match (model, bytes) {
            (Some(name), Some(bytes)) => push_model(&server, &mallory, name, "onnx", bytes.clone()).await,
            _ => server.api(&mallory, "DELETE", "models/m", Bytes::new()).await,
        };
        assert!(status == 200 || status == 201, "{json}");
    }
    pause().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = seen_by(clients).await;
    eprintln!("while the model was removed and re-pushed: {seen:?}");
    for (what, _) in &seen {
        assert!([&v1, &v2, "not-found"].contains(&what.as_str()), "an answer mixed versions or failed: {what} (all: {seen:?})");
    }
    assert!(seen.len() == 3, "every phase was seen: {seen:?}");

    // Idle eviction (1 s, checked every 250 ms) racing waves of 32
    // requests 0.9 to 1.3 s apart: the model is evicted between waves and
    // loaded again, some waves arriving as it goes; the last three waves
    // come 2.5 s apart, so it is certainly evicted before them.
    let loads = model_loads(&metrics).await;
    let start = Instant::now() + Duration::from_millis(100);
    let waves: Vec<Vec<Instant>> = (0..32u64)
        .map(|client| {
            let mut at = start;
            (0..8u64)
                .map(|wave| {
                    at += Duration::from_millis(if wave >= 5 { 2500 } else { 900 + 100 * wave } + client % 8);
                    at
                })
                .collect()
        })
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let clients: Vec<_> = waves.into_iter().map(|w| tokio::spawn(model_user(url.clone(), w, stop.clone()))).collect();
    let seen = seen_by(clients).await;
    eprintln!("while idle eviction raced waves of requests: {seen:?}");
    assert_eq!(seen, Seen::from([(v2.clone(), 32 * 8)]), "every request of every wave computed on the current weights");
    let reloaded = model_loads(&metrics).await - loads;
    assert!(reloaded >= 2, "the model was evicted and loaded again between waves only {reloaded} times");
    acme_is_served(&server).await;
}

/// The files of tests/corpus/`kind` (scripts/make-corpus.py wrote them;
/// scripts/fuzz.sh adds what it finds), by name.
fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "tests/corpus/{kind} holds only {} files", files.len());
    files
}

/// A clean refusal: a 4xx with an error code and a message that names no
/// server path.
fn refused(what: &str, status: u16, json: &serde_json::Value, data_dir: &str) {
    assert!((400..500).contains(&status), "{what}: status {status}: {json}");
    let (code, message) = (json["error"]["code"].as_str().unwrap_or(""), json["error"]["message"].as_str().unwrap_or(""));
    assert!(!code.is_empty() && !message.is_empty(), "{what}: no error code and message: {json}");
    assert!(!message.contains(data_dir), "{what}: a server path leaked: {message}");
}

/// Every file of the bad-input corpus (tests/corpus) gets a clean error
/// from a real server (`valid-` files are served), and the server keeps
/// serving another tenant throughout: components and core modules
/// deployed, manifests given to `gpuwasm deploy`, admin API requests,
/// model files pushed (safetensors beside MiniLM's other files), and
/// tensors sent through wasi-nn to the digits classifier.
#[tokio::test]
async fn attack_9_every_file_of_the_bad_input_corpus_gets_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &[]).await;
    let data_dir = server.data_dir.to_string_lossy().to_string();
    let mut checked = 0;
    for kind in ["components", "modules"] {
        for (name, bytes) in corpus(kind) {
            let (status, json) = server.api(&mallory, "PUT", "deployments/corpus", bytes).await;
            refused(&format!("{kind}/{name}"), status, &json, &data_dir);
            checked += 1;
        }
        acme_is_served(&server).await;
    }

    let hello = wasm("hello");
    for (name, _) in corpus("manifests") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/manifests").join(&name);
        let out = server.cli_as(&mallory, &["deploy", hello.to_str().unwrap(), "--name", "corpus", "--manifest", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "manifests/{name}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.len() > 12, "manifests/{name}: {stderr}");
        checked += 1;
    }
    let (status, _) = server.api(&mallory, "GET", "deployments/corpus", Bytes::new()).await;
    assert_eq!(status, 404, "no bad manifest deployed anything");

    let hello_bytes = std::fs::read(&hello).unwrap();
    for (name, bytes) in corpus("api") {
        let what = format!("api/{name}");
        // As the admin_api fuzz target reads it: the first byte mod 6
        // picks the request ('0' to '5' in the files made by hand).
        let Some((&selector, body)) = bytes.split_first() else { continue };
        let body = body.to_vec();
        let (status, json) = match selector % 6 {
            0 => {
                let url = format!("{}/_gpuwasm/v1/deployments/corpus", server.url);
                let spec = String::from_utf8_lossy(&body).into_owned();
                let reply = send("PUT", &url, &[("authorization", &format!("Bearer {mallory}")), ("gpuwasm-spec", &spec)], hello_bytes.clone()).await;
                (reply.status, serde_json::from_str(&reply.body).unwrap_or_default())
            }
            1 => server.api(&mallory, "PUT", &format!("deployments/corpus?{}", String::from_utf8_lossy(&body)), hello_bytes.clone()).await,
            2 => server.api(TOKEN, "POST", "tenants", body).await,
            3 => server.api(TOKEN, "PUT", "tenants/mallory/domains", body).await,
            4 => server.api(TOKEN, "PUT", "tenants/mallory/limits", body).await,
            _ => server.api(&mallory, "PUT", "models/corpus", body).await,
        };
        refused(&what, status, &json, &data_dir);
        checked += 1;
    }
    acme_is_served(&server).await;

    // Model files: a safetensors file beside MiniLM's real other files.
    let minilm = test_models::model_path("minilm");
    let mut others = serde_json::Map::new();
    for file in ["config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"] {
        let bytes = std::fs::read(minilm.join(file)).unwrap();
        let sha = sha256(&bytes);
        assert_eq!(server.api(&mallory, "PUT", &format!("model-files/{sha}"), bytes).await.0, 201);
        others.insert(file.to_string(), sha.into());
    }
    for (name, bytes) in corpus("safetensors") {
        let sha = sha256(&bytes);
        assert_eq!(server.api(&mallory, "PUT", &format!("model-files/{sha}"), bytes).await.0, 201);
        let mut files = others.clone();
        files.insert("model.safetensors".into(), sha.into());
        let spec = serde_json::json!({ "format": "safetensors", "files": files });
        let (status, json) = server.api(&mallory, "PUT", "models/corpus", spec.to_string()).await;
        refused(&format!("safetensors/{name}"), status, &json, &data_dir);
        checked += 1;
    }
    for format in ["gguf", "onnx"] {
        for (name, bytes) in corpus(format) {
            let (status, json) = push_model(&server, &mallory, "corpus", format, bytes).await;
            refused(&format!("{format}/{name}"), status, &json, &data_dir);
            checked += 1;
        }
        acme_is_served(&server).await;
    }
    let (status, _) = server.api(&mallory, "GET", "models/corpus", Bytes::new()).await;
    assert_eq!(status, 404, "no bad model file was accepted");

    // Tensors a guest sends, to a real graph.
    let digits = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx")).unwrap();
    assert_eq!(push_model(&server, &mallory, "digits", "onnx", digits).await.0, 201);
    deploy_probe(&server, &mallory, "probe", "digits").await;
    for (name, bytes) in corpus("tensors") {
        let reply = send("POST", &format!("{}/mallory/probe/raw-tensor?digits", server.url), &[], bytes).await;
        assert_eq!(reply.status, 200, "tensors/{name}: {}", reply.body);
        if name.starts_with("valid-") {
            assert_eq!(reply.body, "ok outputs probabilities", "tensors/{name}");
        } else {
            let error = reply.body.strip_prefix("error ").unwrap_or_else(|| panic!("tensors/{name}: {}", reply.body));
            let (code, message) = error.split_once(": ").unwrap_or_else(|| panic!("tensors/{name}: {}", reply.body));
            assert!(["invalid-argument", "too-large"].contains(&code) && message.len() > 10, "tensors/{name}: {}", reply.body);
        }
        checked += 1;
    }
    acme_is_served(&server).await;
    eprintln!("{checked} corpus files checked; server peak RSS {} MiB", server.peak_rss() >> 20);
    assert!(checked > 100, "only {checked} corpus files");
}

/// A guest that computes for long moves to the long lane: the server's
/// `gpuwasm-long` threads, at nice 19, do most of its work (a short request
/// never goes there), and the next request of the same deployment starts
/// there; another deployment's short request still answers at once.
#[tokio::test]
async fn a_cpu_hog_runs_on_the_long_lane_at_the_lowest_priority() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("hog", "behaviors", &["--cpu-ms", "5000"]);
    server.deploy("hello", "hello", &[]);
    // (The admin API's work, the deploys, ran on the long lane already.)
    let long_cpu = |server: &Server| server.threads("gpuwasm-long").iter().map(|t| t.cpu_seconds).sum::<f64>();
    let before = long_cpu(&server);
    for _ in 0..500 {
        assert_eq!(get(&format!("{}/default/hello/", server.url)).await.status, 200);
    }
    // Their guests took 25-50 ms of CPU in all; none of it there.
    let short_on_long_lane = long_cpu(&server) - before;
    assert!(short_on_long_lane < 0.005, "short requests ran {short_on_long_lane:.4} s on the long lane");

    for round in 0..2 {
        let before = long_cpu(&server);
        let burn = get(&format!("{}/default/hog/burn?ms=400", server.url)).await;
        assert_eq!(burn.status, 200, "{}", burn.body);
        let on_long_lane = long_cpu(&server) - before;
        eprintln!("round {round}: {on_long_lane:.3} s of the 0.4 s burn on the long lane");
        // The first request moves after its first 5 ms tick and 1 ms more;
        // the second starts there.
        assert!(on_long_lane > 0.35, "round {round}: only {on_long_lane:.3} s of the burn ran on the long lane");
    }
    let threads = server.threads("gpuwasm-long");
    assert!(!threads.is_empty() && threads.iter().all(|t| t.nice == 19), "{threads:?}");
    assert_eq!(get(&format!("{}/default/hello/", server.url)).await.status, 200);
}

/// Opens `n` connections to `path` that each send a head and one byte of
/// a 100 kB body, then nothing; returns each one's answer so far (empty
/// when none came within 2 s; a head and its first chunk or whole body,
/// which may come in separate reads) with the connection, still open.
async fn slow_clients(server: &Server, path: &str, n: usize) -> Vec<(String, tokio::net::TcpStream)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = server.url.trim_start_matches("http://").to_string();
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nx");
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        streams.push(stream);
    }
    let answers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + Duration::from_secs(4);
                let (mut text, mut buf) = (String::new(), [0u8; 512]);
                while !answer_complete(&text) {
                    match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
                        _ => break,
                    }
                }
                (text, stream)
            })
        })
        .collect();
    let mut out = Vec::new();
    for answer in answers {
        out.push(answer.await.unwrap());
    }
    out
}

/// Whether `text` holds a whole answer to a slow client: a refusal with
/// its whole body, or the echo's head and first chunk.
fn answer_complete(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let length = head.lines().find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)));
    match length {
        Some(length) => body.len() >= length,
        None => body.ends_with("1\r\nx\r\n"),
    }
}

/// How many of `answers` were admitted to the echo handler (which streams
/// back the byte it read) and how many refused (a 503, after the refusal delay) whose
/// message contains `why`; any other answer fails.
fn admitted_and_refused(answers: &[(String, tokio::net::TcpStream)], why: &str) -> (usize, usize) {
    let (mut admitted, mut refused) = (0, 0);
    for (text, _) in answers {
        if text.starts_with("HTTP/1.1 503") {
            assert!(text.to_lowercase().contains("retry-after") && text.contains(why), "{text}");
            refused += 1;
        } else {
            assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("1\r\nx\r\n"), "neither admitted nor refused: {text:?}");
            admitted += 1;
        }
    }
    (admitted, refused)
}

/// 500 slowloris clients on one deployment (each sends its head and one
/// byte of a 100 kB body, then nothing) on a node whose 64 instances one
/// tenant could take whole: requests whose bodies are still arriving may
/// take only half a deployment's concurrency, half a tenant's share and
/// half the node's instances, so the rest are refused with 503;
/// the same deployment (to a client that sends its body), the tenant's
/// other deployment and the other tenant are all answered at once, and
/// the other tenant's slow clients are refused by the node's allowance.
/// Once the slow clients leave, their places are free again.
#[tokio::test]
async fn attack_10_slow_bodies_cannot_take_every_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mallory, _) = two_tenants(&dir, &["--max-instances", "64", "--max-tenant-instances", "64"]).await;
    assert_eq!(deploy(&server, &mallory, "slow", "behaviors", "concurrency=64").await.0, 201);
    assert_eq!(deploy(&server, &mallory, "other", "hello", "").await.0, 201);
    let held = slow_clients(&server, "/mallory/slow/echo", 500).await;
    let counts = admitted_and_refused(&held, "bodies are still arriving");
    eprintln!("of 500 slow clients, {} admitted and {} refused", counts.0, counts.1);
    assert_eq!(counts, (32, 468), "half the deployment's concurrency (and of the tenant's share) for slow bodies");

    acme_is_served(&server).await;
    let started = Instant::now();
    let reply = get(&format!("{}/mallory/other/", server.url)).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, HELLO));
    let reply = send("POST", &format!("{}/mallory/slow/echo", server.url), &[], "whole").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "whole"), "the attacked deployment serves a client that sends its body");
    assert!(started.elapsed() < Duration::from_secs(2), "mallory's requests waited {:?}", started.elapsed());
    let others = slow_clients(&server, "/acme/hello/", 5).await;
    assert_eq!(admitted_and_refused(&others, "this node already runs 32 requests whose bodies are still arriving"), (0, 5));

    // Gone, the slow clients leave their places free.
    drop((held, others));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = slow_clients(&server, "/mallory/slow/echo", 40).await;
    assert_eq!(admitted_and_refused(&again, "bodies are still arriving"), (32, 8), "the allowance is whole again");
}
