//! `gpuwasm dev [DIR]`: builds a project, serves it as `gpuwasm run` does,
//! and on every change to its sources builds again and swaps the new
//! version in. Requests in flight finish on the version they started on;
//! a failed build leaves the last good version serving.

use super::build::build;
use super::run::load;
use super::serve::{bind, listen_line, until_signal};
use crate::args::{ConnectionArgs, LimitArgs, PoolArgs, Project};
use anyhow::Result;
use clap::Args;
use gpuwasm::{Deployment, Runtime};
use gpuwasm_server::serve_connections;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Args)]
#[command(after_help = "Example:\n  gpuwasm new js hello && gpuwasm dev hello    # then edit hello/handler.js")]
pub struct DevArgs {
    /// The project folder (made by `gpuwasm new`; its gpuwasm.toml says how to build it).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A model handlers may load by name, as NAME=PATH (repeatable), as for `gpuwasm run`.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// How often the sources are looked at, in milliseconds.
    #[arg(long, default_value_t = 300)]
    poll_ms: u64,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    connections: ConnectionArgs,
}

pub async fn run(args: DevArgs) -> Result<ExitCode> {
    // The sources as they are when the first build starts: an edit made
    // while it runs is a change.
    let project = Project::open(&args.dir)?;
    let (output, manifest) = (project.output(), project.manifest());
    let seen = sources(args.dir.clone(), output.clone()).await;
    let dir = args.dir.clone();
    tokio::task::spawn_blocking(move || build(&dir)).await??;
    let runtime = args.pool.runtime()?;
    let first = load(&runtime, &output, Some(&manifest), &args.limits, &args.models, None).await?;
    let current = Arc::new(RwLock::new(first));
    let limits = args.connections.limits()?;
    let listener = bind(args.listen).await?;
    let announce = listen_line(&listener, &limits)?;
    eprintln!("watching {} for changes (Ctrl-C stops)", args.dir.display());
    let watcher = Watcher { dir: args.dir, output, manifest, runtime, limits: args.limits, models: args.models, current: current.clone() };
    tokio::spawn(watcher.run(seen, Duration::from_millis(args.poll_ms.max(10))));
    let handler = move |req| {
        let deployment = current.read().expect("the version lock").clone();
        async move { deployment.handle(req).await }
    };
    until_signal(args.connections.drain_secs, announce, |stop| serve_connections(listener, handler, limits, stop)).await
}

/// Rebuilds and swaps in the project on every change.
struct Watcher {
    dir: PathBuf,
    output: PathBuf,
    manifest: PathBuf,
    runtime: Runtime,
    limits: LimitArgs,
    models: Vec<String>,
    current: Arc<RwLock<Deployment>>,
}

impl Watcher {
    /// `seen`: the sources the running version was built from.
    async fn run(self, mut seen: Vec<Source>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let now = self.sources().await;
            if now == seen {
                continue;
            }
            // Wait until the editor is done writing: two looks alike.
            let mut settled = now;
            loop {
                tokio::time::sleep(every).await;
                let again = self.sources().await;
                if again == settled {
                    break;
                }
                settled = again;
            }
            // What is built is what was there when the build started: an
            // edit made while it runs is seen at the next look.
            seen = settled;
            eprintln!("change seen: building again");
            let dir = self.dir.clone();
            let built = tokio::task::spawn_blocking(move || build(&dir)).await;
            match built {
                Ok(Ok(output)) => match load(&self.runtime, &output, Some(&self.manifest), &self.limits, &self.models, None).await {
                    Ok(deployment) => {
                        *self.current.write().expect("the version lock") = deployment;
                        eprintln!("serving the new version");
                    }
                    Err(e) => eprintln!("the new build does not load, still serving the last good version: {e:#}"),
                },
                Ok(Err(e)) => eprintln!("build failed, still serving the last good version: {e:#}"),
                Err(e) => eprintln!("build failed, still serving the last good version: {e}"),
            }
        }
    }

    async fn sources(&self) -> Vec<Source> {
        sources(self.dir.clone(), self.output.clone()).await
    }
}

/// A source file, its size and modification time.
type Source = (PathBuf, u64, SystemTime);

/// Every source file under `dir` (sorted), not counting `output`.
async fn sources(dir: PathBuf, output: PathBuf) -> Vec<Source> {
    tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        walk(&dir, &output, &mut files);
        files.sort();
        files
    })
    .await
    .unwrap_or_default()
}

/// Files under `dir` but what builds write: hidden entries (.venv,
/// .gpuwasm), `target`, `node_modules`, `__pycache__`, `Cargo.lock` and the
/// component itself.
fn walk(dir: &Path, output: &Path, files: &mut Vec<Source>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let (path, name) = (entry.path(), entry.file_name());
        let name = name.to_string_lossy();
        if name.starts_with('.') || ["target", "node_modules", "__pycache__", "Cargo.lock"].contains(&name.as_ref()) || path == output {
            continue;
        }
        match entry.metadata() {
            Ok(m) if m.is_dir() => walk(&path, output, files),
            Ok(m) => files.push((path, m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))),
            Err(_) => {}
        }
    }
}
