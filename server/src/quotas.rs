//! What each tenant may hold (its own [`TenantLimits`](crate::control_store::TenantLimits)
//! where the admin set them, the node's [`TenantQuotas`](crate::TenantQuotas)
//! otherwise): active deployments, checked before a deploy or rollback and again when
//! it commits; and storage (deployment files, model files, the components
//! of its versions), checked as upload bytes arrive.

use crate::ServerInner;
use crate::api::ApiError;
use crate::control::{Caller, Control};
use crate::error::Error;
use crate::uploads::{Quota, Room};
use http::StatusCode;
use std::collections::HashSet;
use std::sync::Arc;

/// `403 quota_exceeded` when activating deployment `name` would give the
/// caller's tenant more active deployments than its quota (its own, or
/// the node's `quota`); a new version of an active one does not count;
/// the admin has no quota.
pub(crate) fn check_deployments(control: &Control, caller: &Caller, name: &str, quota: usize) -> Result<(), ApiError> {
    if caller.admin {
        return Ok(());
    }
    let tenant = caller.tenant.as_str();
    let quota = control.tenants.get(tenant).and_then(|t| t.limits.deployments).map_or(quota, |n| n as usize);
    let active: Vec<&str> = control
        .deployments
        .range((tenant.to_string(), String::new())..)
        .take_while(|((t, _), _)| t == tenant)
        .filter(|(_, e)| e.state.active.is_some())
        .map(|((_, n), _)| n.as_str())
        .collect();
    if active.len() >= quota && !active.contains(&name) {
        let message = format!("tenant '{tenant}' has {} active deployments, its quota; remove one first", active.len());
        return Err(ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", message));
    }
    Ok(())
}

impl ServerInner {
    /// The room an upload by `caller` has: `max`, and the tenant's storage
    /// quota (the admin's uploads are bounded by `max` only).
    pub(crate) async fn upload_room(self: &Arc<Self>, caller: &Caller, max: u64) -> Result<Room, ApiError> {
        if caller.admin {
            return Ok(Room { max, quota: None });
        }
        let (me, tenant) = (self.clone(), caller.tenant.clone());
        let stored = tokio::task::spawn_blocking(move || me.storage_stored(&tenant))
            .await
            .map_err(|e| ApiError::internal(format!("measuring storage failed: {e}")))??;
        let own = self.control().tenants.get(&caller.tenant).and_then(|t| t.limits.storage_bytes);
        let bytes = own.unwrap_or(self.config.quotas.storage_bytes);
        let arriving = self.uploads.receiving(&caller.tenant);
        if stored + arriving >= bytes {
            let message = format!(
                "tenant '{}' uses {} of its {bytes} bytes of storage; remove models, or deployments with `gpuwasm rm --purge`",
                caller.tenant,
                stored + arriving
            );
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded", message));
        }
        Ok(Room { max, quota: Some(Quota { bytes, stored }) })
    }

    /// Bytes `tenant` has stored: its deployment files and model files,
    /// and the components its versions run (each counted once). Blocking.
    fn storage_stored(&self, tenant: &str) -> Result<u64, Error> {
        let mut stored = 0;
        for prefix in [format!("files/{tenant}/"), format!("models/{tenant}/")] {
            stored += self.blobs.list(&prefix)?.iter().map(|b| b.size).sum::<u64>();
        }
        let control = self.control();
        let mut components = HashSet::new();
        for entry in control.deployments.range((tenant.to_string(), String::new())..).take_while(|((t, _), _)| t == tenant) {
            for v in entry.1.versions.values() {
                if components.insert(&v.sha256) {
                    stored += v.size_bytes;
                }
            }
        }
        Ok(stored)
    }
}
