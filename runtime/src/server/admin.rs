//! The admin API: tenants, tokens, deployments and their versions.
//! Every call but `health` needs a bearer token; tenant tokens reach only
//! their own tenant, and what belongs to another tenant answers exactly as
//! if it did not exist.

use super::control::{Caller, Control, Entry, new_token};
use super::{ADMIN_PREFIX, ApiError, ServerInner, api_error, check_name, error_response, json_response, not_found, now};
use crate::error::Error;
use crate::limits::Limits;
use crate::request::ResponseBody;
use crate::runtime::Deployment;
use crate::sandbox::{Sandbox, check_host_pattern};
use serde::Deserialize;
use crate::store::{Change, DeploymentState, TenantRecord, VersionRecord};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::BTreeMap;
use std::sync::Arc;

impl ServerInner {
    pub(super) async fn admin(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let path = request.uri().path()[ADMIN_PREFIX.len()..].to_string();
        if path == "health" {
            return match *request.method() {
                Method::GET => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
                _ => api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here"),
            };
        }
        let Some(caller) = self.caller(&request) else {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing, wrong or revoked token (send `Authorization: Bearer <token>`)",
            );
        };
        let query = request.uri().query().unwrap_or("").to_string();
        let method = request.method().clone();
        let segments: Vec<&str> = path.split('/').collect();
        match (method, segments.as_slice()) {
            (Method::GET, ["whoami"]) => json_response(
                StatusCode::OK,
                &serde_json::json!({"tenant": caller.tenant, "admin": caller.admin, "token_id": caller.token_id}),
            ),
            (Method::GET, ["tenants"]) if caller.admin => {
                let tenants: Vec<_> = self.control().tenants.values().cloned().collect();
                json_response(StatusCode::OK, &serde_json::json!({ "tenants": tenants }))
            }
            (Method::POST, ["tenants"]) if caller.admin => self.create_tenant(request).await,
            (_, ["tenants"]) => forbidden_or_wrong_method(&caller),
            (Method::PUT, ["tenants", name, "domains"]) if caller.admin => {
                let name = name.to_string();
                self.set_domains(&name, request).await.unwrap_or_else(ApiError::into_response)
            }
            (_, ["tenants", _, "domains"]) => forbidden_or_wrong_method(&caller),
            (Method::GET, ["tokens"]) => self.list_tokens(&caller),
            (Method::POST, ["tokens"]) => self.create_token(&caller, &query).await,
            (Method::DELETE, ["tokens", id]) => self.revoke_token(&caller, id).await,
            (Method::PUT, ["files", sha256]) => {
                let sha256 = sha256.to_string();
                self.upload_file(&caller, &sha256, request).await.unwrap_or_else(ApiError::into_response)
            }
            (Method::GET, ["deployments"]) => {
                let control = self.control();
                let active: Vec<&VersionRecord> = control
                    .deployments
                    .range((caller.tenant.clone(), String::new())..)
                    .take_while(|((tenant, _), _)| *tenant == caller.tenant)
                    .filter_map(|(_, e)| e.active())
                    .collect();
                json_response(StatusCode::OK, &serde_json::json!({ "deployments": active }))
            }
            (Method::GET, ["deployments", name]) => match self.entry(&caller, name).and_then(|e| e.active().cloned()) {
                Some(active) => json_response(StatusCode::OK, &active),
                None => not_found(name),
            },
            (Method::PUT, ["deployments", name]) => {
                let name = name.to_string();
                self.deploy(&caller, name, &query, request).await.unwrap_or_else(ApiError::into_response)
            }
            (Method::DELETE, ["deployments", name]) => self.remove(&caller, name).await,
            (Method::GET, ["deployments", name, "versions"]) => match self.entry(&caller, name) {
                Some(entry) => json_response(
                    StatusCode::OK,
                    &serde_json::json!({
                        "active": entry.state.active,
                        "versions": entry.versions.values().collect::<Vec<_>>(),
                    }),
                ),
                None => not_found(name),
            },
            (Method::POST, ["deployments", name, "rollback"]) => self.rollback(&caller, name, &query).await,
            (method, ["models" | "model-files", ..]) => {
                self.models_api(&caller, method, segments.as_slice(), &query, request).await
            }
            (_, ["deployments" | "tokens" | "whoami" | "files", ..]) => {
                api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
            }
            _ => api_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn caller<B>(&self, request: &Request<B>) -> Option<Caller> {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        self.control().authenticate(token, &self.config.admin_token)
    }

    /// The caller's own deployment `name`, if it has one (active or not).
    fn entry(&self, caller: &Caller, name: &str) -> Option<Entry> {
        self.control().deployments.get(&(caller.tenant.clone(), name.to_string())).cloned()
    }

    async fn create_tenant(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let body = match read_upload(request, 4096, "request body").await {
            Ok(body) => body,
            Err(e) => return e.into_response(),
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NewTenant {
            name: String,
            #[serde(default)]
            domains: Vec<String>,
        }
        let Ok(NewTenant { name, domains }) = serde_json::from_slice::<NewTenant>(&body) else {
            return api_error(StatusCode::BAD_REQUEST, "bad_request", r#"send {"name": "TENANT", "domains": ["example.com"]} (domains optional)"#);
        };
        let domains = match check_domains(domains) {
            Ok(domains) => domains,
            Err(e) => return e.into_response(),
        };
        if let Err(e) = check_name("tenant", &name) {
            return error_response(e);
        }
        if name == crate::nn::PUBLIC {
            return api_error(StatusCode::BAD_REQUEST, "invalid_name", "'public' is reserved for models every tenant can load");
        }
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        if control.tenants.contains_key(&name) {
            return api_error(StatusCode::CONFLICT, "tenant_exists", &format!("tenant '{name}' already exists"));
        }
        let tenant = TenantRecord { name: name.clone(), created_at: now(), domains };
        let (token, record) = match new_token(&name, false, now()) {
            Ok(t) => t,
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &format!("making a token: {e}")),
        };
        control.tenants.insert(name.clone(), tenant.clone());
        control.tokens.insert(record.id.clone(), record.clone());
        if let Err(e) = self.commit(&[Change::Tenant(tenant), Change::Token(record.clone())], control) {
            return error_response(e);
        }
        tracing::info!(tenant = %name, "tenant created");
        json_response(StatusCode::CREATED, &serde_json::json!({"tenant": name, "token_id": record.id, "token": token}))
    }

    /// `PUT tenants/NAME/domains`: replaces the domains a tenant may claim hosts in.
    async fn set_domains(&self, name: &str, request: Request<Incoming>) -> Result<Response<ResponseBody>, ApiError> {
        let body = read_upload(request, 64 << 10, "request body").await?;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Domains {
            domains: Vec<String>,
        }
        let Domains { domains } = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("bad_request", format!(r#"send {{"domains": ["example.com", ...]}}: {e}"#)))?;
        let domains = check_domains(domains)?;
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        let Some(tenant) = control.tenants.get_mut(name) else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no tenant named '{name}'")));
        };
        tenant.domains = domains;
        let record = tenant.clone();
        self.commit(&[Change::Tenant(record.clone())], control)?;
        tracing::info!(tenant = %name, domains = ?record.domains, "tenant domains set");
        Ok(json_response(StatusCode::OK, &record))
    }

    fn list_tokens(&self, caller: &Caller) -> Response<ResponseBody> {
        let control = self.control();
        let mut tokens: Vec<_> = control
            .tokens
            .values()
            .filter(|t| t.tenant == caller.tenant)
            .map(|t| {
                serde_json::json!({"id": t.id, "tenant": t.tenant, "admin": t.admin,
                                   "created_at": t.created_at, "revoked_at": t.revoked_at})
            })
            .collect();
        tokens.sort_by_key(|t| t["created_at"].as_u64());
        json_response(StatusCode::OK, &serde_json::json!({ "tokens": tokens }))
    }

    async fn create_token(self: &Arc<Self>, caller: &Caller, query: &str) -> Response<ResponseBody> {
        let tenant = match query_value(query, "tenant") {
            Some(t) if t != caller.tenant && !caller.admin => return forbidden(),
            Some(t) => t.to_string(),
            None => caller.tenant.clone(),
        };
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        if !control.tenants.contains_key(&tenant) {
            return api_error(StatusCode::NOT_FOUND, "not_found", &format!("no tenant named '{tenant}'"));
        }
        let (token, record) = match new_token(&tenant, false, now()) {
            Ok(t) => t,
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &format!("making a token: {e}")),
        };
        control.tokens.insert(record.id.clone(), record.clone());
        if let Err(e) = self.commit(&[Change::Token(record.clone())], control) {
            return error_response(e);
        }
        json_response(StatusCode::CREATED, &serde_json::json!({"tenant": tenant, "token_id": record.id, "token": token}))
    }

    async fn revoke_token(self: &Arc<Self>, caller: &Caller, id: &str) -> Response<ResponseBody> {
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        let Some(record) = control.tokens.get(id).filter(|t| caller.admin || t.tenant == caller.tenant) else {
            return api_error(StatusCode::NOT_FOUND, "not_found", &format!("no token with id '{id}'"));
        };
        let mut record = record.clone();
        record.revoked_at.get_or_insert(now());
        control.tokens.insert(record.id.clone(), record.clone());
        if let Err(e) = self.commit(&[Change::Token(record)], control) {
            return error_response(e);
        }
        json_response(StatusCode::OK, &serde_json::json!({ "revoked": id }))
    }

    async fn upload_file(&self, caller: &Caller, sha256: &str, request: Request<Incoming>) -> Result<Response<ResponseBody>, ApiError> {
        let (max, over) = self.upload_room(caller, self.config.max_upload_bytes as u64)?;
        let upload = self.uploads.receive(&caller.tenant, request.into_body(), max, "file", &over).await?;
        self.files.put(&caller.tenant, sha256, &upload)?;
        Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "sha256": sha256 })))
    }

    async fn deploy(
        self: &Arc<Self>,
        caller: &Caller,
        name: String,
        query: &str,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        check_name("deployment", &name)?;
        let spec = DeploySpec::from_request(query, request.headers()).map_err(|m| ApiError::bad_request("invalid_spec", m))?;
        if let Some(host) = &spec.host {
            let domains = self.control().tenants.get(&caller.tenant).map(|t| t.domains.clone()).unwrap_or_default();
            super::hosts::check_claim(host, &self.config.server_names, caller.admin, &domains)
                .map_err(|m| ApiError::new(StatusCode::FORBIDDEN, "host_not_allowed", m))?;
        }
        self.check_deployment_quota(caller, &name)?;
        let wasm = read_upload(request, self.config.max_upload_bytes, "component").await?;
        let version = VersionRecord {
            tenant: caller.tenant.clone(),
            name: name.clone(),
            version: 0,
            sha256: String::new(),
            snapshot_sha256: None,
            size_bytes: wasm.len() as u64,
            host: spec.host,
            limits: spec.limits,
            sandbox: spec.sandbox,
            models: spec.models,
            files: spec.files,
            deployed_at: now(),
            deployed_by: caller.token_id.clone(),
        };
        let me = self.clone();
        let built = tokio::task::spawn_blocking(move || -> Result<(VersionRecord, Deployment), Error> {
            // Everything that can be checked is, before anything is built or stored.
            me.runtime.validate(&wasm)?;
            version.limits.validate(me.runtime.max_limits()).map_err(Error::InvalidLimits)?;
            me.files.check(&version.tenant, &version.files).map_err(Error::InvalidFiles)?;
            let sandbox = me.sandbox(&version)?;
            let snapshot = if spec.preinit { me.runtime.preinitialize(&wasm, &version.limits, &sandbox)? } else { None };
            let (version, component) = match snapshot {
                None => {
                    let (sha256, component) = me.artifacts.store(&me.runtime, &wasm)?;
                    (VersionRecord { sha256, ..version }, component)
                }
                Some(snapshot) => {
                    let (snapshot_sha256, component) = me.artifacts.store(&me.runtime, &snapshot)?;
                    let sha256 = me.artifacts.put_source(&wasm)?;
                    (VersionRecord { sha256, snapshot_sha256: Some(snapshot_sha256), ..version }, component)
                }
            };
            let deployment = me.runtime.deployment(&version.name, &component, version.limits.clone(), sandbox)?;
            Ok((version, deployment))
        })
        .await;
        let (mut version, deployment) = built.map_err(|e| ApiError::internal(format!("deploy task failed: {e}")))??;
        deployment.check().await?;

        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        let key = (caller.tenant.clone(), name.clone());
        host_conflict(&control, &key, version.host.as_deref())?;
        let entry = control.deployments.entry(key).or_insert_with(|| Entry {
            state: DeploymentState { tenant: caller.tenant.clone(), name: name.clone(), active: None, latest: 0 },
            versions: Default::default(),
            live: None,
        });
        version.version = entry.state.latest + 1;
        let created = entry.state.active.is_none();
        entry.state.latest = version.version;
        entry.state.active = Some(version.version);
        entry.versions.insert(version.version, version.clone());
        entry.live = Some(Ok(deployment));
        let changes = [Change::Version(version.clone()), Change::Deployment(entry.state.clone())];
        self.commit(&changes, control)?;
        tracing::info!(tenant = %version.tenant, deployment = %name, version = version.version, sha256 = %version.sha256, "deployed");
        Ok(json_response(if created { StatusCode::CREATED } else { StatusCode::OK }, &version))
    }

    /// `403 quota_exceeded` when a new deployment `name` would take the
    /// caller's tenant past its quota (a new version of an active one
    /// does not count).
    fn check_deployment_quota(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        let control = self.control();
        let mine = control.deployments.range((caller.tenant.clone(), String::new())..).take_while(|((t, _), _)| *t == caller.tenant);
        let active: Vec<&str> = mine.filter(|(_, e)| e.state.active.is_some()).map(|((_, n), _)| n.as_str()).collect();
        let quota = self.config.quotas.deployments;
        if active.len() >= quota && !active.contains(&name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "quota_exceeded",
                format!("tenant '{}' has {} active deployments, its quota; remove one first", caller.tenant, active.len()),
            ));
        }
        Ok(())
    }

    /// The most a file or model upload by `caller` may hold: `max`, or
    /// less when the tenant's storage quota leaves less room; and what to
    /// say when an upload outgrows it.
    pub(super) fn upload_room(&self, caller: &Caller, max: u64) -> Result<(u64, String), ApiError> {
        if caller.admin {
            return Ok((max, format!("this server's limit of {max} bytes")));
        }
        let quota = self.config.quotas.storage_bytes;
        let used = self.storage_used(&caller.tenant)?;
        let room = quota.saturating_sub(used);
        if room == 0 {
            let message = format!("tenant '{}' uses {used} of its {quota} bytes of storage; remove models or deployments' files first", caller.tenant);
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded", message));
        }
        Ok(if room < max {
            (room, format!("the {room} bytes left of tenant '{}''s storage quota of {quota} bytes", caller.tenant))
        } else {
            (max, format!("this server's limit of {max} bytes"))
        })
    }

    /// Bytes of deployment files and model files `tenant` has stored.
    fn storage_used(&self, tenant: &str) -> Result<u64, Error> {
        let mut used = 0;
        for prefix in [format!("files/{tenant}/"), format!("models/{tenant}/")] {
            used += self.blobs.list(&prefix)?.iter().map(|b| b.size).sum::<u64>();
        }
        Ok(used)
    }

    async fn remove(&self, caller: &Caller, name: &str) -> Response<ResponseBody> {
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        let Some(entry) = control.deployments.get_mut(&(caller.tenant.clone(), name.to_string())) else {
            return not_found(name);
        };
        if entry.state.active.is_none() {
            return not_found(name);
        }
        entry.state.active = None;
        if let Some(Ok(live)) = entry.live.take() {
            // Requests still running on it end now, and free their instances.
            live.stop();
        }
        let change = Change::Deployment(entry.state.clone());
        if let Err(e) = self.commit(&[change], control) {
            return error_response(e);
        }
        tracing::info!(tenant = %caller.tenant, deployment = %name, "removed");
        json_response(StatusCode::OK, &serde_json::json!({ "removed": name }))
    }

    async fn rollback(self: &Arc<Self>, caller: &Caller, name: &str, query: &str) -> Response<ResponseBody> {
        let Some(entry) = self.entry(caller, name) else { return not_found(name) };
        let target = match query_value(query, "to") {
            Some(v) => match v.parse::<u64>() {
                Ok(v) => v,
                Err(_) => return api_error(StatusCode::BAD_REQUEST, "bad_request", &format!("`to` must be a version number, got {v:?}")),
            },
            None => match entry.state.active.and_then(|a| entry.versions.range(..a).next_back()) {
                Some((v, _)) => *v,
                None => {
                    let message = "there is no earlier version to roll back to (give one with `to`)";
                    return api_error(StatusCode::CONFLICT, "no_earlier_version", message);
                }
            },
        };
        let Some(version) = entry.versions.get(&target).cloned() else {
            return api_error(StatusCode::NOT_FOUND, "not_found", &format!("deployment '{name}' has no version {target}"));
        };
        let me = self.clone();
        let v = version.clone();
        let deployment = match tokio::task::spawn_blocking(move || me.build(&v)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return error_response(e),
            Err(e) => return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &format!("rollback task failed: {e}")),
        };
        let _guard = self.changes.lock().await;
        let mut control = (*self.control()).clone();
        let key = (caller.tenant.clone(), name.to_string());
        if let Err(conflict) = host_conflict(&control, &key, version.host.as_deref()) {
            return conflict.into_response();
        }
        let Some(entry) = control.deployments.get_mut(&key) else { return not_found(name) };
        entry.state.active = Some(target);
        entry.live = Some(Ok(deployment));
        let change = Change::Deployment(entry.state.clone());
        if let Err(e) = self.commit(&[change], control) {
            return error_response(e);
        }
        tracing::info!(tenant = %caller.tenant, deployment = %name, version = target, "rolled back");
        json_response(StatusCode::OK, &version)
    }
}

/// Checks and normalises the domains a tenant may claim hosts in.
fn check_domains(domains: Vec<String>) -> Result<Vec<String>, ApiError> {
    domains
        .into_iter()
        .map(|d| {
            let normal = super::hosts::normalize(&d).unwrap_or_default();
            check_host_pattern(&normal, false)
                .and_then(|()| super::hosts::check_claim(&normal, &[], true, &[]))
                .map(|()| normal)
                .map_err(|m| ApiError::bad_request("invalid_domain", format!("domain {d:?}: {m}")))
        })
        .collect()
}

/// Reads a request body of at most `max` bytes.
pub(super) async fn read_upload(request: Request<Incoming>, max: usize, what: &str) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(request.into_body(), max).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("{what} is larger than this server's limit of {max} bytes");
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", message))
        }
        Err(e) => Err(ApiError::bad_request("bad_upload", format!("reading the {what} failed: {e}"))),
    }
}

/// A `409` when `host` already routes to a deployment other than `key`.
/// It does not say whose, so nothing leaks across tenants.
fn host_conflict(control: &Control, key: &(String, String), host: Option<&str>) -> Result<(), ApiError> {
    let Some(host) = host else { return Ok(()) };
    match control.host_owner(host) {
        Some(owner) if owner != key => {
            Err(ApiError::new(StatusCode::CONFLICT, "host_taken", format!("host {host:?} is already routed to another deployment")))
        }
        _ => Ok(()),
    }
}

fn forbidden() -> Response<ResponseBody> {
    api_error(StatusCode::FORBIDDEN, "forbidden", "this needs an admin token")
}

fn forbidden_or_wrong_method(caller: &Caller) -> Response<ResponseBody> {
    if caller.admin {
        api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
    } else {
        forbidden()
    }
}

/// The value of `key` in a query string, if present.
pub(super) fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The header carrying a deploy's settings as JSON (see [`DeploySpec`]).
pub const SPEC_HEADER: &str = "gpuwasm-spec";

/// A deploy's settings: from the `gpuwasm-spec` header (JSON, what the CLI
/// sends from gpuwasm.toml and its flags) or from query parameters
/// (`host`, `preinit` and limit fields; handy with curl).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DeploySpec {
    host: Option<String>,
    preinit: bool,
    limits: Limits,
    sandbox: Sandbox,
    models: Vec<String>,
    files: BTreeMap<String, String>,
}

impl Default for DeploySpec {
    fn default() -> Self {
        DeploySpec {
            host: None,
            preinit: true,
            limits: Limits::default(),
            sandbox: Sandbox::default(),
            models: Vec::new(),
            files: BTreeMap::new(),
        }
    }
}

impl DeploySpec {
    fn from_request(query: &str, headers: &http::HeaderMap) -> Result<DeploySpec, String> {
        let mut spec = match headers.get(SPEC_HEADER) {
            Some(json) => {
                if !query.is_empty() {
                    return Err(format!("give settings either in the {SPEC_HEADER} header or as query parameters, not both"));
                }
                let json = json.to_str().map_err(|_| format!("the {SPEC_HEADER} header must be ASCII JSON"))?;
                serde_json::from_str(json).map_err(|e| format!("{SPEC_HEADER}: {e}"))?
            }
            None => parse_deploy_query(query)?,
        };
        if let Some(host) = &mut spec.host {
            let normal = super::hosts::normalize(host).ok_or_else(|| format!("invalid host {host:?}"))?;
            check_host_pattern(&normal, false)?;
            *host = normal;
        }
        spec.sandbox.validate()?;
        Ok(spec)
    }
}

/// Parses `host=...`, `preinit=true|false` and limit fields from a deploy
/// query string.
fn parse_deploy_query(query: &str) -> Result<DeploySpec, String> {
    let mut spec = DeploySpec::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("query parameter {pair:?} has no value"))?;
        match key {
            "host" => spec.host = Some(value.to_string()),
            "preinit" => {
                spec.preinit = value.parse().map_err(|_| format!("preinit must be true or false, got {value:?}"))?;
            }
            _ => spec.limits.set(key, value)?,
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_settings() {
        let none = http::HeaderMap::new();
        let s = DeploySpec::from_request("host=API.example.com&memory_mb=32&cpu_ms=100", &none).unwrap();
        assert_eq!((s.limits.memory_mb, s.limits.cpu_ms, s.host.as_deref(), s.preinit), (32, 100, Some("api.example.com"), true));
        assert!(!DeploySpec::from_request("preinit=false", &none).unwrap().preinit);
        assert!(DeploySpec::from_request("preinit=no", &none).unwrap_err().contains("preinit"));
        assert!(DeploySpec::from_request("memory_mb", &none).unwrap_err().contains("no value"));
        assert!(DeploySpec::from_request("nope=1", &none).unwrap_err().contains("unknown limit"));
        assert!(DeploySpec::from_request("host=a/b", &none).unwrap_err().contains("invalid host"));

        let mut headers = http::HeaderMap::new();
        let json = r#"{"limits":{"memory_mb":16},"sandbox":{"env":{"A":"1"},"outbound":["x.com:8080"]},"models":["m"]}"#;
        headers.insert(SPEC_HEADER, json.parse().unwrap());
        let s = DeploySpec::from_request("", &headers).unwrap();
        assert_eq!((s.limits.memory_mb, s.sandbox.env["A"].as_str(), s.models.len(), s.preinit), (16, "1", 1, true));
        assert!(DeploySpec::from_request("memory_mb=3", &headers).unwrap_err().contains("not both"));
        headers.insert(SPEC_HEADER, r#"{"sandbox":{"outbound":["bad host"]}}"#.parse().unwrap());
        assert!(DeploySpec::from_request("", &headers).unwrap_err().contains("outbound allow-list"));
        headers.insert(SPEC_HEADER, r#"{"limts":{}}"#.parse().unwrap());
        assert!(DeploySpec::from_request("", &headers).unwrap_err().contains("unknown field `limts`"));
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value("to=3&x=1", "to"), Some("3"));
        assert_eq!(query_value("tox=3", "to"), None);
        assert_eq!(query_value("", "to"), None);
    }
}
