//! `gpuwasm bench nn`: the inference engine on MiniLM, called natively and
//! through wasi-nn from a component, at batch 1 and 32; and model load
//! times. scripts/bench-nn.sh runs it beside sentence-transformers.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm::nn::{LocalModels, ModelAccess, read_model_files};
use gpuwasm::{Capabilities, Limits, Runtime};
use gpuwasm_tensor::{Format, Graph, Tensor};
use http_body_util::{BodyExt, Full};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct NnArgs {
    /// The MiniLM model directory (../shared/tools/fetch-test-models.sh prints it).
    #[arg(long)]
    minilm: PathBuf,
    /// The nn-probe test component (target/wasm/nn_probe.wasm).
    #[arg(long)]
    probe: PathBuf,
    /// Sentences to embed, one per line (scripts/bench-sentences.txt).
    #[arg(long)]
    sentences: PathBuf,
    /// An ONNX model whose load time to measure too.
    #[arg(long)]
    onnx: Option<PathBuf>,
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

    // Model load: read the files and build the graph, three times.
    let mut loads = Vec::new();
    let mut graph: Option<Arc<dyn Graph>> = None;
    for _ in 0..3 {
        let start = Instant::now();
        let files = read_model_files(Format::Safetensors, &args.minilm)?;
        graph = Some(gpuwasm_tensor::load(Format::Safetensors, &files)?);
        loads.push(start.elapsed());
    }
    let graph = graph.expect("loaded");
    let load_ms = median_ms(loads);
    println!("model load, all-MiniLM-L6-v2 (read files + check + tokenizer), median of 3: {load_ms:.1} ms");
    println!("key minilm_load_ms={load_ms:.1}");
    if let Some(onnx) = &args.onnx {
        let runs = (0..3)
            .map(|_| {
                let start = Instant::now();
                let files = read_model_files(Format::Onnx, onnx)?;
                gpuwasm_tensor::load(Format::Onnx, &files)?;
                Ok(start.elapsed())
            })
            .collect::<Result<Vec<_>>>()?;
        let onnx_ms = median_ms(runs);
        println!("model load, {}, median of 3: {onnx_ms:.2} ms", onnx.display());
        println!("key onnx_load_ms={onnx_ms:.2}");
    }

    // Through wasi-nn: a component instance per request, in-process.
    let runtime = Runtime::builder().build()?;
    let mut models = LocalModels::default();
    models.add("minilm", Format::Safetensors, args.minilm.clone());
    let capabilities = Capabilities {
        models: ModelAccess { tenant: "bench".into(), allow: vec!["minilm".into()], catalog: Some(Arc::new(models)) },
        ..Capabilities::default()
    };
    let wasm = std::fs::read(&args.probe).with_context(|| format!("reading {}", args.probe.display()))?;
    let limits = Limits { cpu_ms: 60_000, timeout_ms: 60_000, ..Limits::default() };
    let probe = runtime.load_with("probe", &wasm, limits, capabilities).await?;
    let call = async |lines: String| -> Result<()> {
        let request = http::Request::post("http://localhost/embed-lines?minilm").body(Full::new(Bytes::from(lines)))?;
        let response = probe.handle(request).await;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| anyhow::anyhow!("{e}"))?.to_bytes();
        if status != 200 || !body.starts_with(b"ok ") {
            bail!("the probe answered {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    };
    let joined = batch.join("\n");
    // Native passes run under a call's budget, as wasi-nn's do.
    let budget = runtime.models().call_budget();

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
