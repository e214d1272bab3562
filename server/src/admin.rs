//! The admin API: routing and authentication, the one way the control state
//! changes ([`ServerInner::change`]), tenants and tokens. Deployments are in
//! `deployments.rs`, models in `models.rs`. Every call but `health` needs a
//! bearer token; tenant tokens reach only their own tenant, and what
//! belongs to another tenant answers exactly as if it did not exist.

use crate::api::{
    ADMIN_PREFIX, ApiError, Domains, GpuMemory, Health, NewTenant, NewToken, Resident, ResidentModels, Revoked, Tenants, TokenInfo, Tokens, WhoAmI,
    json,
};
use crate::control::{Caller, Control, new_token};
use crate::control_store::{Change, TenantLimits, TenantRecord};
use crate::error::Error;
use crate::metering::{self, GroupBy};
use crate::{ServerInner, check_name, hosts, now};
use bytes::Bytes;
use gpuwasm::ResponseBody;
use gpuwasm::nn::TenantGpu;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use crate::RequestBody;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// How many times a change is decided when other nodes keep committing first.
const CHANGE_ATTEMPTS: u32 = 5;

/// What an admin handler answers.
pub(crate) type Reply = Result<Response<ResponseBody>, ApiError>;

impl ServerInner {
    /// Answers an admin API request. Its work (reading uploads, hashing,
    /// compiling, durable commits) runs in the runtime's long lane, at the
    /// lowest priority, so it never delays guests' requests; only the
    /// health check, which must answer under any load, runs here.
    pub(crate) async fn admin(self: &Arc<Self>, request: Request<RequestBody>) -> Response<ResponseBody> {
        if request.uri().path()[ADMIN_PREFIX.len()..] == *"health" {
            return self.route(request).await.unwrap_or_else(ApiError::into_response);
        }
        let me = self.clone();
        gpuwasm::in_long_lane(async move { me.route(request).await.unwrap_or_else(ApiError::into_response) }).await
    }

    async fn route(self: &Arc<Self>, request: Request<RequestBody>) -> Reply {
        let path = request.uri().path()[ADMIN_PREFIX.len()..].to_string();
        if path == "health" {
            return match *request.method() {
                Method::GET => Ok(json(StatusCode::OK, &Health { status: "ok".into() })),
                _ => Err(ApiError::method_not_allowed()),
            };
        }
        let caller = self.caller(&request).ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing, wrong or revoked token (send `Authorization: Bearer <token>`)")
        })?;
        let query = request.uri().query().unwrap_or("").to_string();
        let method = request.method().clone();
        let segments: Vec<&str> = path.split('/').collect();
        match (method, segments.as_slice()) {
            (Method::GET, ["whoami"]) => {
                let me = WhoAmI { tenant: caller.tenant.clone(), admin: caller.admin, token_id: caller.token_id.clone() };
                Ok(json(StatusCode::OK, &me))
            }
            (Method::GET, ["tenants"]) if caller.admin => {
                Ok(json(StatusCode::OK, &Tenants { tenants: self.control().tenants.values().cloned().collect() }))
            }
            (Method::POST, ["tenants"]) if caller.admin => self.create_tenant(request).await,
            (Method::PUT, ["tenants", name, "domains"]) if caller.admin => {
                let name = name.to_string();
                self.set_domains(&name, request).await
            }
            (Method::PUT, ["tenants", name, "gpu"]) if caller.admin => {
                let name = name.to_string();
                self.set_tenant_gpu(&name, request).await
            }
            (Method::PUT, ["tenants", name, "limits"]) if caller.admin => {
                let name = name.to_string();
                self.set_tenant_limits(&name, request).await
            }
            (Method::GET, ["usage"]) => self.usage(&caller, &query).await,
            (_, ["usage"]) => Err(ApiError::method_not_allowed()),
            (Method::GET, ["resident-models"]) => Ok(json(StatusCode::OK, &self.resident_models(&caller))),
            (_, ["resident-models"]) => Err(ApiError::method_not_allowed()),
            (_, ["tenants"] | ["tenants", _, "domains" | "gpu" | "limits"]) => Err(if caller.admin { ApiError::method_not_allowed() } else { ApiError::forbidden() }),
            (Method::GET, ["tokens"]) => Ok(self.list_tokens(&caller)),
            (Method::POST, ["tokens"]) => self.create_token(&caller, &query).await,
            (Method::DELETE, ["tokens", id]) => self.revoke_token(&caller, id).await,
            (method, ["files", ..] | ["deployments", ..]) => self.deployments_api(&caller, method, &segments, &query, request).await,
            (method, ["models" | "model-files", ..]) => self.models_api(&caller, method, &segments, &query, request).await,
            (_, ["tokens" | "whoami", ..]) => Err(ApiError::method_not_allowed()),
            _ => Err(ApiError::not_found("no such admin endpoint")),
        }
    }

    fn caller<B>(&self, request: &Request<B>) -> Option<Caller> {
        let token = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")?;
        self.control().authenticate(token, &self.config.admin_token)
    }

    /// Changes the control state, the one way it changes: under the change
    /// lock, `edit` works on a copy of the current state and returns the
    /// records to store with its result; they are committed durably, and
    /// only then does the copy become what every request sees. When another
    /// node committed first, the state is reloaded and `edit` decides again
    /// (a few times at most).
    pub(crate) async fn change<T>(
        self: &Arc<Self>,
        mut edit: impl FnMut(&mut Control) -> Result<(Vec<Change>, T), ApiError>,
    ) -> Result<T, ApiError> {
        let _guard = self.changes.lock().await;
        let mut attempts = 1;
        loop {
            let mut control = (*self.control()).clone();
            let (changes, result) = edit(&mut control)?;
            match self.store.commit(control.revision, &changes) {
                Ok(revision) => {
                    control.revision = revision;
                    control.reindex(&self.config.server_names);
                    *self.control.write().unwrap() = Arc::new(control);
                    return Ok(result);
                }
                Err(Error::Conflict(why)) if attempts < CHANGE_ATTEMPTS => {
                    tracing::info!(%why, "another node changed the state first; deciding again");
                    attempts += 1;
                    self.reload().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn create_tenant(self: &Arc<Self>, request: Request<RequestBody>) -> Reply {
        let NewTenant { name, domains } = read_json(request, "request body", r#"{"name": "TENANT", "domains": ["example.com"]} (domains optional)"#).await?;
        check_name("tenant", &name)?;
        if name == gpuwasm::nn::PUBLIC {
            return Err(ApiError::bad_request("invalid_name", "'public' is reserved for models every tenant can load"));
        }
        let domains = self.check_domains(domains)?;
        let (token, record) = new_token(&name, false, now()).map_err(|e| ApiError::internal(format!("making a token: {e}")))?;
        let tenant = TenantRecord { name: name.clone(), created_at: now(), domains, gpu: Default::default(), limits: Default::default() };
        self.change(|control| {
            if control.tenants.contains_key(&name) {
                return Err(ApiError::new(StatusCode::CONFLICT, "tenant_exists", format!("tenant '{name}' already exists")));
            }
            control.tenants.insert(name.clone(), tenant.clone());
            control.tokens.insert(record.id.clone(), record.clone());
            Ok((vec![Change::Tenant(tenant.clone()), Change::Token(record.clone())], ()))
        })
        .await?;
        tracing::info!(tenant = %name, "tenant created");
        Ok(json(StatusCode::CREATED, &NewToken { tenant: name, token_id: record.id, token }))
    }

    /// `PUT tenants/NAME/domains`: replaces the domains a tenant may claim
    /// hosts in. Claims outside the new domains stop routing at once.
    async fn set_domains(self: &Arc<Self>, name: &str, request: Request<RequestBody>) -> Reply {
        let Domains { domains } = read_json(request, "request body", r#"{"domains": ["example.com", ...]}"#).await?;
        let domains = self.check_domains(domains)?;
        let record = self
            .change(|control| {
                let tenant = control.tenants.get_mut(name).ok_or_else(|| ApiError::not_found(format!("no tenant named '{name}'")))?;
                tenant.domains = domains.clone();
                Ok((vec![Change::Tenant(tenant.clone())], tenant.clone()))
            })
            .await?;
        tracing::info!(tenant = %name, domains = ?record.domains, "tenant domains set");
        Ok(json(StatusCode::OK, &record))
    }

    /// `PUT tenants/NAME/gpu`: sets a tenant's GPU memory quota and share
    /// of GPU time. Models it already holds stay; later loads and turns
    /// follow the new settings.
    async fn set_tenant_gpu(self: &Arc<Self>, name: &str, request: Request<RequestBody>) -> Reply {
        let gpu: TenantGpu = read_json(request, "request body", r#"{"memory_mb": 2048, "weight": 1} (memory_mb null: no quota)"#).await?;
        if gpu.weight == 0 || gpu.weight > 1000 {
            return Err(ApiError::bad_request("invalid_weight", format!("weight must be 1 to 1000, got {}", gpu.weight)));
        }
        let record = self
            .change(|control| {
                let tenant = control.tenants.get_mut(name).ok_or_else(|| ApiError::not_found(format!("no tenant named '{name}'")))?;
                tenant.gpu = gpu;
                Ok((vec![Change::Tenant(tenant.clone())], tenant.clone()))
            })
            .await?;
        self.runtime.models().set_tenant_gpu(name, gpu);
        tracing::info!(tenant = %name, ?gpu, "tenant GPU settings set");
        Ok(json(StatusCode::OK, &record))
    }

    /// `PUT tenants/NAME/limits`: sets a tenant's quotas (all of them: a
    /// field left out is no quota, or the node's); they apply to its next
    /// requests, deploys and uploads.
    async fn set_tenant_limits(self: &Arc<Self>, name: &str, request: Request<RequestBody>) -> Reply {
        let example = r#"{"requests_per_second": 100, "instances": 8, "deployments": 20, "storage_bytes": 10737418240} (each may be null: no rate quota; the node's quota for the others)"#;
        let limits: TenantLimits = read_json(request, "request body", example).await?;
        if limits.requests_per_second == Some(0) {
            return Err(ApiError::bad_request("invalid_limits", "requests_per_second must be at least 1 (null: no quota)"));
        }
        let pool = self.runtime.pool_size();
        let record = self
            .change(|control| {
                let tenant = control.tenants.get_mut(name).ok_or_else(|| ApiError::not_found(format!("no tenant named '{name}'")))?;
                if let Some(n) = limits.instances.filter(|n| !(1..=pool).contains(n)) {
                    let message = format!("instances must be 1 to {pool} (the node's instance pool), got {n} (null: the node's default)");
                    return Err(ApiError::bad_request("invalid_limits", message));
                }
                tenant.limits = limits;
                // Under the change lock: the runtime's quota is the one stored last.
                self.runtime.set_tenant_instances(name, limits.instances);
                Ok((vec![Change::Tenant(tenant.clone())], tenant.clone()))
            })
            .await?;
        tracing::info!(tenant = %name, ?limits, "tenant limits set");
        Ok(json(StatusCode::OK, &record))
    }

    /// `GET usage?since=24h&by=deployment&tenant=NAME` (or `all=1`, admin
    /// only): what a tenant's requests used and cost. A tenant's token sees
    /// only its own tenant.
    async fn usage(self: &Arc<Self>, caller: &Caller, query: &str) -> Reply {
        let Some(config) = &self.config.usage else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "metering_off", "this server does not meter requests (started with --no-metering)"));
        };
        let since = query_value(query, "since").unwrap_or("24h");
        let since = metering::parse_duration(since)
            .ok_or_else(|| ApiError::bad_request("bad_request", format!("since={since:?}: give a duration such as 3600, 90m, 24h or 7d")))?;
        let by = query_value(query, "by").unwrap_or("deployment");
        let by = GroupBy::parse(by).ok_or_else(|| ApiError::bad_request("bad_request", format!("by={by:?}: give deployment, model, day or tenant")))?;
        let all = matches!(query_value(query, "all"), Some("1" | "true"));
        let tenant = query_value(query, "tenant").unwrap_or(&caller.tenant).to_string();
        if !caller.admin && (all || tenant != caller.tenant) {
            return Err(ApiError::forbidden());
        }
        // Nothing older than the retention is kept: no need to look for it.
        let since = since.min(std::time::Duration::from_secs(u64::from(config.retention_days) * 86_400));
        let since = std::time::SystemTime::now().checked_sub(since).unwrap_or(std::time::UNIX_EPOCH);
        let (me, prices) = (self.clone(), config.prices.clone());
        let report = tokio::task::spawn_blocking(move || {
            let metering = me.metering.as_ref().expect("metering runs when usage is configured");
            metering.report((!all).then_some(tenant.as_str()), since, by, &prices)
        })
        .await
        .map_err(|e| ApiError::internal(format!("the usage report failed: {e}")))??;
        Ok(json(StatusCode::OK, &report))
    }

    /// `GET resident-models`: the models resident on this node's devices
    /// that the caller can see, and each GPU's memory. Tenants charged for
    /// a model are listed to the admin; a tenant sees only itself among
    /// them.
    fn resident_models(&self, caller: &Caller) -> ResidentModels {
        let visible = self.models.names_by_key(if caller.admin { None } else { Some(&caller.tenant) });
        let runtime = self.runtime.models();
        let models = runtime
            .resident()
            .into_iter()
            .filter_map(|r| {
                let names = visible.get(&r.key)?.clone();
                let tenants = if caller.admin { r.tenants } else { r.tenants.into_iter().filter(|t| *t == caller.tenant).collect() };
                let idle_timeout_s = r.idle_timeout.as_secs();
                Some(Resident { names, device: r.device, bytes: r.bytes, tenants, status: r.status, warm: r.warm, idle_timeout_s })
            })
            .collect();
        let devices = runtime
            .gpu_memory()
            .into_iter()
            .map(|(device, budget_bytes, used_bytes)| GpuMemory { device, budget_bytes: (budget_bytes != u64::MAX).then_some(budget_bytes), used_bytes })
            .collect();
        ResidentModels { devices, models }
    }

    /// Checks and normalises domains a tenant may claim hosts in: DNS
    /// names that could be claimed at all.
    fn check_domains(&self, domains: Vec<String>) -> Result<Vec<String>, ApiError> {
        domains
            .into_iter()
            .map(|d| {
                let normal = hosts::normalize(&d).unwrap_or_default();
                gpuwasm::check_host_pattern(&normal, false)
                    .map_err(|e| e.to_string())
                    .and_then(|()| hosts::check_claim(&normal, &self.config.server_names, true, &[]))
                    .map(|()| normal)
                    .map_err(|m| ApiError::bad_request("invalid_domain", format!("domain {d:?}: {m}")))
            })
            .collect()
    }

    fn list_tokens(&self, caller: &Caller) -> Response<ResponseBody> {
        let control = self.control();
        let mut tokens: Vec<TokenInfo> = control
            .tokens
            .values()
            .filter(|t| t.tenant == caller.tenant)
            .map(|t| TokenInfo { id: t.id.clone(), tenant: t.tenant.clone(), admin: t.admin, created_at: t.created_at, revoked_at: t.revoked_at })
            .collect();
        tokens.sort_by_key(|t| t.created_at);
        json(StatusCode::OK, &Tokens { tokens })
    }

    async fn create_token(self: &Arc<Self>, caller: &Caller, query: &str) -> Reply {
        let tenant = match query_value(query, "tenant") {
            Some(t) if t != caller.tenant && !caller.admin => return Err(ApiError::forbidden()),
            Some(t) => t.to_string(),
            None => caller.tenant.clone(),
        };
        let (token, record) = new_token(&tenant, false, now()).map_err(|e| ApiError::internal(format!("making a token: {e}")))?;
        self.change(|control| {
            if !control.tenants.contains_key(&tenant) {
                return Err(ApiError::not_found(format!("no tenant named '{tenant}'")));
            }
            control.tokens.insert(record.id.clone(), record.clone());
            Ok((vec![Change::Token(record.clone())], ()))
        })
        .await?;
        Ok(json(StatusCode::CREATED, &NewToken { tenant, token_id: record.id, token }))
    }

    async fn revoke_token(self: &Arc<Self>, caller: &Caller, id: &str) -> Reply {
        self.change(|control| {
            let record = control.tokens.get_mut(id).filter(|t| caller.admin || t.tenant == caller.tenant);
            let record = record.ok_or_else(|| ApiError::not_found(format!("no token with id '{id}'")))?;
            record.revoked_at.get_or_insert(now());
            Ok((vec![Change::Token(record.clone())], ()))
        })
        .await?;
        Ok(json(StatusCode::OK, &Revoked { revoked: id.to_string() }))
    }
}

/// Reads a request body of at most `max` bytes.
pub(crate) async fn read_body(request: Request<RequestBody>, max: usize, what: &str) -> Result<Bytes, ApiError> {
    match Limited::new(request.into_body(), max).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("{what} is larger than this server's limit of {max} bytes");
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", message))
        }
        Err(e) => Err(ApiError::bad_request("bad_upload", format!("reading the {what} failed: {e}"))),
    }
}

/// Reads a JSON request body (at most 1 MiB) as `T`; `shape` says what to send.
pub(crate) async fn read_json<T: DeserializeOwned>(request: Request<RequestBody>, what: &str, shape: &str) -> Result<T, ApiError> {
    let body = read_body(request, 1 << 20, what).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request("bad_request", format!("{what}: {e}; send {shape}")))
}

/// The value of `key` in a query string, if present.
pub(crate) fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// The same answer whether the deployment never existed or belongs to
/// another tenant: nothing leaks across tenants, not even existence.
pub(crate) fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no deployment named '{name}'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values() {
        assert_eq!(query_value("to=3&x=1", "to"), Some("3"));
        assert_eq!(query_value("tox=3", "to"), None);
        assert_eq!(query_value("", "to"), None);
    }

    #[test]
    fn api_types_are_the_wire_format() {
        let body: NewTenant = serde_json::from_str(r#"{"name": "acme"}"#).unwrap();
        assert_eq!((body.name.as_str(), body.domains.len()), ("acme", 0));
        assert!(serde_json::from_str::<NewTenant>(r#"{"nmae": "acme"}"#).is_err());
    }
}
