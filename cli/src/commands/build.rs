//! `gpuwasm build [DIR]`: runs the `[build] command` of DIR/gpuwasm.toml
//! in DIR and checks that it wrote a component at `[build] output`.

use crate::args::project_manifest;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

#[derive(Args)]
#[command(after_help = "Example:\n  gpuwasm new python hello && gpuwasm build hello")]
pub struct BuildArgs {
    /// The project: a folder with a gpuwasm.toml that has a [build] section.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

pub fn run(args: BuildArgs) -> Result<ExitCode> {
    build(&args.dir)?;
    let d = args.dir.display();
    println!("next: gpuwasm run {d}  (or: gpuwasm deploy {d}, or gpuwasm dev {d} to rebuild on every change)");
    Ok(ExitCode::SUCCESS)
}

/// Builds the project in `dir`; the command's output and ours go to
/// stderr (stdout is left to what a caller prints: `gpuwasm dev`'s address).
/// The component it wrote.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let (manifest, dir) = project_manifest(dir)?;
    let build = manifest.build.context("unreachable: project_manifest checks [build]")?;
    let name = manifest.name.unwrap_or_else(|| "the component".into());
    eprintln!("building {name}: {}", build.command);
    let (started, started_at) = (Instant::now(), std::time::SystemTime::now());
    let status = Command::new("sh")
        .arg("-c")
        .arg(&build.command)
        .current_dir(&dir)
        .stdout(std::io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr")?)
        .status()
        .context("running the build command with sh")?;
    if !status.success() {
        bail!("the build command failed ({status}); its output is above");
    }
    let output = dir.join(&build.output);
    let size = check_component(&output)?;
    let written = std::fs::metadata(&output).and_then(|m| m.modified()).ok();
    // (File times may lag the clock by a tick: a second of slack.)
    if written.is_some_and(|t| t + std::time::Duration::from_secs(1) < started_at) {
        bail!("the build command succeeded but did not write {} (it is older than the build): check [build] output", output.display());
    }
    eprintln!("built {} ({:.1} MB) in {:.1} s", output.display(), size as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(output)
}

/// Checks `path` holds a WebAssembly component; its size.
pub fn check_component(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("the build wrote no {} ([build] output)", path.display()))?;
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0, 1, 0]) => Ok(bytes.len() as u64),
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
            bail!("{} is a core WebAssembly module, not a component: build for wasm32-wasip2 (or wrap it with `wasm-tools component new`)", path.display())
        }
        _ => bail!("{} is not WebAssembly", path.display()),
    }
}

/// The component a project's build writes, for `run` and `deploy` given a folder.
pub fn output_of(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (manifest, dir) = project_manifest(dir)?;
    let build = manifest.build.context("unreachable: project_manifest checks [build]")?;
    let output = dir.join(build.output);
    if !output.exists() {
        bail!("{} is not built yet: run `gpuwasm build {}` first", output.display(), dir.display());
    }
    Ok((output, dir.join("gpuwasm.toml")))
}
