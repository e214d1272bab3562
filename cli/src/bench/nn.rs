//! `gpuwasm bench nn`: the inference engine on MiniLM, called natively on
//! every backend present (the CPU first, the baseline) and through wasi-nn
//! from a component, at batch 1 and 32; the digits classifier's images/s
//! per backend; and model load times. scripts/bench-nn.sh runs it beside
//! sentence-transformers.

use anyhow::{Context, Result, bail};
use clap::Args;
use crate::args::GpuArgs;
use gpuwasm::nn::{LocalModels, ModelAccess, Target, read_model_files};
use gpuwasm::{Capabilities, Limits, Runtime};
use gpuwasm_tensor::backend::SharedBackend;
use gpuwasm_tensor::{Data, Format, Graph, Tensor};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct NnArgs {
    /// The MiniLM model directory (scripts/fetch-test-models.sh prints it).
    #[arg(long)]
    minilm: PathBuf,
    /// The nn-probe test component (target/wasm/nn_probe.wasm).
    #[arg(long)]
    probe: PathBuf,
    /// Sentences to embed, one per line (scripts/bench-sentences.txt).
    #[arg(long)]
    sentences: PathBuf,
    /// The digits classifier (examples/classify/digits.onnx): its load
    /// time, and images/s per backend.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Also measure batches of this many texts on GPU backends (256 on a
    /// real GPU; too slow on lavapipe). 0: no.
    #[arg(long, default_value_t = 0)]
    large_batch: usize,
    #[command(flatten)]
    gpus: GpuArgs,
    /// Seconds per measurement in each round.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds: each measures all four figures in turn, so drift on a busy
    /// machine hits them alike; the medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Runs `call` repeatedly for about `seconds`; returns calls per second.
async fn rate<F: AsyncFnMut() -> Result<()>>(seconds: f64, mut call: F) -> Result<f64> {
    call().await?; // warm up
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        call().await?;
        calls += 1;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

fn median_ms(mut runs: Vec<Duration>) -> f64 {
    runs.sort();
    runs[runs.len() / 2].as_secs_f64() * 1e3
}

pub async fn run(args: NnArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.sentences).with_context(|| format!("reading {}", args.sentences.display()))?;
    let sentences: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    if sentences.len() < 32 {
        bail!("{} has {} sentences; the batch-32 figure needs 32", args.sentences.display(), sentences.len());
    }
    let batch = &sentences[..32];

    let devices = args.gpus.devices();
    for note in devices.notes() {
        println!("no GPU backend: {note}");
    }
    let backends: Vec<SharedBackend> = std::iter::once(devices.cpu().clone()).chain(devices.gpus().iter().cloned()).collect();

    // Model load on the CPU: read the files and build the graph, three times.
    let mut loads = Vec::new();
    let mut graph: Option<Arc<dyn Graph>> = None;
    for _ in 0..3 {
        let start = Instant::now();
        let files = read_model_files(Format::Safetensors, &args.minilm)?;
        graph = Some(gpuwasm_tensor::load(Format::Safetensors, &files, devices.cpu().clone())?);
        loads.push(start.elapsed());
    }
    let graph = graph.expect("loaded");
    let load_ms = median_ms(loads);
    println!("model load, all-MiniLM-L6-v2 (read files + check + tokenizer), median of 3: {load_ms:.1} ms");
    println!("key minilm_load_ms={load_ms:.1}");
    let digits = match &args.onnx {
        Some(onnx) => {
            let files = read_model_files(Format::Onnx, onnx)?;
            let runs = (0..3)
                .map(|_| {
                    let start = Instant::now();
                    gpuwasm_tensor::load(Format::Onnx, &read_model_files(Format::Onnx, onnx)?, devices.cpu().clone())?;
                    Ok(start.elapsed())
                })
                .collect::<Result<Vec<_>>>()?;
            let onnx_ms = median_ms(runs);
            println!("model load, {}, median of 3: {onnx_ms:.2} ms", onnx.display());
            println!("key onnx_load_ms={onnx_ms:.2}");
            Some(files)
        }
        None => None,
    };

    // Each backend natively, the CPU first: embeddings/s at batch 1 and
    // 32, images/s at batch 1 and 64.
    let minilm_files = read_model_files(Format::Safetensors, &args.minilm)?;
    let budget = gpuwasm_tensor::Budget::unlimited();
    let mut per_backend = Vec::new();
    for backend in &backends {
        let name = format!("{} ({})", backend.info().name, backend.info().kind.name());
        let minilm = gpuwasm_tensor::load(Format::Safetensors, &minilm_files, backend.clone())?;
        let mut k = 0;
        let b1 = rate(args.seconds, async || {
            minilm.run(vec![("text".into(), Tensor::texts(&sentences[k % sentences.len()..][..1]))], &budget)?;
            k += 1;
            Ok(())
        })
        .await?;
        let b32 = 32.0 * rate(args.seconds, async || Ok(minilm.run(vec![("text".into(), Tensor::texts(batch))], &budget).map(drop)?)).await?;
        let images = match &digits {
            Some(files) => {
                let model = gpuwasm_tensor::load(Format::Onnx, files, backend.clone())?;
                let pixels = |n: usize| Tensor::new(vec![n, 1, 8, 8], Data::F32((0..n * 64).map(|i| (i % 17) as f32).collect()));
                let (one, many) = (pixels(1)?, pixels(64)?);
                let i1 = rate(args.seconds, async || Ok(model.run(vec![("pixels".into(), one.clone())], &budget).map(drop)?)).await?;
                let i64 = 64.0 * rate(args.seconds, async || Ok(model.run(vec![("pixels".into(), many.clone())], &budget).map(drop)?)).await?;
                Some((i1, i64))
            }
            None => None,
        };
        if args.large_batch > 0 && backend.info().kind != gpuwasm_tensor::backend::DeviceKind::Cpu {
            let texts: Vec<&str> = (0..args.large_batch).map(|k| sentences[k % sentences.len()]).collect();
            let large = args.large_batch as f64 * rate(args.seconds, async || Ok(minilm.run(vec![("text".into(), Tensor::texts(&texts))], &budget).map(drop)?)).await?;
            println!("{name}: {large:.1} embeddings/s at batch {}", args.large_batch);
            println!("key {}_b{}={large:.1}", backend.info().kind.name(), args.large_batch);
        }
        per_backend.push((name, backend.info().kind.name(), b1, b32, images));
    }
    println!();
    println!("per backend, {} s per figure (the CPU is the baseline)", args.seconds);
    println!("{:<44} {:>12} {:>12} {:>12} {:>12}", "", "emb/s b1", "emb/s b32", "img/s b1", "img/s b64");
    let (cpu_b1, cpu_b32) = (per_backend[0].2, per_backend[0].3);
    for (name, kind, b1, b32, images) in &per_backend {
        let (i1, i64) = images.map_or((f64::NAN, f64::NAN), |(a, b)| (a, b));
        println!("{name:<44} {b1:>12.1} {b32:>12.1} {i1:>12.1} {i64:>12.1}");
        if *kind != "cpu" {
            println!("{:<44} {:>11.2}x {:>11.2}x", "  vs the CPU", b1 / cpu_b1, b32 / cpu_b32);
        }
        println!("key {kind}_b1={b1:.1}");
        println!("key {kind}_b32={b32:.1}");
        if let Some((i1, i64)) = images {
            println!("key {kind}_images_b1={i1:.1}");
            println!("key {kind}_images_b64={i64:.1}");
        }
    }
    println!();

    // Through wasi-nn: a component instance per request, in-process.
    let runtime = Runtime::builder().devices(devices.clone()).build()?;
    let mut models = LocalModels::default();
    models.add("minilm", Format::Safetensors, args.minilm.clone());
    let capabilities = Capabilities {
        // wasi-nn on the CPU, against the native CPU figures.
        models: ModelAccess { tenant: "bench".into(), allow: vec!["minilm".into()], catalog: Some(Arc::new(models)), target: Target::Cpu, ..ModelAccess::default() },
        ..Capabilities::default()
    };
    let wasm = std::fs::read(&args.probe).with_context(|| format!("reading {}", args.probe.display()))?;
    let limits = Limits { cpu_ms: 60_000, timeout_ms: 60_000, ..Limits::default() };
    let probe = runtime.load_with("probe", &wasm, limits, capabilities).await?;
    let call = async |lines: String| super::embed_lines(&probe, lines).await;
    let joined = batch.join("\n");
    // Native passes run under a call's budget, as wasi-nn's do.
    let budget = runtime.models().call_budget();
    let graph = &graph;

    // [native b1, wasi b1, native b32, wasi b32] per round.
    let mut figures: Vec<[f64; 4]> = Vec::new();
    let (mut i, mut j) = (0, 0);
    for _ in 0..args.rounds {
        let native_1 = rate(args.seconds, async || {
            graph.run(vec![("text".into(), Tensor::texts(&sentences[i % sentences.len()..][..1]))], &budget)?;
            i += 1;
            Ok(())
        })
        .await?;
        let wasi_1 = rate(args.seconds, async || {
            let line = sentences[j % sentences.len()].to_string();
            j += 1;
            call(line).await
        })
        .await?;
        let native_32 = 32.0 * rate(args.seconds, async || Ok(graph.run(vec![("text".into(), Tensor::texts(batch))], &budget).map(drop)?)).await?;
        let wasi_32 = 32.0 * rate(args.seconds, async || call(joined.clone()).await).await?;
        figures.push([native_1, wasi_1, native_32, wasi_32]);
    }
    let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
        let mut v: Vec<f64> = figures.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (native_1, wasi_1, native_32, wasi_32) =
        (median(&|f| f[0]), median(&|f| f[1]), median(&|f| f[2]), median(&|f| f[3]));
    // Overhead per round (paired), then the median.
    let overhead_1 = median(&|f| (f[0] / f[1] - 1.0) * 100.0);
    let overhead_32 = median(&|f| (f[2] / f[3] - 1.0) * 100.0);

    println!();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("embeddings/s, all-MiniLM-L6-v2, median of {} rounds of {} s per figure, {cores} cores", args.rounds, args.seconds);
    println!("{:<34} {:>12} {:>12}", "", "batch 1", "batch 32");
    println!("{:<34} {:>12.1} {:>12.1}", "native engine (gpuwasm-tensor)", native_1, native_32);
    println!("{:<34} {:>12.1} {:>12.1}", "component via wasi-nn", wasi_1, wasi_32);
    println!("{:<34} {:>11.1}% {:>11.1}%", "wasi-nn overhead (time, paired)", overhead_1, overhead_32);
    println!("key native_b1={native_1:.1}");
    println!("key native_b32={native_32:.1}");
    println!("key wasi_b1={wasi_1:.1}");
    println!("key wasi_b32={wasi_32:.1}");
    println!("key overhead_b1={overhead_1:.1}");
    println!("key overhead_b32={overhead_32:.1}");
    Ok(ExitCode::SUCCESS)
}
