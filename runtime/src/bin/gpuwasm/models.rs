//! `gpuwasm model push|list|rm`, and the local models of `gpuwasm run`.

use crate::cli::{ModelCommand, PushArgs, print_json, sha256_hex};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use gpuwasm::nn::{LocalModels, ModelAccess, read_model_files};
use gpuwasm_tensor::Format;
use http::Method;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

pub async fn run(cmd: ModelCommand) -> Result<ExitCode> {
    match cmd {
        ModelCommand::Push(args) => push(args).await,
        ModelCommand::List(args) => {
            let reply = args.server.api()?.admin(Method::GET, "models", Bytes::new()).await?;
            if print_json(args.json, &reply)? {
                return Ok(ExitCode::SUCCESS);
            }
            let models = reply["models"].as_array().cloned().unwrap_or_default();
            if models.is_empty() {
                println!("no models");
            }
            for m in models {
                let name = match m["namespace"].as_str() {
                    Some("public") => format!("public/{}", m["name"].as_str().unwrap_or("?")),
                    _ => m["name"].as_str().unwrap_or("?").to_string(),
                };
                let loaded = if m["loaded"].is_null() { "" } else { " (loaded)" };
                println!(
                    "{name:<28} {:<12} {:>8.1} MiB  {}{loaded}",
                    m["format"].as_str().unwrap_or("?"),
                    m["size_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    m["summary"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Rm(args) => {
            args.server.api()?.admin(Method::DELETE, &format!("models/{}", args.name), Bytes::new()).await?;
            println!("removed model {}", args.name);
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
    let files = read_model_files(format, &args.path).map_err(anyhow::Error::msg)?;
    if files.is_empty() {
        bail!("{} holds none of the files of a {} model", args.path.display(), format.name());
    }
    let api = args.server.api()?;
    let public = args.name.starts_with("public/");
    let query = if public { "?namespace=public" } else { "" };
    let mut manifest = serde_json::Map::new();
    for (path, bytes) in files {
        let sha256 = sha256_hex(&bytes);
        let label = format!("{path} ({:.1} MiB)", bytes.len() as f64 / (1 << 20) as f64);
        api.upload(&format!("model-files/{sha256}{query}"), Bytes::from(bytes), &label)
            .await
            .with_context(|| format!("uploading {path}"))?;
        manifest.insert(path, sha256.into());
    }
    let spec = serde_json::json!({ "format": format.name(), "files": manifest });
    let reply = api
        .admin(Method::PUT, &format!("models/{}", args.name), Bytes::from(serde_json::to_vec(&spec)?))
        .await
        .with_context(|| format!("pushing model {}", args.name))?;
    println!("pushed model {} ({}): {}", args.name, format.name(), reply["summary"].as_str().unwrap_or(""));
    Ok(ExitCode::SUCCESS)
}

/// The models `gpuwasm run` serves from `NAME=PATH` flags; the manifest's
/// `[models] allow` limits them when it names any.
pub fn local(flags: &[String], manifest_allow: Vec<String>) -> Result<ModelAccess> {
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
    let allow = if manifest_allow.is_empty() { names } else { manifest_allow };
    Ok(ModelAccess { tenant: "local".into(), allow, catalog: Some(Arc::new(models)) })
}
