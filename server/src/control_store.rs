//! Durable control-plane state: tenants, API tokens, deployments and their
//! immutable versions.
//!
//! [`ControlStore`] is the seam: the server keeps the state in memory for
//! reads and sends every change through the store, atomically, before it
//! takes effect. [`RedbStore`] (an embedded, transactional, crash-safe
//! database file) is the single-node default;
//! [`PgStore`](crate::postgres_store::PgStore) keeps one state for several
//! nodes in PostgreSQL.
//!
//! Every commit names the revision of the state it was made against and
//! succeeds only if the store is still at it, so a node never commits a
//! change decided on a state another node has since changed: it reloads
//! and decides again.

use crate::error::Error;
use crate::spec::DeploymentSpec;
use gpuwasm::nn::TenantGpu;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A tenant: a namespace of deployments with its own tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// The tenant's name, also the first segment of its routes.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Domains whose names (the domain and its subdomains) the tenant's
    /// deployments may claim as hosts; set by the admin.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Its GPU memory quota and share of GPU time; set by the admin.
    #[serde(default)]
    pub gpu: TenantGpu,
    /// Its request quotas; set by the admin.
    #[serde(default)]
    pub limits: TenantLimits,
}

/// A tenant's request quotas (`PUT tenants/NAME/limits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Requests a second over all its deployments, with up to a second's
    /// worth at once; beyond it requests get `429` with `Retry-After`.
    /// `None`: no quota.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// Instances its deployments may run at once (at most the node's
    /// pool); beyond it requests wait in their deployment's queue.
    /// `None`: the node's `--max-tenant-instances`.
    #[serde(default)]
    pub instances: Option<u32>,
    /// Active deployments it may have. `None`: the node's quota.
    #[serde(default)]
    pub deployments: Option<u32>,
    /// Bytes of deployment files, model files and components it may
    /// store. `None`: the node's quota.
    #[serde(default)]
    pub storage_bytes: Option<u64>,
}

/// An API token. Only a SHA-256 of the token is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public part of the token, used to find and revoke it.
    pub id: String,
    /// The tenant the token acts for.
    pub tenant: String,
    /// Hex SHA-256 of the whole token.
    pub sha256: String,
    /// Whether the token may manage tenants.
    pub admin: bool,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// One immutable version of a deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Owning tenant.
    pub tenant: String,
    /// Deployment name.
    pub name: String,
    /// 1, 2, 3, ... per deployment.
    pub version: u64,
    /// SHA-256 of the uploaded component.
    pub sha256: String,
    /// SHA-256 of the pre-initialised snapshot that runs, if init ran.
    pub snapshot_sha256: Option<String>,
    /// Size of the uploaded component in bytes.
    pub size_bytes: u64,
    /// What it was deployed with: host, limits, sandbox, models, files
    /// (the same fields the deploy request and the manifest give).
    #[serde(flatten)]
    pub spec: DeploymentSpec,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
    /// Id of the token that deployed it.
    pub deployed_by: String,
}

/// Which version of a deployment serves traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentState {
    /// Owning tenant.
    pub tenant: String,
    /// Deployment name.
    pub name: String,
    /// The version serving traffic; `None` once removed.
    pub active: Option<u64>,
    /// The highest version number handed out.
    pub latest: u64,
}

/// A model in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The owning tenant, or `public` for models every tenant may load.
    pub namespace: String,
    /// The name handlers load it by.
    pub name: String,
    /// `safetensors`, `onnx` or `gguf`.
    pub format: gpuwasm_tensor::Format,
    /// Its files: path inside the model -> SHA-256 of the content.
    pub files: BTreeMap<String, String>,
    /// Total size of the files in bytes.
    pub size_bytes: u64,
    /// What the engine found when it checked the model.
    pub summary: String,
    /// Seconds since the Unix epoch.
    pub pushed_at: u64,
}

/// Everything the store holds.
#[derive(Debug, Default)]
pub struct ControlState {
    /// Which state this is: it grows with every commit.
    pub revision: u64,
    /// All tenants.
    pub tenants: Vec<TenantRecord>,
    /// All tokens, revoked ones too.
    pub tokens: Vec<TokenRecord>,
    /// All deployments.
    pub deployments: Vec<DeploymentState>,
    /// All versions of all deployments.
    pub versions: Vec<VersionRecord>,
    /// All models.
    pub models: Vec<ModelRecord>,
}

/// One change to the state; a commit applies several atomically.
#[derive(Clone, Debug)]
pub enum Change {
    /// Create or replace a tenant.
    Tenant(TenantRecord),
    /// Create or replace a token (revocation replaces it).
    Token(TokenRecord),
    /// Add a version.
    Version(VersionRecord),
    /// Create or replace a deployment's state.
    Deployment(DeploymentState),
    /// Create or replace a model.
    Model(ModelRecord),
    /// Remove a model: (namespace, name).
    RemoveModel(String, String),
    /// Forget one version of a deployment: (tenant, name, version).
    RemoveVersion(String, String, u64),
    /// Forget a deployment and all its versions: (tenant, name).
    RemoveDeployment(String, String),
}

/// Durable storage of the control-plane state.
pub trait ControlStore: Send + Sync {
    /// Reads the whole state, as of one revision.
    fn load(&self) -> Result<ControlState, Error>;
    /// The revision the stored state is at now.
    fn revision(&self) -> Result<u64, Error>;
    /// Applies `changes` atomically and durably if the stored state is
    /// still at revision `base`: all or none, and done when this returns.
    /// Returns the new revision. [`Error::Conflict`] when another writer
    /// committed since `base`: nothing was applied; load the state again
    /// and decide the change again.
    fn commit(&self, base: u64, changes: &[Change]) -> Result<u64, Error>;
    /// Has `changed` notified whenever another writer may have committed
    /// (also after a lost connection, when notices may have been missed).
    /// Returns false for a store no one else writes to, which never
    /// notifies.
    fn watch(&self, changed: Arc<tokio::sync::Notify>) -> Result<bool, Error> {
        let _ = changed;
        Ok(false)
    }
}

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
const MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("models");

/// The embedded default: one redb database file, which one process at a
/// time holds. Its revision counts the commits since it was opened.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    revision: Mutex<u64>,
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
                Error::StateInUse(path.to_path_buf())
            }
            e => corrupt(path, e),
        })?;
        let store = RedbStore { db, path: path.to_path_buf(), revision: Mutex::new(0) };
        // Create the tables so that reads of a fresh database find them.
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        for table in [TENANTS, TOKENS, DEPLOYMENTS, VERSIONS, MODELS] {
            txn.open_table(table).map_err(|e| store.err(e))?;
        }
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        corrupt(&self.path, e)
    }

    fn read_all<T: DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>, Error> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            let record = serde_json::from_slice(value.value())
                .map_err(|e| self.err(format!("record {:?}: {e}", key.value())))?;
            out.push(record);
        }
        Ok(out)
    }
}

/// Versions sort by tenant, name and number.
fn version_key(tenant: &str, name: &str, version: u64) -> String {
    format!("{tenant}/{name}/{version:020}")
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::CorruptState { path: path.to_path_buf(), message: e.to_string() }
}

impl ControlStore for RedbStore {
    fn load(&self) -> Result<ControlState, Error> {
        let revision = self.revision.lock().unwrap();
        Ok(ControlState {
            revision: *revision,
            tenants: self.read_all(TENANTS)?,
            tokens: self.read_all(TOKENS)?,
            deployments: self.read_all(DEPLOYMENTS)?,
            versions: self.read_all(VERSIONS)?,
            models: self.read_all(MODELS)?,
        })
    }

    fn revision(&self) -> Result<u64, Error> {
        Ok(*self.revision.lock().unwrap())
    }

    fn commit(&self, base: u64, changes: &[Change]) -> Result<u64, Error> {
        let mut revision = self.revision.lock().unwrap();
        if *revision != base {
            return Err(Error::Conflict(format!("the state is at revision {}, the change was made at {base}", *revision)));
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        for change in changes {
            let (table, key, value) = match change {
                Change::Tenant(t) => (TENANTS, t.name.clone(), serde_json::to_vec(t)),
                Change::Token(t) => (TOKENS, t.id.clone(), serde_json::to_vec(t)),
                Change::Deployment(d) => (DEPLOYMENTS, format!("{}/{}", d.tenant, d.name), serde_json::to_vec(d)),
                Change::Version(v) => (VERSIONS, version_key(&v.tenant, &v.name, v.version), serde_json::to_vec(v)),
                Change::Model(m) => (MODELS, format!("{}/{}", m.namespace, m.name), serde_json::to_vec(m)),
                Change::RemoveModel(namespace, name) => {
                    let mut table = txn.open_table(MODELS).map_err(|e| self.err(e))?;
                    table.remove(format!("{namespace}/{name}").as_str()).map_err(|e| self.err(e))?;
                    continue;
                }
                Change::RemoveVersion(tenant, name, version) => {
                    let mut table = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
                    table.remove(version_key(tenant, name, *version).as_str()).map_err(|e| self.err(e))?;
                    continue;
                }
                Change::RemoveDeployment(tenant, name) => {
                    let mut versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
                    let (from, to) = (version_key(tenant, name, 0), version_key(tenant, name, u64::MAX));
                    versions.retain_in(from.as_str()..=to.as_str(), |_, _| false).map_err(|e| self.err(e))?;
                    let mut deployments = txn.open_table(DEPLOYMENTS).map_err(|e| self.err(e))?;
                    deployments.remove(format!("{tenant}/{name}").as_str()).map_err(|e| self.err(e))?;
                    continue;
                }
            };
            let value = value.expect("records serialise");
            let mut table = txn.open_table(table).map_err(|e| self.err(e))?;
            table.insert(key.as_str(), value.as_slice()).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        *revision += 1;
        Ok(*revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_durable_and_atomic_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let tenant = TenantRecord { name: "acme".into(), created_at: 1, domains: vec!["acme.example".into()], gpu: TenantGpu::default(), limits: TenantLimits { requests_per_second: Some(5), instances: Some(3), deployments: Some(2), storage_bytes: Some(1 << 20) } };
        let deployment = DeploymentState { tenant: "acme".into(), name: "api".into(), active: Some(1), latest: 1 };
        {
            let store = RedbStore::open(&path).unwrap();
            assert!(store.load().unwrap().tenants.is_empty());
            assert_eq!(store.commit(0, &[Change::Tenant(tenant.clone()), Change::Deployment(deployment.clone())]).unwrap(), 1);
        }
        let state = RedbStore::open(&path).unwrap().load().unwrap();
        assert_eq!(state.tenants, vec![tenant]);
        assert_eq!(state.deployments, vec![deployment]);
    }

    #[test]
    fn a_database_in_use_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _held = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).err().expect("a second open must fail");
        assert!(matches!(err, Error::StateInUse(_)), "{err}");
        assert!(err.to_string().contains("another `gpuwasm serve`"), "{err}");
    }

    #[test]
    fn a_garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        std::fs::write(&path, b"not a database at all, not at all").unwrap();
        let err = RedbStore::open(&path).err().expect("garbage must not open");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }
}
