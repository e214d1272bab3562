//! `gpuwasm bench`: benchmarks that print their figures.

mod coldstart;
mod http;
mod llm;
mod nn;
mod serve;
mod share;

use anyhow::{Context, Result};
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum Bench {
    /// Requests/s and latency p50/p99 of one component over loopback.
    #[command(after_help = crate::args::default_limits_help())]
    Http(http::HttpArgs),
    /// Cold starts: instantiation, first requests after deploy and restart,
    /// pre-initialisation, idle memory.
    Coldstart(coldstart::ColdstartArgs),
    /// Throughput, p99 and the kernel's share of CPU of `gpuwasm run`
    /// against `wasmtime serve`, for several components, each server also
    /// pinned to one core (scripts/bench-serve.sh builds what it needs).
    Serve(serve::ServeArgs),
    /// Inference: embeddings/s and images/s on every backend present (the
    /// CPU the baseline) and through wasi-nn, and model load times
    /// (scripts/bench-nn.sh adds sentence-transformers).
    Nn(nn::NnArgs),
    /// Fair GPU time: a light tenant's latency alone and while a heavy
    /// tenant saturates the GPU (p99 ratio; goal at most 2x).
    GpuShare(share::ShareArgs),
    /// Text generation through the chat example: load to first token,
    /// time to first token, decode tokens/s, aggregate tokens/s of many
    /// streams (scripts/bench-llm.sh adds llama.cpp).
    Llm(llm::LlmArgs),
}

/// Embeds the lines of `text` through the nn-probe component's
/// `/embed-lines?minilm` (one wasi-nn call); fails unless it answers `ok`.
async fn embed_lines(probe: &gpuwasm::Deployment, text: impl Into<bytes::Bytes>) -> Result<()> {
    use http_body_util::BodyExt;
    let request = ::http::Request::post("http://localhost/embed-lines?minilm").body(http_body_util::Full::new(text.into()))?;
    let response = probe.handle(request).await;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| anyhow::anyhow!("{e}"))?.to_bytes();
    if status != 200 || !body.starts_with(b"ok ") {
        anyhow::bail!("the probe answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// The URL in the first line `gpuwasm run` or `gpuwasm serve` prints.
fn read_listen_line(child: &mut std::process::Child) -> Result<String> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    line.trim()
        .strip_prefix("gpuwasm listening on ")
        .map(str::to_string)
        .with_context(|| format!("unexpected first line from the server: {line:?}"))
}

/// Resident memory (VmRSS) of process `pid`, in MiB.
fn vm_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb / 1024.0)
}

pub async fn run(bench: Bench) -> Result<ExitCode> {
    match bench {
        Bench::Http(args) => http::run(args).await,
        Bench::Coldstart(args) => coldstart::run(args).await,
        Bench::Serve(args) => serve::run(args).await,
        Bench::Nn(args) => nn::run(args).await,
        Bench::GpuShare(args) => share::run(args).await,
        Bench::Llm(args) => llm::run(args).await,
    }
}
