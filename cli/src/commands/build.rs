//! `gpuwasm build [DIR]`: runs the `[build] command` of DIR/gpuwasm.toml
//! in DIR and checks that it wrote a component at `[build] output`.

use crate::args::Project;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

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
    let project = Project::open(dir)?;
    let name = project.name.as_deref().unwrap_or("the component");
    eprintln!("building {name}: {}", project.build.command);
    let (started, started_at) = (Instant::now(), SystemTime::now());
    let status = Command::new("sh")
        .arg("-c")
        .arg(&project.build.command)
        .current_dir(&project.dir)
        .stdout(std::io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr")?)
        .status()
        .context("running the build command with sh")?;
    if !status.success() {
        bail!("the build command failed ({status}); its output is above");
    }
    let output = project.output();
    let written = std::fs::metadata(&output).with_context(|| format!("the build wrote no {} ([build] output)", output.display()))?;
    // (File times may lag the clock by a tick: a second of slack.)
    if written.modified().is_ok_and(|t| t + Duration::from_secs(1) < started_at) {
        bail!("the build command succeeded but did not write {} (it is older than the build): check [build] output", output.display());
    }
    let mut header = Vec::with_capacity(8);
    let read = std::fs::File::open(&output).and_then(|f| f.take(8).read_to_end(&mut header));
    read.with_context(|| format!("reading {}", output.display()))?;
    gpuwasm::check_header(&header).with_context(|| format!("{} ([build] output)", output.display()))?;
    eprintln!("built {} ({:.1} MB) in {:.1} s", output.display(), written.len() as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(output)
}
