//! `gpuwasm bench llm`: text generation through the chat example over
//! loopback HTTP, served in-process: model load to first token, time to
//! first token for a long prompt, decode tokens/s of one sequence, and
//! aggregate tokens/s of many concurrent streams. scripts/bench-llm.sh
//! runs it beside llama.cpp on the same file.
//!
//! Prompts are counting sequences (`100, 101, 102, ...`): the model goes
//! on counting for as long as it is let, so every request generates all
//! the tokens it asks for (each answer's usage is checked).

use crate::args::GpuArgs;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm::nn::{LlmSettings, LocalModels, ModelAccess, Target};
use gpuwasm::{Capabilities, Limits, Runtime};
use gpuwasm_server::serve_connections;
use gpuwasm_tensor::Format;
use gpuwasm_tensor::llm::tokenizer::Tokenizer;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

#[derive(Args)]
pub struct LlmArgs {
    /// The GGUF model (scripts/fetch-test-models.sh prints SmolLM2's path).
    #[arg(long)]
    model: PathBuf,
    /// The chat example component (target/wasm/chat.wasm).
    #[arg(long)]
    chat: PathBuf,
    /// Tokens each decode measurement generates.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Tokens of the prompt whose time to first token is measured.
    #[arg(long, default_value_t = 200)]
    prompt_tokens: usize,
    /// Concurrent streams to measure aggregate tokens/s at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    streams: Vec<usize>,
    /// Repetitions of each single-sequence figure (the median is printed).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The model's key/value cache, in MiB (as `serve --llm-cache-mb`):
    /// the default holds 64 SmolLM2 streams of 128 tokens without
    /// preempting any.
    #[arg(long, default_value_t = 512)]
    cache_mb: u64,
    #[command(flatten)]
    gpus: GpuArgs,
}

/// A counting prompt of about `numbers` numbers from `from`.
fn counting(from: usize, numbers: usize) -> String {
    (from..from + numbers).map(|n| format!("{n}, ")).collect::<String>().trim_end().to_string()
}

/// `model`'s tokenizer.
fn tokenizer(model: &std::path::Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(model)?;
    Ok(Tokenizer::from_gguf(&gpuwasm_tensor::gguf::Gguf::parse(&bytes)?)?)
}

/// Prose of `tokens` tokens as `tokenizer` counts them, starting with
/// `seed` so that no two are alike.
fn long_prompt(tokenizer: &Tokenizer, seed: usize, tokens: usize) -> Result<String> {
    let words = "the history of every science is a long story of small steps taken by many people who asked simple questions ";
    let text = format!("{seed} {}", words.repeat(tokens / 10 + 2));
    let ids = tokenizer.encode(&text)?;
    Ok(tokenizer.decode(&ids[..tokens.min(ids.len())]))
}

/// One in-process server of the chat example over `model`.
struct Server {
    authority: String,
}

async fn serve(args: &LlmArgs, max_streams: usize) -> Result<Server> {
    let wasm = std::fs::read(&args.chat).with_context(|| format!("reading {}", args.chat.display()))?;
    let runtime = Runtime::builder()
        .devices(args.gpus.devices())
        .max_instances((max_streams as u32 + 8).max(64))
        .max_instances_per_tenant((max_streams as u32 + 8).max(64))
        .llm(LlmSettings { cache_mb: args.cache_mb, max_seqs: max_streams.max(1), ..LlmSettings::default() })
        .build()?;
    let mut models = LocalModels::default();
    models.add("bench", Format::Gguf, args.model.clone());
    let access = ModelAccess { tenant: "bench".into(), allow: vec!["bench".into()], catalog: Some(Arc::new(models)), target: Target::Auto, ..ModelAccess::default() };
    let capabilities = Capabilities { env: [("MODELS".to_string(), "bench".to_string())].into(), models: access, ..Capabilities::default() };
    let limits = Limits {
        concurrency: max_streams as u32 + 8,
        timeout_ms: 600_000,
        cpu_ms: 60_000,
        stream_ms: 600_000,
        max_tokens: args.tokens.max(1024),
        ..Limits::default()
    };
    let deployment = Arc::new(runtime.load_with("bench", &wasm, limits, capabilities).await?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let authority = listener.local_addr()?.to_string();
    let handler = move |req| {
        let deployment = deployment.clone();
        async move { deployment.handle(req).await }
    };
    tokio::spawn(serve_connections(listener, handler, Default::default(), std::future::pending()));
    Ok(Server { authority })
}

impl Server {
    /// Completes `prompt` greedily with `max_tokens` (streamed when
    /// `stream`); returns the answer's prompt and completion tokens, the
    /// latter checked.
    async fn complete(&self, prompt: &str, max_tokens: u32, stream: bool) -> Result<(u64, u32)> {
        let body = json!({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "stream_options": {"include_usage": true}});
        let tcp = TcpStream::connect(&self.authority).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let request = http::Request::post("/v1/completions")
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        if status != 200 {
            bail!("the chat example answered {status}: {text}");
        }
        let usage: Value = if stream {
            let last = text.split("\n\n").filter(|e| e.starts_with("data: {")).last().context("no events in the stream")?;
            serde_json::from_str::<Value>(&last["data: ".len()..])?["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&text)?["usage"].clone()
        };
        let tokens = usage["completion_tokens"].as_u64().context("no usage in the answer")? as u32;
        if tokens != max_tokens {
            bail!("asked for {max_tokens} tokens, got {tokens}: the counting prompt stopped early");
        }
        Ok((usage["prompt_tokens"].as_u64().unwrap_or(0), tokens))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(args: LlmArgs) -> Result<ExitCode> {
    if args.tokens < 2 || args.repeat == 0 || args.streams.contains(&0) {
        bail!("--tokens must be at least 2, --repeat and every --streams level at least 1");
    }
    let max_streams = args.streams.iter().copied().max().unwrap_or(1);
    println!(
        "gpuwasm bench llm: {} through the chat example over loopback HTTP ({} MiB key/value cache, up to {max_streams} sequences a step)",
        args.model.display(),
        args.cache_mb
    );

    // Model load to first token: a fresh runtime each time (the file in the
    // page cache after the first), its first request.
    let mut loads = Vec::new();
    for _ in 0..args.repeat + 1 {
        let server = serve(&args, 1).await?;
        let start = Instant::now();
        server.complete("1, 2, 3,", 1, false).await?;
        loads.push(start.elapsed().as_secs_f64() * 1e3);
    }
    loads.remove(0); // the first read the file from disk
    let server = serve(&args, max_streams).await?;
    server.complete("1, 2, 3,", 1, false).await?; // loaded

    // Time to first token for a long prompt: one token asked, whole answer.
    let mut ttft = Vec::new();
    let tokenizer = tokenizer(&args.model)?;
    for i in 0..args.repeat {
        // A different prompt each time: nothing can be reused.
        let prompt = long_prompt(&tokenizer, i, args.prompt_tokens)?;
        let start = Instant::now();
        let (tokens, _) = server.complete(&prompt, 1, false).await?;
        ttft.push(start.elapsed().as_secs_f64() * 1e3);
        if tokens.abs_diff(args.prompt_tokens as u64) > 2 {
            bail!("the long prompt came to {tokens} tokens, not {}", args.prompt_tokens);
        }
    }

    // Decode: N tokens against 1 on the same short prompt.
    let mut decode = Vec::new();
    for i in 0..args.repeat {
        let prompt = counting(100 * (i + 1), 4);
        let start = Instant::now();
        server.complete(&prompt, 1, false).await?;
        let one = start.elapsed().as_secs_f64();
        let start = Instant::now();
        server.complete(&prompt, args.tokens, false).await?;
        let all = start.elapsed().as_secs_f64();
        decode.push((args.tokens - 1) as f64 / (all - one));
    }
    let (load_ms, ttft_ms, decode_rate) = (median(loads), median(ttft), median(decode));
    println!("{:<44} {:>10.1}", "model load to first token, ms", load_ms);
    println!("{:<44} {:>10.1}", format!("time to first token, {}-token prompt, ms", args.prompt_tokens), ttft_ms);
    println!("{:<44} {:>10.1}", "decode, 1 sequence, tokens/s", decode_rate);
    println!("key load_to_first_token_ms={load_ms:.1}");
    println!("key ttft_ms={ttft_ms:.1}");
    println!("key decode_tok_s={decode_rate:.2}");

    // Aggregate: every stream asks for N tokens at once; tokens over the wall time.
    let server = Arc::new(server);
    for &streams in &args.streams {
        let start = Instant::now();
        let tasks: Vec<_> = (0..streams)
            .map(|i| {
                let (server, tokens) = (server.clone(), args.tokens);
                tokio::spawn(async move { server.complete(&counting(1000 + 37 * i, 4), tokens, true).await })
            })
            .collect();
        let mut total = 0u64;
        for task in tasks {
            total += task.await??.1 as u64;
        }
        let rate = total as f64 / start.elapsed().as_secs_f64();
        println!(
            "{:<44} {:>10.1}  ({:.1}x one sequence)",
            format!("aggregate, {streams} streams, tokens/s"),
            rate,
            rate / decode_rate
        );
        println!("key aggregate_{streams}_tok_s={rate:.2}");
    }
    Ok(ExitCode::SUCCESS)
}
