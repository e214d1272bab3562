//! `gpuwasm list`, `rm`, `versions`, `rollback`: a tenant's deployments.

use crate::args::{ListArgs, ServerArgs, print_json, short};
use crate::client::typed;
use anyhow::Result;
use bytes::Bytes;
use clap::Args;
use gpuwasm_server::api::{Deployments, Removed, Versions};
use gpuwasm_server::control_store::VersionRecord;
use http::Method;
use std::process::ExitCode;

#[derive(Args)]
pub struct RmArgs {
    /// The deployment.
    name: String,
    /// Also forget every version (no rollback afterwards); its files and
    /// components are then removed, freeing the tenant's storage.
    #[arg(long)]
    purge: bool,
    #[command(flatten)]
    server: ServerArgs,
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
            v.spec.limits.memory_mb,
            v.spec.limits.cpu_ms,
            v.spec.host.as_deref().unwrap_or("-")
        );
    }
}

pub async fn list(args: ListArgs) -> Result<ExitCode> {
    let reply = args.server.api()?.admin_json(Method::GET, "deployments", &[], Bytes::new()).await?;
    if print_json(args.json, &reply)? {
        return Ok(ExitCode::SUCCESS);
    }
    let Deployments { deployments } = typed(reply)?;
    if deployments.is_empty() {
        println!("no deployments");
    } else {
        print_versions(&deployments, None);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(args: RmArgs) -> Result<ExitCode> {
    let query = if args.purge { "?purge=true" } else { "" };
    let removed: Removed = args.server.api()?.admin(Method::DELETE, &format!("deployments/{}{query}", args.name), Bytes::new()).await?;
    match args.purge {
        true => println!("removed {} and forgot its versions", removed.removed),
        false => println!("removed {}", removed.removed),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn versions(args: VersionsArgs) -> Result<ExitCode> {
    let reply = args.server.api()?.admin_json(Method::GET, &format!("deployments/{}/versions", args.name), &[], Bytes::new()).await?;
    if print_json(args.json, &reply)? {
        return Ok(ExitCode::SUCCESS);
    }
    let Versions { active, versions } = typed(reply)?;
    print_versions(&versions, active);
    println!("(* = serving traffic)");
    Ok(ExitCode::SUCCESS)
}

pub async fn rollback(args: RollbackArgs) -> Result<ExitCode> {
    let query = args.to.map(|v| format!("?to={v}")).unwrap_or_default();
    let path = format!("deployments/{}/rollback{query}", args.name);
    let v: VersionRecord = args.server.api()?.admin(Method::POST, &path, Bytes::new()).await?;
    println!("{}/{} now serves version {} (sha256 {})", v.tenant, v.name, v.version, short(&v.sha256));
    Ok(ExitCode::SUCCESS)
}
