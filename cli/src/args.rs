//! The command line: the commands, and the argument types several of them
//! share (where the server is, limits, the node's pool, names, listings),
//! with the small helpers that go with them.

use crate::client::Api;
use crate::commands;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gpuwasm::nn::{Devices, InferenceMemory, LlmSettings};
use gpuwasm::{Limits, Runtime};
use gpuwasm_server::{ConnectionLimits, Tls};
use gpuwasm_server::manifest::{Build, Manifest};
use std::path::{Path, PathBuf};

/// gpuwasm: serverless functions as WebAssembly components.
///
/// Handlers are components of the standard `wasi:http/proxy` world. Each
/// request runs in a fresh sandboxed instance under per-deployment limits.
///
/// Quick start: `gpuwasm serve` in one terminal, then
/// `gpuwasm deploy hello.wasm --name hello` and `gpuwasm invoke hello`
/// (on the server's machine the CLI finds the admin token by itself).
///
/// A new handler: `gpuwasm new js hello` (or rust, python), then
/// `gpuwasm dev hello` to build, serve and rebuild it on every change
/// (docs/guide.md).
#[derive(Parser)]
#[command(name = "gpuwasm", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr look: text, or json (one object a line; a
    /// request's lines carry its id and trace id). RUST_LOG sets the level.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server: deployments, routing and the admin API.
    Serve(commands::serve::ServeArgs),
    /// Create a handler project (Rust, JavaScript or Python) with its gpuwasm.toml.
    New(commands::new::NewArgs),
    /// Build a project's component with the command its gpuwasm.toml gives.
    Build(commands::build::BuildArgs),
    /// Build a project, serve it locally, and rebuild and swap in the new
    /// version on every change to its sources.
    Dev(commands::dev::DevArgs),
    /// Serve one component on every path, with no server state (like `wasmtime
    /// serve`); a gpuwasm.toml beside it sets limits, env, outbound hosts and files.
    #[command(after_help = default_limits_help())]
    Run(commands::run::RunArgs),
    /// Upload a component as a new version of a deployment, routed at /TENANT/NAME/.
    #[command(after_help = default_limits_help())]
    Deploy(commands::deploy::DeployArgs),
    /// List your deployments (their active versions).
    List(ListArgs),
    /// Remove a deployment (its versions stay, for rollback --to).
    Rm(commands::deployments::RmArgs),
    /// List a deployment's versions.
    Versions(commands::deployments::VersionsArgs),
    /// Switch a deployment back to an earlier version.
    Rollback(commands::deployments::RollbackArgs),
    /// Tenants (admin token only).
    #[command(subcommand)]
    Tenant(commands::tenant::TenantCommand),
    /// API tokens of your tenant.
    #[command(subcommand)]
    Token(commands::token::TokenCommand),
    /// Models handlers load through wasi-nn: push, list, remove.
    #[command(subcommand)]
    Model(commands::model::ModelCommand),
    /// Show which tenant your token acts for.
    Whoami(ServerArgs),
    /// Show what your requests used and cost (CPU, inference, memory,
    /// bytes, tokens), and compare with a dedicated machine.
    Usage(commands::usage::UsageArgs),
    /// Show what a deployment's guests printed, and why requests failed.
    Logs(commands::logs::LogsArgs),
    /// Send one HTTP request to a deployment and print the response body.
    Invoke(commands::invoke::InvokeArgs),
    /// Show the devices models can run on here (the CPU and GPUs), their
    /// memory and backend, and why a GPU backend found nothing.
    Info(commands::info::InfoArgs),
    /// Benchmarks: HTTP throughput and latency, cold starts.
    #[command(subcommand)]
    Bench(crate::bench::Bench),
}

/// The node's resources: its instance pool, the highest limits a
/// deployment may ask for, and inference memory.
#[derive(Args)]
pub struct PoolArgs {
    /// Instances that may run at once over all deployments.
    #[arg(long, default_value_t = 256)]
    max_instances: u32,
    /// Instances one tenant's deployments may run at once [default: half of --max-instances].
    #[arg(long)]
    max_tenant_instances: Option<u32>,
    /// Largest memory limit, in MiB, any deployment may be given.
    #[arg(long, default_value_t = Limits::default_ceilings().memory_mb)]
    max_memory_mb: u64,
    /// Memory each instance slot may keep resident between requests, in
    /// MiB: the pages a request wrote are reset by copying (Linux 6.7+),
    /// not unmapped, which would interrupt every core; 0 unmaps all.
    #[arg(long, default_value_t = gpuwasm::DEFAULT_KEEP_RESIDENT_MB)]
    keep_resident_mb: u64,
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
    /// Least time, in ms, from a request's arrival to its refusal (503 for a
    /// full queue or too many slow bodies, 429 over a tenant's rate; each
    /// waits up to half as long again, at random): a client that retries
    /// at once then gets about one refusal a second for each request it
    /// holds open (an HTTP/1 connection, an HTTP/2 stream), not as many as
    /// it can send. 0 refuses at once.
    #[arg(long, default_value_t = gpuwasm::DEFAULT_REFUSAL_DELAY.as_millis() as u64)]
    refusal_delay_ms: u64,
    /// Most tokens any deployment may let one generation produce.
    #[arg(long, default_value_t = Limits::default_ceilings().max_tokens)]
    max_max_tokens: u32,
    /// Longest wall-clock time, in ms, any deployment may give a request
    /// that streams a generation.
    #[arg(long, default_value_t = Limits::default_ceilings().stream_ms)]
    max_stream_ms: u64,
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
    /// Memory for each loaded LLM's key/value cache, in MiB: it bounds the
    /// tokens (prompt and generated) its running sequences hold in all;
    /// sequences beyond it wait or are preempted.
    #[arg(long, default_value_t = LlmSettings::default().cache_mb)]
    llm_cache_mb: u64,
    /// Sequences each loaded LLM generates at once (more wait their turn).
    #[arg(long, default_value_t = LlmSettings::default().max_seqs)]
    llm_max_seqs: usize,
    /// Tokens one LLM step computes at most (decodes plus prompt chunks;
    /// at least --llm-max-seqs): lower keeps decodes smooth while long
    /// prompts arrive.
    #[arg(long, default_value_t = LlmSettings::default().step_tokens)]
    llm_step_tokens: usize,
    #[command(flatten)]
    pub gpus: GpuArgs,
}

/// Which GPUs models may run on.
#[derive(Args, Clone)]
pub struct GpuArgs {
    /// GPUs to use: `auto` (CUDA devices, else Vulkan/Metal/DX12 ones
    /// through wgpu), `none` (models run on the CPU), or `software` (also
    /// software Vulkan devices such as Mesa's lavapipe, which compute on
    /// the CPU: for testing the GPU path without a GPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "software"])]
    pub gpus: String,
    /// GPU memory models may hold on each GPU, in MiB [default: 90% of
    /// the device's memory; no limit for a device that does not say].
    #[arg(long)]
    pub gpu_memory_mb: Option<u64>,
}

impl GpuArgs {
    /// The node's devices as these flags pick them.
    pub fn devices(&self) -> Devices {
        match self.gpus.as_str() {
            "none" => Devices::cpu_only(),
            other => Devices::discover(other == "software"),
        }
    }
}

impl PoolArgs {
    pub fn runtime(&self) -> Result<Runtime> {
        let ceilings = Limits {
            memory_mb: self.max_memory_mb,
            cpu_ms: self.max_cpu_ms,
            timeout_ms: self.max_timeout_ms,
            max_body_bytes: self.max_body_limit,
            concurrency: self.max_concurrency,
            queue: self.max_queue,
            queue_timeout_ms: self.max_queue_timeout_ms,
            max_tokens: self.max_max_tokens,
            stream_ms: self.max_stream_ms,
        };
        let mut builder = Runtime::builder()
            .max_instances(self.max_instances)
            .max_limits(ceilings)
            .keep_resident_mb(self.keep_resident_mb)
            .refusal_delay(std::time::Duration::from_millis(self.refusal_delay_ms))
            .inference_memory(InferenceMemory { per_call_mb: self.inference_call_mb, node_mb: self.inference_node_mb })
            .model_idle_timeout(std::time::Duration::from_secs(self.model_idle_secs))
            .llm(LlmSettings { cache_mb: self.llm_cache_mb, max_seqs: self.llm_max_seqs, step_tokens: self.llm_step_tokens });
        if let Some(n) = self.max_tenant_instances {
            builder = builder.max_instances_per_tenant(n);
        }
        if let Some(mb) = self.gpus.gpu_memory_mb {
            builder = builder.gpu_memory(mb.saturating_mul(1 << 20));
        }
        let devices = self.gpus.devices();
        for note in devices.notes() {
            tracing::info!("no GPU from {note}");
        }
        for device in devices.list().iter().skip(1) {
            tracing::info!(device = %device.name, backend = device.kind.name(), "models may run on this GPU");
        }
        Ok(builder.devices(devices).build()?)
    }
}

/// How the server takes connections and stops.
#[derive(Args)]
pub struct ConnectionArgs {
    /// Open connections at most; a connection beyond it is answered 503
    /// (with Retry-After) and closed.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// Open connections from one client address at most (same refusal).
    #[arg(long, default_value_t = ConnectionLimits::default().max_per_client)]
    max_connections_per_client: usize,
    /// Seconds a client has to send a request's headers before its
    /// connection is closed.
    #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs())]
    header_timeout_secs: u64,
    /// Size of a request's start line and headers at most, in KiB; larger
    /// ones (or more than 100 header fields) are answered 431.
    #[arg(long, default_value_t = ConnectionLimits::default().max_header_bytes >> 10)]
    max_header_kb: usize,
    /// Seconds a handler (or an upload) may wait for the next bytes of a
    /// request body; a client that stalls longer gets its body ended with
    /// an error.
    #[arg(long, default_value_t = ConnectionLimits::default().body_timeout.as_secs())]
    body_timeout_secs: u64,
    /// At SIGTERM or Ctrl-C the server stops accepting connections and lets
    /// requests in flight (streams included) finish for up to this many
    /// seconds, then exits; a second signal exits at once.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM, the server's
    /// certificate first); HTTP/2 where the client offers it by ALPN. The
    /// files are loaded again on SIGHUP and when they change.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ConnectionArgs {
    pub fn limits(&self) -> Result<ConnectionLimits> {
        if self.max_connections == 0 || self.max_connections_per_client == 0 || self.header_timeout_secs == 0 || self.max_header_kb == 0 || self.body_timeout_secs == 0 {
            anyhow::bail!(
                "--max-connections, --max-connections-per-client, --header-timeout-secs, --max-header-kb and --body-timeout-secs must be at least 1"
            );
        }
        if self.header_timeout_secs > 86_400 || self.body_timeout_secs > 86_400 {
            anyhow::bail!("--header-timeout-secs and --body-timeout-secs must be at most 86400 (a day)");
        }
        // hyper reads a request head into a buffer of at most about 400 KiB.
        if self.max_header_kb > 400 {
            anyhow::bail!("--max-header-kb must be at most 400");
        }
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = Tls::load(cert, key)?;
                tls.watch().context("watching for SIGHUP")?;
                Some(tls)
            }
            _ => None,
        };
        Ok(ConnectionLimits {
            tls,
            max_connections: self.max_connections,
            max_per_client: self.max_connections_per_client,
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            max_header_bytes: self.max_header_kb.saturating_mul(1 << 10),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs),
        })
    }
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
    /// Tokens one LLM generation may produce.
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Wall-clock time, in ms, of a request that streams a generation.
    #[arg(long)]
    stream_ms: Option<u64>,
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
            ("max_tokens", self.max_tokens),
            ("stream_ms", self.stream_ms),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?)))
        .collect()
    }

    /// `base` with the limits given on the command line set over it.
    pub fn over(&self, mut base: Limits) -> Result<Limits> {
        for (name, value) in self.given() {
            base.set(name, &value.to_string())?;
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

/// The help footer listing the default limits.
pub fn default_limits_help() -> String {
    let l = Limits::default();
    format!(
        "Default limits: --memory-mb {} --cpu-ms {} --timeout-ms {} --max-body-bytes {} \
         --concurrency {} --queue {} --queue-timeout-ms {} --max-tokens {} --stream-ms {}",
        l.memory_mb, l.cpu_ms, l.timeout_ms, l.max_body_bytes, l.concurrency, l.queue, l.queue_timeout_ms, l.max_tokens, l.stream_ms
    )
}

/// `$XDG_DATA_HOME/gpuwasm`, or `~/.local/share/gpuwasm`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("gpuwasm");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/gpuwasm")
}

/// Prints `json` and returns true when `--json` was given.
pub fn print_json(json: bool, value: &serde_json::Value) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(json)
}

/// Reads a component file, with an error that names it.
pub fn read_component(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The first 12 characters of a digest, as listings show it.
pub fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// A project folder (`gpuwasm new`): its gpuwasm.toml, which must say how
/// its component is built (`[build]`).
pub struct Project {
    /// The folder; the manifest's paths are relative to it.
    pub dir: PathBuf,
    /// The deployment's name, if the manifest gives one.
    pub name: Option<String>,
    /// How the component is built.
    pub build: Build,
}

impl Project {
    /// The project in `dir`.
    pub fn open(dir: &Path) -> Result<Project> {
        let path = dir.join("gpuwasm.toml");
        if !path.exists() {
            anyhow::bail!("{} has no gpuwasm.toml: give a component (.wasm), or a project made by `gpuwasm new`", dir.display());
        }
        let (manifest, dir) = load_manifest(&path, Some(&path))?;
        let Some(build) = manifest.build else {
            anyhow::bail!("{} has no [build] section saying how to build the component (command, output)", path.display());
        };
        Ok(Project { dir, name: manifest.name, build })
    }

    /// The component its build writes.
    pub fn output(&self) -> PathBuf {
        self.dir.join(&self.build.output)
    }

    /// Its gpuwasm.toml.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("gpuwasm.toml")
    }
}

/// What `run` and `deploy` were given: a component, or a project folder
/// (its built component and its manifest, unless `manifest` names one).
pub fn component_of(path: &Path, manifest: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>)> {
    if !path.is_dir() {
        return Ok((path.to_path_buf(), manifest.map(Path::to_path_buf)));
    }
    let project = Project::open(path)?;
    let output = project.output();
    if !output.exists() {
        anyhow::bail!("{} is not built yet: run `gpuwasm build {}` first", output.display(), project.dir.display());
    }
    Ok((output, Some(manifest.map_or_else(|| project.manifest(), Path::to_path_buf))))
}

/// The manifest for `file`: `explicit`, else gpuwasm.toml beside it, else
/// none; with the folder it is in (its paths are relative to that).
pub fn load_manifest(file: &Path, explicit: Option<&Path>) -> Result<(Manifest, PathBuf)> {
    let beside = file.parent().unwrap_or(Path::new(".")).join("gpuwasm.toml");
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None if beside.exists() => beside,
        None => return Ok((Manifest::default(), PathBuf::from("."))),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // The server (or `run`'s runtime) checks the limits against its own maxima.
    let no_ceilings = Limits::unbounded();
    let manifest = Manifest::parse(&text, &no_ceilings).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((manifest, path.parent().unwrap_or(Path::new(".")).to_path_buf()))
}


#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command's long options are distinct. clap checks this only in
    /// debug builds; in release the second of two options with one name
    /// silently lost (`bench http --concurrency` was both the levels and a
    /// deployment limit).
    #[test]
    fn no_command_has_two_options_of_one_name() {
        fn check(command: &clap::Command, path: &str) {
            let mut seen = std::collections::HashSet::new();
            for arg in command.get_arguments() {
                for long in arg.get_long_and_visible_aliases().into_iter().flatten() {
                    assert!(seen.insert(long), "`{path}` has two options named --{long}");
                }
            }
            for sub in command.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        let cli = super::Cli::command();
        assert!(cli.get_subcommands().count() > 5);
        check(&cli, "gpuwasm");
    }
}
