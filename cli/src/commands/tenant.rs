//! `gpuwasm tenant create|list|domains|gpu|limits` (admin token only).

use crate::args::{ListArgs, ServerArgs, print_json};
use crate::client::{Api, typed};
use anyhow::Result;
use gpuwasm::nn::TenantGpu;
use gpuwasm_server::api::{Domains, NewTenant, NewToken, Tenants};
use gpuwasm_server::control_store::{TenantLimits, TenantRecord};
use bytes::Bytes;
use clap::Subcommand;
use http::Method;
use std::process::ExitCode;

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
    /// Set a tenant's GPU memory quota and share of GPU time; what is not
    /// given stays as it is. Models it holds already stay; its next loads
    /// and passes follow the new settings.
    Gpu {
        /// The tenant.
        name: String,
        /// GPU memory its resident models may hold on each GPU, in MiB.
        #[arg(long, conflicts_with = "no_memory_quota")]
        memory_mb: Option<u64>,
        /// Remove the memory quota (the device's budget still applies).
        #[arg(long)]
        no_memory_quota: bool,
        /// Its share of GPU time against other tenants with work waiting:
        /// weight 2 gets twice the time of weight 1 (1 to 1000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        weight: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Set a tenant's quotas: requests a second over all its deployments
    /// (a second's worth may come at once; beyond it requests get 429 with
    /// Retry-After), instances running at once, active deployments and
    /// storage. Quotas not given stay as they are; other tenants are not
    /// affected.
    #[command(after_help = "Examples:
  gpuwasm tenant limits acme --requests-per-second 100 --instances 8
  gpuwasm tenant limits acme --deployments 20 --storage-mb 4096
  gpuwasm tenant limits acme --no-rate-limit
  gpuwasm tenant limits acme --node-defaults   # instances, deployments and storage as the node's")]
    Limits {
        /// The tenant.
        name: String,
        /// Requests a second (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "no_rate_limit")]
        requests_per_second: Option<u32>,
        /// Remove the request-rate quota.
        #[arg(long)]
        no_rate_limit: bool,
        /// Instances its deployments may run at once (at most the node's
        /// --max-instances); more requests wait in their queues.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        instances: Option<u32>,
        /// Active deployments it may have.
        #[arg(long)]
        deployments: Option<u32>,
        /// MiB of deployment files, models and components it may store.
        #[arg(long)]
        storage_mb: Option<u64>,
        /// Use the node's quotas for instances, deployments and storage
        /// (those not given with this).
        #[arg(long)]
        node_defaults: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// A tenant's quotas, as `tenant list` prints them.
fn limits_text(limits: &TenantLimits) -> String {
    let rate = limits.requests_per_second.map_or("no rate limit".to_string(), |n| format!("{n} req/s"));
    let node = |what: &str| format!("{what}: node's");
    let instances = limits.instances.map_or(node("instances"), |n| format!("{n} instances"));
    let deployments = limits.deployments.map_or(node("deployments"), |n| format!("{n} deployments"));
    let storage = limits.storage_bytes.map_or(node("storage"), |b| format!("{} MiB storage", b >> 20));
    format!("{rate}, {instances}, {deployments}, {storage}")
}

/// A tenant's GPU settings, as `tenant list` prints them.
fn gpu_text(gpu: &TenantGpu) -> String {
    let memory = gpu.memory_mb.map_or("no quota".to_string(), |mb| format!("{mb} MiB"));
    format!("{memory}, weight {}", gpu.weight)
}

/// The record of tenant `name`, as the server has it now.
async fn tenant(api: &Api, name: &str) -> Result<TenantRecord> {
    let Tenants { tenants } = typed(api.admin_json(Method::GET, "tenants", &[], Bytes::new()).await?)?;
    tenants.into_iter().find(|t| t.name == name).ok_or_else(|| anyhow::anyhow!("no tenant named '{name}'"))
}

pub async fn run(cmd: TenantCommand) -> Result<ExitCode> {
    match cmd {
        TenantCommand::Create { name, domains, server } => {
            let reply: NewToken = server.api()?.admin_send(Method::POST, "tenants", &NewTenant { name: name.clone(), domains }).await?;
            println!("created tenant {name}");
            println!("token (shown only once): {}", reply.token);
        }
        TenantCommand::List(args) => {
            let reply = args.server.api()?.admin_json(Method::GET, "tenants", &[], Bytes::new()).await?;
            if !print_json(args.json, &reply)? {
                let Tenants { tenants } = typed(reply)?;
                println!("{:<24} {:<28} {:<72} DOMAINS", "TENANT", "GPU", "QUOTAS");
                for t in tenants {
                    let domains = if t.domains.is_empty() { "-".into() } else { t.domains.join(", ") };
                    println!("{:<24} {:<28} {:<72} {domains}", t.name, gpu_text(&t.gpu), limits_text(&t.limits));
                }
            }
        }
        TenantCommand::Domains { name, domains, server } => {
            let tenant: TenantRecord = server.api()?.admin_send(Method::PUT, &format!("tenants/{name}/domains"), &Domains { domains }).await?;
            match tenant.domains.as_slice() {
                [] => println!("tenant {name} may not claim host names"),
                set => println!("tenant {name} may claim host names in {}", set.join(", ")),
            }
        }
        TenantCommand::Gpu { name, memory_mb, no_memory_quota, weight, server } => {
            let api = server.api()?;
            let current = tenant(&api, &name).await?;
            let gpu = TenantGpu {
                memory_mb: if no_memory_quota { None } else { memory_mb.or(current.gpu.memory_mb) },
                weight: weight.unwrap_or(current.gpu.weight),
            };
            let tenant: TenantRecord = api.admin_send(Method::PUT, &format!("tenants/{name}/gpu"), &gpu).await?;
            println!("tenant {name}: GPU {}", gpu_text(&tenant.gpu));
        }
        TenantCommand::Limits { name, requests_per_second, no_rate_limit, instances, deployments, storage_mb, node_defaults, server } => {
            let api = server.api()?;
            let current = tenant(&api, &name).await?;
            let old = if node_defaults { TenantLimits { requests_per_second: current.limits.requests_per_second, ..TenantLimits::default() } } else { current.limits };
            let limits = TenantLimits {
                requests_per_second: if no_rate_limit { None } else { requests_per_second.or(old.requests_per_second) },
                instances: instances.or(old.instances),
                deployments: deployments.or(old.deployments),
                storage_bytes: storage_mb.map(|mb| mb.saturating_mul(1 << 20)).or(old.storage_bytes),
            };
            let tenant: TenantRecord = api.admin_send(Method::PUT, &format!("tenants/{name}/limits"), &limits).await?;
            println!("tenant {name}: {}", limits_text(&tenant.limits));
        }
    }
    Ok(ExitCode::SUCCESS)
}
