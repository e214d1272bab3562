//! What a deployment declares: [`DeploymentSpec`], one type for the
//! manifest (`gpuwasm.toml`), the deploy request of the admin API and the
//! stored version record. The core's runtime
//! [`Capabilities`](gpuwasm::Capabilities) are resolved from it on the node
//! (files assembled, models bound to the registry).

use crate::error::Error;
use crate::hosts;
use gpuwasm::Limits;
use gpuwasm::nn::{ModelAccess, ModelCatalog, Target};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The header carrying a deploy's [`DeploymentSpec`] as JSON.
pub const SPEC_HEADER: &str = "gpuwasm-spec";

/// A deployment's settings. Every field has a default: no host, init runs,
/// default limits, nothing reachable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeploymentSpec {
    /// The host name routed to the deployment (normalised: lower case, no
    /// port, no trailing dot), instead of its path.
    pub host: Option<String>,
    /// Whether the component's init function runs at deploy time.
    pub preinit: bool,
    /// Limits its requests run under.
    pub limits: Limits,
    /// Environment and outbound allow-list.
    pub sandbox: SandboxSpec,
    /// Models the handler may load (enforced by wasi-nn).
    pub models: Vec<String>,
    /// Where its models run (`[models] target`): `auto` (a GPU when the
    /// guest asks for one and the node has one), `gpu` or `cpu`.
    pub model_target: Target,
    /// Whether the handler may load graphs from bytes it supplies (wasi-nn
    /// `load`, `[models] from_bytes`); such a graph counts against its
    /// memory limit. Off: models load by name only.
    pub models_from_bytes: bool,
    /// Models loaded when it is deployed and kept resident while it is
    /// active (`[models] warm`; names from `models`).
    pub models_warm: Vec<String>,
    /// Per model, seconds it stays resident unused, overriding the node's
    /// idle timeout (`[models] idle_timeout_s`).
    pub models_idle_timeout_s: BTreeMap<String, u64>,
    /// Files it sees read-only at `/`: guest path -> SHA-256 of content
    /// uploaded with `PUT files/SHA256`.
    pub files: BTreeMap<String, String>,
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            host: None,
            preinit: true,
            limits: Limits::default(),
            sandbox: SandboxSpec::default(),
            models: Vec::new(),
            model_target: Target::Auto,
            models_from_bytes: false,
            models_warm: Vec::new(),
            models_idle_timeout_s: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }
}

/// What the handler may reach besides models and files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSpec {
    /// Environment variables the handler sees.
    pub env: BTreeMap<String, String>,
    /// Hosts outbound HTTP(S) may reach: `host` or `host:port`.
    pub outbound: Vec<String>,
}

impl DeploymentSpec {
    /// The spec of a deploy request: from the [`SPEC_HEADER`] header (JSON,
    /// what the CLI sends), or from query parameters (`host`, `preinit` and
    /// limit fields; handy with curl); checked and normalised.
    pub fn from_request(query: &str, headers: &http::HeaderMap) -> Result<DeploymentSpec, String> {
        let mut spec = match headers.get(SPEC_HEADER) {
            Some(json) => {
                if !query.is_empty() {
                    return Err(format!("give settings either in the {SPEC_HEADER} header or as query parameters, not both"));
                }
                let json = json.to_str().map_err(|_| format!("the {SPEC_HEADER} header must be ASCII JSON"))?;
                serde_json::from_str(json).map_err(|e| format!("{SPEC_HEADER}: {e}"))?
            }
            None => Self::from_query(query)?,
        };
        spec.check().map_err(|e| e.to_string())?;
        Ok(spec)
    }

    /// Parses `host=...`, `preinit=true|false` and limit fields.
    fn from_query(query: &str) -> Result<DeploymentSpec, String> {
        let mut spec = DeploymentSpec::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("query parameter {pair:?} has no value"))?;
            match key {
                "host" => spec.host = Some(value.to_string()),
                "preinit" => {
                    spec.preinit = value.parse().map_err(|_| format!("preinit must be true or false, got {value:?}"))?;
                }
                _ => spec.limits.set(key, value).map_err(|e| e.to_string())?,
            }
        }
        Ok(spec)
    }

    /// Checks the host, environment and outbound allow-list, and
    /// normalises the host.
    pub fn check(&mut self) -> Result<(), Error> {
        if let Some(host) = &mut self.host {
            let normal = hosts::normalize(host).ok_or_else(|| gpuwasm::Error::InvalidHost(format!("{host:?}")))?;
            gpuwasm::check_host_pattern(&normal, false)?;
            *host = normal;
        }
        gpuwasm::check_env(&self.sandbox.env)?;
        gpuwasm::check_outbound(&self.sandbox.outbound)?;
        self.model_access("", None).validate().map_err(gpuwasm::Error::InvalidCapabilities)?;
        Ok(())
    }

    /// What a deployment of `tenant` with this spec may load, names
    /// resolving in `catalog`.
    pub fn model_access(&self, tenant: &str, catalog: Option<Arc<dyn ModelCatalog>>) -> ModelAccess {
        ModelAccess {
            tenant: tenant.to_string(),
            allow: self.models.clone(),
            catalog,
            target: self.model_target,
            from_bytes: self.models_from_bytes,
            warm: self.models_warm.clone(),
            idle_timeouts: self.models_idle_timeout_s.iter().map(|(name, s)| (name.clone(), Duration::from_secs(*s))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_settings() {
        let none = http::HeaderMap::new();
        let s = DeploymentSpec::from_request("host=API.example.com&memory_mb=32&cpu_ms=100", &none).unwrap();
        assert_eq!((s.limits.memory_mb, s.limits.cpu_ms, s.host.as_deref(), s.preinit), (32, 100, Some("api.example.com"), true));
        assert!(!DeploymentSpec::from_request("preinit=false", &none).unwrap().preinit);
        assert!(DeploymentSpec::from_request("preinit=no", &none).unwrap_err().contains("preinit"));
        assert!(DeploymentSpec::from_request("memory_mb", &none).unwrap_err().contains("no value"));
        assert!(DeploymentSpec::from_request("nope=1", &none).unwrap_err().contains("unknown limit"));
        assert!(DeploymentSpec::from_request("host=a/b", &none).unwrap_err().contains("invalid host"));

        let mut headers = http::HeaderMap::new();
        let json = r#"{"limits":{"memory_mb":16},"sandbox":{"env":{"A":"1"},"outbound":["x.com:8080"]},"models":["m"]}"#;
        headers.insert(SPEC_HEADER, json.parse().unwrap());
        let s = DeploymentSpec::from_request("", &headers).unwrap();
        assert_eq!((s.limits.memory_mb, s.sandbox.env["A"].as_str(), s.models.len(), s.preinit), (16, "1", 1, true));
        assert!(DeploymentSpec::from_request("memory_mb=3", &headers).unwrap_err().contains("not both"));
        headers.insert(SPEC_HEADER, r#"{"sandbox":{"outbound":["bad host"]}}"#.parse().unwrap());
        assert!(DeploymentSpec::from_request("", &headers).unwrap_err().contains("outbound allow-list"));
        headers.insert(SPEC_HEADER, r#"{"limts":{}}"#.parse().unwrap());
        assert!(DeploymentSpec::from_request("", &headers).unwrap_err().contains("unknown field `limts`"));
        headers.insert(SPEC_HEADER, r#"{"models":["m"],"models_warm":["n"]}"#.parse().unwrap());
        assert!(DeploymentSpec::from_request("", &headers).unwrap_err().contains("[models] warm names 'n', which is not in [models] allow"));
        headers.insert(SPEC_HEADER, r#"{"models":["m"],"models_idle_timeout_s":{"m":0}}"#.parse().unwrap());
        assert!(DeploymentSpec::from_request("", &headers).unwrap_err().contains("give 1 to 604800 s"));
    }

    #[test]
    fn version_records_keep_the_spec_flat() {
        let spec = DeploymentSpec { host: Some("a.example".into()), ..DeploymentSpec::default() };
        let json = serde_json::to_value(crate::control_store::VersionRecord {
            tenant: "t".into(),
            name: "n".into(),
            version: 1,
            sha256: "s".into(),
            snapshot_sha256: None,
            size_bytes: 3,
            spec: spec.clone(),
            deployed_at: 0,
            deployed_by: "admin".into(),
        })
        .unwrap();
        assert_eq!((json["host"].as_str(), json["limits"]["memory_mb"].as_u64()), (Some("a.example"), Some(128)));
        // Records stored before `preinit` was recorded read back with the default.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("preinit");
        let back: crate::control_store::VersionRecord = serde_json::from_value(old).unwrap();
        assert_eq!(back.spec, spec);
    }
}
