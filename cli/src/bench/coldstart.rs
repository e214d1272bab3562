//! `gpuwasm bench coldstart`: what a cold start costs, measured five ways.
//!
//! 1. Instantiation from a snapshot, in-process: `Deployment::check`
//!    (a fresh store and instance, then dropped) for hello and for a
//!    component whose init built a 20 MB heap.
//! 2. The first request to each of N fresh deployments, right after its
//!    deploy and again after a server restart: server side (the
//!    `Server-Timing` header) and end to end (the client's clock).
//! 3. A handler whose setup takes 200 ms, with and without pre-initialisation.
//! 4. Resident memory of a server holding many idle deployments.
//!
//! Servers run as child processes (`gpuwasm serve`) on 127.0.0.1; this
//! process is the client. Throughput against `wasmtime serve` is
//! `gpuwasm bench serve`.

use super::http::percentile;
use super::{read_listen_line, vm_rss_mib};
use crate::client::Api;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm::{Limits, Runtime};
use http::Method;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ColdstartArgs {
    /// Folder holding hello.wasm, bigheap.wasm and slowinit.wasm
    /// (`scripts/build-guests.sh` puts them in target/wasm).
    #[arg(long, default_value = "target/wasm")]
    wasm_dir: PathBuf,
    /// Deployments whose first requests are measured.
    #[arg(long, default_value_t = 200)]
    deployments: usize,
    /// Idle deployments for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Instantiations measured per component.
    #[arg(long, default_value_t = 20000)]
    instantiations: usize,
    /// Requests per variant for the 200 ms-setup comparison.
    #[arg(long, default_value_t = 20)]
    slow_requests: usize,
}

const TOKEN: &str = "coldstart-bench";

pub async fn run(args: ColdstartArgs) -> Result<ExitCode> {
    let read = |name: &str| -> Result<Vec<u8>> {
        let path = args.wasm_dir.join(format!("{name}.wasm"));
        std::fs::read(&path).with_context(|| format!("reading {} (run scripts/build-guests.sh)", path.display()))
    };
    let (hello, bigheap, slowinit) = (read("hello")?, read("bigheap")?, read("slowinit")?);
    let work = scratch_dir()?;
    println!("gpuwasm bench coldstart ({} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));

    instantiation(&hello, &bigheap, args.instantiations).await?;
    first_requests(&work.join("first"), &hello, args.deployments).await?;
    preinit(&work.join("preinit"), &slowinit, args.slow_requests).await?;
    idle_memory(&work.join("idle"), &hello, args.idle).await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(ExitCode::SUCCESS)
}

fn scratch_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpuwasm-coldstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn stats(label: &str, mut values: Vec<f64>, unit: &str) {
    values.sort_by(f64::total_cmp);
    println!(
        "  {label:<44} p50 {:>9.3} {unit}  p99 {:>9.3} {unit}  (n={})",
        percentile(&values, 0.5),
        percentile(&values, 0.99),
        values.len()
    );
}

async fn instantiation(hello: &[u8], bigheap: &[u8], n: usize) -> Result<()> {
    println!("\n1. instantiate from snapshot, in-process (fresh store + instance, dropped)");
    let runtime = Runtime::builder().build()?;
    let names = ["hello", "bigheap (20 MB heap built by init)"];
    let deployments = [
        runtime.load("hello", hello, Limits::default()).await?,
        runtime.load("bigheap", bigheap, Limits::default()).await?,
    ];
    // Ten rounds, alternating, so drift on a shared machine hits both alike.
    let mut us: [Vec<f64>; 2] = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for round in 0..=10 {
        for (deployment, samples) in deployments.iter().zip(us.iter_mut()) {
            for _ in 0..n / 10 {
                let t = Instant::now();
                deployment.check().await?;
                if round > 0 {
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    for (name, samples) in names.into_iter().zip(us) {
        stats(name, samples, "µs");
    }
    Ok(())
}

/// A `gpuwasm serve` child process on 127.0.0.1, killed on drop.
struct ServerProcess {
    child: Child,
    api: Api,
}

impl ServerProcess {
    fn start(data_dir: &Path) -> Result<(ServerProcess, Duration)> {
        let start = Instant::now();
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN, "--max-instances", "256"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting gpuwasm serve")?;
        let url = read_listen_line(&mut child)?;
        Ok((ServerProcess { child, api: Api::new(&url, Some(TOKEN.into())) }, start.elapsed()))
    }

    async fn deploy(&self, name: &str, wasm: &[u8], query: &str) -> Result<()> {
        let path = format!("deployments/{name}?{query}");
        let _: gpuwasm_server::control_store::VersionRecord = self.api.admin(Method::PUT, &path, Bytes::copy_from_slice(wasm)).await?;
        Ok(())
    }

    /// One GET of `/name/`: (end-to-end ms, server-side ms).
    async fn first(&self, name: &str) -> Result<(f64, f64)> {
        let t = Instant::now();
        let path = format!("/{}/{name}/", gpuwasm_server::DEFAULT_TENANT);
        let reply = self.api.send(Method::GET, &path, &[], Bytes::new()).await?;
        let e2e = t.elapsed().as_secs_f64() * 1e3;
        if !reply.status.is_success() {
            bail!("{path} answered {}: {}", reply.status, String::from_utf8_lossy(&reply.body));
        }
        let server = reply
            .headers
            .get("server-timing")
            .and_then(|v| v.to_str().ok()?.split("dur=").nth(1)?.parse::<f64>().ok())
            .context("no Server-Timing header")?;
        Ok((e2e, server))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn first_requests(dir: &Path, hello: &[u8], n: usize) -> Result<()> {
    println!("\n2. first request to each of {n} deployments of hello (same bytes, distinct names)");
    let (server, _) = ServerProcess::start(dir)?;
    let (mut deploy_ms, mut e2e, mut side) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        server.deploy(&format!("h{i}"), hello, "").await?;
        deploy_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let (e, s) = server.first(&format!("h{i}")).await?;
        e2e.push(e);
        side.push(s);
    }
    stats("deploy (upload, store, link, check, commit)", deploy_ms, "ms");
    stats("after deploy: server side", side, "ms");
    stats("after deploy: end to end", e2e, "ms");
    drop(server);

    let (server, restart) = ServerProcess::start(dir)?;
    println!("  restart with {n} deployments: listening after {:.1} ms", restart.as_secs_f64() * 1e3);
    let (mut e2e, mut side) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (e, s) = server.first(&format!("h{i}")).await?;
        e2e.push(e);
        side.push(s);
    }
    stats("after restart: server side", side, "ms");
    stats("after restart: end to end", e2e, "ms");
    Ok(())
}

async fn preinit(dir: &Path, slowinit: &[u8], n: usize) -> Result<()> {
    println!("\n3. a handler whose setup takes 200 ms (slowinit), {n} requests each");
    let (server, _) = ServerProcess::start(dir)?;
    server.deploy("snap", slowinit, "").await?;
    server.deploy("raw", slowinit, "preinit=false").await?;
    let mut medians = Vec::new();
    for (name, label) in [("snap", "pre-initialised snapshot"), ("raw", "no snapshot (setup per instance)")] {
        let (mut e2e, mut side) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (e, s) = server.first(name).await?;
            e2e.push(e);
            side.push(s);
        }
        side.sort_by(f64::total_cmp);
        medians.push(percentile(&side, 0.5));
        stats(&format!("{label}: server side"), side, "ms");
        stats(&format!("{label}: end to end"), e2e, "ms");
    }
    println!("  speed-up from the snapshot (server-side medians): {:.0}x", medians[1] / medians[0]);
    Ok(())
}

async fn idle_memory(dir: &Path, hello: &[u8], n: usize) -> Result<()> {
    println!("\n4. resident memory (VmRSS) of `gpuwasm serve` with {n} idle deployments of hello");
    let (server, _) = ServerProcess::start(dir)?;
    let empty = vm_rss_mib(server.child.id())?;
    let t = Instant::now();
    for i in 0..n {
        server.deploy(&format!("idle{i}"), hello, "").await?;
    }
    let deployed = vm_rss_mib(server.child.id())?;
    println!("  deployed {n} in {:.1} s", t.elapsed().as_secs_f64());
    drop(server);
    let (server, restart) = ServerProcess::start(dir)?;
    let restarted = vm_rss_mib(server.child.id())?;
    println!("  no deployments:                    {empty:>8.1} MiB");
    println!(
        "  {n} deployed (each instantiated once at deploy): {deployed:>8.1} MiB = {:.1} KiB per deployment",
        (deployed - empty) * 1024.0 / n as f64
    );
    println!(
        "  {n} after a restart, none invoked yet: {restarted:>8.1} MiB = {:.1} KiB per deployment (restart took {:.0} ms)",
        (restarted - empty) * 1024.0 / n as f64,
        restart.as_secs_f64() * 1e3
    );
    Ok(())
}
