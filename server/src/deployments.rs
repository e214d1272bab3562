//! The admin API of deployments: deploy (through the pipeline in
//! `deploy.rs`), list, versions, rollback, remove; and the upload of the
//! files deployments serve.

use crate::admin::{Reply, not_found, query_value, read_body};
use crate::api::{ApiError, Deployments, Logs, Removed, Uploaded, Versions, json};
use crate::control::{Caller, Control, Entry};
use crate::control_store::{Change, DeploymentState, VersionRecord};
use crate::spec::DeploymentSpec;
use crate::{ServerInner, check_name, hosts, now, quotas};
use http::{Method, Request, StatusCode};
use crate::RequestBody;
use std::sync::Arc;

/// Versions kept per deployment besides the active one; older ones are
/// forgotten when a deploy adds one (their blobs are then collected).
pub(crate) const KEPT_VERSIONS: usize = 50;

impl ServerInner {
    pub(crate) async fn deployments_api(
        self: &Arc<Self>,
        caller: &Caller,
        method: Method,
        segments: &[&str],
        query: &str,
        request: Request<RequestBody>,
    ) -> Reply {
        match (method, segments) {
            (Method::PUT, ["files", sha256]) => self.upload_file(caller, sha256, request).await,
            (Method::GET, ["deployments"]) => {
                let control = self.control();
                let deployments = mine(&control, &caller.tenant).filter_map(|(_, e)| e.active().cloned()).collect();
                Ok(json(StatusCode::OK, &Deployments { deployments }))
            }
            (Method::GET, ["deployments", name]) => {
                let active = self.entry(caller, name).and_then(|e| e.active().cloned()).ok_or_else(|| not_found(name))?;
                Ok(json(StatusCode::OK, &active))
            }
            (Method::PUT, ["deployments", name]) => self.deploy(caller, name, query, request).await,
            (Method::DELETE, ["deployments", name]) => self.remove(caller, name, query).await,
            (Method::GET, ["deployments", name, "versions"]) => {
                let entry = self.entry(caller, name).ok_or_else(|| not_found(name))?;
                Ok(json(StatusCode::OK, &Versions { active: entry.state.active, versions: entry.versions.into_values().collect() }))
            }
            (Method::POST, ["deployments", name, "rollback"]) => self.rollback(caller, name, query).await,
            (Method::GET, ["deployments", name, "logs"]) => {
                self.entry(caller, name).ok_or_else(|| not_found(name))?;
                let after = match query.strip_prefix("after=") {
                    Some(n) => n.parse().map_err(|_| ApiError::bad_request("invalid_query", format!("after must be a number, got {n:?}")))?,
                    None if query.is_empty() => 0,
                    None => return Err(ApiError::bad_request("invalid_query", format!("unknown query {query:?} (give after=SEQ)"))),
                };
                let entries = self.logs.after(&caller.tenant, name, after);
                let next = entries.last().map_or(after, |e| e.seq);
                Ok(json(StatusCode::OK, &Logs { entries, next }))
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// The caller's own deployment `name`, if it has one (active or not).
    fn entry(&self, caller: &Caller, name: &str) -> Option<Entry> {
        self.control().deployments.get(&(caller.tenant.clone(), name.to_string())).cloned()
    }

    async fn upload_file(self: &Arc<Self>, caller: &Caller, sha256: &str, request: Request<RequestBody>) -> Reply {
        let slot = self.uploads.admit(&caller.tenant)?;
        let room = self.upload_room(caller, self.config.max_upload_bytes as u64).await?;
        let upload = self.uploads.receive(&slot, request.into_body(), room, "file").await?;
        self.files.put(&caller.tenant, sha256, upload).await?;
        Ok(json(StatusCode::CREATED, &Uploaded { sha256: sha256.to_string() }))
    }

    /// `403 host_not_allowed` unless `caller` may claim `host` now.
    fn check_claim(&self, caller: &Caller, host: Option<&str>) -> Result<(), ApiError> {
        let Some(host) = host else { return Ok(()) };
        let domains = self.control().tenants.get(&caller.tenant).map(|t| t.domains.clone()).unwrap_or_default();
        hosts::check_claim(host, &self.config.server_names, caller.admin, &domains)
            .map_err(|m| ApiError::new(StatusCode::FORBIDDEN, "host_not_allowed", m))
    }

    async fn deploy(self: &Arc<Self>, caller: &Caller, name: &str, query: &str, request: Request<RequestBody>) -> Reply {
        check_name("deployment", name)?;
        let spec = DeploymentSpec::from_request(query, request.headers()).map_err(|m| ApiError::bad_request("invalid_spec", m))?;
        self.check_claim(caller, spec.host.as_deref())?;
        let quota = self.config.quotas.deployments;
        quotas::check_deployments(&self.control(), caller, name, quota)?;
        // A deploy holds its component in memory and compiles it: a few at a time.
        let _building = self.building.acquire().await.map_err(|_| ApiError::internal("the server is shutting down"))?;
        let wasm = read_body(request, self.config.max_upload_bytes, "component").await?;
        let draft = VersionRecord {
            tenant: caller.tenant.clone(),
            name: name.to_string(),
            version: 0,
            sha256: String::new(),
            snapshot_sha256: None,
            size_bytes: wasm.len() as u64,
            spec,
            deployed_at: now(),
            deployed_by: caller.token_id.clone(),
        };
        let (version, deployment) = self.build_version(draft, wasm).await?;
        let key = (caller.tenant.clone(), name.to_string());
        let (created, version) = self
            .change(|control| {
                // Checked again: other deploys may have committed meanwhile.
                quotas::check_deployments(control, caller, name, quota)?;
                host_conflict(control, &key, version.spec.host.as_deref())?;
                let entry = control.deployments.entry(key.clone()).or_insert_with(|| Entry {
                    state: DeploymentState { tenant: key.0.clone(), name: key.1.clone(), active: None, latest: 0 },
                    versions: Default::default(),
                    live: None,
                });
                let version = VersionRecord { version: entry.state.latest + 1, ..version.clone() };
                self.observe(&deployment, &version);
                let created = entry.state.active.is_none();
                entry.state.latest = version.version;
                entry.state.active = Some(version.version);
                entry.versions.insert(version.version, version.clone());
                entry.live = Some(Ok(deployment.clone()));
                let mut changes = vec![Change::Version(version.clone()), Change::Deployment(entry.state.clone())];
                changes.extend(forget_old_versions(entry));
                Ok((changes, (created, version)))
            })
            .await?;
        tracing::info!(tenant = %version.tenant, deployment = %name, version = version.version, sha256 = %version.sha256, "deployed");
        Ok(json(if created { StatusCode::CREATED } else { StatusCode::OK }, &version))
    }

    /// `DELETE deployments/NAME`: stops serving it; requests still running
    /// on it end now. Its versions stay for `rollback --to`, unless
    /// `?purge=true`, which forgets the deployment and every version (their
    /// files and components are then collected).
    async fn remove(self: &Arc<Self>, caller: &Caller, name: &str, query: &str) -> Reply {
        let purge = match query_value(query, "purge") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(ApiError::bad_request("bad_request", format!("purge must be true or false, got {other:?}"))),
        };
        let key = (caller.tenant.clone(), name.to_string());
        let live = self
            .change(|control| {
                let entry = control.deployments.get_mut(&key).filter(|e| e.state.active.is_some() || purge);
                let entry = entry.ok_or_else(|| not_found(name))?;
                entry.state.active = None;
                let live = entry.live.take();
                let changes = if purge {
                    let entry = control.deployments.remove(&key).expect("found above");
                    vec![Change::RemoveDeployment(entry.state.tenant, entry.state.name)]
                } else {
                    vec![Change::Deployment(entry.state.clone())]
                };
                Ok((changes, live))
            })
            .await?;
        // Only once the removal is durable: requests still running on it end now.
        if let Some(Ok(live)) = live {
            live.stop();
        }
        if purge {
            self.logs.forget(&caller.tenant, name);
        }
        tracing::info!(tenant = %caller.tenant, deployment = %name, purge, "removed");
        Ok(json(StatusCode::OK, &Removed { removed: name.to_string() }))
    }

    async fn rollback(self: &Arc<Self>, caller: &Caller, name: &str, query: &str) -> Reply {
        let entry = self.entry(caller, name).ok_or_else(|| not_found(name))?;
        let target = match query_value(query, "to") {
            Some(v) => v.parse::<u64>().map_err(|_| ApiError::bad_request("bad_request", format!("`to` must be a version number, got {v:?}")))?,
            None => match entry.state.active.and_then(|a| entry.versions.range(..a).next_back()) {
                Some((v, _)) => *v,
                None => {
                    let message = "there is no earlier version to roll back to (give one with `to`)";
                    return Err(ApiError::new(StatusCode::CONFLICT, "no_earlier_version", message));
                }
            },
        };
        let version = entry
            .versions
            .get(&target)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("deployment '{name}' has no version {target}")))?;
        // A rollback activates the version as a deploy would: the same quota and host rules, as they are now.
        self.check_claim(caller, version.spec.host.as_deref())?;
        let quota = self.config.quotas.deployments;
        quotas::check_deployments(&self.control(), caller, name, quota)?;
        let (me, v) = (self.clone(), version.clone());
        let deployment = tokio::task::spawn_blocking(move || me.load_version(&v))
            .await
            .map_err(|e| ApiError::internal(format!("rollback task failed: {e}")))??;
        deployment.warm().await?;
        let key = (caller.tenant.clone(), name.to_string());
        self.change(|control| {
            quotas::check_deployments(control, caller, name, quota)?;
            host_conflict(control, &key, version.spec.host.as_deref())?;
            let entry = control.deployments.get_mut(&key).ok_or_else(|| not_found(name))?;
            // Checked again: another node may have forgotten it meanwhile.
            if entry.versions.get(&target) != Some(&version) {
                return Err(ApiError::not_found(format!("deployment '{name}' has no version {target} any more")));
            }
            entry.state.active = Some(target);
            entry.live = Some(Ok(deployment.clone()));
            Ok((vec![Change::Deployment(entry.state.clone())], ()))
        })
        .await?;
        tracing::info!(tenant = %caller.tenant, deployment = %name, version = target, "rolled back");
        Ok(json(StatusCode::OK, &version))
    }
}

/// The deployments of `tenant`, by name.
fn mine<'a>(control: &'a Control, tenant: &'a str) -> impl Iterator<Item = (&'a (String, String), &'a Entry)> {
    control.deployments.range((tenant.to_string(), String::new())..).take_while(move |((t, _), _)| t == tenant)
}

/// Forgets the oldest versions of `entry` beyond [`KEPT_VERSIONS`] (never
/// the active one); the changes that make it durable.
fn forget_old_versions(entry: &mut Entry) -> Vec<Change> {
    let mut changes = Vec::new();
    while entry.versions.len() > KEPT_VERSIONS + 1 {
        let oldest = entry.versions.keys().copied().find(|&v| Some(v) != entry.state.active).expect("more than one version");
        entry.versions.remove(&oldest);
        changes.push(Change::RemoveVersion(entry.state.tenant.clone(), entry.state.name.clone(), oldest));
    }
    changes
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
