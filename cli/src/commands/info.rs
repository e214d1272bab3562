//! `gpuwasm info`: the devices this machine offers models, as `serve` and
//! `run` would find them.

use crate::args::GpuArgs;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub gpus: GpuArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InfoArgs) -> Result<ExitCode> {
    let devices = args.gpus.devices();
    let list = devices.list();
    if args.json {
        let value = serde_json::json!({ "devices": list, "notes": devices.notes() });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<40} {:<8} {:>12}  DRIVER", "DEVICE", "BACKEND", "MEMORY");
    for d in &list {
        let memory = d.memory_bytes.map_or("-".to_string(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
        println!("{:<40} {:<8} {memory:>12}  {}", d.name, d.kind.name(), d.driver);
    }
    if list.len() == 1 {
        println!("models run on the CPU: no GPU found");
    }
    for note in devices.notes() {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}
