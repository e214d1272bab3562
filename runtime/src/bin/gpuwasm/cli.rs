//! Command-line arguments and what each command does.

use crate::client::Api;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use gpuwasm::nn::InferenceMemory;
use gpuwasm::server::{Server, ServerConfig, TenantQuotas, serve_connections};
use gpuwasm::manifest::Manifest;
use gpuwasm::server::SPEC_HEADER;
use gpuwasm::store::VersionRecord;
use gpuwasm::{Limits, Runtime, Sandbox};
use http::Method;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::net::TcpListener;

/// gpuwasm: serverless functions as WebAssembly components.
///
/// Handlers are components of the standard `wasi:http/proxy` world. Each
/// request runs in a fresh sandboxed instance under per-deployment limits.
///
/// Quick start: `gpuwasm serve` in one terminal, then
/// `gpuwasm deploy hello.wasm --name hello` and `gpuwasm invoke hello`
/// (on the server's machine the CLI finds the admin token by itself).
#[derive(Parser)]
#[command(name = "gpuwasm", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server: deployments, routing and the admin API.
    Serve(ServeArgs),
    /// Serve one component on every path, with no server state (like `wasmtime
    /// serve`); a gpuwasm.toml beside it sets limits, env, outbound hosts and files.
    #[command(after_help = default_limits_help())]
    Run(RunArgs),
    /// Upload a component as a new version of a deployment, routed at /TENANT/NAME/.
    #[command(after_help = default_limits_help())]
    Deploy(DeployArgs),
    /// List your deployments (their active versions).
    List(ListArgs),
    /// Remove a deployment (its versions stay, for rollback --to).
    Rm(NameArgs),
    /// List a deployment's versions.
    Versions(VersionsArgs),
    /// Switch a deployment back to an earlier version.
    Rollback(RollbackArgs),
    /// Tenants (admin token only).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API tokens of your tenant.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Models handlers load through wasi-nn: push, list, remove.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Show which tenant your token acts for.
    Whoami(ServerArgs),
    /// Send one HTTP request to a deployment and print the response body.
    Invoke(InvokeArgs),
    /// Benchmarks: HTTP throughput and latency, cold starts.
    #[command(subcommand)]
    Bench(crate::bench::Bench),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for deployments, artifacts and the admin token.
    #[arg(long, env = "GPUWASM_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Admin API token. Without it, the token in DATA_DIR/admin-token is
    /// used, and created on first start.
    #[arg(long, env = "GPUWASM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    pool: PoolArgs,
    /// Largest component upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    max_upload_mb: usize,
    /// Largest model file accepted by `model push`, in MiB.
    #[arg(long, default_value_t = 4096)]
    max_model_mb: usize,
    /// A name this server answers on (repeatable). No deployment may claim
    /// it as its host, so /TENANT/NAME/ paths on it always reach their
    /// deployment. IP addresses, localhost and this machine's host name
    /// are never claimable anyway.
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Active deployments each tenant may have.
    #[arg(long, default_value_t = 100)]
    tenant_deployments: usize,
    /// Storage each tenant may use for deployment files and models, in MiB.
    #[arg(long, default_value_t = 10240)]
    tenant_storage_mb: u64,
    /// File and model uploads each tenant may have in progress at once
    /// (the server takes four times this over all tenants).
    #[arg(long, default_value_t = 2)]
    tenant_uploads: usize,
    /// Seconds an uploaded blob or assembled file tree that nothing refers
    /// to is kept before it is removed.
    #[arg(long, default_value_t = 3600)]
    gc_grace_secs: u64,
}

/// The node's resources: its instance pool, the highest limits a
/// deployment may ask for, and inference memory.
#[derive(Args)]
struct PoolArgs {
    /// Instances that may run at once over all deployments.
    #[arg(long, default_value_t = 256)]
    max_instances: u32,
    /// Instances one tenant's deployments may run at once [default: half of --max-instances].
    #[arg(long)]
    max_tenant_instances: Option<u32>,
    /// Largest memory limit, in MiB, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().memory_mb)]
    max_memory_mb: u64,
    /// Largest CPU time limit, in ms, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().cpu_ms)]
    max_cpu_ms: u64,
    /// Largest wall-clock limit, in ms, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().timeout_ms)]
    max_timeout_ms: u64,
    /// Largest request body limit, in bytes, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().max_body_bytes)]
    max_body_limit: u64,
    /// Largest concurrency any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().concurrency)]
    max_concurrency: u32,
    /// Longest queue any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().queue)]
    max_queue: u32,
    /// Longest queue wait, in ms, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().queue_timeout_ms)]
    max_queue_timeout_ms: u64,
    /// Host memory one inference call may allocate, in MiB (a call over it
    /// fails with wasi-nn `too-large`; model pushes are checked against it).
    #[arg(long, default_value_t = InferenceMemory::default().per_call_mb)]
    inference_call_mb: u64,
    /// Host memory all inference calls on the node may allocate at once, in MiB.
    #[arg(long, default_value_t = InferenceMemory::default().node_mb)]
    inference_node_mb: u64,
    /// Seconds a model stays loaded after its last use (it loads again on
    /// the next request that needs it).
    #[arg(long, default_value_t = 600)]
    model_idle_secs: u64,
}

impl PoolArgs {
    fn runtime(&self) -> Result<Runtime> {
        let ceilings = Limits {
            memory_mb: self.max_memory_mb,
            cpu_ms: self.max_cpu_ms,
            timeout_ms: self.max_timeout_ms,
            max_body_bytes: self.max_body_limit,
            concurrency: self.max_concurrency,
            queue: self.max_queue,
            queue_timeout_ms: self.max_queue_timeout_ms,
        };
        let mut builder = Runtime::builder()
            .max_instances(self.max_instances)
            .max_limits(ceilings)
            .inference_memory(InferenceMemory { per_call_mb: self.inference_call_mb, node_mb: self.inference_node_mb })
            .model_idle_timeout(std::time::Duration::from_secs(self.model_idle_secs));
        if let Some(n) = self.max_tenant_instances {
            builder = builder.max_instances_per_tenant(n);
        }
        Ok(builder.build()?)
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// The component (.wasm) to serve.
    file: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A model handlers may load by name, as NAME=PATH (repeatable): a
    /// directory for safetensors models, a .onnx or .gguf file otherwise.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Upload a model to your tenant (or to public/ with the admin token);
    /// the server checks it before accepting it.
    Push(PushArgs),
    /// List the models your handlers can load: your tenant's and public ones.
    List(ListArgs),
    /// Remove a model (NAME, or public/NAME with the admin token).
    Rm(NameArgs),
}

#[derive(Args)]
pub struct PushArgs {
    /// The name handlers load it by: 1-63 of a-z, 0-9 and '-'; public/NAME
    /// makes it loadable by every tenant (admin token only).
    pub name: String,
    /// A directory with model.safetensors, config.json and tokenizer.json
    /// (a sentence-transformers layout), or a .onnx or .gguf file.
    pub path: PathBuf,
    /// The model format [default: from PATH: a directory is safetensors,
    /// otherwise the file extension].
    #[arg(long, value_parser = ["safetensors", "onnx", "gguf"])]
    pub format: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Per-deployment limits; each one not given keeps its default (see the help footer).
#[derive(Args, Default)]
pub struct LimitArgs {
    /// Largest linear memory, in MiB.
    #[arg(long)]
    memory_mb: Option<u64>,
    /// CPU time per request, in ms.
    #[arg(long)]
    cpu_ms: Option<u64>,
    /// Wall-clock time per request, in ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Largest request body, in bytes.
    #[arg(long)]
    max_body_bytes: Option<u64>,
    /// Instances of this deployment that may run at once.
    #[arg(long)]
    concurrency: Option<u64>,
    /// Requests that may wait for an instance.
    #[arg(long)]
    queue: Option<u64>,
    /// How long a queued request waits before `503`, in ms.
    #[arg(long)]
    queue_timeout_ms: Option<u64>,
}

impl LimitArgs {
    /// The limits given, as (field name, value) pairs.
    fn given(&self) -> Vec<(&'static str, u64)> {
        [
            ("memory_mb", self.memory_mb),
            ("cpu_ms", self.cpu_ms),
            ("timeout_ms", self.timeout_ms),
            ("max_body_bytes", self.max_body_bytes),
            ("concurrency", self.concurrency),
            ("queue", self.queue),
            ("queue_timeout_ms", self.queue_timeout_ms),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?)))
        .collect()
    }

    /// `base` with the limits given on the command line set over it.
    pub fn over(&self, mut base: Limits) -> Result<Limits> {
        for (name, value) in self.given() {
            base.set(name, &value.to_string()).map_err(anyhow::Error::msg)?;
        }
        Ok(base)
    }
}

/// Where to find the server and how to authenticate.
///
/// Each comes from the flag, else the environment, else
/// `~/.config/gpuwasm/config.toml` (`server = "..."`, `token = "..."`),
/// else the defaults: http://127.0.0.1:8080 and, on the machine that runs
/// the server, the admin token in its default data directory.
#[derive(Args)]
pub struct ServerArgs {
    /// URL of the gpuwasm server [default: http://127.0.0.1:8080].
    #[arg(long, env = "GPUWASM_SERVER")]
    server: Option<String>,
    /// API token (a tenant's, or the admin token).
    #[arg(long, env = "GPUWASM_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// `~/.config/gpuwasm/config.toml`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: Option<String>,
    token: Option<String>,
}

impl ServerArgs {
    pub fn api(&self) -> Result<Api> {
        let config = read_config_file()?;
        let server = self
            .server
            .clone()
            .or(config.server)
            .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
        let token = self.token.clone().or(config.token).or_else(|| {
            std::fs::read_to_string(default_data_dir().join("admin-token")).ok().map(|t| t.trim().to_string())
        });
        Ok(Api::new(&server, token))
    }
}

fn read_config_file() -> Result<ConfigFile> {
    let dir = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".config"),
            None => return Ok(ConfigFile::default()),
        },
    };
    let path = dir.join("gpuwasm/config.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[derive(Args)]
pub struct DeployArgs {
    /// The component (.wasm) to deploy.
    file: PathBuf,
    /// Deployment name: 1-63 of a-z, 0-9 and '-'. Requests to /TENANT/NAME/... reach it.
    /// [default: `name` in the manifest]
    #[arg(long)]
    name: Option<String>,
    /// The manifest [default: gpuwasm.toml beside FILE, if there is one].
    /// Flags override what it says.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Route requests whose Host header is HOST here (instead of by path).
    #[arg(long)]
    host: Option<String>,
    /// Do not run the component's init function at deploy time (it then
    /// never runs: the handler must set itself up per request).
    #[arg(long)]
    no_preinit: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print the JSON the server returned.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args)]
pub struct NameArgs {
    /// The name.
    pub name: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Args)]
pub struct VersionsArgs {
    /// The deployment.
    name: String,
    /// Print the JSON the server returned.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
pub struct RollbackArgs {
    /// The deployment.
    name: String,
    /// The version to switch to [default: the one before the active one].
    #[arg(long)]
    to: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its first token (shown only once).
    Create {
        /// The tenant's name: 1-63 of a-z, 0-9 and '-'.
        name: String,
        /// A domain whose names its deployments may claim as hosts (repeatable).
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List tenants and their domains.
    List(ListArgs),
    /// Set the domains a tenant's deployments may claim host names in
    /// (each domain and its subdomains); none clears them. Only the admin
    /// may claim other names.
    Domains {
        /// The tenant.
        name: String,
        /// The domains, replacing the current ones.
        domains: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create another token for your tenant (an admin may name one) and print it.
    Create {
        /// The tenant (admin token only).
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your tenant's tokens (ids only; tokens are stored hashed).
    List(ListArgs),
    /// Revoke a token by its id.
    Revoke {
        /// The token id (the part after `gwt_`, as `token list` shows it).
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Args)]
pub struct InvokeArgs {
    /// The deployment to call: NAME (of your tenant) or TENANT/NAME.
    name: String,
    /// Path inside the deployment.
    #[arg(default_value = "/")]
    path: String,
    /// HTTP method [default: GET, or POST when a body is given].
    #[arg(short = 'X', long)]
    method: Option<Method>,
    /// Request body.
    #[arg(short, long, conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the request body from a file.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Extra request header, as 'Name: value' (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Print the status line and headers before the body.
    #[arg(short, long)]
    include: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// The help footer listing the default limits.
pub fn default_limits_help() -> String {
    let l = Limits::default();
    format!(
        "Default limits: --memory-mb {} --cpu-ms {} --timeout-ms {} --max-body-bytes {} \
         --concurrency {} --queue {} --queue-timeout-ms {}",
        l.memory_mb, l.cpu_ms, l.timeout_ms, l.max_body_bytes, l.concurrency, l.queue, l.queue_timeout_ms
    )
}

/// `$XDG_DATA_HOME/gpuwasm`, or `~/.local/share/gpuwasm`.
fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("gpuwasm");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/gpuwasm")
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Run(args) => run_file(args).await,
        Command::Deploy(args) => deploy(args).await,
        Command::List(args) => list(args).await,
        Command::Rm(args) => rm(args).await,
        Command::Versions(args) => versions(args).await,
        Command::Rollback(args) => rollback(args).await,
        Command::Tenant(cmd) => tenant(cmd).await,
        Command::Token(cmd) => token(cmd).await,
        Command::Model(cmd) => crate::models::run(cmd).await,
        Command::Whoami(server) => {
            let me = server.api()?.admin(Method::GET, "whoami", Bytes::new()).await?;
            println!("tenant {} (token {}{})", me["tenant"].as_str().unwrap_or("?"), me["token_id"].as_str().unwrap_or("?"), if me["admin"].as_bool() == Some(true) { ", admin" } else { "" });
            Ok(ExitCode::SUCCESS)
        }
        Command::Invoke(args) => invoke(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let admin_token = match args.admin_token {
        Some(token) if !token.is_empty() => token,
        _ => stored_token(&args.data_dir)?,
    };
    let mut server_names = args.server_names.clone();
    server_names.extend(std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()));
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        admin_token,
        max_upload_bytes: args.max_upload_mb.saturating_mul(1 << 20),
        max_model_bytes: args.max_model_mb.saturating_mul(1 << 20),
        server_names: server_names.iter().filter_map(|n| gpuwasm::server::normalize_host(n)).collect(),
        quotas: TenantQuotas {
            deployments: args.tenant_deployments,
            storage_bytes: args.tenant_storage_mb.saturating_mul(1 << 20),
            uploads: args.tenant_uploads,
        },
        gc_grace: std::time::Duration::from_secs(args.gc_grace_secs),
    };
    let server = Server::open(args.pool.runtime()?, config)
        .await
        .with_context(|| format!("opening the server state in {}", args.data_dir.display()))?;
    let listener = bind(args.listen).await?;
    tracing::info!(data_dir = %args.data_dir.display(), deployments = server.deployments().len(), "server ready");
    announce(&listener)?;
    until_signal(server.serve(listener)).await
}

async fn run_file(args: RunArgs) -> Result<ExitCode> {
    let (manifest, manifest_dir) = load_manifest(&args.file, None)?;
    let limits = args.limits.over(manifest.limits)?;
    let models = crate::models::local(&args.models, manifest.models)?;
    let wasm = read_component(&args.file)?;
    let runtime = args.pool.runtime()?;
    let sandbox = Sandbox {
        env: manifest.env,
        outbound: manifest.outbound,
        files: manifest.files.map(|dir| manifest_dir.join(dir)),
        models,
    };
    let name = args.file.file_stem().and_then(|s| s.to_str()).unwrap_or("component").to_string();
    let deployment = runtime
        .load_with_sandbox(&name, &wasm, limits, sandbox)
        .await
        .with_context(|| format!("loading {}", args.file.display()))?;
    let listener = bind(args.listen).await?;
    announce(&listener)?;
    until_signal(serve_connections(listener, move |req| {
        let deployment = deployment.clone();
        async move { deployment.handle(req).await }
    }))
    .await
}

/// The manifest for `file`: `explicit`, else gpuwasm.toml beside it, else
/// none; with the folder it is in (its paths are relative to that).
fn load_manifest(file: &Path, explicit: Option<&Path>) -> Result<(Manifest, PathBuf)> {
    let beside = file.parent().unwrap_or(Path::new(".")).join("gpuwasm.toml");
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None if beside.exists() => beside,
        None => return Ok((Manifest::default(), PathBuf::from("."))),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // The server (or `run`'s runtime) checks the limits against its own maxima.
    let no_ceilings = Limits {
        memory_mb: u64::MAX,
        cpu_ms: u64::MAX,
        timeout_ms: u64::MAX,
        max_body_bytes: u64::MAX,
        concurrency: u32::MAX,
        queue: u32::MAX,
        queue_timeout_ms: u64::MAX,
    };
    let manifest = Manifest::parse(&text, &no_ceilings).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((manifest, path.parent().unwrap_or(Path::new(".")).to_path_buf()))
}

async fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let wasm = read_component(&args.file)?;
    let (manifest, manifest_dir) = load_manifest(&args.file, args.manifest.as_deref())?;
    let Some(name) = args.name.clone().or(manifest.name.clone()) else {
        bail!("give the deployment a name: --name NAME, or `name = \"...\"` in gpuwasm.toml");
    };
    let limits = args.limits.over(manifest.limits.clone())?;
    let api = args.server.api()?;
    let files = match &manifest.files {
        Some(dir) => upload_files(&api, &manifest_dir.join(dir)).await?,
        None => BTreeMap::new(),
    };
    let spec = serde_json::json!({
        "files": files,
        "host": args.host.clone().or(manifest.host.clone()),
        "preinit": !args.no_preinit,
        "limits": limits,
        "sandbox": Sandbox { env: manifest.env.clone(), outbound: manifest.outbound.clone(), ..Sandbox::default() },
        "models": manifest.models,
    });
    let path = format!("deployments/{name}");
    let header = (SPEC_HEADER.to_string(), ascii_json(&spec));
    let v: VersionRecord = serde_json::from_value(api.admin_with(Method::PUT, &path, &[header], Bytes::from(wasm)).await?)
        .context("unexpected reply from the server")?;
    let route = match &v.host {
        Some(host) => format!("http://{host}/ (by Host header)"),
        None => format!("{}/{}/{}/", api.base(), v.tenant, v.name),
    };
    let snapshot = if v.snapshot_sha256.is_some() { ", pre-initialised" } else { "" };
    println!("deployed {}/{} version {} (sha256 {}{snapshot}) at {route}", v.tenant, v.name, v.version, short(&v.sha256));
    Ok(ExitCode::SUCCESS)
}

/// Uploads every file under `dir` and returns their map (path -> SHA-256).
/// Only regular files and folders are allowed: a symlink is refused, not
/// followed.
async fn upload_files(api: &Api, dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).with_context(|| format!("reading {} ([files] dir)", folder.display()))?;
        for entry in entries {
            let path = entry?.path();
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            if !kind.is_file() {
                bail!("{} is not a regular file (symlinks are not uploaded; copy the file itself)", path.display());
            }
            let relative = path.strip_prefix(dir).expect("walked from dir");
            let name = relative.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?.to_string();
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let sha256 = sha256_hex(&bytes);
            api.admin(Method::PUT, &format!("files/{sha256}"), Bytes::from(bytes))
                .await
                .with_context(|| format!("uploading {}", path.display()))?;
            files.insert(name, sha256);
        }
    }
    Ok(files)
}

/// Lower-case hex SHA-256 of `bytes`, as the server names uploads.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `value` as JSON with every non-ASCII character escaped, so that it fits
/// in an HTTP header.
fn ascii_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Prints `json` and returns true when `--json` was given.
pub fn print_json(json: bool, value: &serde_json::Value) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(json)
}

fn print_versions(versions: &[VersionRecord], active: Option<u64>) {
    println!("{:<24} {:>7} {:<12} {:>9} {:>9} {:>8} {:<20}", "NAME", "VERSION", "SHA256", "SIZE", "MEMORY", "CPU", "HOST");
    for v in versions {
        let mark = if Some(v.version) == active { "*" } else { " " };
        println!(
            "{:<24} {:>6}{mark} {:<12} {:>9} {:>6}MiB {:>6}ms {:<20}",
            v.name,
            v.version,
            short(&v.sha256),
            v.size_bytes,
            v.limits.memory_mb,
            v.limits.cpu_ms,
            v.host.as_deref().unwrap_or("-")
        );
    }
}

async fn list(args: ListArgs) -> Result<ExitCode> {
    let reply = args.server.api()?.admin(Method::GET, "deployments", Bytes::new()).await?;
    if print_json(args.json, &reply)? {
        return Ok(ExitCode::SUCCESS);
    }
    let records: Vec<VersionRecord> =
        serde_json::from_value(reply["deployments"].clone()).context("unexpected reply from the server")?;
    if records.is_empty() {
        println!("no deployments");
    } else {
        print_versions(&records, None);
    }
    Ok(ExitCode::SUCCESS)
}

async fn rm(args: NameArgs) -> Result<ExitCode> {
    args.server.api()?.admin(Method::DELETE, &format!("deployments/{}", args.name), Bytes::new()).await?;
    println!("removed {}", args.name);
    Ok(ExitCode::SUCCESS)
}

async fn versions(args: VersionsArgs) -> Result<ExitCode> {
    let reply = args.server.api()?.admin(Method::GET, &format!("deployments/{}/versions", args.name), Bytes::new()).await?;
    if print_json(args.json, &reply)? {
        return Ok(ExitCode::SUCCESS);
    }
    let versions: Vec<VersionRecord> =
        serde_json::from_value(reply["versions"].clone()).context("unexpected reply from the server")?;
    print_versions(&versions, reply["active"].as_u64());
    println!("(* = serving traffic)");
    Ok(ExitCode::SUCCESS)
}

async fn rollback(args: RollbackArgs) -> Result<ExitCode> {
    let query = args.to.map(|v| format!("?to={v}")).unwrap_or_default();
    let path = format!("deployments/{}/rollback{query}", args.name);
    let v: VersionRecord = serde_json::from_value(args.server.api()?.admin(Method::POST, &path, Bytes::new()).await?)
        .context("unexpected reply from the server")?;
    println!("{}/{} now serves version {} (sha256 {})", v.tenant, v.name, v.version, short(&v.sha256));
    Ok(ExitCode::SUCCESS)
}

async fn tenant(cmd: TenantCommand) -> Result<ExitCode> {
    match cmd {
        TenantCommand::Create { name, domains, server } => {
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "domains": domains }))?;
            let reply = server.api()?.admin(Method::POST, "tenants", Bytes::from(body)).await?;
            println!("created tenant {name}");
            println!("token (shown only once): {}", reply["token"].as_str().unwrap_or("?"));
        }
        TenantCommand::List(args) => {
            let reply = args.server.api()?.admin(Method::GET, "tenants", Bytes::new()).await?;
            if !print_json(args.json, &reply)? {
                println!("{:<24} DOMAINS", "TENANT");
                for t in reply["tenants"].as_array().into_iter().flatten() {
                    let domains: Vec<&str> = t["domains"].as_array().into_iter().flatten().filter_map(|d| d.as_str()).collect();
                    println!("{:<24} {}", t["name"].as_str().unwrap_or("?"), if domains.is_empty() { "-".into() } else { domains.join(", ") });
                }
            }
        }
        TenantCommand::Domains { name, domains, server } => {
            let body = serde_json::to_vec(&serde_json::json!({ "domains": domains }))?;
            let reply = server.api()?.admin(Method::PUT, &format!("tenants/{name}/domains"), Bytes::from(body)).await?;
            let set: Vec<&str> = reply["domains"].as_array().into_iter().flatten().filter_map(|d| d.as_str()).collect();
            match set.as_slice() {
                [] => println!("tenant {name} may not claim host names"),
                set => println!("tenant {name} may claim host names in {}", set.join(", ")),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token(cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Create { tenant, server } => {
            let query = tenant.map(|t| format!("?tenant={t}")).unwrap_or_default();
            let reply = server.api()?.admin(Method::POST, &format!("tokens{query}"), Bytes::new()).await?;
            println!("token for tenant {} (shown only once): {}", reply["tenant"].as_str().unwrap_or("?"), reply["token"].as_str().unwrap_or("?"));
        }
        TokenCommand::List(args) => {
            let reply = args.server.api()?.admin(Method::GET, "tokens", Bytes::new()).await?;
            if !print_json(args.json, &reply)? {
                println!("{:<14} {:<20} {:<8}", "ID", "TENANT", "STATUS");
                for t in reply["tokens"].as_array().into_iter().flatten() {
                    let status = if t["revoked_at"].is_null() { "active" } else { "revoked" };
                    println!("{:<14} {:<20} {status:<8}", t["id"].as_str().unwrap_or("?"), t["tenant"].as_str().unwrap_or("?"));
                }
            }
        }
        TokenCommand::Revoke { id, server } => {
            server.api()?.admin(Method::DELETE, &format!("tokens/{id}"), Bytes::new()).await?;
            println!("revoked token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn invoke(args: InvokeArgs) -> Result<ExitCode> {
    let body = match (&args.data, &args.data_file) {
        (Some(d), _) => Bytes::from(d.clone()),
        (None, Some(f)) => Bytes::from(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?),
        (None, None) => Bytes::new(),
    };
    let method = args.method.clone().unwrap_or(if body.is_empty() { Method::GET } else { Method::POST });
    let headers = args
        .headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("header {h:?} must look like 'Name: value'"),
        })
        .collect::<Result<Vec<_>>>()?;
    let path = if args.path.starts_with('/') { args.path.clone() } else { format!("/{}", args.path) };
    let api = args.server.api()?;
    let target = if args.name.contains('/') {
        args.name.clone()
    } else {
        let me = api.admin(Method::GET, "whoami", Bytes::new()).await.context("finding your tenant (or give TENANT/NAME)")?;
        format!("{}/{}", me["tenant"].as_str().unwrap_or("default"), args.name)
    };
    let reply = api.send(method, &format!("/{target}{path}"), &headers, body).await?;
    let mut out = std::io::stdout().lock();
    if args.include {
        writeln!(out, "HTTP {}", reply.status)?;
        for (k, v) in &reply.headers {
            writeln!(out, "{k}: {}", String::from_utf8_lossy(v.as_bytes()))?;
        }
        writeln!(out)?;
    }
    out.write_all(&reply.body)?;
    out.flush()?;
    if reply.status.is_success() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: HTTP {}", reply.status);
        Ok(ExitCode::FAILURE)
    }
}

/// Reads a component file, with an error that names it.
pub fn read_component(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The token stored in `data_dir/admin-token`, created (mode 0600) if absent.
fn stored_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("admin-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut raw = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw).context("reading /dev/urandom")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    eprintln!("gpuwasm: created an admin token in {}", path.display());
    Ok(token)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))
}

/// Prints the address actually bound (tests and scripts read this line).
fn announce(listener: &TcpListener) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "gpuwasm listening on http://{}", listener.local_addr()?)?;
    out.flush()?;
    Ok(())
}

/// Runs `serving` until Ctrl-C or SIGTERM.
async fn until_signal(serving: impl std::future::Future<Output = std::io::Result<()>>) -> Result<ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = serving => { result?; }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
    }
    Ok(ExitCode::SUCCESS)
}
