//! `gpuwasm serve`: the server, its state in a data directory; and what
//! `serve` and `run` share: binding, announcing the address, and stopping
//! on a signal.

use crate::args::{ConnectionArgs, PoolArgs, default_data_dir};
use anyhow::{Context, Result};
use clap::Args;
use gpuwasm_server::{ConnectionLimits, Prices, Server, ServerConfig, TenantQuotas, UsageConfig};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::net::TcpListener;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for deployments, artifacts and the admin token.
    #[arg(long, env = "GPUWASM_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Keep the control state (tenants, tokens, deployments, models) in
    /// PostgreSQL, shared by every node given the same URL, rather than in
    /// DATA_DIR/state.redb. Example: postgres://gpuwasm:PASSWORD@db:5432/gpuwasm.
    /// Needs --admin-token (the same on every node) and, for several
    /// nodes, --blobs.
    #[arg(long = "state", env = "GPUWASM_STATE", value_name = "URL", hide_env_values = true)]
    state_url: Option<String>,
    /// Keep blobs (components, deployment files, models) where the nodes
    /// share them, rather than in DATA_DIR/blobs: s3://BUCKET/PREFIX (an
    /// S3-compatible store; credentials, region and endpoint from the
    /// AWS_* environment variables, e.g. AWS_ENDPOINT_URL and
    /// AWS_ALLOW_HTTP=true for a local server), or a directory (a network
    /// file system). Each node keeps its compiled artifacts in its own
    /// DATA_DIR.
    #[arg(long, env = "GPUWASM_BLOBS", value_name = "URL|DIR")]
    blobs: Option<String>,
    /// The URL (http://HOST:PORT) the other nodes sharing --state reach
    /// this one at: requests for a deployment whose models another node
    /// holds resident go there (one hop). Default: the listen address when
    /// it names one IP and the node speaks plain HTTP; else no routing
    /// between nodes. In Kubernetes: http://$(POD_IP):8080.
    #[arg(long, env = "GPUWASM_ADVERTISE", value_name = "URL", requires = "state_url")]
    advertise: Option<String>,
    /// Admin API token. Without it, the token in DATA_DIR/admin-token is
    /// used, and created on first start.
    #[arg(long, env = "GPUWASM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    connections: ConnectionArgs,
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
    /// MiB a second each tenant's uploads receive, all together, at most
    /// (0: as fast as they arrive). Receiving, hashing and writing uploads
    /// at full speed takes cores other tenants' requests wait for.
    #[arg(long, default_value_t = 64)]
    tenant_upload_mb_per_sec: u64,
    /// Seconds an uploaded blob or assembled file tree that nothing refers
    /// to is kept before it is removed.
    #[arg(long, default_value_t = 3600)]
    gc_grace_secs: u64,
    /// Serve Prometheus metrics (`GET /metrics`, OpenMetrics text) on this
    /// address, apart from the API and the guests (no token: bind it where
    /// only your scraper reaches).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Do not meter requests: no usage records (`gpuwasm usage` answers
    /// that metering is off) and no request metrics.
    #[arg(long)]
    no_metering: bool,
    /// Days of usage records kept (DATA_DIR/usage).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..))]
    usage_retention_days: u32,
    /// A price table (TOML) that turns usage into cost: cpu_second,
    /// gb_second, million_tokens, request, and [gpu_second] by device or
    /// kind (docs/usage.md). Without it every price is 0.
    #[arg(long, value_name = "FILE")]
    prices: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let admin_token = match args.admin_token {
        Some(token) if !token.is_empty() => token,
        _ if args.state_url.is_some() => {
            anyhow::bail!("--state needs --admin-token (or GPUWASM_ADMIN_TOKEN): every node sharing the state must take the same admin token")
        }
        _ => stored_token(&args.data_dir)?,
    };
    if let Some(blobs) = args.blobs.as_ref().filter(|b| b.contains("://") && !b.starts_with("s3://")) {
        anyhow::bail!("--blobs {blobs}: give s3://BUCKET/PREFIX or a directory");
    }
    let limits = args.connections.limits()?;
    let listener = bind(args.listen).await?;
    let advertise = match (&args.advertise, &args.state_url) {
        (Some(url), _) if !url.starts_with("http://") => anyhow::bail!("--advertise {url}: nodes reach each other over plain HTTP: give http://HOST:PORT"),
        (Some(url), _) => Some(url.trim_end_matches('/').to_string()),
        (None, Some(_)) => {
            let local = listener.local_addr()?;
            (!local.ip().is_unspecified() && limits.tls.is_none()).then(|| format!("http://{local}"))
        }
        (None, None) => None,
    };
    let mut server_names = args.server_names.clone();
    server_names.extend(std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()));
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        state_url: args.state_url.clone(),
        blobs: args.blobs.clone(),
        advertise,
        admin_token,
        max_upload_bytes: args.max_upload_mb.saturating_mul(1 << 20),
        max_model_bytes: args.max_model_mb.saturating_mul(1 << 20),
        server_names: server_names.iter().filter_map(|n| gpuwasm_server::hosts::normalize(n)).collect(),
        quotas: TenantQuotas {
            deployments: args.tenant_deployments,
            storage_bytes: args.tenant_storage_mb.saturating_mul(1 << 20),
            uploads: args.tenant_uploads,
            upload_bytes_per_sec: Some(args.tenant_upload_mb_per_sec.saturating_mul(1 << 20)).filter(|&b| b > 0),
        },
        gc_grace: std::time::Duration::from_secs(args.gc_grace_secs),
        usage: match args.no_metering {
            true => None,
            false => Some(UsageConfig {
                retention_days: args.usage_retention_days,
                prices: match &args.prices {
                    Some(path) => Prices::load(path).map_err(anyhow::Error::msg)?,
                    None => Prices::default(),
                },
            }),
        },
    };
    let server = Server::open(args.pool.runtime()?, config)
        .await
        .with_context(|| format!("opening the server state in {}", args.data_dir.display()))?;
    tracing::info!(data_dir = %args.data_dir.display(), deployments = server.deployments().len(), "server ready");
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = args.metrics_listen {
        let metrics = bind(addr).await?;
        tracing::info!(address = %metrics.local_addr()?, "metrics at GET /metrics");
        tokio::spawn(server.clone().serve_metrics(metrics, async move {
            let _ = metrics_stopped.await;
        }));
    }
    let handle = server.clone();
    let announce = listen_line(&listener, &limits)?;
    let code = until_signal(args.connections.drain_secs, announce, |stop| server.serve(listener, limits, stop)).await;
    let _ = metrics_stop.send(());
    handle.flush_usage().await;
    code
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
    let token = gpuwasm_server::hex::random_hex(24).context("reading /dev/urandom")?;
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

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))
}

/// The line that announces the address actually bound (tests and
/// scripts read it); [`until_signal`] prints it.
pub fn listen_line(listener: &TcpListener, limits: &ConnectionLimits) -> Result<String> {
    let scheme = if limits.tls.is_some() { "https" } else { "http" };
    Ok(format!("gpuwasm listening on {scheme}://{}", listener.local_addr()?))
}

/// Prints `announce` ([`listen_line`]) and runs `serve` until it ends or
/// a signal (Ctrl-C, SIGTERM) comes; signals are caught from before the
/// line (whoever reads it may signal at once). At the first signal `serve`'s
/// stop future completes: it stops accepting and drains, and the process
/// exits 0 once it has drained or after the drain timeout, whichever is
/// first. A second signal exits at once (status 1).
pub async fn until_signal<S>(drain_secs: u64, announce: String, serve: impl FnOnce(StopFuture) -> S) -> Result<ExitCode>
where
    S: std::future::Future<Output = std::io::Result<()>>,
{
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut interrupt) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{announce}")?;
        out.flush()?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = serve(Box::pin(async move {
        let _ = stopped.await;
    }));
    tokio::pin!(serving);
    let mut signalled = async || {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    };
    tokio::select! {
        result = &mut serving => {
            result?;
            return Ok(ExitCode::SUCCESS);
        }
        () = signalled() => {}
    }
    let drain = std::time::Duration::from_secs(drain_secs);
    tracing::info!(drain_secs, "signal received: accepting nothing new, letting requests in flight finish (a second signal stops at once)");
    let _ = stop.send(());
    // Past this point the process exits directly: returning would drop the
    // tokio runtime, which waits for every blocking task still running
    // (compiles, model loads, inference calls), however long they take.
    tokio::select! {
        result = &mut serving => {
            result?;
            tracing::info!("every request in flight finished; exiting");
            Ok(ExitCode::SUCCESS)
        }
        () = tokio::time::sleep(drain) => {
            tracing::warn!(drain_secs, "drain timeout: exiting with requests still in flight");
            std::process::exit(0)
        }
        () = signalled() => {
            tracing::warn!("second signal: exiting at once, requests in flight are cut off");
            std::process::exit(1)
        }
    }
}

/// What [`until_signal`] hands the server: completes at the first signal.
pub type StopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

