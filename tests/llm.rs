//! LLM serving end to end: a real server, SmolLM2 pushed with the real
//! CLI, the chat example deployed, and real clients (the official `openai`
//! Python client, curl -N, raw HTTP/1.1): streamed and whole answers, bad
//! requests in OpenAI's error shape, a client that hangs up mid-stream,
//! 100 concurrent streams against their solo runs, hostile GGUF pushes.

mod support;
#[path = "test_models.rs"]
mod test_models;
mod hostile;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{Server, python, send, stdout_of};
use test_models::model_path;

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chat/gpuwasm.toml")
}

/// A server with SmolLM2 pushed as `smollm2` and the chat example deployed
/// as `chat` (and, with `--max-tokens 4`, as `capped`).
fn chat_server(dir: &tempfile::TempDir, flags: &[&str]) -> Server {
    let server = Server::start_with(&dir.path().join("data"), flags);
    let smollm2 = model_path("smollm2");
    let pushed = stdout_of(&server.cli(&["model", "push", "smollm2", smollm2.to_str().unwrap()]));
    assert!(pushed.contains("llama decoder, 30 layers, width 576, 9 heads (3 key/value), vocabulary 49152"), "{pushed}");
    let manifest = manifest();
    server.deploy("chat", "chat", &["--manifest", manifest.to_str().unwrap()]);
    server.deploy("capped", "chat", &["--manifest", manifest.to_str().unwrap(), "--max-tokens", "4"]);
    server
}

fn url(server: &Server, deployment: &str, path: &str) -> String {
    format!("{}/default/{deployment}/v1/{path}", server.url)
}

async fn post(server: &Server, deployment: &str, path: &str, body: &str) -> (u16, http::HeaderMap, Value) {
    let reply = send("POST", &url(server, deployment, path), &[("content-type", "application/json")], body.to_string()).await;
    let json = serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("not JSON: {}", reply.body));
    (reply.status, reply.headers, json)
}

/// The engine's counters for `smollm2` (`null` while it is not loaded).
async fn engine(server: &Server) -> Value {
    let reply = send("GET", &format!("{}/_gpuwasm/v1/models/smollm2", server.url), &[("authorization", &format!("Bearer {}", support::TOKEN))], "").await;
    serde_json::from_str::<Value>(&reply.body).unwrap()["loaded"]["generation"].clone()
}

/// The text of an SSE stream of chat chunks, checking each event's shape.
fn sse_text(body: &str) -> (String, Vec<Value>) {
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "the stream ends with [DONE]: {body}");
    let mut text = String::new();
    let mut chunks = Vec::new();
    for event in &events[..events.len() - 1] {
        let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {event:?}"));
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        if let Some(choice) = chunk["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        }
        chunks.push(chunk);
    }
    (text, chunks)
}

#[tokio::test]
async fn the_official_openai_client_streams_and_gets_whole_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = chat_server(&dir, &[]);
    let script = r#"
import sys
from openai import OpenAI, NotFoundError, BadRequestError
c = OpenAI(base_url=sys.argv[1], api_key="unused")
msgs = [{"role": "user", "content": "What is the capital of France?"}]
whole = c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24)
text = whole.choices[0].message.content
assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant", whole
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.prompt_tokens > 10 and 0 < whole.usage.completion_tokens <= 24, whole.usage
parts, usage, finish = [], None, None
for chunk in c.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24,
                                       stream=True, stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
assert len(parts) > 3, parts
assert "".join(parts) == text, ("".join(parts), text)
assert finish == whole.choices[0].finish_reason, finish
assert usage.completion_tokens == whole.usage.completion_tokens, usage
done = c.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=6, temperature=0)
assert done.object == "text_completion" and done.choices[0].finish_reason == "length", done
assert done.choices[0].text.strip().startswith("6"), done.choices[0].text
assert [m.id for m in c.models.list()] == ["smollm2"]
try:
    c.chat.completions.create(model="gpt-4o", messages=msgs)
    raise SystemExit("an unknown model was served")
except NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 9000}])
    raise SystemExit("a prompt over the context was served")
except BadRequestError as e:
    assert e.code == "context_length_exceeded", e
print("openai client ok:", repr(text))
"#;
    let base = url(&server, "chat", "");
    let out = python().args(["-c", script, base.trim_end_matches('/')]).output().expect("running python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("openai client ok"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}");

    // curl -N: the events arrive as OpenAI sends them.
    let body = json!({"model": "smollm2", "stream": true, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "Name a colour."}]});
    let out = std::process::Command::new("curl")
        .args(["-sS", "-N", "-D", "-", "-H", "content-type: application/json", "-d", &body.to_string(), &url(&server, "chat", "chat/completions")])
        .output()
        .expect("running curl");
    let reply = String::from_utf8(out.stdout).unwrap();
    let (head, events) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    let (text, chunks) = sse_text(events);
    assert!(!text.is_empty(), "{events}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "the first chunk names the role");
    let last = chunks.last().unwrap();
    assert!(["stop", "length"].contains(&last["choices"][0]["finish_reason"].as_str().unwrap()), "{last}");
    let ids: Vec<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]) && ids[0].len() > 20 && ids[0] != "chatcmpl-000000000000000000000000", "{ids:?}");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = chat_server(&dir, &[]);
    let cases = [
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}"#, "body", "invalid JSON body"),
        (r#"[1, 2]"#, "body", "must be a JSON object"),
        (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, "model", "`model` is required"),
        (r#"{"model": "smollm2"}"#, "messages", "`messages` is required"),
        (r#"{"model": "smollm2", "messages": "hi"}"#, "messages", "must be a list"),
        (r#"{"model": "smollm2", "messages": []}"#, "messages", "must not be empty"),
        (r#"{"model": "smollm2", "messages": [{"content": "hi"}]}"#, "messages[0]", "missing field `role`"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": 7}]}"#, "messages[0].content", "content must be a string"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#, "temperature", "`temperature`"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#, "max_tokens", "at least 1"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}"#, "stop", "up to 4 strings"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}"#, "logit_bias", "not a token id"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "tools": []}"#, "tools", "unrecognized request argument"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 2}"#, "n", "only n = 1"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": 150}"#, "temperature", "out of range: 0 to 100"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}"#, "stop", "1 to 256 allowed"),
        (r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 1}}"#, "logit_bias", "not in the 49152-token vocabulary"),
    ];
    for (body, param, message) in cases {
        let (status, _, reply) = post(&server, "chat", "chat/completions", body).await;
        assert_eq!(status, 400, "{body}: {reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{body}: {reply}");
        assert_eq!(reply["error"]["param"], param, "{body}: {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains(message), "{body}: {reply}");
    }
    let (status, _, reply) = post(&server, "chat", "chat/completions", r#"{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}"#).await;
    assert_eq!((status, &reply["error"]["code"]), (404, &json!("model_not_found")), "{reply}");

    // Over the deployment's cap: capped, and the reply says so.
    let body = json!({"model": "smollm2", "max_tokens": 100, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}]});
    let (status, headers, reply) = post(&server, "capped", "chat/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(headers["x-gpuwasm-max-tokens"], "4 (asked 100; the deployment's cap)");
    assert_eq!(reply["usage"]["completion_tokens"], 4, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "length", "{reply}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_stops_its_generation_and_frees_its_blocks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = chat_server(&dir, &[]);
    // Counting goes on for as long as it is let: 2000 tokens would take
    // tens of seconds.
    let body = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "temperature": 0, "stream": true}).to_string();
    let authority = server.url.strip_prefix("http://").unwrap();
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let head = format!(
        "POST /default/chat/v1/completions HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await.expect("no tokens within 60 s").unwrap();
        assert!(n > 0, "the server closed the stream: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let running = engine(&server).await;
    assert_eq!(running["running"], 1, "{running}");
    assert!(running["free_blocks"].as_u64() < running["total_blocks"].as_u64(), "{running}");
    drop(stream);
    let start = Instant::now();
    loop {
        let now = engine(&server).await;
        if now["running"] == 0 && now["free_blocks"] == now["total_blocks"] && now["cancelled"] == 1 {
            let generated = now["generated_tokens"].as_u64().unwrap();
            assert!(generated < 1000, "the generation ran on after the hang-up: {now}");
            eprintln!("hung up: cancelled within {:?}, {generated} tokens generated: {now}", start.elapsed());
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the generation was not cancelled: {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_streams_each_get_their_solo_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = chat_server(&dir, &[]);
    let questions = ["What is the capital of France?", "Name three fruits.", "What is 2 + 2?", "Say hello in German.", "What colour is the sky?"];
    let request = |q: &str, stream: bool| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 16, "stream": stream, "messages": [{"role": "user", "content": q}]}).to_string()
    };
    let mut solo = Vec::new();
    for q in questions {
        let (status, _, reply) = post(&server, "chat", "chat/completions", &request(q, false)).await;
        assert_eq!(status, 200, "{reply}");
        solo.push(reply["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    let before = engine(&server).await;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (url, body) = (url(&server, "chat", "chat/completions"), request(questions[i % questions.len()], true));
            tokio::spawn(async move { (i, send("POST", &url, &[("content-type", "application/json")], body).await) })
        })
        .collect();
    for task in tasks {
        let (i, reply) = task.await.unwrap();
        assert_eq!(reply.status, 200, "stream {i}: {}", reply.body);
        let (text, _) = sse_text(&reply.body);
        assert_eq!(text, solo[i % questions.len()], "stream {i} differs from its prompt's solo run");
    }
    let after = engine(&server).await;
    assert_eq!(after["free_blocks"], after["total_blocks"], "{after}");
    let status = send("GET", &format!("{}/_gpuwasm/v1/models/smollm2", server.url), &[("authorization", &format!("Bearer {}", support::TOKEN))], "").await;
    let loaded: Value = serde_json::from_str(&status.body).unwrap();
    let largest = loaded["loaded"]["largest_batch"].as_u64().unwrap();
    assert!(largest >= 16, "streams shared steps: at most {largest} sequences in one step ({before} -> {after})");
    eprintln!("100 streams, each its solo tokens; up to {largest} sequences in one step");
}

#[tokio::test]
async fn hostile_gguf_files_fail_the_push_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &[]);
    let cases = [
        ("huge-vocab", hostile::gguf_decoder(1 << 40, 64), "implausible sizes: 1 layers, width 64, feed-forward 128, vocabulary 1099511627776"),
        ("wrong-shape", hostile::gguf_decoder(4, 32), "tensor blk.0.attn_q.weight is [64, 32], the architecture needs [64, 64]"),
    ];
    for (name, bytes, message) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let out = server.cli(&["model", "push", name, path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{name}: {stderr}");
    }
    // The same file with honest sizes is checked as far as its tokenizer,
    // which these four tokens do not make (no merges).
    let honest = dir.path().join("honest.gguf");
    std::fs::write(&honest, hostile::gguf_decoder(4, 64)).unwrap();
    let out = server.cli(&["model", "push", "honest", honest.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("merges"), "{out:?}");
    let listed = stdout_of(&server.cli(&["model", "list"]));
    assert!(listed.contains("no models"), "nothing was recorded: {listed}");
}

/// The text and finish reason of a whole answer of the text endpoint.
async fn completion(server: &Server, deployment: &str, body: Value) -> (u16, String, String) {
    let (status, _, reply) = post(server, deployment, "completions", &body.to_string()).await;
    let text = reply["choices"][0]["text"].as_str().unwrap_or_default().to_string();
    let finish = reply["choices"][0]["finish_reason"].as_str().unwrap_or_default().to_string();
    (status, text, finish)
}

#[tokio::test]
async fn seeds_repeat_stops_end_and_stream_time_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = chat_server(&dir, &[]);
    // The same seed, the same text; another seed, another text.
    let sampled = |seed: u64| json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": seed});
    let (status, first, _) = completion(&server, "chat", sampled(42)).await;
    assert_eq!(status, 200, "{first}");
    let (_, again, _) = completion(&server, "chat", sampled(42)).await;
    let (_, other, _) = completion(&server, "chat", sampled(43)).await;
    assert_eq!(first, again, "seed 42 twice");
    assert_ne!(first, other, "seeds 42 and 43 gave the same 24 sampled tokens");

    // A stop string ends the text before it, with finish_reason stop.
    let counting = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40, "temperature": 0, "stop": [" 9"]});
    let (_, text, finish) = completion(&server, "chat", counting).await;
    assert!(text.contains('8') && !text.contains('9'), "{text:?}");
    assert_eq!(finish, "stop", "{text:?}");

    // A generation longer than the deployment's stream_ms is cut off, and
    // its sequence freed.
    let manifest = manifest();
    server.deploy("brief", "chat", &["--manifest", manifest.to_str().unwrap(), "--stream-ms", "1500", "--timeout-ms", "1000"]);
    let start = Instant::now();
    let long = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "temperature": 0});
    let reply = send("POST", &url(&server, "brief", "completions"), &[("content-type", "application/json")], long.to_string()).await;
    let took = start.elapsed();
    assert_eq!(reply.status, 504, "after {took:?}: {}", reply.body);
    assert!(reply.body.contains("within its time limit of 1500 ms"), "{}", reply.body);
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(10), "{took:?}");
    let start = Instant::now();
    loop {
        let now = engine(&server).await;
        if now["running"] == 0 && now["free_blocks"] == now["total_blocks"] {
            assert_eq!(now["cancelled"], 1, "the cut-off generation was cancelled: {now}");
            // Everything generated in this test: 3 x 24, at most 40, and the cut-off one.
            assert!(now["generated_tokens"].as_u64().unwrap() < 1000, "the cut-off generation ran on: {now}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the cut-off generation still runs: {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
