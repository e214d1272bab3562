//! The control plane in memory: tenants, tokens, deployments with their
//! versions, and the routing table derived from them. One immutable
//! snapshot is shared by all requests and replaced whole on every change,
//! after the change is durable in the [`ControlStore`](crate::control_store::ControlStore).

use crate::control_store::{ControlState, DeploymentState, TenantRecord, TokenRecord, VersionRecord};
use crate::hex::{random_hex, sha256_hex};
use gpuwasm::Deployment;
use std::collections::{BTreeMap, HashMap};

/// The tenant the bootstrap admin token acts for.
pub const DEFAULT_TENANT: &str = "default";

/// The id the bootstrap admin token goes by in records (`deployed_by`).
const ADMIN_TOKEN_ID: &str = "admin";

/// Who is calling the admin API.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub tenant: String,
    pub admin: bool,
    pub token_id: String,
}

/// A deployment: its state, every version, and the loaded active one.
#[derive(Clone)]
pub(crate) struct Entry {
    pub state: DeploymentState,
    pub versions: BTreeMap<u64, VersionRecord>,
    /// The active version's deployment, or why it failed to load.
    pub live: Option<Result<Deployment, String>>,
}

impl Entry {
    pub fn active(&self) -> Option<&VersionRecord> {
        self.versions.get(&self.state.active?)
    }
}

/// Tenant and deployment name.
pub(crate) type Key = (String, String);

#[derive(Clone, Default)]
pub(crate) struct Control {
    /// The store's revision this state is.
    pub revision: u64,
    pub tenants: BTreeMap<String, TenantRecord>,
    pub tokens: HashMap<String, TokenRecord>,
    pub deployments: BTreeMap<Key, Entry>,
    /// Host name -> deployment, for active deployments routed by host.
    hosts: HashMap<String, Key>,
}

impl Control {
    /// The in-memory state for what the store holds; `load` builds each
    /// active version's deployment. Host claims are indexed as
    /// [`Control::reindex`] says.
    pub fn from_state(
        state: ControlState,
        server_names: &[String],
        mut load: impl FnMut(&VersionRecord) -> Result<Deployment, String>,
    ) -> Self {
        let mut versions: HashMap<Key, BTreeMap<u64, VersionRecord>> = HashMap::new();
        for v in state.versions {
            versions.entry((v.tenant.clone(), v.name.clone())).or_default().insert(v.version, v);
        }
        let mut control = Control {
            revision: state.revision,
            tenants: state.tenants.into_iter().map(|t| (t.name.clone(), t)).collect(),
            tokens: state.tokens.into_iter().map(|t| (t.id.clone(), t)).collect(),
            ..Control::default()
        };
        for d in state.deployments {
            let key = (d.tenant.clone(), d.name.clone());
            let mut entry = Entry { versions: versions.remove(&key).unwrap_or_default(), state: d, live: None };
            entry.live = entry.active().map(&mut load);
            control.deployments.insert(key, entry);
        }
        control.reindex(server_names);
        control
    }

    /// Rebuilds the host index after deployments (or tenants' domains)
    /// changed. A claim routes only while it is allowed under today's
    /// rules: claims stored before a name became unclaimable (a server
    /// name, an IP address, a domain the admin took back) are logged and
    /// not routed, so they can never shadow the server's own paths.
    pub fn reindex(&mut self, server_names: &[String]) {
        let mut hosts = HashMap::new();
        for (key, entry) in &self.deployments {
            let Some(version) = entry.active() else { continue };
            let Some(host) = &version.spec.host else { continue };
            let by_admin = version.deployed_by == ADMIN_TOKEN_ID;
            let domains = self.tenants.get(&key.0).map_or(&[][..], |t| &t.domains);
            match crate::hosts::check_claim(host, server_names, by_admin, domains) {
                Ok(()) => {
                    hosts.insert(host.clone(), key.clone());
                }
                Err(why) => tracing::warn!(tenant = %key.0, deployment = %key.1, %why, "host claim not routed"),
            }
        }
        self.hosts = hosts;
    }

    pub fn by_host(&self, host: &str) -> Option<&Entry> {
        self.deployments.get(self.hosts.get(host)?)
    }

    /// Which deployment serves `host`, if any.
    pub fn host_owner(&self, host: &str) -> Option<&Key> {
        self.hosts.get(host)
    }

    /// The caller a bearer token stands for, if it is valid and not revoked.
    pub fn authenticate(&self, token: &str, admin_token: &str) -> Option<Caller> {
        if constant_time_eq(token.as_bytes(), admin_token.as_bytes()) {
            return Some(Caller { tenant: DEFAULT_TENANT.into(), admin: true, token_id: ADMIN_TOKEN_ID.into() });
        }
        let id = parse_token_id(token)?;
        let record = self.tokens.get(id)?;
        let matches = constant_time_eq(sha256_hex(token.as_bytes()).as_bytes(), record.sha256.as_bytes());
        (matches && record.revoked_at.is_none()).then(|| Caller {
            tenant: record.tenant.clone(),
            admin: record.admin,
            token_id: record.id.clone(),
        })
    }
}

/// Tokens look like `gwt_<id>_<secret>`.
fn parse_token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("gwt_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some(id)
}

/// A new token for `tenant`: the token itself (shown once) and its record.
pub(crate) fn new_token(tenant: &str, admin: bool, now: u64) -> std::io::Result<(String, TokenRecord)> {
    let id = random_hex(6)?;
    let token = format!("gwt_{id}_{}", random_hex(24)?);
    let record = TokenRecord {
        sha256: sha256_hex(token.as_bytes()),
        id,
        tenant: tenant.to_string(),
        admin,
        created_at: now,
        revoked_at: None,
    };
    Ok((token, record))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn tokens_authenticate_until_revoked() {
        let (token, mut record) = new_token("acme", false, 1).unwrap();
        assert!(token.starts_with(&format!("gwt_{}_", record.id)));
        let mut control = Control::default();
        control.tokens.insert(record.id.clone(), record.clone());
        let caller = control.authenticate(&token, "admin-secret").unwrap();
        assert_eq!((caller.tenant.as_str(), caller.admin), ("acme", false));
        assert!(control.authenticate(&format!("{token}x"), "admin-secret").is_none());
        assert!(control.authenticate("gwt_nope_nope", "admin-secret").is_none());
        assert!(control.authenticate("admin-secret", "admin-secret").unwrap().admin);
        record.revoked_at = Some(2);
        control.tokens.insert(record.id.clone(), record);
        assert!(control.authenticate(&token, "admin-secret").is_none());
    }
}
