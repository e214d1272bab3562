//! `gpuwasm bench http`: requests/s and latency percentiles over loopback.
//!
//! Each worker keeps one HTTP/1.1 keep-alive connection and sends requests
//! back to back; a run reports the requests answered `200` per second and
//! the p50/p99 latency of those requests, as seen by the client.

use crate::args::read_component;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm::{Limits, Runtime};
use gpuwasm_server::serve_connections;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args)]
pub struct HttpArgs {
    /// Component to serve in-process on 127.0.0.1 for the run, with the
    /// default limits and as many instances as the highest level has clients.
    #[arg(required_unless_present = "url", conflicts_with = "url")]
    file: Option<PathBuf>,
    /// Benchmark a server that is already running instead (http://127.0.0.1:PORT/path).
    #[arg(long)]
    url: Option<String>,
    /// Concurrency levels to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds to measure each level (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
}

pub async fn run(args: HttpArgs) -> Result<ExitCode> {
    if args.concurrency.iter().any(|&c| c == 0) {
        bail!("--concurrency levels must be at least 1");
    }
    let max_c = args.concurrency.iter().copied().max().unwrap_or(1);
    let (url, what) = match (&args.file, &args.url) {
        (_, Some(url)) => (url.clone(), url.clone()),
        (Some(file), None) => {
            let wasm = read_component(file)?;
            let limits = Limits { concurrency: Limits::default().concurrency.max(max_c as u32), ..Limits::default() };
            let runtime = Runtime::builder().max_instances((max_c as u32).max(256)).build()?;
            let deployment = runtime.load("bench", &wasm, limits).await?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let handler = move |req| {
                let deployment = deployment.clone();
                async move { deployment.handle(req).await }
            };
            tokio::spawn(serve_connections(listener, handler, Default::default(), std::future::pending()));
            (format!("http://{addr}/"), format!("{} served in-process", file.display()))
        }
        (None, None) => bail!("give a component file or --url"),
    };
    let uri: http::Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
    let authority = uri.authority().context("the URL needs a host and port")?.to_string();

    println!("gpuwasm bench http: GET {url} ({what}), {} s per level, HTTP/1.1 keep-alive", args.duration);
    println!("{:>11} {:>10} {:>12} {:>10} {:>10} {:>8}", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "errors");
    for &c in &args.concurrency {
        load(&uri, &authority, c, Duration::from_millis(500)).await?;
        let r = load(&uri, &authority, c, Duration::from_secs_f64(args.duration)).await?;
        println!(
            "{:>11} {:>10} {:>12.0} {:>10.3} {:>10.3} {:>8}",
            c,
            r.latencies.len(),
            r.latencies.len() as f64 / r.elapsed.as_secs_f64(),
            percentile(&r.latencies, 0.50),
            percentile(&r.latencies, 0.99),
            r.errors
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub struct LoadResult {
    /// Latencies of successful requests, in ms, sorted.
    pub latencies: Vec<f64>,
    pub errors: u64,
    pub elapsed: Duration,
}

/// Sends requests to `uri` from `concurrency` keep-alive connections for `duration`.
pub async fn load(uri: &http::Uri, authority: &str, concurrency: usize, duration: Duration) -> Result<LoadResult> {
    let start = Instant::now();
    let until = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (uri, authority) = (uri.clone(), authority.to_string());
        workers.push(tokio::spawn(async move { worker(uri, authority, until).await }));
    }
    let mut result = LoadResult { latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for w in workers {
        let (lat, errors) = w.await??;
        result.latencies.extend(lat);
        result.errors += errors;
    }
    result.elapsed = start.elapsed();
    result.latencies.sort_by(f64::total_cmp);
    Ok(result)
}

async fn worker(uri: http::Uri, authority: String, until: Instant) -> Result<(Vec<f64>, u64)> {
    let stream = TcpStream::connect(&authority).await.with_context(|| format!("connecting to {authority}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let (mut latencies, mut errors) = (Vec::new(), 0u64);
    while Instant::now() < until {
        let request = http::Request::get(&path).header(http::header::HOST, &authority).body(Empty::<Bytes>::new())?;
        let t = Instant::now();
        let ok = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                response.into_body().collect().await.is_ok() && status == http::StatusCode::OK
            }
            Err(_) => false,
        };
        if ok {
            latencies.push(t.elapsed().as_secs_f64() * 1e3);
        } else {
            errors += 1;
            if sender.ready().await.is_err() {
                break;
            }
        }
    }
    Ok((latencies, errors))
}

/// The `p` quantile (0..1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
