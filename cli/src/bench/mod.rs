//! `gpuwasm bench`: benchmarks that print their figures.

mod coldstart;
mod http;
mod nn;

use anyhow::Result;
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum Bench {
    /// Requests/s and latency p50/p99 of one component over loopback.
    #[command(after_help = crate::args::default_limits_help())]
    Http(http::HttpArgs),
    /// Cold starts: instantiation, first requests after deploy and restart,
    /// pre-initialisation, throughput against `wasmtime serve`, idle memory.
    Coldstart(coldstart::ColdstartArgs),
    /// Inference: embeddings/s natively and through wasi-nn at batch 1 and
    /// 32, and model load times (scripts/bench-nn.sh adds sentence-transformers).
    Nn(nn::NnArgs),
}

pub async fn run(bench: Bench) -> Result<ExitCode> {
    match bench {
        Bench::Http(args) => http::run(args).await,
        Bench::Coldstart(args) => coldstart::run(args).await,
        Bench::Nn(args) => nn::run(args).await,
    }
}
