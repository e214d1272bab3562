//! `gpuwasm tenant create|list|domains` (admin token only).

use crate::args::{ListArgs, ServerArgs, print_json};
use crate::client::typed;
use anyhow::Result;
use gpuwasm_server::api::{Domains, NewTenant, NewToken, Tenants};
use gpuwasm_server::control_store::TenantRecord;
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
                println!("{:<24} DOMAINS", "TENANT");
                for t in tenants {
                    println!("{:<24} {}", t.name, if t.domains.is_empty() { "-".into() } else { t.domains.join(", ") });
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
    }
    Ok(ExitCode::SUCCESS)
}
