//! `gpuwasm token create|list|revoke`: a tenant's API tokens.

use crate::args::{ListArgs, ServerArgs, print_json};
use crate::client::typed;
use anyhow::Result;
use gpuwasm_server::api::{NewToken, Revoked, Tokens};
use bytes::Bytes;
use clap::Subcommand;
use http::Method;
use std::process::ExitCode;

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

pub async fn run(cmd: TokenCommand) -> Result<ExitCode> {
    match cmd {
        TokenCommand::Create { tenant, server } => {
            let query = tenant.map(|t| format!("?tenant={t}")).unwrap_or_default();
            let made: NewToken = server.api()?.admin(Method::POST, &format!("tokens{query}"), Bytes::new()).await?;
            println!("token for tenant {} (shown only once): {}", made.tenant, made.token);
        }
        TokenCommand::List(args) => {
            let reply = args.server.api()?.admin_json(Method::GET, "tokens", &[], Bytes::new()).await?;
            if !print_json(args.json, &reply)? {
                let Tokens { tokens } = typed(reply)?;
                println!("{:<14} {:<20} {:<8}", "ID", "TENANT", "STATUS");
                for t in tokens {
                    let status = if t.revoked_at.is_none() { "active" } else { "revoked" };
                    println!("{:<14} {:<20} {status:<8}", t.id, t.tenant);
                }
            }
        }
        TokenCommand::Revoke { id, server } => {
            let revoked: Revoked = server.api()?.admin(Method::DELETE, &format!("tokens/{id}"), Bytes::new()).await?;
            println!("revoked token {}", revoked.revoked);
        }
    }
    Ok(ExitCode::SUCCESS)
}
