//! `gpuwasm bench gpu-share`: fair GPU time. A light tenant sends one
//! embedding request at a time, alone on the GPU and then while a heavy
//! tenant saturates it with many concurrent requests of the same size;
//! prints the light tenant's latency percentiles in both cases and their
//! ratio (the goal: contended p99 within 2x of solo p99), and the heavy
//! tenant's throughput. Both tenants use the same model on the same GPU,
//! through wasi-nn from the nn-probe component, in-process.

use crate::args::GpuArgs;
use anyhow::{Context, Result, bail};
use clap::Args;
use gpuwasm::nn::{LocalModels, ModelAccess, Target};
use gpuwasm::{Capabilities, Deployment, Limits, Runtime};
use gpuwasm_tensor::Format;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ShareArgs {
    /// The MiniLM model directory (scripts/fetch-test-models.sh prints it).
    #[arg(long)]
    minilm: PathBuf,
    /// The nn-probe test component (target/wasm/nn_probe.wasm).
    #[arg(long)]
    probe: PathBuf,
    /// Seconds the light tenant is measured, alone and then contended.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Requests the heavy tenant keeps in flight.
    #[arg(long, default_value_t = 16)]
    heavy_clients: usize,
    #[command(flatten)]
    gpus: GpuArgs,
}

async fn embed(deployment: &Deployment) -> Result<()> {
    super::embed_lines(deployment, "a request about fairness").await
}

/// The light tenant's latencies over `seconds`, one request at a time.
async fn light_latencies(light: &Deployment, seconds: f64) -> Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let asked = Instant::now();
        embed(light).await?;
        latencies.push(asked.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

pub async fn run(args: ShareArgs) -> Result<ExitCode> {
    let devices = args.gpus.devices();
    let Some(gpu) = devices.gpu().map(|g| g.info().clone()) else {
        bail!("no GPU to share ({}); on a machine without one, --gpus software uses lavapipe", devices.notes().join("; "));
    };
    let runtime = Runtime::builder().devices(devices).max_instances(4 * args.heavy_clients as u32).build()?;
    let wasm = std::fs::read(&args.probe).with_context(|| format!("reading {}", args.probe.display()))?;
    let limits = Limits { cpu_ms: 60_000, timeout_ms: 60_000, concurrency: 2 * args.heavy_clients as u32, ..Limits::default() };
    let deploy = async |tenant: &str| -> Result<Arc<Deployment>> {
        let mut models = LocalModels::default();
        models.add("minilm", Format::Safetensors, args.minilm.clone());
        let access = ModelAccess { tenant: tenant.into(), allow: vec!["minilm".into()], catalog: Some(Arc::new(models)), target: Target::Gpu, ..ModelAccess::default() };
        let capabilities = Capabilities { models: access, ..Capabilities::default() };
        Ok(Arc::new(runtime.load_with(tenant, &wasm, limits.clone(), capabilities).await?))
    };
    let (light, heavy) = (deploy("light").await?, deploy("heavy").await?);
    // Load the model and warm both paths.
    for _ in 0..3 {
        embed(&light).await?;
        embed(&heavy).await?;
    }

    let solo = light_latencies(&light, args.seconds).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let heavy_done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..args.heavy_clients)
        .map(|_| {
            let (heavy, stop, done) = (heavy.clone(), stop.clone(), heavy_done.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    embed(&heavy).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = heavy_done.load(Ordering::Relaxed);
    let started = Instant::now();
    let contended = light_latencies(&light, args.seconds).await?;
    let heavy_rate = (heavy_done.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await??;
    }

    println!("GPU: {} ({})", gpu.name, gpu.kind.name());
    println!("light tenant: one request at a time; heavy tenant: {} requests in flight; same model, same request size", args.heavy_clients);
    println!("{:<28} {:>10} {:>10} {:>10} {:>10}", "light tenant latency, ms", "requests", "p50", "p90", "p99");
    for (name, l) in [("alone", &solo), ("heavy tenant saturating", &contended)] {
        println!("{name:<28} {:>10} {:>10.2} {:>10.2} {:>10.2}", l.len(), percentile(l, 0.5), percentile(l, 0.9), percentile(l, 0.99));
    }
    let ratio = percentile(&contended, 0.99) / percentile(&solo, 0.99);
    println!("p99 contended / alone: {ratio:.2}x (goal: at most 2x)");
    println!("heavy tenant meanwhile: {heavy_rate:.1} requests/s");
    println!("key light_p99_solo_ms={:.2}", percentile(&solo, 0.99));
    println!("key light_p99_contended_ms={:.2}", percentile(&contended, 0.99));
    println!("key p99_ratio={ratio:.2}");
    println!("key heavy_rps={heavy_rate:.1}");
    Ok(ExitCode::SUCCESS)
}
