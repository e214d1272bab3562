//! `gpuwasm invoke`: one HTTP request to a deployment, its body printed.

use crate::args::ServerArgs;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm_server::api::WhoAmI;
use http::Method;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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

pub async fn run(args: InvokeArgs) -> Result<ExitCode> {
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
        let me: WhoAmI = api.admin(Method::GET, "whoami", Bytes::new()).await.context("finding your tenant (or give TENANT/NAME)")?;
        format!("{}/{}", me.tenant, args.name)
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


