//! `gpuwasm model push|list|rm`, and the local models of `gpuwasm run`.

use crate::args::{ListArgs, NameArgs, ServerArgs, print_json};
use crate::client::typed;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use gpuwasm::nn::{LocalModels, ModelAccess, PUBLIC, read_model_files};
use gpuwasm_server::api::{ModelPush, Models, Removed, ResidentModels, Uploaded};
use gpuwasm_server::control_store::ModelRecord;
use gpuwasm_server::spec::DeploymentSpec;
use gpuwasm_server::hex::sha256_hex;
use gpuwasm_tensor::Format;
use http::Method;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Upload a model to your tenant (or to public/ with the admin token);
    /// the server checks it before accepting it.
    Push(PushArgs),
    /// List the models your handlers can load: your tenant's and public ones.
    List(ModelListArgs),
    /// Remove a model (NAME, or public/NAME with the admin token).
    Rm(NameArgs),
}

#[derive(Args)]
pub struct ModelListArgs {
    /// List what is resident on this node's devices instead: each model's
    /// device, bytes and the tenants charged for it (the admin sees every
    /// tenant; a tenant sees itself), and each GPU's model memory.
    #[arg(long)]
    pub resident: bool,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Args)]
pub struct PushArgs {
    /// The name handlers load it by: 1-63 of a-z, 0-9 and '-'; public/NAME
    /// makes it loadable by every tenant (admin token only).
    pub name: String,
    /// A directory with model.safetensors, config.json and tokenizer.json
    /// (a sentence-transformers layout), or a .onnx or .gguf file.
    pub path: PathBuf,
    /// The model format [default: from PATH: a directory is safetensors,
    /// otherwise the file extension].
    #[arg(long, value_parser = ["safetensors", "onnx", "gguf"])]
    pub format: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn run(cmd: ModelCommand) -> Result<ExitCode> {
    match cmd {
        ModelCommand::Push(args) => push(args).await,
        ModelCommand::List(ModelListArgs { resident: true, list: args }) => {
            let reply = args.server.api()?.admin_json(Method::GET, "resident-models", &[], Bytes::new()).await?;
            if print_json(args.json, &reply)? {
                return Ok(ExitCode::SUCCESS);
            }
            let ResidentModels { devices, models } = typed(reply)?;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            for d in devices {
                let budget = d.budget_bytes.map_or("no limit".to_string(), |b| format!("{:.1} MiB", mib(b)));
                println!("GPU {}: models hold {:.1} MiB of {budget}", d.device, mib(d.used_bytes));
            }
            if models.is_empty() {
                println!("no models resident");
            }
            for m in models {
                let tenants = if m.tenants.is_empty() { "-".to_string() } else { m.tenants.join(", ") };
                let kept = match m.warm {
                    0 => format!("idle timeout {} s", m.idle_timeout_s),
                    n => format!("kept warm by {n} deployment{}", if n == 1 { "" } else { "s" }),
                };
                println!("{:<28} {:<32} {:>8.1} MiB  {kept:<28} tenants: {tenants}", m.names.join(", "), m.device, mib(m.bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::List(ModelListArgs { list: args, .. }) => {
            let reply = args.server.api()?.admin_json(Method::GET, "models", &[], Bytes::new()).await?;
            if print_json(args.json, &reply)? {
                return Ok(ExitCode::SUCCESS);
            }
            let Models { models } = typed(reply)?;
            if models.is_empty() {
                println!("no models");
            }
            for m in models {
                let r = &m.record;
                let name = if r.namespace == PUBLIC { format!("public/{}", r.name) } else { r.name.clone() };
                let loaded = if m.loaded.is_none() { "" } else { " (loaded)" };
                println!("{name:<28} {:<12} {:>8.1} MiB  {}{loaded}", r.format.name(), r.size_bytes as f64 / (1 << 20) as f64, r.summary);
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Rm(args) => {
            let removed: Removed = args.server.api()?.admin(Method::DELETE, &format!("models/{}", args.name), Bytes::new()).await?;
            println!("removed model {}", removed.removed);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The format of the model at `path`: `explicit`, else a directory is
/// safetensors and a file goes by its extension.
fn format_of(path: &Path, explicit: Option<&str>) -> Result<Format> {
    if let Some(name) = explicit {
        return Format::from_name(name).with_context(|| format!("unknown format {name:?}"));
    }
    if path.is_dir() {
        return Ok(Format::Safetensors);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("onnx") => Ok(Format::Onnx),
        Some("gguf") => Ok(Format::Gguf),
        _ => bail!("cannot tell the format of {}: give --format safetensors|onnx|gguf", path.display()),
    }
}

async fn push(args: PushArgs) -> Result<ExitCode> {
    let format = format_of(&args.path, args.format.as_deref())?;
    if format.files().is_some() != args.path.is_dir() {
        bail!("a {} model is {}: {}", format.name(), if args.path.is_dir() { "a file" } else { "a directory" }, args.path.display());
    }
    let files = read_model_files(format, &args.path)?;
    if files.is_empty() {
        bail!("{} holds none of the files of a {} model", args.path.display(), format.name());
    }
    let api = args.server.api()?;
    let public = args.name.starts_with("public/");
    let query = if public { "?namespace=public" } else { "" };
    let mut manifest = BTreeMap::new();
    for (path, bytes) in files {
        let sha256 = sha256_hex(&bytes);
        let label = format!("{path} ({:.1} MiB)", bytes.len() as f64 / (1 << 20) as f64);
        let _: Uploaded = api
            .upload(&format!("model-files/{sha256}{query}"), Bytes::from(Vec::from(bytes)), &label)
            .await
            .with_context(|| format!("uploading {path}"))?;
        manifest.insert(path, sha256);
    }
    let push = ModelPush { format: format.name().to_string(), files: manifest };
    let record: ModelRecord = api
        .admin_send(Method::PUT, &format!("models/{}", args.name), &push)
        .await
        .with_context(|| format!("pushing model {}", args.name))?;
    println!("pushed model {} ({}): {}", args.name, format.name(), record.summary);
    Ok(ExitCode::SUCCESS)
}

/// The models `gpuwasm run` serves from `NAME=PATH` flags; the manifest's
/// `[models] allow` limits them when it names any, and its other
/// `[models]` settings hold as on a server.
pub fn local(flags: &[String], spec: &DeploymentSpec) -> Result<ModelAccess> {
    let mut models = LocalModels::default();
    let mut names = Vec::new();
    for flag in flags {
        let Some((name, path)) = flag.split_once('=') else {
            bail!("--model {flag:?}: use NAME=PATH");
        };
        let path = Path::new(path);
        let format = format_of(path, None).with_context(|| format!("--model {name}"))?;
        if !path.exists() {
            bail!("--model {name}: {} does not exist", path.display());
        }
        models.add(name, format, path.to_path_buf());
        names.push(name.to_string());
    }
    let access = spec.model_access("local", Some(Arc::new(models)));
    Ok(if spec.models.is_empty() { ModelAccess { allow: names, ..access } } else { access })
}
