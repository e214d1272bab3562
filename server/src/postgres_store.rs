//! The control state in PostgreSQL, shared by several nodes
//! (`gpuwasm serve --state postgres://...`).
//!
//! - **Schema.** The migrations in `server/migrations` are applied at
//!   connect, in order, under an advisory lock (nodes starting together
//!   apply each once), and recorded in `gpuwasm_migrations`. A database
//!   migrated by a newer gpuwasm is refused, not guessed at.
//! - **Commits.** One transaction per commit: it raises the one-row
//!   revision only if it is still the revision the change was decided on
//!   (else [`Error::Conflict`], nothing applied), writes the records, and
//!   sends `NOTIFY gpuwasm_control`, delivered when it commits.
//! - **Watching.** A thread of its own `LISTEN`s on another connection and
//!   tells the server; it reconnects after a lost connection.
//! - **A lost connection** fails the call in progress with
//!   [`Error::Store`]; the next call connects again.
//!
//! The `postgres` client drives a tokio runtime of its own, which cannot
//! start on a thread that already drives one: every call runs on a short
//! thread of its own, so the server may call the store from anywhere.
//! Connections are plain TCP or Unix sockets; TLS to PostgreSQL is not
//! supported yet (`sslmode=require` is refused at connect).

use crate::control_store::{Change, ControlState, ControlStore};
use crate::error::Error;
use crate::metering::{MinuteLine, SharedUsage};
use crate::off_runtime;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{Json, ToSql};
use postgres::{Client, GenericClient, NoTls, Transaction};
use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Migrations: number, name, SQL. Append only; never edit one released.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "control state", include_str!("../migrations/0001_control_state.sql")),
    (2, "usage minutes", include_str!("../migrations/0002_usage_minutes.sql")),
    (3, "nodes", include_str!("../migrations/0003_nodes.sql")),
    (4, "node queues", include_str!("../migrations/0004_node_queues.sql")),
];

/// The advisory lock migrations hold ("gpuwasm" in ASCII).
const MIGRATION_LOCK: i64 = 0x0067_7075_7761_736d;

/// The channel commits notify.
const CHANNEL: &str = "gpuwasm_control";

/// How long a connection attempt waits, unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long checking a kept connection waits.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The control state in a PostgreSQL database.
pub struct PgStore {
    connection: Connection,
    /// Tells the listener thread to end.
    stop: Arc<AtomicBool>,
}

/// One connection, made when first needed and again after it is lost.
struct Connection {
    config: postgres::Config,
    /// `None` until connected, and after a connection is lost.
    client: Mutex<Option<Client>>,
}

impl PgStore {
    /// Connects to the database `url` names (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// or `host=... user=...`) and brings its schema up to date.
    pub fn connect(url: &str) -> Result<PgStore, Error> {
        let mut config: postgres::Config = url.parse().map_err(|e| Error::Store(format!("the URL is not usable: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let store = PgStore { connection: Connection::new(config), stop: Arc::new(AtomicBool::new(false)) };
        store.connection.with_client(migrate)?;
        Ok(store)
    }

    /// Usage records in the same database, on a connection of their own.
    pub(crate) fn usage(&self) -> PgUsage {
        PgUsage { connection: Connection::new(self.connection.config.clone()) }
    }

    /// The directory of nodes in the same database, on a connection of
    /// its own.
    pub(crate) fn nodes(&self) -> PgNodes {
        PgNodes { connection: Connection::new(self.connection.config.clone()) }
    }

    fn with_client<T: Send>(&self, f: impl FnOnce(&mut Client) -> Result<T, Error> + Send) -> Result<T, Error> {
        self.connection.with_client(f)
    }
}

impl Connection {
    fn new(config: postgres::Config) -> Connection {
        Connection { config, client: Mutex::new(None) }
    }

    /// Runs `f` with a connected client, on a thread of its own. A kept
    /// client is checked first (one round trip), so a database restarted
    /// since its last use costs a new connection, not a failed call. A
    /// client whose connection broke is dropped (there too: dropping one
    /// drives its runtime).
    fn with_client<T: Send>(&self, f: impl FnOnce(&mut Client) -> Result<T, Error> + Send) -> Result<T, Error> {
        // A panic in `f` poisons the lock: the client it held is dropped
        // below, and the next call connects again.
        let mut guard = self.client.lock().unwrap_or_else(|poisoned| {
            let mut guard = poisoned.into_inner();
            if let Some(client) = guard.take() {
                off_runtime(move || drop(client));
            }
            guard
        });
        let slot: &mut Option<Client> = &mut guard;
        off_runtime(|| {
            let kept = slot.take().and_then(|mut client| client.is_valid(CHECK_TIMEOUT).is_ok().then_some(client));
            let client = match kept {
                Some(client) => slot.insert(client),
                None => slot.insert(self.config.connect(NoTls).map_err(store_error)?),
            };
            let outcome = f(client);
            if client.is_closed() {
                *slot = None;
            }
            outcome
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(client) = self.client.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            off_runtime(move || drop(client));
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn store_error(e: postgres::Error) -> Error {
    let message = match (e.as_db_error(), std::error::Error::source(&e)) {
        (Some(db), _) => db.to_string(),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    };
    Error::Store(message)
}

/// Applies the migrations the database lacks.
fn migrate(client: &mut Client) -> Result<(), Error> {
    let mut txn = client.transaction().map_err(store_error)?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(store_error)?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS gpuwasm_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .map_err(store_error)?;
    let applied: i32 = txn.query_one("SELECT coalesce(max(version), 0) FROM gpuwasm_migrations", &[]).map_err(store_error)?.get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if applied > known {
        return Err(Error::NewerSchema { found: applied, known });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
        txn.batch_execute(sql).map_err(|e| Error::Store(format!("migration {version} ({name}): {}", store_error(e))))?;
        txn.execute("INSERT INTO gpuwasm_migrations (version, name) VALUES ($1, $2)", &[version, name]).map_err(store_error)?;
        tracing::info!(version, name, "control store migrated");
    }
    txn.commit().map_err(store_error)
}

/// The records one query returns, from its first column.
fn records<T: DeserializeOwned>(client: &mut impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<T>, Error> {
    let rows = client.query(sql, params).map_err(store_error)?;
    rows.iter()
        .map(|row| row.try_get::<_, Json<T>>(0).map(|json| json.0).map_err(|e| Error::Store(format!("a record of `{sql}`: {e}"))))
        .collect()
}

fn revision_of(client: &mut impl GenericClient) -> Result<u64, Error> {
    let revision: i64 = client.query_one("SELECT revision FROM gpuwasm_revision", &[]).map_err(store_error)?.get(0);
    Ok(revision as u64)
}

/// Writes one change.
fn apply(txn: &mut Transaction, change: &Change) -> Result<(), Error> {
    let mut run = |sql: &str, params: &[&(dyn ToSql + Sync)]| txn.execute(sql, params).map(drop).map_err(store_error);
    match change {
        Change::Tenant(t) => run(
            "INSERT INTO gpuwasm_tenants (name, record) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET record = excluded.record",
            &[&t.name, &Json(t)],
        ),
        Change::Token(t) => run(
            "INSERT INTO gpuwasm_tokens (id, record) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
            &[&t.id, &Json(t)],
        ),
        Change::Deployment(d) => run(
            "INSERT INTO gpuwasm_deployments (tenant, name, record) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, name) DO UPDATE SET record = excluded.record",
            &[&d.tenant, &d.name, &Json(d)],
        ),
        // Versions are immutable: storing one twice is an error.
        Change::Version(v) => run(
            "INSERT INTO gpuwasm_versions (tenant, name, version, record) VALUES ($1, $2, $3, $4)",
            &[&v.tenant, &v.name, &(v.version as i64), &Json(v)],
        ),
        Change::Model(m) => run(
            "INSERT INTO gpuwasm_models (namespace, name, record) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, name) DO UPDATE SET record = excluded.record",
            &[&m.namespace, &m.name, &Json(m)],
        ),
        Change::RemoveModel(namespace, name) => run("DELETE FROM gpuwasm_models WHERE namespace = $1 AND name = $2", &[namespace, name]),
        Change::RemoveVersion(tenant, name, version) => run(
            "DELETE FROM gpuwasm_versions WHERE tenant = $1 AND name = $2 AND version = $3",
            &[tenant, name, &(*version as i64)],
        ),
        Change::RemoveDeployment(tenant, name) => {
            run("DELETE FROM gpuwasm_versions WHERE tenant = $1 AND name = $2", &[tenant, name])?;
            run("DELETE FROM gpuwasm_deployments WHERE tenant = $1 AND name = $2", &[tenant, name])
        }
    }
}

impl ControlStore for PgStore {
    fn load(&self) -> Result<ControlState, Error> {
        self.with_client(|client| {
            let mut txn = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(store_error)?;
            let state = ControlState {
                revision: revision_of(&mut txn)?,
                tenants: records(&mut txn, "SELECT record FROM gpuwasm_tenants ORDER BY name", &[])?,
                tokens: records(&mut txn, "SELECT record FROM gpuwasm_tokens ORDER BY id", &[])?,
                deployments: records(&mut txn, "SELECT record FROM gpuwasm_deployments ORDER BY tenant, name", &[])?,
                versions: records(&mut txn, "SELECT record FROM gpuwasm_versions ORDER BY tenant, name, version", &[])?,
                models: records(&mut txn, "SELECT record FROM gpuwasm_models ORDER BY namespace, name", &[])?,
            };
            txn.commit().map_err(store_error)?;
            Ok(state)
        })
    }

    fn revision(&self) -> Result<u64, Error> {
        self.with_client(revision_of)
    }

    fn commit(&self, base: u64, changes: &[Change]) -> Result<u64, Error> {
        self.with_client(|client| {
            let mut txn = client.transaction().map_err(store_error)?;
            // The row lock makes concurrent commits wait for each other; the
            // one that waited finds the revision moved and changes nothing.
            let sql = "UPDATE gpuwasm_revision SET revision = revision + 1 WHERE revision = $1 RETURNING revision";
            let Some(row) = txn.query_opt(sql, &[&(base as i64)]).map_err(store_error)? else {
                let now = revision_of(&mut txn)?;
                return Err(Error::Conflict(format!("the state is at revision {now}, the change was made at {base}")));
            };
            let revision: i64 = row.get(0);
            for change in changes {
                apply(&mut txn, change)?;
            }
            txn.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &revision.to_string()]).map_err(store_error)?;
            txn.commit().map_err(store_error)?;
            Ok(revision as u64)
        })
    }

    fn watch(&self, changed: Arc<tokio::sync::Notify>) -> Result<bool, Error> {
        let (config, stop) = (self.connection.config.clone(), self.stop.clone());
        std::thread::Builder::new()
            .name("gpuwasm-pg-listen".into())
            .spawn(move || listen(&config, &stop, &changed))
            .map_err(|e| Error::Store(format!("starting the thread that listens for changes: {e}")))?;
        Ok(true)
    }
}

/// Every node's usage, per minute, in the control store's database.
pub(crate) struct PgUsage {
    connection: Connection,
}

impl SharedUsage for PgUsage {
    fn append(&self, lines: &[MinuteLine]) -> Result<(), Error> {
        self.connection.with_client(|client| {
            let mut txn = client.transaction().map_err(store_error)?;
            let insert = txn.prepare("INSERT INTO gpuwasm_usage_minutes (minute, tenant, line) VALUES ($1, $2, $3)").map_err(store_error)?;
            for line in lines {
                txn.execute(&insert, &[&(line.minute as i64), &line.tenant, &Json(line)]).map_err(store_error)?;
            }
            txn.commit().map_err(store_error)
        })
    }

    fn since(&self, minute: u64, tenant: Option<&str>) -> Result<Vec<MinuteLine>, Error> {
        self.connection.with_client(|client| {
            let sql = "SELECT line FROM gpuwasm_usage_minutes WHERE minute >= $1 AND ($2::text IS NULL OR tenant = $2)";
            records(client, sql, &[&(minute as i64), &tenant])
        })
    }

    fn forget_before(&self, minute: u64) -> Result<u64, Error> {
        self.connection.with_client(|client| {
            client.execute("DELETE FROM gpuwasm_usage_minutes WHERE minute < $1", &[&(minute as i64)]).map_err(store_error)
        })
    }
}

/// A node as the directory knows it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NodeRow {
    pub id: String,
    pub url: String,
    /// Content keys of the models resident on it.
    pub models: Vec<String>,
    pub load: Load,
}

/// How busy a node is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Load {
    /// Instances running.
    pub running: u64,
    /// Requests waiting for an instance.
    pub queued: u64,
}

impl Load {
    pub(crate) fn total(self) -> u64 {
        self.running + self.queued
    }
}

/// The nodes sharing the database (`gpuwasm_nodes`).
pub(crate) struct PgNodes {
    connection: Connection,
}

impl PgNodes {
    /// Writes `me`, removes rows not written for a minute, and reads the
    /// other nodes written within `fresh`.
    pub(crate) fn beat(&self, me: &NodeRow, fresh: Duration) -> Result<Vec<NodeRow>, Error> {
        self.connection.with_client(|client| {
            let upsert = "INSERT INTO gpuwasm_nodes (id, url, models, load, queued, seen_at) VALUES ($1, $2, $3, $4, $5, now())
                          ON CONFLICT (id) DO UPDATE SET url = excluded.url, models = excluded.models, load = excluded.load,
                          queued = excluded.queued, seen_at = now()";
            let (load, queued) = (me.load.total() as i64, me.load.queued as i64);
            client.execute(upsert, &[&me.id, &me.url, &Json(&me.models), &load, &queued]).map_err(store_error)?;
            client.execute("DELETE FROM gpuwasm_nodes WHERE seen_at < now() - interval '1 minute'", &[]).map_err(store_error)?;
            let sql = "SELECT id, url, models, load, queued FROM gpuwasm_nodes WHERE id <> $1 AND seen_at > now() - make_interval(secs => $2)";
            let rows = client.query(sql, &[&me.id, &fresh.as_secs_f64()]).map_err(store_error)?;
            rows.iter()
                .map(|row| {
                    let models: Json<Vec<String>> = row.try_get(2).map_err(|e| Error::Store(format!("a node's models: {e}")))?;
                    let (total, queued) = (row.get::<_, i64>(3) as u64, row.get::<_, i64>(4) as u64);
                    let load = Load { running: total.saturating_sub(queued), queued };
                    Ok(NodeRow { id: row.get(0), url: row.get(1), models: models.0, load })
                })
                .collect()
        })
    }
}

/// Listens for commits until `stop`, connecting again after a lost
/// connection (and then notifying, as notices may have been missed).
fn listen(config: &postgres::Config, stop: &AtomicBool, changed: &tokio::sync::Notify) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let connected = config.connect(NoTls).and_then(|mut client| client.batch_execute(&format!("LISTEN {CHANNEL}")).map(|()| client));
        let mut client = match connected {
            Ok(client) => client,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %store_error(e), "cannot listen for control changes; retrying every second");
                }
                failing = true;
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if failing {
            tracing::info!("listening for control changes again");
        }
        failing = false;
        changed.notify_one();
        while !stop.load(Ordering::Relaxed) {
            match client.notifications().timeout_iter(Duration::from_secs(1)).next() {
                Ok(Some(_)) => changed.notify_one(),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %store_error(e), "lost the connection that listens for control changes");
                    break;
                }
            }
        }
    }
}
