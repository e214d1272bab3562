//! Several nodes over one shared state: the two control stores (embedded
//! redb, PostgreSQL) held to one contract, the two blob stores (a
//! directory, S3) likewise, and `gpuwasm serve` nodes that share a real
//! PostgreSQL 15 and blobs in a real S3-compatible server (s3s-fs) or one
//! directory, all started here on loopback: what one node changes, the
//! others serve; concurrent changes through different nodes; PostgreSQL
//! going away and coming back; a node killed with SIGKILL.

mod support;
#[path = "test_models.rs"]
mod test_models;

use bytes::Bytes;
use gpuwasm::nn::TenantGpu;
use gpuwasm_server::control_store::{
    Change, ControlState, ControlStore, DeploymentState, ModelRecord, RedbStore, TenantLimits, TenantRecord, TokenRecord, VersionRecord,
};
use gpuwasm_server::blobs::{BlobStore, LocalBlobStore};
use gpuwasm_server::postgres_store::PgStore;
use gpuwasm_server::s3_blobs::S3BlobStore;
use gpuwasm_server::{DeploymentSpec, Error};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::*;

const HELLO: &str = "hello from gpuwasm! you asked for GET /\n";

fn tenant(name: &str) -> TenantRecord {
    TenantRecord { name: name.into(), created_at: 1, domains: Vec::new(), gpu: TenantGpu::default(), limits: TenantLimits::default() }
}

fn version(tenant: &str, name: &str, n: u64) -> VersionRecord {
    VersionRecord {
        tenant: tenant.into(),
        name: name.into(),
        version: n,
        sha256: format!("sha-{n}"),
        snapshot_sha256: None,
        size_bytes: n,
        spec: DeploymentSpec::default(),
        deployed_at: n,
        deployed_by: "t".into(),
    }
}

/// Runs one sequence of commits on a fresh `store`, checking what each
/// leaves; returns the final state.
fn keeps_the_contract(store: &dyn ControlStore, kind: &str) -> ControlState {
    let fresh = store.load().unwrap();
    assert!(fresh.tenants.is_empty() && fresh.versions.is_empty() && fresh.models.is_empty(), "{kind}: a fresh store is empty");
    let mut revision = fresh.revision;
    let mut commit = |changes: &[Change]| {
        let next = store.commit(revision, changes).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(next, revision + 1, "{kind}: each commit raises the revision by one");
        revision = next;
    };

    // Records are stored, and replaced whole.
    let mut acme = tenant("acme");
    let token = TokenRecord { id: "tok".into(), tenant: "acme".into(), sha256: "h".into(), admin: false, created_at: 1, revoked_at: None };
    commit(&[Change::Tenant(acme.clone()), Change::Token(token.clone())]);
    acme.domains = vec!["acme.example".into()];
    acme.limits.instances = Some(3);
    commit(&[Change::Tenant(acme.clone()), Change::Token(TokenRecord { revoked_at: Some(9), ..token })]);

    // Versions of two deployments whose names share a prefix; one forgotten,
    // then a whole deployment.
    let mut changes: Vec<Change> = (1..=3).map(|n| Change::Version(version("acme", "app", n))).collect();
    changes.push(Change::Version(version("acme", "app2", 1)));
    changes.push(Change::Deployment(DeploymentState { tenant: "acme".into(), name: "app".into(), active: Some(3), latest: 3 }));
    changes.push(Change::Deployment(DeploymentState { tenant: "acme".into(), name: "app2".into(), active: Some(1), latest: 1 }));
    commit(&changes);
    commit(&[Change::RemoveVersion("acme".into(), "app".into(), 1)]);
    let numbers = |state: &ControlState| state.versions.iter().map(|v| (v.name.clone(), v.version)).collect::<Vec<_>>();
    assert_eq!(numbers(&store.load().unwrap()), [("app".into(), 2), ("app".into(), 3), ("app2".into(), 1)], "{kind}");
    commit(&[Change::RemoveDeployment("acme".into(), "app".into())]);

    // Models, one removed.
    let model = |name: &str| ModelRecord {
        namespace: "acme".into(),
        name: name.into(),
        format: gpuwasm_tensor::Format::Onnx,
        files: [("model.onnx".to_string(), "f".repeat(64))].into(),
        size_bytes: 10,
        summary: "s".into(),
        pushed_at: 1,
    };
    commit(&[Change::Model(model("kept")), Change::Model(model("gone"))]);
    commit(&[Change::RemoveModel("acme".into(), "gone".into())]);

    // A commit made on an older revision is refused whole.
    let err = store.commit(revision - 1, &[Change::Tenant(tenant("late")), Change::Model(model("late"))]).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{kind}: {err}");
    assert_eq!(store.revision().unwrap(), revision, "{kind}: a refused commit leaves the revision");

    let state = store.load().unwrap();
    assert_eq!(state.revision, revision, "{kind}");
    assert_eq!(state.tenants, [acme], "{kind}");
    assert_eq!(state.tokens.len(), 1, "{kind}");
    assert_eq!(state.tokens[0].revoked_at, Some(9), "{kind}");
    assert_eq!(numbers(&state), [("app2".to_string(), 1)], "{kind}: app2 shares the prefix `acme/app` and stays");
    assert_eq!(state.deployments.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["app2"], "{kind}");
    assert_eq!(state.models, [model("kept")], "{kind}");
    state
}

#[test]
fn both_control_stores_keep_one_contract() {
    let dir = tempfile::tempdir().unwrap();
    let redb = keeps_the_contract(&RedbStore::open(&dir.path().join("state.redb")).unwrap(), "redb");
    let Some(pg) = Postgres::start() else { return };
    let postgres = keeps_the_contract(&PgStore::connect(&pg.url()).unwrap(), "postgres");
    assert_eq!(
        (redb.tenants, redb.tokens, redb.deployments, redb.versions, redb.models),
        (postgres.tenants, postgres.tokens, postgres.deployments, postgres.versions, postgres.models),
        "both stores end with the same records"
    );
}

/// Nodes starting together apply each migration once; of commits made on
/// one revision through different connections exactly one wins; a
/// database migrated by a newer gpuwasm is refused.
#[test]
fn postgres_store_migrates_once_and_lets_one_of_concurrent_commits_win() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.url();
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let connecting: Vec<_> = (0..4).map(|_| s.spawn(|| PgStore::connect(&url))).collect();
        connecting.into_iter().map(|c| c.join().unwrap().unwrap_or_else(|e| panic!("{e}"))).collect()
    });
    assert_eq!(pg.sql("SELECT version, name FROM gpuwasm_migrations ORDER BY version"), "1|control state\n2|usage minutes\n3|nodes\n4|node queues\n");

    let base = stores[0].revision().unwrap();
    let outcomes: Vec<Result<u64, Error>> = std::thread::scope(|s| {
        let committing: Vec<_> =
            stores.iter().enumerate().map(|(i, store)| s.spawn(move || store.commit(base, &[Change::Tenant(tenant(&format!("t{i}")))]))).collect();
        committing.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let won: Vec<usize> = outcomes.iter().enumerate().filter(|(_, o)| o.is_ok()).map(|(i, _)| i).collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    for outcome in &outcomes {
        assert!(matches!(outcome, Ok(_) | Err(Error::Conflict(_))), "{outcome:?}");
    }
    let names: Vec<String> = stores[3].load().unwrap().tenants.into_iter().map(|t| t.name).collect();
    assert_eq!(names, [format!("t{}", won[0])]);

    pg.sql("INSERT INTO gpuwasm_migrations (version, name) VALUES (99, 'from the future')");
    let err = PgStore::connect(&url).err().expect("a newer schema must be refused");
    assert!(err.to_string().contains("migration 99") && err.to_string().contains("upgrade"), "{err}");
}

/// Runs one sequence of blob operations on a fresh `store`, checking each.
fn keeps_the_blob_contract(store: &dyn BlobStore, scratch: &std::path::Path, kind: &str) {
    let (one, two) = (b"one".as_slice(), b"two".as_slice());
    let (key_one, key_two) = (format!("files/acme/{}", sha256(one)), format!("components/{}.wasm", sha256(two)));
    assert!(!store.contains(&key_one).unwrap() && store.get(&key_one).unwrap().is_none(), "{kind}");
    store.put(&key_one, one).unwrap();
    store.put(&key_one, one).unwrap();
    store.put(&key_two, two).unwrap();
    assert_eq!(store.get(&key_one).unwrap().as_deref(), Some(one), "{kind}");
    assert!(store.contains(&key_two).unwrap(), "{kind}");
    assert!(store.put("../escape", b"x").is_err() && store.get("a//b").is_err(), "{kind}: keys are plain names");

    // A file larger than two upload parts, streamed and given back whole.
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    let key_big = format!("models/acme/{}", sha256(&big));
    let upload = scratch.join(format!("upload-{kind}"));
    std::fs::write(&upload, &big).unwrap();
    store.put_file(&key_big, &upload).unwrap();
    assert!(!upload.exists(), "{kind}: the upload is consumed");
    assert!(store.get(&key_big).unwrap().unwrap() == big, "{kind}: the 20 MiB blob reads back the same");

    let mut listed: Vec<(String, u64)> = store.list("files/").unwrap().into_iter().chain(store.list("models/").unwrap()).map(|b| (b.key, b.size)).collect();
    listed.sort();
    assert_eq!(listed, [(key_one.clone(), 3), (key_big.clone(), 20 << 20)], "{kind}");
    let fresh = store.list("components/").unwrap()[0].stored_at.elapsed().unwrap_or_default();
    assert!(fresh < Duration::from_secs(60), "{kind}: stored_at is the time it was stored");
    assert!(store.list("nothing/").unwrap().is_empty(), "{kind}");
    store.delete(&key_one).unwrap();
    store.delete(&key_one).unwrap();
    assert!(!store.contains(&key_one).unwrap(), "{kind}");
}

#[test]
fn both_blob_stores_keep_one_contract() {
    let dir = tempfile::tempdir().unwrap();
    keeps_the_blob_contract(&LocalBlobStore::open(dir.path().join("blobs")).unwrap(), dir.path(), "directory");
    // A shared directory is often another file system than the node's
    // uploads (a network file system): /dev/shm stands for one here.
    use std::os::unix::fs::MetadataExt;
    match tempfile::tempdir_in("/dev/shm") {
        Ok(other) if std::fs::metadata(other.path()).unwrap().dev() != std::fs::metadata(dir.path()).unwrap().dev() => {
            keeps_the_blob_contract(&LocalBlobStore::open(other.path().join("blobs")).unwrap(), dir.path(), "directory on another file system");
        }
        _ => eprintln!("SKIPPED: no /dev/shm on another file system than {}: uploads into another file system not checked", dir.path().display()),
    }
    let Some(s3) = S3::start() else { return };
    let store = S3BlobStore::open("s3://gpuwasm/node-blobs", s3.env()).unwrap_or_else(|e| panic!("{e}"));
    keeps_the_blob_contract(&store, dir.path(), "s3");

    // A blob changed behind the store's back is refused, never served.
    let key = format!("files/acme/{}", sha256(b"two"));
    store.put(&key, b"two").unwrap();
    std::fs::write(s3.file(&format!("node-blobs/{key}")), b"tw0").unwrap();
    let err = store.get(&key).unwrap_err().to_string();
    assert!(err.contains(&sha256(b"tw0")) && err.contains("not the one its key names"), "{err}");

    // A wrong setting fails at open, naming the URL.
    let wrong: Vec<(String, String)> = s3.env().into_iter().map(|(k, v)| if k == "AWS_SECRET_ACCESS_KEY" { (k, "wrong".into()) } else { (k, v) }).collect();
    let err = S3BlobStore::open("s3://gpuwasm/x", wrong).err().expect("a wrong secret must fail").to_string();
    assert!(err.contains("s3://gpuwasm/x"), "{err}");
    let err = S3BlobStore::open("s3:///x", s3.env()).err().expect("no bucket").to_string();
    assert!(err.contains("names no bucket"), "{err}");
}

/// `n` nodes sharing `pg` and one blob directory in `dir`.
fn nodes(dir: &tempfile::TempDir, pg: &Postgres, n: usize) -> Vec<Server> {
    let blobs = dir.path().join("blobs");
    (0..n).map(|i| node(&dir.path().join(format!("node-{i}")), pg, &blobs)).collect()
}

fn node(data_dir: &std::path::Path, pg: &Postgres, blobs: &std::path::Path) -> Server {
    Server::start_with(data_dir, &["--state", &pg.url(), "--blobs", blobs.to_str().unwrap()])
}

/// A node sharing `pg` and the blobs under `s3://gpuwasm/blobs` of `s3`.
fn s3_node(data_dir: &std::path::Path, pg: &Postgres, s3: &S3) -> Server {
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let flags = ["--state", &pg.url(), "--blobs", "s3://gpuwasm/blobs"];
    Server::start_under(data_dir, Launch { flags: &flags, env: &env, ..Launch::default() })
}

/// Calls `check` every 10 ms until it gives `Ok`, for up to 10 s (what
/// nodes learn of each other's changes takes about a second); then fails
/// with the last `Err`, which says what was still wrong.
async fn eventually<T, F: std::future::Future<Output = Result<T, String>>>(mut check: impl FnMut() -> F) -> T {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) => assert!(start.elapsed() < Duration::from_secs(10), "after 10 s: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `url` answers `status` with `body`; how long it took.
async fn until_answers(url: &str, status: u16, body: &str) -> Duration {
    let start = Instant::now();
    eventually(|| async {
        let reply = get(url).await;
        match reply.status == status && reply.body == body {
            true => Ok(start.elapsed()),
            false => Err(format!("{url} still answers {} {:?}", reply.status, reply.body)),
        }
    })
    .await
}

async fn deploy(server: &Server, token: &str, name: &str, wasm_name: &str) -> (u16, serde_json::Value) {
    let bytes = std::fs::read(wasm(wasm_name)).unwrap();
    server.api(token, "PUT", &format!("deployments/{name}"), bytes).await
}

/// Three nodes over PostgreSQL and S3.
#[tokio::test]
async fn what_one_node_changes_the_others_serve() {
    let Some(pg) = Postgres::start() else { return };
    let Some(s3) = S3::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|name| s3_node(&dir.path().join(name), &pg, &s3));
    let url = |node: &Server| format!("{}/default/app/", node.url);

    assert_eq!(deploy(&a, TOKEN, "app", "hello").await.0, 201);
    for (name, node) in [("B", &b), ("C", &c)] {
        let took = until_answers(&url(node), 200, HELLO).await;
        eprintln!("a deploy through A answered on {name} {} ms after A acknowledged it", took.as_millis());
        assert!(took < Duration::from_secs(1), "{name} answered {} ms after the deploy: the goal is within a second", took.as_millis());
    }

    assert_eq!(deploy(&b, TOKEN, "app", "behaviors").await.0, 200);
    for node in [&a, &c] {
        until_answers(&url(node), 200, "behaviors ok").await;
    }
    let (status, json) = c.api(TOKEN, "POST", "deployments/app/rollback", Bytes::new()).await;
    assert_eq!((status, json["version"].as_u64()), (200, Some(1)), "{json}");
    for node in [&a, &b] {
        until_answers(&url(node), 200, HELLO).await;
    }

    // A tenant made on B: its token works on A, and its deployment serves on C.
    let acme = b.tenant("acme").await;
    let deployed = eventually(|| async {
        match deploy(&a, &acme, "api", "hello").await {
            (401, _) => Err("A does not know acme's token".to_string()),
            answer => Ok(answer),
        }
    })
    .await;
    assert_eq!(deployed.0, 201, "{}", deployed.1);
    until_answers(&format!("{}/acme/api/", c.url), 200, HELLO).await;

    // A model pushed through B loads on A, where a deployment using it is
    // deployed and called.
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx");
    stdout_of(&b.cli(&["model", "push", "digits", model.to_str().unwrap()]));
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/gpuwasm.toml");
    let out = a.cli(&["deploy", wasm("classify").to_str().unwrap(), "--manifest", manifest.to_str().unwrap()]);
    stdout_of(&out);
    let reference: serde_json::Value = serde_json::from_str(include_str!("fixtures/digits-reference.json")).unwrap();
    let body = serde_json::json!({ "images": [reference["images"][0]] }).to_string();
    let classify = format!("{}/default/classify/classify", a.url);
    let reply = eventually(|| async {
        match send("POST", &classify, &[], body.clone()).await {
            reply if reply.status == 404 => Err(format!("A does not serve classify: {}", reply.body)),
            reply => Ok(reply),
        }
    })
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let predicted: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(predicted["predictions"][0]["digit"], reference["labels"][0], "{}", reply.body);

    // Removed on A: the others stop serving it.
    assert_eq!(a.api(TOKEN, "DELETE", "deployments/app", Bytes::new()).await.0, 200);
    for node in [&b, &c] {
        until_answers(&url(node), 404, "no deployment serves /default/app/\n").await;
    }
}

#[tokio::test]
async fn concurrent_deploys_through_two_nodes_get_versions_1_to_n() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes(&dir, &pg, 2);
    let bytes = Bytes::from(std::fs::read(wasm("hello")).unwrap());
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (url, bytes) = (format!("{}/_gpuwasm/v1/deployments/app", nodes[i % 2].url), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let reply = send("PUT", &url, &[("authorization", &format!("Bearer {TOKEN}"))], bytes).await;
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            (reply.status, json)
        }));
    }
    let mut versions = BTreeSet::new();
    for task in tasks {
        let (status, json) = task.await.unwrap();
        assert!(status == 200 || status == 201, "{status} {json}");
        versions.insert(json["version"].as_u64().unwrap());
    }
    assert_eq!(versions, (1..=8).collect(), "no gaps, no duplicates");
    for node in &nodes {
        eventually(|| async {
            let (_, json) = node.api(TOKEN, "GET", "deployments/app/versions", Bytes::new()).await;
            let listed: BTreeSet<u64> = json["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
            if listed == versions { Ok(()) } else { Err(format!("{} lists {listed:?}", node.url)) }
        })
        .await;
    }
}

/// PostgreSQL killed and started again under load: every request is
/// answered from the nodes' state; changes fail cleanly while it is down
/// and succeed once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_postgres_nodes_keep_serving_and_changes_fail_until_it_returns() {
    let Some(mut pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = <[Server; 2]>::try_from(nodes(&dir, &pg, 2)).ok().unwrap();
    assert_eq!(deploy(&a, TOKEN, "app", "hello").await.0, 201);
    until_answers(&format!("{}/default/app/", b.url), 200, HELLO).await;

    // Load on both nodes, from before PostgreSQL goes until after it is back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop) = (format!("{}/default/app/", [&a, &b][i % 2].url), stop.clone());
            tokio::spawn(async move {
                let mut answered = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = get(&url).await;
                    assert_eq!(reply.status, 200, "{url}: {}", reply.body);
                    answered += 1;
                }
                answered
            })
        })
        .collect();

    pg.kill();
    for node in [&a, &b] {
        for _ in 0..20 {
            assert_eq!(get(&format!("{}/default/app/", node.url)).await.body, HELLO, "served from the state loaded last");
        }
    }
    let (status, json) = deploy(&a, TOKEN, "app", "behaviors").await;
    assert_eq!((status, json["error"]["code"].as_str()), (503, Some("state_unavailable")), "{json}");
    let (status, _) = b.api(TOKEN, "POST", "tenants", r#"{"name":"acme"}"#).await;
    assert_eq!(status, 503);
    for node in [&a, &b] {
        assert_eq!(get(&format!("{}/default/app/", node.url)).await.body, HELLO, "a failed change changes nothing");
    }

    pg.run();
    let (status, json) = deploy(&b, TOKEN, "app", "behaviors").await;
    assert_eq!((status, json["version"].as_u64()), (200, Some(2)), "{json}");
    let took = until_answers(&format!("{}/default/app/", a.url), 200, "behaviors ok").await;
    eprintln!("after PostgreSQL came back, a deploy through B answered on A {} ms after B acknowledged it", took.as_millis());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for task in load {
        answered += task.await.unwrap();
    }
    eprintln!("{answered} requests under load, all answered 200, while PostgreSQL was killed and started again");
    assert!(answered > 100, "only {answered} requests made under load");
}

#[tokio::test]
async fn a_node_killed_with_sigkill_loses_nothing_acknowledged() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = (node(&a_dir, &pg, &blobs), node(&b_dir, &pg, &blobs));
    assert_eq!(deploy(&a, TOKEN, "app", "hello").await.0, 201);
    assert_eq!(deploy(&a, TOKEN, "app", "behaviors").await.0, 200);
    a.kill();
    until_answers(&format!("{}/default/app/", b.url), 200, "behaviors ok").await;

    // The node's data directory is its own: a second node on it is refused.
    let out = gpuwasm()
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN, "--state", &pg.url(), "--data-dir"])
        .arg(&b_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("in use by another process"), "{stderr}");

    let a = node(&a_dir, &pg, &blobs);
    assert_eq!(get(&format!("{}/default/app/", a.url)).await.body, "behaviors ok");
    let (_, json) = a.api(TOKEN, "GET", "deployments/app/versions", Bytes::new()).await;
    assert_eq!((json["active"].as_u64(), json["versions"].as_array().unwrap().len()), (Some(2), 2), "{json}");
}

/// The Kubernetes manifests (deploy/kubernetes, base and overlays) render,
/// validate strictly against Kubernetes' schemas, and match this gpuwasm:
/// its `serve` flags and settings, /health, and the metric the autoscaler
/// reads from a real server's /metrics (scripts/check-kubernetes.py).
#[tokio::test]
async fn kubernetes_manifests_validate_and_match_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_address();
    let server = Server::start_with(&dir.path().join("data"), &["--metrics-listen", &metrics]);
    server.deploy("app", "hello", &[]);
    assert_eq!(get(&format!("{}/default/app/", server.url)).await.body, HELLO);
    let scrape = get(&format!("http://{metrics}/metrics")).await;
    assert_eq!(scrape.status, 200);
    std::fs::write(dir.path().join("metrics.txt"), scrape.body).unwrap();
    let help = gpuwasm().args(["serve", "--help"]).output().unwrap();
    std::fs::write(dir.path().join("serve-help.txt"), stdout_of(&help)).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check-kubernetes.py");
    let out = python()
        .arg(script)
        .arg("--serve-help")
        .arg(dir.path().join("serve-help.txt"))
        .arg("--metrics")
        .arg(dir.path().join("metrics.txt"))
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(report.contains("base: 6 objects") && report.contains("overlays/gpu: 6 objects"), "{report}");
}

/// Usage metered on each node is reported through any node; what a node
/// metered while PostgreSQL was down reaches it once it is back.
#[tokio::test]
async fn usage_through_any_node_counts_every_nodes_requests() {
    let Some(mut pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [a, b] = <[Server; 2]>::try_from(nodes(&dir, &pg, 2)).ok().unwrap();
    assert_eq!(deploy(&a, TOKEN, "app", "hello").await.0, 201);
    until_answers(&format!("{}/default/app/", b.url), 200, HELLO).await;
    for (node, n) in [(&a, 30), (&b, 19)] {
        for _ in 0..n {
            assert_eq!(get(&format!("{}/default/app/", node.url)).await.status, 200);
        }
    }
    // 50 requests answered: 30 through A, 1 + 19 through B. Each node
    // writes its lines every second.
    for node in [&a, &b] {
        until_reported(node, 50).await;
    }

    pg.kill();
    for _ in 0..10 {
        assert_eq!(get(&format!("{}/default/app/", a.url)).await.status, 200, "serving does not need PostgreSQL");
    }
    let (status, json) = a.api(TOKEN, "GET", "usage?since=1h", Bytes::new()).await;
    assert_eq!((status, json["error"]["code"].as_str()), (503, Some("state_unavailable")), "{json}");
    pg.run();
    until_reported(&b, 60).await;
}

/// Waits (up to 10 s) until `node`'s usage report counts `n` requests of
/// `default/app`; fails if it counts more.
async fn until_reported(node: &Server, n: u64) {
    eventually(|| async {
        let (status, json) = node.api(TOKEN, "GET", "usage?since=1h&by=deployment", Bytes::new()).await;
        assert_eq!(status, 200, "{json}");
        let rows = json["rows"].as_array().unwrap();
        let counted = rows.iter().find(|r| r["key"] == "default/app").map_or(0, |r| r["requests"].as_u64().unwrap());
        assert!(counted <= n, "{} counts {counted} requests, more than the {n} answered", node.url);
        if counted == n { Ok(()) } else { Err(format!("{} counts {counted} requests of {n}", node.url)) }
    })
    .await;
}

/// Model-aware routing: once the digits model is resident on A, requests
/// for the classifier through B and C are served by A, and neither B nor C
/// loads it; a request already forwarded once is served where it lands.
#[tokio::test]
async fn requests_go_to_the_node_that_holds_their_model() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = <[Server; 3]>::try_from(nodes(&dir, &pg, 3)).ok().unwrap();
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/digits.onnx");
    stdout_of(&a.cli(&["model", "push", "digits", model.to_str().unwrap()]));
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/classify/gpuwasm.toml");
    stdout_of(&a.cli(&["deploy", wasm("classify").to_str().unwrap(), "--manifest", manifest.to_str().unwrap()]));
    let reference: serde_json::Value = serde_json::from_str(include_str!("fixtures/digits-reference.json")).unwrap();
    let body = serde_json::json!({ "images": [reference["images"][0]] }).to_string();
    let classify = |node: &Server| format!("{}/default/classify/classify", node.url);
    let resident = |node: &Server| {
        let node_url = node.url.clone();
        async move {
            let reply = send("GET", &format!("{node_url}/_gpuwasm/v1/resident-models"), &[("authorization", &format!("Bearer {TOKEN}"))], Bytes::new()).await;
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            json["models"].as_array().unwrap().len()
        }
    };

    // Nobody holds the model: A, as loaded as anyone, loads it itself.
    let reply = send("POST", &classify(&a), &[], body.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.headers.get("gpuwasm-served-by").is_none(), "served by A itself");
    assert_eq!(resident(&a).await, 1);

    // Wait until A's row says it holds the model, then for B and C to read it.
    eventually(|| async {
        match pg.sql("SELECT count(*) FROM gpuwasm_nodes WHERE jsonb_array_length(models) > 0").trim() {
            "1" => Ok(()),
            n => Err(format!("{n} nodes say they hold a model, not A alone")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut hops = Vec::new();
    for node in [&b, &c] {
        for _ in 0..10 {
            let start = Instant::now();
            let reply = send("POST", &classify(node), &[], body.clone()).await;
            hops.push(start.elapsed());
            assert_eq!(reply.status, 200, "{}", reply.body);
            let predicted: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(predicted["predictions"][0]["digit"], reference["labels"][0]);
            assert!(reply.headers.get("gpuwasm-served-by").is_some(), "{} forwarded it", node.url);
        }
        assert_eq!(resident(node).await, 0, "{} never loaded the model", node.url);
    }
    hops.sort();
    eprintln!("20 requests through B and C served by A: median {} us", hops[10].as_micros());

    // A forwarding header a client made up is not taken for a node's.
    let forged = send("POST", &classify(&b), &[("gpuwasm-forwarded-by", "0123abcd not-the-mac")], body.clone()).await;
    assert_eq!(forged.status, 200, "{}", forged.body);
    assert!(forged.headers.get("gpuwasm-served-by").is_some(), "a forged header is ignored: B still forwards");
    assert_eq!(resident(&b).await, 0);

    // Already forwarded once by a node: served where it lands, loading the
    // model there.
    let header = forwarded_by("another-node");
    let reply = send("POST", &classify(&b), &[("gpuwasm-forwarded-by", &header)], body.clone()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.headers.get("gpuwasm-served-by").is_none());
    assert_eq!(resident(&b).await, 1);
}

/// The forwarding header node `id` of these tests' nodes would send (keyed
/// with the admin token they share; server/src/routing.rs).
fn forwarded_by(id: &str) -> String {
    format!("{id} {}", sha256(format!("gpuwasm-forwarded-by\n{TOKEN}\n{id}").as_bytes()))
}

/// A benchmark, not run by CI (scripts/bench-routing.sh runs it): three
/// nodes over PostgreSQL serve the embeddings example over MiniLM. Once A
/// holds the model, requests through B and C are forwarded to A; then the
/// same requests, marked as forwarded already, make B and C load it
/// themselves. Prints the cold loads each way and what a hop costs
/// against a cold load.
#[tokio::test]
#[ignore = "a benchmark: scripts/bench-routing.sh"]
async fn bench_routing() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = <[Server; 3]>::try_from(nodes(&dir, &pg, 3)).ok().unwrap();
    let minilm = test_models::model_path("minilm");
    stdout_of(&a.cli(&["model", "push", "minilm", minilm.to_str().unwrap()]));
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/embeddings/gpuwasm.toml");
    stdout_of(&a.cli(&["deploy", wasm("embeddings").to_str().unwrap(), "--manifest", manifest.to_str().unwrap()]));
    let body = r#"{"model": "minilm", "input": "the quick brown fox jumps over the lazy dog"}"#;
    let header = forwarded_by("benchmark");
    let embed = |node: &Server, local: bool| {
        let url = format!("{}/default/embeddings/v1/embeddings", node.url);
        let headers: Vec<(&str, String)> = if local { vec![("gpuwasm-forwarded-by", header.clone())] } else { Vec::new() };
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let start = Instant::now();
            let reply = send("POST", &url, &headers, body).await;
            assert_eq!(reply.status, 200, "{}", reply.body);
            (start.elapsed(), reply.headers.contains_key("gpuwasm-served-by"))
        }
    };
    let cold_a = embed(&a, true).await.0;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let rounds = 200;
    let (mut direct, mut hop) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let (took, forwarded) = embed(&a, false).await;
        assert!(!forwarded);
        direct.push(took);
        let (took, forwarded) = embed(if i % 2 == 0 { &b } else { &c }, false).await;
        assert!(forwarded, "B and C forward to A");
        hop.push(took);
    }
    let loads_routed = model_loads(&[&a, &b, &c]).await;
    let cold_b = embed(&b, true).await.0;
    let cold_c = embed(&c, true).await.0;
    let loads_local = model_loads(&[&a, &b, &c]).await;
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[v.len() * p / 100].as_secs_f64() * 1000.0
    };
    let (d50, d99, h50, h99) = (pct(&mut direct, 50), pct(&mut direct, 99), pct(&mut hop, 50), pct(&mut hop, 99));
    println!("routing benchmark: 3 nodes, embeddings over MiniLM, {rounds} requests direct to A and {rounds} through B and C");
    println!("  cold loads with routing: {loads_routed} (A only); serving on every node: {loads_local}; avoided: {}", loads_local - loads_routed);
    println!("  a cold load (first request on a node): A {:.1} ms, B {:.1} ms, C {:.1} ms", ms(cold_a), ms(cold_b), ms(cold_c));
    println!("  direct to A: p50 {d50:.2} ms, p99 {d99:.2} ms");
    println!("  through B or C (one hop to A): p50 {h50:.2} ms, p99 {h99:.2} ms");
    println!("  the hop adds {:.2} ms at p50 ({:.2}x direct)", h50 - d50, h50 / d50);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How many nodes of `nodes` hold a model resident.
async fn model_loads(nodes: &[&Server]) -> usize {
    let mut loads = 0;
    for node in nodes {
        let (_, json) = node.api(TOKEN, "GET", "resident-models", Bytes::new()).await;
        loads += json["models"].as_array().unwrap().len();
    }
    loads
}
