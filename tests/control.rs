//! The control plane end to end: tenants and their isolation, tokens,
//! versions and rollback, concurrent deploys, restarts and kill -9.

mod support;

use bytes::Bytes;
use std::collections::BTreeSet;
use std::time::Duration;
use support::*;

/// Calls the admin API with `token`; returns (status, JSON body).
async fn api(server: &Server, token: &str, method: &str, path: &str, body: impl Into<Bytes>) -> (u16, serde_json::Value) {
    server.api(token, method, path, body).await
}

/// Deploys `wasm_name` as `name` with `token`; returns (status, JSON body).
async fn deploy(server: &Server, token: &str, name: &str, wasm_name: &str) -> (u16, serde_json::Value) {
    let bytes = std::fs::read(wasm(wasm_name)).unwrap();
    api(server, token, "PUT", &format!("deployments/{name}"), bytes).await
}

/// Creates tenant `name` with the admin token; returns its token.
async fn tenant(server: &Server, name: &str) -> String {
    server.tenant(name).await
}

const HELLO: &str = "hello from gpuwasm! you asked for GET /\n";

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_deployments() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let (a, b) = (tenant(&server, "acme").await, tenant(&server, "bravo").await);
    assert_eq!(deploy(&server, &a, "secret", "hello").await.0, 201);

    // Every way b could reach acme's deployment answers exactly as for a
    // name that exists nowhere.
    let attempts = [
        ("GET", "deployments/{}"),
        ("GET", "deployments/{}/versions"),
        ("POST", "deployments/{}/rollback"),
        ("POST", "deployments/{}/rollback?to=1"),
        ("DELETE", "deployments/{}"),
    ];
    for (method, path) in attempts {
        let theirs = api(&server, &b, method, &path.replace("{}", "secret"), Bytes::new()).await;
        let nobodys = api(&server, &b, method, &path.replace("{}", "nosuch"), Bytes::new()).await;
        assert_eq!(theirs.0, 404, "{method} {path}: {}", theirs.1);
        assert_eq!(theirs.1.to_string().replace("secret", "X"), nobodys.1.to_string().replace("nosuch", "X"), "{method} {path}");
    }
    let (_, listed) = api(&server, &b, "GET", "deployments", Bytes::new()).await;
    assert_eq!(listed["deployments"], serde_json::json!([]));

    // b's own "secret" is another deployment; acme's is untouched.
    let (status, mine) = deploy(&server, &b, "secret", "behaviors").await;
    assert_eq!((status, mine["tenant"].as_str(), mine["version"].as_u64()), (201, Some("bravo"), Some(1)));
    assert_eq!(get(&format!("{}/acme/secret/", server.url)).await.body, HELLO);
    assert_eq!(get(&format!("{}/bravo/secret/", server.url)).await.body, "behaviors ok");
    let (_, acme) = api(&server, &a, "GET", "deployments/secret/versions", Bytes::new()).await;
    assert_eq!(acme["versions"].as_array().unwrap().len(), 1);

    // Tenants cannot manage tenants, nor other tenants' tokens.
    assert_eq!(api(&server, &b, "POST", "tenants", r#"{"name":"evil"}"#).await.0, 403);
    assert_eq!(api(&server, &b, "GET", "tenants", Bytes::new()).await.0, 403);
    assert_eq!(api(&server, &b, "POST", "tokens?tenant=acme", Bytes::new()).await.0, 403);
    let acme_token_id = a.split('_').nth(1).unwrap();
    assert_eq!(api(&server, &b, "DELETE", &format!("tokens/{acme_token_id}"), Bytes::new()).await.0, 404);
    assert_eq!(api(&server, &a, "GET", "whoami", Bytes::new()).await.0, 200, "acme's token still works");
}

#[tokio::test]
async fn missing_wrong_and_revoked_tokens_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let first = tenant(&server, "acme").await;
    let (status, second) = api(&server, &first, "POST", "tokens", Bytes::new()).await;
    assert_eq!(status, 201);
    let second = second["token"].as_str().unwrap().to_string();
    let first_id = first.split('_').nth(1).unwrap();
    assert_eq!(api(&server, &second, "DELETE", &format!("tokens/{first_id}"), Bytes::new()).await.0, 200);

    let url = format!("{}/_gpuwasm/v1/deployments", server.url);
    let bad = [None, Some("Bearer ".to_string()), Some("Bearer nonsense".into()), Some("Bearer gwt_0000_0000".into()),
               Some(format!("Bearer {first}")), Some(format!("Bearer {second}x")), Some(second.clone())];
    for auth in bad {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = send("GET", &url, &headers, Bytes::new()).await;
        assert_eq!(reply.status, 401, "{auth:?}");
        assert!(reply.body.contains(r#""code": "unauthorized""#), "{}", reply.body);
    }
    let (status, me) = api(&server, &second, "GET", "whoami", Bytes::new()).await;
    assert_eq!((status, me["tenant"].as_str()), (200, Some("acme")));
    let (_, tokens) = api(&server, &second, "GET", "tokens", Bytes::new()).await;
    let tokens = tokens["tokens"].as_array().unwrap();
    let revoked = |id: &str| tokens.iter().find(|t| t["id"] == id).map(|t| !t["revoked_at"].is_null());
    let second_id = second.split('_').nth(1).unwrap();
    assert_eq!((tokens.len(), revoked(first_id), revoked(second_id)), (2, Some(true), Some(false)));
    let secret = second.rsplit('_').next().unwrap();
    assert!(!serde_json::to_string(tokens).unwrap().contains(secret), "token secrets are never listed");
}

#[tokio::test]
async fn versions_roll_back_and_in_flight_requests_finish_on_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    assert_eq!(deploy(&server, TOKEN, "app", "hello").await.0, 201);
    assert_eq!(deploy(&server, TOKEN, "app", "behaviors").await.0, 200);
    let url = format!("{}/default/app/", server.url);
    assert_eq!(get(&url).await.body, "behaviors ok");

    // A slow request on version 2, then a rollback while it runs.
    let slow_url = format!("{url}sleep?ms=1500");
    let in_flight = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = server.cli(&["rollback", "app"]);
    assert_eq!(stdout_of(&out).lines().next().unwrap(), format!("default/app now serves version 1 (sha256 {})", &sha(&server, "app", 1).await[..12]));
    assert_eq!(get(&url).await.body, HELLO, "new requests reach version 1 at once");
    assert_eq!(in_flight.await.unwrap().body, "slept", "the running request finished on version 2");

    let out = stdout_of(&server.cli(&["versions", "app"]));
    assert!(out.contains("      1* ") && out.contains("      2  "), "{out}");
    stdout_of(&server.cli(&["rollback", "app", "--to", "2"]));
    assert_eq!(get(&url).await.body, "behaviors ok");
    let (status, json) = api(&server, TOKEN, "POST", "deployments/app/rollback?to=9", Bytes::new()).await;
    assert_eq!((status, json["error"]["message"].as_str()), (404, Some("deployment 'app' has no version 9")));

    // Removal keeps the history; a rollback brings it back.
    stdout_of(&server.cli(&["rm", "app"]));
    assert_eq!(get(&url).await.status, 404);
    stdout_of(&server.cli(&["rollback", "app", "--to", "1"]));
    assert_eq!(get(&url).await.body, HELLO);
    assert_eq!(deploy(&server, TOKEN, "app", "hello").await.1["version"], 3, "numbering continues");
}

async fn sha(server: &Server, name: &str, version: u64) -> String {
    let (_, json) = api(server, TOKEN, "GET", &format!("deployments/{name}/versions"), Bytes::new()).await;
    let v = json["versions"].as_array().unwrap().iter().find(|v| v["version"] == version).unwrap().clone();
    v["sha256"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn concurrent_deploys_of_one_name_get_distinct_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let bytes = Bytes::from(std::fs::read(wasm("hello")).unwrap());
    let url = format!("{}/_gpuwasm/v1/deployments/app", server.url);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (url, bytes) = (url.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let reply = send("PUT", &url, &[("authorization", &format!("Bearer {TOKEN}"))], bytes).await;
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            (reply.status, json["version"].as_u64().unwrap())
        }));
    }
    let mut statuses = Vec::new();
    let mut versions = BTreeSet::new();
    for t in tasks {
        let (status, version) = t.await.unwrap();
        statuses.push(status);
        versions.insert(version);
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 201]);
    assert_eq!(versions, (1..=6).collect());
    let (_, json) = api(&server, TOKEN, "GET", "deployments/app/versions", Bytes::new()).await;
    assert_eq!((json["active"].as_u64(), json["versions"].as_array().unwrap().len()), (Some(6), 6));
}

#[tokio::test]
async fn restart_keeps_tenants_tokens_versions_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_in(&data);
    let a = tenant(&server, "acme").await;
    deploy(&server, &a, "app", "hello").await;
    deploy(&server, &a, "app", "behaviors").await;
    api(&server, &a, "POST", "deployments/app/rollback", Bytes::new()).await;
    server.kill();

    let server = Server::start_in(&data);
    assert_eq!(get(&format!("{}/acme/app/", server.url)).await.body, HELLO);
    let (status, json) = api(&server, &a, "GET", "deployments/app/versions", Bytes::new()).await;
    assert_eq!((status, json["active"].as_u64(), json["versions"].as_array().unwrap().len()), (200, Some(1), 2));
}

/// Kills the server with SIGKILL at varying moments of deploys, again and
/// again: every acknowledged deploy is there after the restart, and every
/// version there loads and serves (never a half deployment), the last
/// round's included.
#[tokio::test]
async fn kill_9_during_deploys_never_loses_or_half_applies_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let components = ["hello", "behaviors", "stateful"];
    let bodies = [HELLO, "behaviors ok", "built-by-init,entry-0,entry-1,entry-2"];
    let mut acknowledged = BTreeSet::new();
    // Kill moments from "at once" to "long after": compiling a new
    // component takes a few hundred ms here, a cached one a few ms.
    let delays_ms = [0, 5, 20, 60, 150, 400, 1500];
    // What is there after a restart: every acknowledged version, and each
    // version listed loads and serves its own component.
    let check = async |server: &Server, round: u64, acknowledged: &BTreeSet<u64>| -> BTreeSet<u64> {
        let (_, json) = api(server, TOKEN, "GET", "deployments/app/versions", Bytes::new()).await;
        let listed: BTreeSet<u64> = json["versions"].as_array().map_or(BTreeSet::new(), |vs| vs.iter().map(|v| v["version"].as_u64().unwrap()).collect());
        assert!(acknowledged.is_subset(&listed), "round {round}: acknowledged {acknowledged:?}, listed {listed:?}");
        let active = json["active"].as_u64();
        let mut serving = active;
        for &version in &listed {
            if serving != Some(version) {
                serving = Some(version);
                let (status, body) = api(server, TOKEN, "POST", &format!("deployments/app/rollback?to={version}"), Bytes::new()).await;
                assert_eq!(status, 200, "round {round}: rollback to {version}: {body}");
            }
            let reply = get(&format!("{}/default/app/", server.url)).await;
            let component = (version - 1) as usize % components.len();
            assert_eq!((reply.status, reply.body.as_str()), (200, bodies[component]), "round {round}, version {version}");
        }
        if let (Some(active), Some(&last)) = (active, listed.last()) {
            if active != last {
                api(server, TOKEN, "POST", &format!("deployments/app/rollback?to={active}"), Bytes::new()).await;
            }
        }
        listed
    };
    for round in 0..14u64 {
        let server = Server::start_in(&data);
        let listed = check(&server, round, &acknowledged).await;
        // Deploy the next version and kill the server at some moment of it.
        let next = listed.last().copied().unwrap_or(0) + 1;
        let bytes = Bytes::from(std::fs::read(wasm(components[(next - 1) as usize % components.len()])).unwrap());
        let url = format!("{}/_gpuwasm/v1/deployments/app", server.url);
        let deploying = tokio::spawn(async move {
            let request = http::Request::put(&url)
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(http_body_util::Full::new(bytes))
                .unwrap();
            match client().request(request).await {
                Ok(response) if response.status().is_success() => true,
                _ => false,
            }
        });
        tokio::time::sleep(Duration::from_millis(delays_ms[round as usize % delays_ms.len()])).await;
        server.kill();
        if deploying.await.unwrap() {
            acknowledged.insert(next);
        }
    }
    // The last round's kill is checked too.
    let server = Server::start_in(&data);
    check(&server, 14, &acknowledged).await;
    eprintln!("kill -9 loop: {} of 14 deploys acknowledged before their kill", acknowledged.len());
    assert!(!acknowledged.is_empty(), "no deploy finished before a kill; the test proves nothing");
    assert!(acknowledged.len() < 14, "every deploy finished before its kill; no kill landed mid-deploy");
}

#[tokio::test]
async fn files_are_served_read_only_and_nothing_outside_them_is_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_in(&data);
    let app = dir.path().join("app");
    std::fs::create_dir_all(app.join("static/sub")).unwrap();
    std::fs::copy(wasm("behaviors"), app.join("handler.wasm")).unwrap();
    std::fs::write(app.join("static/hello.txt"), "hi from a file").unwrap();
    std::fs::write(app.join("static/sub/data.json"), "{}").unwrap();
    std::fs::write(app.join("gpuwasm.toml"), "name = \"site\"\n[files]\ndir = \"static\"\n").unwrap();
    stdout_of(&server.cli(&["deploy", app.join("handler.wasm").to_str().unwrap()]));

    let read = |path: &str| {
        let url = format!("{}/default/site/read?{path}", server.url);
        async move { get(&url).await.body }
    };
    assert_eq!(read("/hello.txt").await, "hi from a file");
    assert_eq!(read("/sub/data.json").await, "{}");
    for outside in ["/../../../../etc/passwd", "/sub/../../etc/passwd", "/etc/passwd", "../hello.txt"] {
        let body = read(outside).await;
        assert!(body.starts_with("error:"), "{outside}: {body}");
    }
    let written = get(&format!("{}/default/site/write?/new.txt", server.url)).await.body;
    assert!(written.starts_with("error:"), "the tree is read-only: {written}");

    // A symlink planted inside the tree on the server's disk still cannot
    // lead outside it.
    let trees = data.join("files/trees/default");
    let tree = std::fs::read_dir(&trees).unwrap().next().unwrap().unwrap().path();
    std::os::unix::fs::symlink("/etc/passwd", tree.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../../../..", tree.join("up")).unwrap();
    for path in ["/escape", "/up/etc/passwd"] {
        let body = read(path).await;
        assert!(body.starts_with("error:"), "{path}: {body}");
    }

    // Without [files] nothing is preopened at all.
    assert_eq!(deploy(&server, TOKEN, "bare", "behaviors").await.0, 201);
    let body = get(&format!("{}/default/bare/read?/etc/passwd", server.url)).await.body;
    assert!(body.starts_with("error:"), "{body}");

    // The files survive a restart.
    server.kill();
    let server = Server::start_in(&data);
    assert_eq!(get(&format!("{}/default/site/read?/hello.txt", server.url)).await.body, "hi from a file");

    // The CLI refuses to upload a symlink rather than follow it.
    std::os::unix::fs::symlink("/etc/passwd", app.join("static/link")).unwrap();
    let out = server.cli(&["deploy", app.join("handler.wasm").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a regular file"), "{out:?}");
}

/// docs/openapi.json and the server agree: every documented operation
/// exists and answers only with documented statuses, errors have the
/// documented shape, other methods on documented paths get 405, and every
/// `$ref` resolves.
#[tokio::test]
async fn the_openapi_document_matches_the_server() {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap()).unwrap();
    fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_str()) {
                        ("$ref", Some(r)) => out.push(r),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        assert!(doc.pointer(r.trim_start_matches('#')).is_some(), "dangling $ref {r}");
    }

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let empty_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let methods = ["get", "post", "put", "delete", "patch"];
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{name}", "probe").replace("{id}", "probe").replace("{sha256}", empty_sha);
        let url = format!("{}/_gpuwasm/v1{concrete}", server.url);
        for method in methods {
            let reply = send(&method.to_uppercase(), &url, &[("authorization", &format!("Bearer {TOKEN}"))], Bytes::new()).await;
            let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("{method} {path}: {}", reply.body));
            if reply.status >= 400 {
                assert!(json["error"]["code"].is_string() && json["error"]["message"].is_string(), "{method} {path}: {json}");
            }
            match item.get(method) {
                Some(op) => {
                    let documented = op["responses"].as_object().unwrap();
                    assert!(documented.contains_key(&reply.status.to_string()), "{method} {path} answered undocumented {}: {json}", reply.status);
                    assert_ne!(json["error"]["message"], "no such admin endpoint", "{method} {path}");
                }
                None => assert_eq!((reply.status, json["error"]["code"].as_str()), (405, Some("method_not_allowed")), "{method} {path}"),
            }
        }
    }
}
