//! `gpuwasm.toml`: what a deployment declares beside its component.
//!
//! ```toml
//! name = "api"                       # deployment name (--name overrides)
//!
//! [routes]
//! host = "api.example.com"           # also route requests with this Host
//!
//! [limits]                           # any Limits field (flags override)
//! memory_mb = 64
//! cpu_ms = 1000
//!
//! [env]                              # environment variables of the handler
//! GREETING = "hello"
//!
//! [outbound]                         # hosts the handler may call over HTTP(S)
//! allow = ["api.example.com", "127.0.0.1:8080"]
//!
//! [files]                            # served read-only at / inside the sandbox
//! dir = "static"                     # relative to gpuwasm.toml; uploaded on deploy
//!
//! [models]                           # models it may load (enforced by wasi-nn)
//! allow = ["minilm"]
//! target = "auto"                    # where they run: auto (a GPU when the
//!                                    # guest asks and the node has one), gpu, cpu
//! from_bytes = false                 # whether wasi-nn `load` may build graphs
//!                                    # from the guest's bytes (charged to its memory)
//! warm = ["minilm"]                  # loaded at deploy, kept resident while active
//! idle_timeout_s = { minilm = 3600 } # per model: unused this long, it is evicted
//!                                    # (default: the node's --model-idle-secs)
//!
//! [build]                            # how `gpuwasm build` makes the component
//! command = "cargo build --release --target wasm32-wasip2"   # run by sh, here
//! output = "target/wasm32-wasip2/release/api.wasm"          # what it writes
//! ```
//!
//! Errors name the field and the line. The manifest is a
//! [`DeploymentSpec`] (the same one the admin API takes and versions
//! record) with the deployment's name and the folder of its files.

use crate::spec::{DeploymentSpec, SandboxSpec};
use gpuwasm::Limits;
use gpuwasm::nn::Target;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use toml::Spanned;

/// A parsed, checked manifest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    /// Deployment name.
    pub name: Option<String>,
    /// Directory, relative to the manifest, served read-only at `/`
    /// (uploaded by `gpuwasm deploy`, read in place by `gpuwasm run`).
    pub files_dir: Option<PathBuf>,
    /// Host, limits, environment, outbound hosts and models; its files
    /// are empty until the folder's are uploaded.
    pub spec: DeploymentSpec,
    /// How the component is built, for `gpuwasm build` (the server
    /// ignores it).
    pub build: Option<Build>,
}

/// A manifest's `[build]` section.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// A shell command that builds the component, run in the manifest's folder.
    pub command: String,
    /// The component it writes, relative to the manifest's folder.
    pub output: PathBuf,
}

/// What is wrong with a manifest, and where.
#[derive(Debug, thiserror::Error)]
#[error("gpuwasm.toml line {line}: {message}")]
pub struct ManifestError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong, naming the field.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Option<Spanned<String>>,
    #[serde(default)]
    routes: Routes,
    limits: Option<Spanned<Limits>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    outbound: Allow,
    files: Option<Files>,
    #[serde(default)]
    models: ModelsSection,
    build: Option<Spanned<Build>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ModelsSection {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    target: Target,
    #[serde(default)]
    from_bytes: bool,
    #[serde(default)]
    warm: Vec<Spanned<String>>,
    idle_timeout_s: Option<Spanned<BTreeMap<String, u64>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Routes {
    host: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Files {
    dir: Spanned<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Allow {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

impl Manifest {
    /// Parses and checks `text`, the contents of a `gpuwasm.toml`, with
    /// limits at most `ceilings`.
    pub fn parse(text: &str, ceilings: &Limits) -> Result<Manifest, ManifestError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let err = |span: std::ops::Range<usize>, message: String| ManifestError { line: line_of(span.start), message };
        let file: File = toml::from_str(text).map_err(|e| ManifestError {
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().to_string(),
        })?;
        if let Some(name) = &file.name {
            crate::check_name("deployment", name.get_ref()).map_err(|e| err(name.span(), format!("`name`: {e}")))?;
        }
        let host = match file.routes.host {
            Some(host) => {
                let normal = crate::hosts::normalize(host.get_ref()).unwrap_or_default();
                gpuwasm::check_host_pattern(&normal, false).map_err(|e| err(host.span(), format!("`routes.host`: {e}")))?;
                Some(normal)
            }
            None => None,
        };
        let limits = match file.limits {
            Some(limits) => {
                let span = limits.span();
                let limits = limits.into_inner();
                limits.validate(ceilings).map_err(|e| match e {
                    gpuwasm::Error::InvalidLimits(why) => err(span, format!("`limits`: {why}")),
                    other => err(span, format!("`limits`: {other}")),
                })?;
                limits
            }
            None => Limits::default(),
        };
        let mut env = BTreeMap::new();
        for (key, value) in file.env {
            let valid = !key.is_empty() && !key.contains('=') && !key.contains('\0') && !value.get_ref().contains('\0');
            if !valid {
                return Err(err(value.span(), format!("`env.{key}`: names must be non-empty without '=' or NUL, values without NUL")));
            }
            env.insert(key, value.into_inner());
        }
        let mut outbound = Vec::new();
        for entry in file.outbound.allow {
            gpuwasm::check_host_pattern(entry.get_ref(), true).map_err(|e| err(entry.span(), format!("`outbound.allow`: {e}")))?;
            outbound.push(entry.into_inner().to_ascii_lowercase());
        }
        let files = match file.files {
            Some(files) => {
                let dir = files.dir.get_ref();
                if dir.is_absolute() || dir.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                    let message = format!("`files.dir` must be a folder inside the manifest's folder, got {}", dir.display());
                    return Err(err(files.dir.span(), message));
                }
                Some(files.dir.into_inner())
            }
            None => None,
        };
        let mut models = Vec::new();
        for model in file.models.allow {
            if model.get_ref().is_empty() {
                return Err(err(model.span(), "`models.allow`: model names cannot be empty".into()));
            }
            models.push(model.into_inner());
        }
        let mut warm = Vec::new();
        for name in file.models.warm {
            if !models.contains(name.get_ref()) {
                return Err(err(name.span(), format!("`models.warm`: '{}' is not in `models.allow`", name.get_ref())));
            }
            warm.push(name.into_inner());
        }
        let idle_timeout_s = match file.models.idle_timeout_s {
            Some(idle) => {
                let spec = DeploymentSpec { models: models.clone(), models_idle_timeout_s: idle.get_ref().clone(), ..DeploymentSpec::default() };
                spec.model_access("", None).validate().map_err(|e| err(idle.span(), format!("`models.idle_timeout_s`: {e}")))?;
                idle.into_inner()
            }
            None => BTreeMap::new(),
        };
        if let Some(build) = &file.build {
            let Build { command, output } = build.get_ref();
            let outside = output.is_absolute() || output.components().any(|c| matches!(c, std::path::Component::ParentDir));
            if command.trim().is_empty() || output.as_os_str().is_empty() || outside {
                let message = "`build` needs a `command` and an `output` path inside the manifest's folder".into();
                return Err(err(build.span(), message));
            }
        }
        Ok(Manifest {
            build: file.build.map(Spanned::into_inner),
            name: file.name.map(Spanned::into_inner),
            files_dir: files,
            spec: DeploymentSpec {
                host,
                limits,
                sandbox: SandboxSpec { env, outbound },
                models,
                model_target: file.models.target,
                models_from_bytes: file.models.from_bytes,
                models_warm: warm,
                models_idle_timeout_s: idle_timeout_s,
                ..DeploymentSpec::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_manifest_parses() {
        let m = Manifest::parse(
            "name = \"api\"\n[routes]\nhost = \"API.example.com\"\n[limits]\nmemory_mb = 64\n\
             [env]\nGREETING = \"hi\"\n[outbound]\nallow = [\"example.com\", \"127.0.0.1:8080\"]\n\
             [files]\ndir = \"static\"\n[models]\nallow = [\"minilm\"]\n\
             [build]\ncommand = \"make wasm\"\noutput = \"out/api.wasm\"\n",
            &Limits::default_ceilings(),
        )
        .unwrap();
        assert_eq!(m.name.as_deref(), Some("api"));
        assert_eq!(m.spec.host.as_deref(), Some("api.example.com"));
        assert_eq!(m.spec.limits.memory_mb, 64);
        assert_eq!(m.spec.limits.cpu_ms, Limits::default().cpu_ms);
        assert_eq!(m.spec.sandbox.env["GREETING"], "hi");
        assert_eq!(m.spec.sandbox.outbound, ["example.com", "127.0.0.1:8080"]);
        assert_eq!(m.files_dir, Some(PathBuf::from("static")));
        assert_eq!(m.spec.models, ["minilm"]);
        assert_eq!(m.build, Some(Build { command: "make wasm".into(), output: PathBuf::from("out/api.wasm") }));
        assert_eq!(Manifest::parse("", &Limits::default_ceilings()).unwrap(), Manifest::default());
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let cases = [
            ("name = \"api\"\n\n[limits]\nmemory_mb = \"lots\"\n", 4, "invalid type"),
            ("name = \"api\"\ncolour = \"blue\"\n", 2, "unknown field `colour`"),
            ("[limits]\nmemroy_mb = 3\n", 2, "unknown field `memroy_mb`"),
            ("\n\nname = \"Not Valid\"\n", 3, "`name`"),
            ("[routes]\n\nhost = \"a/b\"\n", 3, "`routes.host`"),
            ("[outbound]\nallow = [\n  \"ok.com\",\n  \"bad host\",\n]\n", 4, "`outbound.allow`"),
            ("[limits]\ncpu_ms = 0\n", 1, "`limits`: limit `cpu_ms` must be greater than 0"),
            ("[limits]\nmemory_mb = 4096\n", 1, "exceeds this server's maximum"),
            ("[limits]\ntimeout_ms = 18446744073709551615\n", 1, "`limits`: limit `timeout_ms` = 18446744073709551615 exceeds"),
            ("[env]\nA = \"x\\u0000y\"\n", 2, "`env.A`"),
            ("[files]\ndir = \"../etc\"\n", 2, "`files.dir`"),
            ("\n[build]\ncommand = \" \"\noutput = \"a.wasm\"\n", 2, "`build` needs a `command`"),
            ("[build]\ncommand = \"make\"\noutput = \"/tmp/a.wasm\"\n", 1, "`build` needs"),
            ("[build]\ncommand = \"make\"\n", 1, "missing field `output`"),
            ("name = \n", 1, ""),
        ];
        for (text, line, needle) in cases {
            let e = Manifest::parse(text, &Limits::default_ceilings()).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }
}
