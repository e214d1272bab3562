//! `gpuwasm logs`: what a deployment's guests printed (stdout and
//! stderr), request by request, and why requests failed.

use crate::args::ServerArgs;
use anyhow::Result;
use bytes::Bytes;
use clap::Args;
use gpuwasm_server::api::{LogEntry, Logs};
use http::Method;
use std::process::ExitCode;
use std::time::Duration;

/// Show what a deployment's guests printed, and why requests failed.
#[derive(Args)]
#[command(after_help = "The server keeps the last 1 MiB per deployment, in memory (a restart forgets it), \
and at most 64 KiB of one request's output.

Examples:
  gpuwasm logs api
  gpuwasm logs api --follow
  gpuwasm logs api --json | jq .failure")]
pub struct LogsArgs {
    /// The deployment.
    pub name: String,
    /// Keep printing new entries as requests make them (Ctrl-C to stop).
    #[arg(long, short)]
    pub follow: bool,
    /// Print each entry as one line of JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// How often `--follow` asks for new entries.
const POLL: Duration = Duration::from_millis(500);

pub async fn run(args: LogsArgs) -> Result<ExitCode> {
    let api = args.server.api()?;
    let mut after = 0;
    loop {
        let page: Logs = api.admin(Method::GET, &format!("deployments/{}/logs?after={after}", args.name), Bytes::new()).await?;
        let full = page.entries.len() >= 1000;
        for entry in &page.entries {
            print(entry, args.json)?;
        }
        after = page.next;
        match (full, args.follow) {
            (true, _) => continue,
            (false, true) => tokio::time::sleep(POLL).await,
            (false, false) => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn print(entry: &LogEntry, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(entry)?);
        return Ok(());
    }
    let id = entry.request_id.as_deref().unwrap_or("-");
    let head = format!("{} v{} {id}", entry.arrived(), entry.version);
    for line in entry.output.lines() {
        println!("{head} | {line}");
    }
    if let Some(failure) = &entry.failure {
        println!("{head} ! {failure}");
    }
    Ok(())
}
