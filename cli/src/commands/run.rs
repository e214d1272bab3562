//! `gpuwasm run`: one component on every path, no server state (like
//! `wasmtime serve`); a gpuwasm.toml beside it applies. Compiled
//! components are kept in a cache directory, so a second start of the
//! same component does not compile it again.

use super::serve::{bind, listen_line, until_signal};
use super::workers::{self, Workers};
use crate::args::{ConnectionArgs, LimitArgs, PoolArgs, component_of, load_manifest, read_component};
use anyhow::{Context, Result};
use clap::Args;
use gpuwasm::{Capabilities, Deployment, Runtime};
use gpuwasm_server::{CompileCache, serve_connections};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct RunArgs {
    /// The component (.wasm) to serve, or a project folder (`gpuwasm new`)
    /// after `gpuwasm build`.
    file: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Worker processes serving the component on the same port, each
    /// pinned to a core: a number, or `auto` for one per core. Several
    /// spare every core the TLB flushes of the others' memory resets
    /// (docs/performance.md); each loads its own copy of local models and
    /// applies the connection limits to its own connections.
    #[arg(long, default_value = "1", value_name = "N|auto")]
    workers: Workers,
    /// Set by `--workers` for the processes it starts.
    #[arg(long, hide = true)]
    pub worker: Option<usize>,
    /// A model handlers may load by name, as NAME=PATH (repeatable): a
    /// directory for safetensors models, a .onnx or .gguf file otherwise.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// Where compiled components are kept between runs (the 16 used last;
    /// `gpuwasm dev` compiles each edit without keeping it).
    #[arg(long, env = "GPUWASM_CACHE_DIR", value_name = "DIR", default_value_os_t = default_cache_dir())]
    cache_dir: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let (file, manifest) = component_of(&args.file, None)?;
    let limits = args.connections.limits()?;
    if args.worker.is_none() && args.workers.count() > 1 {
        return workers::supervise(args.workers.count(), args.listen, limits.tls.is_some()).await;
    }
    let runtime = args.pool.runtime()?;
    let cache = private_dir(&args.cache_dir)
        .and_then(|()| Ok(CompileCache::open(args.cache_dir.clone(), &runtime)?.keeping(KEEP_COMPILED)))
        .inspect_err(|e| tracing::warn!("compiling without a cache: {e:#}"))
        .ok();
    let deployment = load(&runtime, &file, manifest.as_deref(), &args.limits, &args.models, cache).await?;
    let listener = match args.worker {
        Some(_) => workers::shared_listener(args.listen)?,
        None => bind(args.listen).await?,
    };
    let announce = listen_line(&listener, &limits)?;
    let handler = move |req| {
        let deployment = deployment.clone();
        async move { deployment.handle(req).await }
    };
    until_signal(args.connections.drain_secs, announce, |stop| serve_connections(listener, handler, limits, stop)).await
}

/// Compiled components `gpuwasm run` keeps in its cache.
const KEEP_COMPILED: usize = 16;

/// Creates `dir` (mode 0700) if missing; refuses one that another user
/// owns or others may write to: its artifacts are mapped and run as code,
/// and a digest beside each catches corruption, not a planted file.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        anyhow::bail!("{} is not private to this user (owner {}, mode {:o}): compiled code there could be anyone's", dir.display(), meta.uid(), meta.mode() & 0o7777);
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/gpuwasm/compiled`, else `~/.cache/gpuwasm/compiled`.
fn default_cache_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("gpuwasm/compiled");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/gpuwasm/compiled")
}

/// `file` loaded on `runtime` as `gpuwasm run` serves it: the manifest
/// (`manifest`, else gpuwasm.toml beside it) with `limits` over its own,
/// local `models` (NAME=PATH); compiled through `cache` when given.
pub async fn load(
    runtime: &Runtime,
    file: &Path,
    manifest: Option<&Path>,
    limits: &LimitArgs,
    models: &[String],
    cache: Option<CompileCache>,
) -> Result<Deployment> {
    let (manifest, manifest_dir) = load_manifest(file, manifest)?;
    let spec = manifest.spec;
    let models = super::model::local(models, &spec)?;
    let limits = limits.over(spec.limits)?;
    let wasm = read_component(file)?;
    let capabilities = Capabilities {
        env: spec.sandbox.env,
        outbound: spec.sandbox.outbound,
        files: manifest.files_dir.map(|dir| manifest_dir.join(dir)),
        models,
    };
    let name = file.file_stem().and_then(|s| s.to_str()).unwrap_or("component").to_string();
    let loaded = match cache {
        Some(cache) => runtime.load_compiling(&name, &wasm, limits, capabilities, move |runtime, wasm| cache.compiled(runtime, wasm)).await,
        None => runtime.load_with(&name, &wasm, limits, capabilities).await.map_err(Into::into),
    };
    loaded.with_context(|| format!("loading {}", file.display()))
}
