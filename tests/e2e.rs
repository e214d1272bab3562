//! End-to-end tests: a real `gpuwasm serve` on 127.0.0.1, real components
//! built from examples/ and tests/guests/, the real CLI and HTTP clients.

mod support;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::time::{Duration, Instant};
use support::*;

const HELLO_ROOT: &str = "hello from gpuwasm! you asked for GET /\n";

#[tokio::test]
async fn deploy_then_invoke_returns_the_exact_body() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("hello", "hello", &[]);

    let reply = get(&format!("{}/default/hello/", server.url)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, HELLO_ROOT);
    assert_eq!(reply.headers["content-type"], "text/plain; charset=utf-8");

    // The prefix is stripped and the query kept; the CLI reaches the same handler.
    let reply = get(&format!("{}/default/hello/a/b?q=1", server.url)).await;
    assert_eq!(reply.body, "hello from gpuwasm! you asked for GET /a/b\n");
    let out = server.cli(&["invoke", "hello", "/x", "-X", "PUT"]);
    assert_eq!(stdout_of(&out), "hello from gpuwasm! you asked for PUT /x\n");
}

#[tokio::test]
async fn unknown_deployment_is_404() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let reply = get(&format!("{}/nothing-here/x", server.url)).await;
    assert_eq!(reply.status, 404);
    assert!(reply.body.contains("no deployment serves /nothing-here/x"), "{}", reply.body);
}

#[tokio::test]
async fn response_body_streams_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);
    let reply = get(&format!("{}/default/beh/stream?n=500", server.url)).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers.get("content-length").is_none(), "a streamed body has no length up front");
    assert_eq!(reply.headers["transfer-encoding"], "chunked");
    let expected: String = (0..500).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(reply.body, expected);
}


#[tokio::test]
async fn request_and_response_bodies_stream_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);

    let (mut sender, authority) = streaming_connection(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = http::Request::post("/default/beh/echo").header("host", &authority).body(ChannelBody(rx)).unwrap();
    tx.send(Bytes::from_static(b"first chunk;")).await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    // The first chunk comes back while the request body is still open:
    // neither side is buffered whole.
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("echo of the first chunk");
    let first = frame.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first chunk;");
    tx.send(Bytes::from_static(b"second chunk")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"second chunk");
}

#[tokio::test]
async fn malformed_uploads_get_clear_4xx_and_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("hello", "hello", &[]);

    let hello = std::fs::read(wasm("hello")).unwrap();
    let mut random = vec![0u8; 4096];
    let mut x: u32 = 0x1234_5678;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("random bytes", random, "not_wasm", "not a WebAssembly binary"),
        ("a core module", b"\0asm\x01\0\0\0".to_vec(), "core_module", "core WebAssembly module, not a component"),
        ("a truncated component", hello[..hello.len() / 2].to_vec(), "invalid_component", "invalid component"),
        ("an empty upload", Vec::new(), "not_wasm", "not a WebAssembly binary"),
        (
            "an unsupported import",
            std::fs::read(wasm("unsupported_import")).unwrap(),
            "unsupported_import",
            "gpuwasm-test:unsupported/secret-service",
        ),
    ];
    for (what, bytes, code, message) in cases {
        let reply = send(
            "PUT",
            &format!("{}/_gpuwasm/v1/deployments/bad", server.url),
            &[("authorization", &format!("Bearer {TOKEN}"))],
            bytes,
        )
        .await;
        assert_eq!(reply.status, 400, "{what}: {}", reply.body);
        let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(json["error"]["code"], code, "{what}: {}", reply.body);
        let text = json["error"]["message"].as_str().unwrap();
        assert!(text.contains(message), "{what}: message {text:?} lacks {message:?}");
        assert_eq!(get(&format!("{}/default/hello/", server.url)).await.body, HELLO_ROOT, "after {what}");
    }
    // Nothing was deployed under the bad name.
    assert_eq!(get(&format!("{}/default/bad/", server.url)).await.status, 404);

    // The CLI shows the same message and fails.
    let out = server.cli(&["deploy", wasm("unsupported_import").to_str().unwrap(), "--name", "bad"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported import"), "{out:?}");
}

#[tokio::test]
async fn a_trap_answers_500_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);
    for _ in 0..3 {
        let reply = get(&format!("{}/default/beh/trap", server.url)).await;
        assert_eq!(reply.status, 500);
        assert!(reply.body.contains("deployment 'beh' failed: wasm trap"), "{}", reply.body);
    }
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.body, "behaviors ok");
}

#[tokio::test]
async fn an_infinite_loop_hits_the_cpu_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--cpu-ms", "300"]);
    let start = Instant::now();
    let reply = get(&format!("{}/default/beh/loop", server.url)).await;
    let took = start.elapsed();
    assert_eq!(reply.status, 504);
    assert!(reply.body.contains("exceeded its CPU time limit of 300 ms"), "{}", reply.body);
    assert!(took >= Duration::from_millis(300), "stopped too early: {took:?}");
    assert!(took < Duration::from_secs(10), "not stopped in time: {took:?}");
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.status, 200);
}

#[tokio::test]
async fn waiting_past_the_wall_clock_limit_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--timeout-ms", "300"]);
    // Sleeping uses no CPU, so only the wall-clock limit can stop it.
    let reply = get(&format!("{}/default/beh/sleep?ms=20000", server.url)).await;
    assert_eq!(reply.status, 504);
    assert!(reply.body.contains("did not answer within its time limit of 300 ms"), "{}", reply.body);
    assert_eq!(get(&format!("{}/default/beh/sleep?ms=10", server.url)).await.body, "slept");
}

#[tokio::test]
async fn a_memory_hog_is_stopped_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--memory-mb", "24"]);
    let reply = get(&format!("{}/default/beh/hog", server.url)).await;
    assert_eq!(reply.status, 500);
    assert!(reply.body.contains("exceeded its memory limit of 24 MiB"), "{}", reply.body);
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.status, 200);
}

#[tokio::test]
async fn request_bodies_over_the_limit_get_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--max-body-bytes", "1000"]);
    let url = format!("{}/default/beh/body-length", server.url);
    assert_eq!(send("POST", &url, &[], vec![7u8; 1000]).await.body, "1000");
    // Declared too large: refused before any instance runs.
    let reply = send("POST", &url, &[], vec![7u8; 1001]).await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(reply.body.contains("exceeds the limit of 1000 bytes"), "{}", reply.body);

    // Streamed without a length: cut off once it passes the limit.
    let (mut sender, authority) = streaming_connection(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let request = http::Request::post("/default/beh/body-length").header("host", &authority).body(ChannelBody(rx)).unwrap();
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx.send(Bytes::from(vec![1u8; 600])).await.is_err() {
                break;
            }
        }
    });
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 413);
}

#[tokio::test]
async fn a_guest_that_logs_megabytes_is_not_stopped_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);
    let reply = get(&format!("{}/default/beh/chatty", server.url)).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "still here"));
}

#[tokio::test]
async fn a_manifest_sets_env_limits_and_the_outbound_allow_list() {
    // An upstream on loopback for the allowed call.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from("upstream"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::copy(wasm("behaviors"), app.join("handler.wasm")).unwrap();
    std::fs::write(
        app.join("gpuwasm.toml"),
        format!(
            "name = \"configured\"\n[limits]\ncpu_ms = 250\n[env]\nGREETING = \"grüße aus gpuwasm\"\n\
             [outbound]\nallow = [\"{upstream_addr}\"]\n[models]\nallow = [\"minilm\"]\n"
        ),
    )
    .unwrap();
    let out = server.cli(&["deploy", app.join("handler.wasm").to_str().unwrap()]);
    assert!(stdout_of(&out).starts_with("deployed default/configured version 1"));
    let base = format!("{}/default/configured", server.url);
    assert_eq!(get(&format!("{base}/env?GREETING")).await.body, "grüße aus gpuwasm");
    assert_eq!(get(&format!("{base}/outbound?to={upstream_addr}")).await.body, "allowed: status 200");
    assert_eq!(get(&format!("{base}/outbound?to=127.0.0.1:9")).await.body, "refused: ErrorCode::HttpRequestDenied");
    let reply = get(&format!("{base}/loop")).await;
    assert!(reply.body.contains("CPU time limit of 250 ms"), "{}", reply.body);
    let listed: serde_json::Value = serde_json::from_str(&stdout_of(&server.cli(&["list", "--json"]))).unwrap();
    assert_eq!(listed["deployments"][0]["models"], serde_json::json!(["minilm"]));

    // Flags override the manifest.
    let out = server.cli(&["deploy", app.join("handler.wasm").to_str().unwrap(), "--name", "other", "--cpu-ms", "100"]);
    stdout_of(&out);
    let reply = get(&format!("{}/default/other/loop", server.url)).await;
    assert!(reply.body.contains("CPU time limit of 100 ms"), "{}", reply.body);

    // A bad manifest is refused before anything is sent, naming field and line.
    std::fs::write(app.join("gpuwasm.toml"), "name = \"configured\"\n\n[outbound]\nallow = [\"not a host\"]\n").unwrap();
    let out = server.cli(&["deploy", app.join("handler.wasm").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("gpuwasm.toml line 4: `outbound.allow`: invalid host \"not a host\""), "{stderr}");
}

#[tokio::test]
async fn outbound_http_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);
    let reply = get(&format!("{}/default/beh/outbound", server.url)).await;
    assert_eq!(reply.body, "refused: ErrorCode::HttpRequestDenied");
}

#[tokio::test]
async fn concurrency_limit_queues_then_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--concurrency", "1", "--queue", "1", "--queue-timeout-ms", "200"]);
    let sleeper = format!("{}/default/beh/sleep?ms=1500", server.url);
    let busy = tokio::spawn(async move { get(&sleeper).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One may wait in the queue (and gives up after 200 ms); a second is
    // refused at once, and told so after the refusal delay (1 s by
    // default) from its arrival.
    let queued_url = format!("{}/default/beh/", server.url);
    let queued = tokio::spawn(async move { get(&queued_url).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let asked = Instant::now();
    let refused = get(&format!("{}/default/beh/", server.url)).await;
    let waited = asked.elapsed();
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(refused.body.contains("concurrency limit"), "{}", refused.body);
    let decided_ms: f64 = refused.headers["server-timing"].to_str().unwrap().strip_prefix("gpuwasm;dur=").unwrap().parse().unwrap();
    assert!(decided_ms < 100.0, "the refusal took the server {decided_ms} ms to decide");
    assert!(waited >= Duration::from_secs(1), "refused after {waited:?}, before the refusal delay");
    assert_eq!(queued.await.unwrap().status, 503);
    assert_eq!(busy.await.unwrap().body, "slept");
    // Free again.
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.status, 200);
}

#[tokio::test]
async fn two_hundred_concurrent_requests_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("hello", "hello", &[]);
    server.deploy("beh", "behaviors", &[]);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = if i % 2 == 0 {
            format!("{}/default/hello/req/{i}", server.url)
        } else {
            format!("{}/default/beh/header", server.url)
        };
        tasks.push(tokio::spawn(async move {
            let tag = format!("tag-{i}");
            let reply = send("GET", &url, &[("x-test", &tag)], Bytes::new()).await;
            (i, tag, reply)
        }));
    }
    for task in tasks {
        let (i, tag, reply) = task.await.unwrap();
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        let expected = if i % 2 == 0 { format!("hello from gpuwasm! you asked for GET /req/{i}\n") } else { tag };
        assert_eq!(reply.body, expected, "request {i}");
    }
}

#[tokio::test]
async fn deployments_and_artifacts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_in(&data);
    server.deploy("hello", "hello", &["--memory-mb", "64"]);
    server.deploy("beh", "behaviors", &[]);
    server.kill();

    let cwasm: Vec<_> = std::fs::read_dir(data.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(cwasm.len(), 2, "{cwasm:?}");
    let modified = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before: Vec<_> = cwasm.iter().map(|p| modified(p)).collect();

    let server = Server::start_in(&data);
    assert_eq!(get(&format!("{}/default/hello/", server.url)).await.body, HELLO_ROOT);
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.body, "behaviors ok");
    let after: Vec<_> = cwasm.iter().map(|p| modified(p)).collect();
    assert_eq!(before, after, "a restart loads compiled artifacts instead of recompiling");
    let listed = stdout_of(&server.cli(&["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let hello = json["deployments"].as_array().unwrap().iter().find(|d| d["name"] == "hello").unwrap();
    assert_eq!(hello["limits"]["memory_mb"], 64);

    // A corrupted artifact is detected and rebuilt, never run: after the
    // restart each file holds a good artifact again, not the damaged bytes.
    server.kill();
    let mut damaged = Vec::new();
    for path in &cwasm {
        let mut bytes = std::fs::read(path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(path, &bytes).unwrap();
        damaged.push(bytes);
    }
    let server = Server::start_in(&data);
    assert_eq!(get(&format!("{}/default/hello/", server.url)).await.body, HELLO_ROOT);
    assert_eq!(get(&format!("{}/default/beh/", server.url)).await.body, "behaviors ok");
    for (path, damaged) in cwasm.iter().zip(&damaged) {
        let now = std::fs::read(path).unwrap();
        assert_ne!(&now, damaged, "{} was not rewritten", path.display());
        assert_eq!(now.len(), damaged.len(), "{} rebuilt to a different size", path.display());
    }
}

#[tokio::test]
async fn host_routing_and_redeploy_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("site", "hello", &["--host", "api.example.test"]);
    let reply = send("GET", &format!("{}/whatever", server.url), &[("host", "api.example.test:8080")], Bytes::new()).await;
    assert_eq!(reply.body, "hello from gpuwasm! you asked for GET /whatever\n");
    // A host-routed deployment is not reachable by path prefix.
    assert_eq!(get(&format!("{}/default/site/", server.url)).await.status, 404);

    // Redeploying a name switches it to the new component.
    server.deploy("site", "behaviors", &[]);
    assert_eq!(get(&format!("{}/default/site/", server.url)).await.body, "behaviors ok");

    let out = server.cli(&["rm", "site"]);
    assert_eq!(stdout_of(&out), "removed site\n");
    assert_eq!(get(&format!("{}/default/site/", server.url)).await.status, 404);
    let out = server.cli(&["rm", "site"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no deployment named 'site'"), "{out:?}");
    assert_eq!(stdout_of(&server.cli(&["list"])), "no deployments\n");
}

#[tokio::test]
async fn the_admin_api_requires_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let url = format!("{}/_gpuwasm/v1/deployments", server.url);
    for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let reply = send("GET", &url, &headers, Bytes::new()).await;
        assert_eq!(reply.status, 401, "{auth:?}");
        let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(json["error"]["code"], "unauthorized");
    }
    let reply = send("GET", &url, &[("authorization", &format!("Bearer {TOKEN}"))], Bytes::new()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(get(&format!("{}/_gpuwasm/v1/health", server.url)).await.status, 200);
    let out = gpuwasm().args(["list", "--token", "wrong", "--server", &server.url]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"), "{out:?}");
}

/// Starts `gpuwasm run FILE --listen 127.0.0.1:0 ARGS` with its compile
/// cache in `cache`; returns it and the URL it announced.
fn start_run(file: &std::path::Path, cache: &std::path::Path, args: &[&str]) -> (std::process::Child, String) {
    let mut child = gpuwasm()
        .arg("run")
        .arg(file)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("GPUWASM_CACHE_DIR", cache)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("gpuwasm listening on ").unwrap_or_else(|| panic!("no address announced: {line:?}")).to_string();
    (child, url)
}

/// The compiled artifacts in a compile cache, with their inode numbers.
fn artifacts(cache: &std::path::Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(cache).unwrap().flatten();
    let mut found: Vec<_> = entries
        .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino()))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn run_serves_one_file_without_state() {
    let cache = tempfile::tempdir().unwrap();
    let start = |file: &std::path::Path| start_run(file, cache.path(), &[]);
    let (mut child, url) = start(&wasm("hello"));
    let reply = get(&format!("{url}/any/path")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(reply.body, "hello from gpuwasm! you asked for GET /any/path\n");

    // The compiled component stays in the cache: a second start maps the
    // same file instead of compiling and writing it again.
    let compiled = artifacts(cache.path());
    assert_eq!(compiled.len(), 1, "{compiled:?}");
    let (mut child, url) = start(&wasm("hello"));
    let again = get(&format!("{url}/again")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(again.status, 200);
    assert_eq!(artifacts(cache.path()), compiled, "the second start compiled again");

    // A gpuwasm.toml beside the file applies: env, limits and local files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("static")).unwrap();
    std::fs::copy(wasm("behaviors"), dir.path().join("handler.wasm")).unwrap();
    std::fs::write(dir.path().join("static/hello.txt"), "local file").unwrap();
    std::fs::write(
        dir.path().join("gpuwasm.toml"),
        "[env]\nGREETING = \"from the manifest\"\n[limits]\ncpu_ms = 200\n[files]\ndir = \"static\"\n",
    )
    .unwrap();
    let (mut child, url) = start(&dir.path().join("handler.wasm"));
    let env = get(&format!("{url}/env?GREETING")).await.body;
    let file = get(&format!("{url}/read?/hello.txt")).await.body;
    let looped = get(&format!("{url}/loop")).await.body;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!((env.as_str(), file.as_str()), ("from the manifest", "local file"));
    assert!(looped.contains("CPU time limit of 200 ms"), "{looped}");
}

/// The processes a process started, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten();
    let lists = tasks.filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok()).collect::<Vec<_>>();
    lists.iter().flat_map(|l| l.split_whitespace().map(|p| p.parse().unwrap())).collect()
}

/// The sockets a process has open.
fn sockets_of(pid: u32) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten();
    fds.filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))).count()
}

#[tokio::test]
async fn run_with_workers_serves_from_a_process_per_core_and_drains_on_sigterm() {
    let cache = tempfile::tempdir().unwrap();
    // Compiled once by a plain run: the workers must load that artifact.
    let (mut plain, _) = start_run(&wasm("behaviors"), cache.path(), &[]);
    let _ = plain.kill();
    let _ = plain.wait();
    let compiled = artifacts(cache.path());
    assert_eq!(compiled.len(), 1);
    let (mut parent, url) = start_run(&wasm("behaviors"), cache.path(), &["--workers", "2"]);
    let workers = children_of(parent.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    // Each worker runs on one core, a different one where there are two.
    let cores: Vec<String> = workers
        .iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
        })
        .collect();
    assert!(cores.iter().all(|c| c.parse::<usize>().is_ok()), "a worker may run on several cores: {cores:?}");
    if std::thread::available_parallelism().unwrap().get() >= 2 {
        assert_ne!(cores[0], cores[1], "both workers on one core");
    }
    // Connections spread over both (SO_REUSEPORT): hold 32 open, each
    // answered, then count each worker's sockets against its own before.
    let before: Vec<usize> = workers.iter().map(|&pid| sockets_of(pid)).collect();
    let authority = url.strip_prefix("http://").unwrap().to_string();
    let mut held = Vec::new();
    for i in 0..32 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&authority).unwrap();
        write!(stream, "GET /sleep?ms=0 HTTP/1.1\r\nhost: {authority}\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "connection {i}");
        held.push(stream);
    }
    let after: Vec<usize> = workers.iter().map(|&pid| sockets_of(pid)).collect();
    assert!(before.iter().zip(&after).all(|(b, a)| a > b), "a worker took no connection: {before:?} then {after:?}");
    drop(held);
    assert_eq!(artifacts(cache.path()), compiled, "a worker compiled the component again");

    // SIGTERM to the parent drains every worker: a request in flight
    // finishes, then all exit, status 0.
    let in_flight = tokio::spawn(get_owned(format!("{url}/sleep?ms=1500")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill takes plain integers; the child is not reaped yet.
    unsafe { libc::kill(parent.id() as i32, libc::SIGTERM) };
    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept"));
    let status = parent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for pid in &workers {
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
        });
        assert!(gone, "worker {pid} outlived its parent");
    }

    // A worker that dies on its own stops the rest, and the parent fails.
    let (mut parent, _url) = start_run(&wasm("behaviors"), cache.path(), &["--workers", "2"]);
    let workers = children_of(parent.id());
    // SAFETY: as above.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = parent.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the parent kept running without one of its workers");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status:?}");
    let survivor = format!("/proc/{}/stat", workers[1]);
    let stopped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        std::fs::read_to_string(&survivor).map_or(true, |s| s.contains(") Z"))
    });
    assert!(stopped, "the other worker kept running");
}

#[tokio::test]
async fn the_library_invokes_components_directly() {
    let runtime = gpuwasm::Runtime::builder().max_instances(8).build().unwrap();
    let bytes = std::fs::read(wasm("hello")).unwrap();
    let hello = runtime.load("hello", &bytes, gpuwasm::Limits::default()).await.unwrap();
    let request = http::Request::get("/from/library").body(http_body_util::Empty::<Bytes>::new()).unwrap();
    let response = hello.handle(request).await;
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello from gpuwasm! you asked for GET /from/library\n");

    let err = runtime.load("core", b"\0asm\x01\0\0\0", gpuwasm::Limits::default()).await.err().unwrap();
    assert!(matches!(err, gpuwasm::Error::CoreModule), "{err}");
}

#[tokio::test]
async fn init_state_is_in_every_request_and_request_changes_never_leak() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_in(&data);
    server.deploy("stateful", "stateful", &[]);
    let url = format!("{}/default/stateful/", server.url);
    for _ in 0..3 {
        // Each request appends to the state; the next still sees only init's.
        assert_eq!(get(&url).await.body, "built-by-init,entry-0,entry-1,entry-2");
    }
    let listed = stdout_of(&server.cli(&["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let record = &json["deployments"][0];
    assert!(record["snapshot_sha256"].is_string(), "{record}");
    assert_ne!(record["snapshot_sha256"], record["sha256"]);

    // Without pre-initialisation the init function never runs.
    server.deploy("raw", "stateful", &["--no-preinit"]);
    assert_eq!(get(&format!("{}/default/raw/", server.url)).await.body, "");

    // The snapshot is what runs after a restart too.
    server.kill();
    let server = Server::start_in(&data);
    assert_eq!(get(&format!("{}/default/stateful/", server.url)).await.body, "built-by-init,entry-0,entry-1,entry-2");
}

#[tokio::test]
async fn the_wizer_convention_is_pre_initialised_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("wz", "wizer_convention", &[]);
    assert_eq!(get(&format!("{}/default/wz/", server.url)).await.body, "set by wizer-initialize");
    server.deploy("raw", "wizer_convention", &["--no-preinit"]);
    assert_eq!(get(&format!("{}/default/raw/", server.url)).await.body, "not initialised");
}

#[tokio::test]
async fn a_20_mb_heap_built_by_init_is_served_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("big", "bigheap", &[]);
    for _ in 0..3 {
        assert_eq!(get(&format!("{}/default/big/", server.url)).await.body, "20971520 bytes, byte[1000]=247");
    }
}

/// Pool slots are reset for their next instance by copying back what an
/// instance wrote (the default) or by unmapping it (`--keep-resident-mb 0`).
/// Either way, 16 clients sending 12 requests each, every request scribbling
/// over half the pages of a 20 MB snapshot heap and over 4 MiB of fresh
/// memory, all see init's heap byte for byte and fresh memory zeroed. (Where
/// the copying reset applies, Linux 6.7+, the scribbled pages are more
/// scattered runs than wasmtime's scan reports, so the rest of the slot is
/// unmapped: both kinds of reset happen in the first pass.)
#[tokio::test]
async fn every_instance_sees_the_snapshot_whatever_earlier_ones_wrote() {
    for flags in [&[][..], &["--keep-resident-mb", "0"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(&dir.path().join("data"), flags);
        server.deploy("big", "bigheap", &["--concurrency", "16"]);
        let url = format!("{}/default/big/scribble", server.url);
        let clients: Vec<_> = (0..16)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    for _ in 0..12 {
                        let reply = get(&url).await;
                        assert_eq!(reply.status, 200, "{flags:?}: {}", reply.body);
                        assert!(reply.body.starts_with("0 bytes differed from init's heap, 0 fresh bytes were not zero"), "{flags:?}: {}", reply.body);
                    }
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
    }
}

#[tokio::test]
async fn init_failures_refuse_the_deploy_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let cases = [
        ("init_trap", &[][..], vec!["init trapped", "configuration is missing"]),
        ("init_prints", &[][..], vec!["init left", "output stream", "cannot be snapshotted"]),
        ("bigheap", &["--memory-mb", "16"][..], vec!["init grew a memory past the deployment's limit of 16 MiB"]),
    ];
    for (wasm_name, flags, expected) in cases {
        let file = wasm(wasm_name);
        let mut args = vec!["deploy", file.to_str().unwrap(), "--name", "bad"];
        args.extend_from_slice(flags);
        let out = server.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{wasm_name} deployed");
        assert!(stderr.contains("pre-initialisation failed") && stderr.contains("[init_failed, HTTP 400]"), "{stderr}");
        for text in expected {
            assert!(stderr.contains(text), "{wasm_name}: {text:?} not in {stderr}");
        }
        assert_eq!(get(&format!("{}/default/bad/", server.url)).await.status, 404);
    }
    // A component whose initial memory does not fit its limit is refused too.
    server.deploy("big", "bigheap", &[]);
    let out = server.cli(&["deploy", wasm("behaviors").to_str().unwrap(), "--name", "tiny", "--memory-mb", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not fit the limit of 1 MiB"), "{stderr}");
}

/// SIGTERM: the server stops accepting, lets the request in flight finish
/// (a handler sleeping 1.5 s), then exits 0.
#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir);
    server.deploy("beh", "behaviors", &[]);
    let url = format!("{}/default/beh/sleep?ms=1500", server.url);
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.signal(libc::SIGTERM);
    // New connections are refused once the listener is closed.
    let addr = server.url.trim_start_matches("http://").to_string();
    let refused = async {
        while tokio::net::TcpStream::connect(&addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), refused).await.expect("still accepting 1 s after SIGTERM");
    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept"));
    let status = server.wait_exit(Duration::from_secs(5)).expect("no exit 5 s after the last request");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A second signal exits at once, cutting off what is still in flight.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir);
    server.deploy("beh", "behaviors", &["--timeout-ms", "60000"]);
    let url = format!("{}/default/beh/sleep?ms=30000", server.url);
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server.wait_exit(Duration::ZERO).is_none(), "exited at the first signal with a request in flight");
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(3)).expect("still running 3 s after the second signal");
    assert_eq!(status.code(), Some(1), "{status}");
    in_flight.abort();
}

/// Opens a connection to `server` from local address `from` (any of
/// 127.0.0.0/8) and sends `head` without waiting for an answer.
async fn connect_from(server: &Server, from: &str, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(server.url.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Reads what the server sends until it closes the connection (at most 5 s).
async fn read_to_close(mut stream: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await.expect("the server kept the connection open").ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// Connections beyond the per-client and the total caps are answered 503
/// with Retry-After and closed; a place freed is taken again.
#[tokio::test]
async fn connections_over_the_caps_are_refused_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--max-connections", "5", "--max-connections-per-client", "3"]);
    server.deploy("hello", "hello", &[]);
    let request = "GET /default/hello/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let mut idle_a = Vec::new();
    for _ in 0..3 {
        idle_a.push(connect_from(&server, "127.0.0.1", "").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = read_to_close(connect_from(&server, "127.0.0.1", request).await).await;
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("retry-after: 1") && refused.contains("one client"), "{refused}");
    // Another address is still served, until the total is reached.
    let mut idle_b = Vec::new();
    for _ in 0..2 {
        idle_b.push(connect_from(&server, "127.0.0.2", "").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = read_to_close(connect_from(&server, "127.0.0.3", request).await).await;
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("as many connections open as it takes"), "{refused}");
    drop(idle_b);
    drop(idle_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = read_to_close(connect_from(&server, "127.0.0.1", request).await).await;
    assert!(served.starts_with("HTTP/1.1 200") && served.contains("hello from gpuwasm"), "{served}");
}

/// A client that does not finish its request head within the header
/// timeout is cut off; heads over the size or field-count limits get 431.
#[tokio::test]
async fn slow_and_oversized_request_heads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--header-timeout-secs", "1", "--max-header-kb", "8"]);
    server.deploy("hello", "hello", &[]);
    let t = Instant::now();
    let slow = read_to_close(connect_from(&server, "127.0.0.1", "GET /default/hello/ HTTP/1.1\r\nhost: x\r\n").await).await;
    assert!(!slow.contains("hello from gpuwasm"), "{slow}");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3), "cut off after {:?}", t.elapsed());

    let big = format!("GET /default/hello/ HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(9 << 10));
    let reply = read_to_close(connect_from(&server, "127.0.0.1", &big).await).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let many: String = (0..101).map(|i| format!("x-{i}: {i}\r\n")).collect();
    let reply = read_to_close(connect_from(&server, "127.0.0.1", &format!("GET /default/hello/ HTTP/1.1\r\nhost: x\r\n{many}\r\n")).await).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // A request within the limits is answered.
    let ok = read_to_close(connect_from(&server, "127.0.0.1", "GET /default/hello/ HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// A client that stops sending its body: the handler reading it gets an
/// error after the body timeout instead of waiting for ever, and answers.
/// The timeout is per wait: a body sent in parts whose gaps are each under
/// it is whole even when the whole takes longer, and a handler busy
/// elsewhere for longer than it does not count against the client.
#[tokio::test]
async fn a_stalled_request_body_ends_after_the_body_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--body-timeout-secs", "1"]);
    server.deploy("beh", "behaviors", &[]);
    let t = Instant::now();
    let head = "POST /default/beh/body-length HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nconnection: close\r\n\r\nabc";
    let reply = read_to_close(connect_from(&server, "127.0.0.1", head).await).await;
    assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("body error"), "{reply}");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(4), "answered after {:?}", t.elapsed());
    // A body sent in four parts 0.6 s apart (1.8 s in all) is whole.
    let mut stream = connect_from(&server, "127.0.0.1", "POST /default/beh/body-length HTTP/1.1\r\nhost: x\r\ncontent-length: 12\r\nconnection: close\r\n\r\nabc").await;
    for part in [b"def", b"ghi", b"jkl"] {
        tokio::time::sleep(Duration::from_millis(600)).await;
        tokio::io::AsyncWriteExt::write_all(&mut stream, part).await.unwrap();
    }
    let reply = read_to_close(stream).await;
    // Chunked: one chunk of two bytes, "12".
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\r\n\r\n2\r\n12\r\n0\r\n"), "{reply}");
    // A handler busy for 1.5 s before it reads; the rest of the body comes
    // 0.5 s after it starts waiting (2 s after the request): whole.
    let head = "POST /default/beh/slow-read?ms=1500 HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\nconnection: close\r\n\r\nabc";
    let mut stream = connect_from(&server, "127.0.0.1", head).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"def").await.unwrap();
    let reply = read_to_close(stream).await;
    assert!(reply.starts_with("HTTP/1.1 200") && reply.contains("\r\n\r\n1\r\n6\r\n0\r\n"), "{reply}");
}

/// The benchmark commands keep working (their figures are not asserted:
/// timing belongs to benchmarks, not tests).
#[test]
fn bench_commands_run_and_report_every_section() {
    let dir = wasm("hello").parent().unwrap().to_path_buf();
    let out = gpuwasm()
        .args(["bench", "http", wasm("hello").to_str().unwrap(), "--concurrency", "1,4", "--duration", "0.2"])
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(text.contains("concurrency   requests"), "{text}");
    assert_eq!(text.lines().filter(|l| l.trim_end().ends_with(" 0")).count(), 2, "two levels, no errors:\n{text}");

    let out = gpuwasm()
        .args(["bench", "coldstart", "--deployments", "3", "--idle", "3", "--instantiations", "20", "--slow-requests", "2"])
        .arg("--wasm-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let text = stdout_of(&out);
    for section in ["1. instantiate", "2. first request", "after restart: server side", "3. a handler", "speed-up", "4. resident memory", "per deployment"] {
        assert!(text.contains(section), "{section:?} missing from:\n{text}");
    }

    // `bench serve` without wasmtime says so, and measures gpuwasm on all
    // cores and pinned: a row per server and level, requests answered, none failed.
    let out = gpuwasm()
        .args(["bench", "serve", wasm("hello").to_str().unwrap(), "--wasmtime", "/nonexistent/wasmtime"])
        .args(["--concurrency", "1,4", "--duration", "0.2", "--rounds", "1"])
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(text.contains("comparing with: NOTHING"), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("gpuwasm run"))
        .map(|l| l.split_whitespace().rev().collect())
        .collect();
    assert_eq!(rows.len(), 4, "two servers at two levels:\n{text}");
    for row in &rows {
        // Reversed: errors, kernel, cores, p99, req/s, concurrency.
        assert_eq!(row[0], "0", "errors in:\n{text}");
        assert!(row[4].parse::<f64>().unwrap() > 0.0, "no requests answered:\n{text}");
    }
    assert_eq!(text.matches("gpuwasm all cores/one core").count(), 2, "{text}");
}

/// The environment a template's build command runs in here: the project's
/// guest toolchain (scripts/install-guest-toolchain.sh) where rustup could
/// not add the wasm32-wasip2 target, as scripts/build-guests.sh uses it.
fn template_build(dir: &std::path::Path) -> std::process::Command {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let env = std::fs::read_to_string(root.join("target/guest-toolchain.env"))
        .expect("target/guest-toolchain.env: run scripts/build-guests.sh first (scripts/test.sh does)");
    let mut build = gpuwasm();
    build.arg("build").arg(dir);
    if env.lines().any(|l| l == "GUEST_MODE=debian") {
        // Debian's cargo and rustc, std built from source: the config in a
        // parent folder of the project, where cargo finds it.
        let config = dir.parent().unwrap().join(".cargo/config.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::copy(root.join("target/guest-toolchain.toml"), config).unwrap();
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        build.env("PATH", path).env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
    }
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER"] {
        build.env_remove(var);
    }
    build
}

/// Each template, as a new user meets it: `gpuwasm new`, `gpuwasm build`
/// (Rust with cargo; JavaScript with componentize-js from npm; Python with
/// componentize-py from PyPI), `gpuwasm deploy` of the project folder, and
/// a request answered by the handler the template wrote.
#[tokio::test]
async fn every_template_builds_deploys_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    for template in ["rust", "js", "python"] {
        let name = format!("hello-{template}");
        let project = dir.path().join("projects").join(&name);
        let out = gpuwasm().args(["new", template, &name, "--dir"]).arg(&project).output().unwrap();
        assert!(out.status.success(), "gpuwasm new {template}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout_of(&out).contains("next:"), "{}", stdout_of(&out));
        // A second `new` into the same folder is refused, and writes nothing.
        let again = gpuwasm().args(["new", template, &name, "--dir"]).arg(&project).output().unwrap();
        assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));

        // Deploying before building says what to do.
        let early = server.cli(&["deploy", project.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&early.stderr).contains("gpuwasm build"), "{}", String::from_utf8_lossy(&early.stderr));

        let started = Instant::now();
        let out = template_build(&project).output().unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "gpuwasm build ({template}) failed:\n{log}");
        assert!(log.contains("built "), "{log}");
        eprintln!("{template}: built in {:.1} s", started.elapsed().as_secs_f64());

        let out = server.cli(&["deploy", project.to_str().unwrap()]);
        assert!(out.status.success(), "deploy {template}: {}", String::from_utf8_lossy(&out.stderr));
        let reply = get(&format!("{}/default/{name}/from/{template}", server.url)).await;
        assert_eq!(reply.status, 200, "{template}: {}", reply.body);
        assert_eq!(reply.body, format!("hello from {name}, you asked for /from/{template}\n"));
    }

    // Not a project, or a build that fails: clear errors.
    let out = gpuwasm().args(["build"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("has no gpuwasm.toml"));
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("gpuwasm.toml"), "name = \"broken\"\n[build]\ncommand = \"echo compiling; exit 3\"\noutput = \"x.wasm\"\n").unwrap();
    let out = gpuwasm().args(["build"]).arg(&broken).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the build command failed") && err.contains("compiling"), "{err}");
    let out = gpuwasm().args(["new", "rust", "Bad_Name"]).current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success() && !dir.path().join("Bad_Name").exists());
}

async fn get_owned(url: String) -> Reply {
    get(&url).await
}

/// `gpuwasm dev`: builds and serves a project, picks up an edit and serves
/// the new version with no request failing meanwhile, and keeps serving
/// the last good version when a build fails.
#[tokio::test]
async fn dev_rebuilds_on_change_without_dropping_requests() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("hello-dev");
    stdout_of(&gpuwasm().args(["new", "js", "hello-dev", "--dir"]).arg(&project).output().unwrap());
    let log = dir.path().join("dev.log");
    let mut child = gpuwasm()
        .arg("dev")
        .arg(&project)
        .args(["--listen", "127.0.0.1:0", "--poll-ms", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("gpuwasm listening on ").unwrap_or_else(|| panic!("{line:?}: {}", std::fs::read_to_string(&log).unwrap())).to_string();
    assert_eq!(get(&format!("{url}/a")).await.body, "hello from hello-dev, you asked for /a\n");

    // An edit: requests keep being answered, by the old version until the new one is in.
    let source = project.join("handler.js");
    let text = std::fs::read_to_string(&source).unwrap();
    std::fs::write(&source, text.replace("hello from", "howdy from")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut old_replies = 0;
    'swap: loop {
        // Four at a time, so requests are in flight when the version changes.
        let requests: Vec<_> = (0..4).map(|_| tokio::spawn(get_owned(format!("{url}/b")))).collect();
        let mut new_seen = false;
        for request in requests {
            let reply = request.await.unwrap();
            assert_eq!(reply.status, 200, "a request failed during the rebuild: {}", reply.body);
            match reply.body.as_str() {
                "hello from hello-dev, you asked for /b\n" => old_replies += 1,
                "howdy from hello-dev, you asked for /b\n" => new_seen = true,
                other => panic!("unexpected reply {other:?}"),
            }
        }
        if new_seen {
            break 'swap;
        }
        assert!(Instant::now() < deadline, "no new version after 180 s: {}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old_replies > 0, "the old version answered while the new one was built");

    // A build that fails: its error is shown, the last good version stays.
    std::fs::write(&source, "this is not JavaScript (").unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !std::fs::read_to_string(&log).unwrap().contains("build failed, still serving the last good version") {
        assert!(Instant::now() < deadline, "no failed build reported: {}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&format!("{url}/c")).await.body, "howdy from hello-dev, you asked for /c\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// HTTP/2 with prior knowledge ("h2c") on the plain port, beside
/// HTTP/1.1: curl's `--http2-prior-knowledge` reaches a guest and the
/// admin API over HTTP/2, and 20 requests multiplexed on one connection
/// are each answered (each with its own request id).
#[tokio::test]
async fn http2_prior_knowledge_serves_guests_and_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    server.deploy("hello", "hello", &[]);
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl").args(["-sS", "--http2-prior-knowledge"]).args(args).output().expect("curl runs");
        assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let guest = format!("{}/default/hello/", server.url);
    assert_eq!(curl(&["-w", "[HTTP %{http_version} %{http_code}]", &guest]), format!("{HELLO_ROOT}[HTTP 2 200]"));
    let admin = format!("{}/_gpuwasm/v1/whoami", server.url);
    let auth = format!("authorization: Bearer {TOKEN}");
    let me = curl(&["-H", &auth, "-w", "[HTTP %{http_version} %{http_code}]", &admin]);
    assert!(me.contains("\"tenant\": \"default\"") && me.ends_with("[HTTP 2 200]"), "{me}");

    // 20 requests at once on one connection, with hyper's HTTP/2 client
    // (curl 7.88.1 here, with --parallel, fails every stream after its
    // first with "Error in the HTTP2 framing layer"; hyper's client and
    // curl's single requests do not).
    let addr = server.url.trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let mut sender = sender.clone();
            let request = http::Request::get(&guest).body(http_body_util::Empty::<Bytes>::new()).unwrap();
            tokio::spawn(async move {
                let response = sender.send_request(request).await.unwrap();
                let id = response.headers()["x-request-id"].to_str().unwrap().to_string();
                (response.version(), id, response.into_body().collect().await.unwrap().to_bytes())
            })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for request in requests {
        let (version, id, body) = request.await.unwrap();
        assert_eq!((version, &body[..]), (http::Version::HTTP_2, HELLO_ROOT.as_bytes()));
        ids.insert(id);
    }
    assert_eq!(ids.len(), 20, "each request its own");
    // HTTP/1.1 on the same port, as before.
    assert_eq!(get(&guest).await.body, HELLO_ROOT);
}

/// Makes (again) a server certificate for 127.0.0.1 and localhost, signed
/// by the test CA in `dir` (made the first time), with `trustme`: writes
/// ca.pem, cert.pem and key.pem; returns the certificate's serial number.
fn issue_certificate(dir: &std::path::Path) -> String {
    let script = r#"
import os, sys, trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key
d = sys.argv[1]
if os.path.exists(f"{d}/ca-key.pem"):
    ca = trustme.CA.from_pem(open(f"{d}/ca.pem", "rb").read(), open(f"{d}/ca-key.pem", "rb").read())
else:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(f"{d}/ca.pem")
    ca.private_key_pem.write_to_path(f"{d}/ca-key.pem")
cert = ca.issue_cert("127.0.0.1", "localhost")
cert.private_key_pem.write_to_path(f"{d}/key.pem")
with open(f"{d}/cert.pem", "wb") as f:
    for pem in cert.cert_chain_pems:
        f.write(pem.bytes())
print(format(x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number, "x"))
"#;
    let out = python().args(["-c", script, dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// HTTPS with `--tls-cert`/`--tls-key`: Python's `ssl` client trusting a
/// test CA deploys through the admin API and calls the guest over TLS
/// (HTTP/1.1); curl negotiates HTTP/2 by ALPN; after a new certificate is
/// written (and SIGHUP sent: the 2 s file watch would also find it, so
/// this does not tell the two apart), new connections get it. Unusable files stop
/// the server at start with a message naming them.
#[tokio::test]
async fn https_with_alpn_http2_and_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    let first = issue_certificate(&tls);
    let (cert, key, ca) = (tls.join("cert.pem"), tls.join("key.pem"), tls.join("ca.pem"));
    let flags = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let server = Server::start_with(&dir.path().join("data"), &flags);
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);

    let client = r#"
import http.client, json, ssl, sys
url, ca, wasm, token = sys.argv[1:5]
host, port = url.removeprefix("https://").split(":")
context = ssl.create_default_context(cafile=ca)
def call(method, path, body=None, headers={}):
    c = http.client.HTTPSConnection(host, int(port), context=context)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    out = (r.status, r.read().decode(), c.sock.version(), format(int(c.sock.getpeercert()["serialNumber"], 16), "x"))
    c.close()
    return out
status, body, _, _ = call("PUT", "/_gpuwasm/v1/deployments/hello", open(wasm, "rb").read(), {"authorization": "Bearer " + token})
assert status in (200, 201), (status, body)
print(json.dumps(call("GET", "/default/hello/")))
"#;
    let hello = support::wasm("hello");
    let run_client = || {
        let out = python().args(["-c", client, &server.url, ca.to_str().unwrap(), hello.to_str().unwrap(), TOKEN]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let reply = run_client();
    assert_eq!(reply[0], 200, "{reply}");
    assert_eq!(reply[1], HELLO_ROOT);
    assert_eq!(reply[2], "TLSv1.3");
    assert_eq!(reply[3], first.as_str(), "the certificate served");

    let guest = format!("{}/default/hello/", server.url);
    let out = std::process::Command::new("curl").args(["-sS", "--http2", "--cacert", ca.to_str().unwrap(), "-w", "[HTTP %{http_version}]", &guest]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{HELLO_ROOT}[HTTP 2]"), "{}", String::from_utf8_lossy(&out.stderr));

    // A new certificate, then SIGHUP: new connections get it.
    let second = issue_certificate(&tls);
    assert_ne!(first, second);
    server.signal(libc::SIGHUP);
    let start = Instant::now();
    loop {
        let reply = run_client();
        if reply[3] == second.as_str() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still serving {} after SIGHUP", reply[3]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Files that are not a certificate and key: a clear refusal at start.
    std::fs::write(tls.join("bad.pem"), "not a certificate\n").unwrap();
    let out = gpuwasm()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.path().join("other").to_str().unwrap()])
        .args(["--tls-cert", tls.join("bad.pem").to_str().unwrap(), "--tls-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bad.pem: holds no certificate"), "{stderr}");
}
