//! `gpuwasm deploy`: a component and its manifest become a new version of
//! a deployment; the manifest's files are uploaded first.

use crate::args::{LimitArgs, ServerArgs, component_of, load_manifest, read_component, short};
use crate::client::{Api, typed};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use gpuwasm_server::api::Uploaded;
use gpuwasm_server::control_store::VersionRecord;
use gpuwasm_server::hex::sha256_hex;
use gpuwasm_server::SPEC_HEADER;
use http::Method;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args)]
pub struct DeployArgs {
    /// The component (.wasm) to deploy, or a project folder (`gpuwasm new`)
    /// after `gpuwasm build`.
    file: PathBuf,
    /// Deployment name: 1-63 of a-z, 0-9 and '-'. Requests to /TENANT/NAME/... reach it.
    /// [default: `name` in the manifest]
    #[arg(long)]
    name: Option<String>,
    /// The manifest [default: gpuwasm.toml beside FILE, if there is one].
    /// Flags override what it says.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Route requests whose Host header is HOST here (instead of by path).
    #[arg(long)]
    host: Option<String>,
    /// Do not run the component's init function at deploy time (it then
    /// never runs: the handler must set itself up per request).
    #[arg(long)]
    no_preinit: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: DeployArgs) -> Result<ExitCode> {
    let (file, manifest) = component_of(&args.file, args.manifest.as_deref())?;
    let wasm = read_component(&file)?;
    let (manifest, manifest_dir) = load_manifest(&file, manifest.as_deref())?;
    let Some(name) = args.name.clone().or(manifest.name.clone()) else {
        bail!("give the deployment a name: --name NAME, or `name = \"...\"` in gpuwasm.toml");
    };
    let mut spec = manifest.spec;
    spec.limits = args.limits.over(spec.limits)?;
    spec.host = args.host.clone().or(spec.host);
    spec.preinit = !args.no_preinit;
    let api = args.server.api()?;
    if let Some(dir) = &manifest.files_dir {
        spec.files = upload_files(&api, &manifest_dir.join(dir)).await?;
    }
    let path = format!("deployments/{name}");
    let header = (SPEC_HEADER.to_string(), ascii_json(&serde_json::to_value(&spec)?));
    let v: VersionRecord = typed(api.admin_json(Method::PUT, &path, &[header], Bytes::from(wasm)).await?)?;
    let route = match &v.spec.host {
        Some(host) => format!("http://{host}/ (by Host header)"),
        None => format!("{}/{}/{}/", api.base(), v.tenant, v.name),
    };
    let snapshot = if v.snapshot_sha256.is_some() { ", pre-initialised" } else { "" };
    println!("deployed {}/{} version {} (sha256 {}{snapshot}) at {route}", v.tenant, v.name, v.version, short(&v.sha256));
    Ok(ExitCode::SUCCESS)
}

/// Uploads every file under `dir` and returns their map (path -> SHA-256).
/// Only regular files and folders are allowed: a symlink is refused, not
/// followed.
async fn upload_files(api: &Api, dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder).with_context(|| format!("reading {} ([files] dir)", folder.display()))?;
        for entry in entries {
            let path = entry?.path();
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            if kind.is_dir() {
                pending.push(path);
                continue;
            }
            if !kind.is_file() {
                bail!("{} is not a regular file (symlinks are not uploaded; copy the file itself)", path.display());
            }
            let relative = path.strip_prefix(dir).expect("walked from dir");
            let name = relative.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?.to_string();
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let sha256 = sha256_hex(&bytes);
            let _: Uploaded = api
                .admin(Method::PUT, &format!("files/{sha256}"), Bytes::from(bytes))
                .await
                .with_context(|| format!("uploading {}", path.display()))?;
            files.insert(name, sha256);
        }
    }
    Ok(files)
}

/// `value` as JSON with every non-ASCII character escaped, so that it fits
/// in an HTTP header.
fn ascii_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    for c in value.to_string().chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

