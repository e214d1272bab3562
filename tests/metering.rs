//! Metering and observability end to end: usage measured against
//! independent clocks, usage and cost through the CLI and the admin API,
//! tenants kept apart, inference counted against the CPU limit, request
//! rate quotas, Prometheus metrics parsed by Prometheus's own Python
//! client, trace context and JSON logs.

mod support;
#[path = "test_models.rs"]
mod test_models;

use serde_json::Value;
use std::time::Duration;
use support::{Server, TOKEN, free_address, get, python, send, stdout_of};
use test_models::model_path;

/// The JSON usage report the CLI prints for `args`, as `token`.
fn usage(server: &Server, token: &str, args: &[&str]) -> Value {
    settle();
    let mut all = vec!["usage", "--json"];
    all.extend_from_slice(args);
    let out = server.cli_as(token, &all);
    assert!(out.status.success(), "gpuwasm usage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout_of(&out)).unwrap()
}

/// Waits for the records of requests just answered: a request's record is
/// made once its instance is torn down, which may be after the client has
/// the whole response.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn row<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["rows"].as_array().unwrap().iter().find(|r| r["key"] == key).unwrap_or_else(|| panic!("no row {key} in {report}"))
}

/// Guest CPU is metered within 1% of the CPU time the kernel counted for
/// the server's request thread (its tokio worker's scheduler counter), over
/// a run where the guest computes 5 s in 5 requests one after another; what
/// else that thread does (HTTP, routing) is well under that 1% (0.1%
/// measured). The server runs one worker thread here so that the kernel's
/// count is the requests' alone: with several, each of a guest's epoch
/// yields (one per 5 ms) can wake an idle worker to look for work, about
/// 30 us of CPU on this VM (0.6% of a busy guest's CPU) that no request is
/// charged (docs/usage.md). The whole process is printed beside it: the
/// node's background threads (the epoch ticker) are nobody's request.
/// Inference is metered within 1% of the time the guest measured around
/// its compute calls with its own clock, and the calls are counted
/// exactly.
#[tokio::test]
async fn guest_cpu_and_inference_are_metered_within_one_percent_of_independent_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_under(&dir.path().join("data"), support::Launch { env: &[("TOKIO_WORKER_THREADS", "1")], ..Default::default() });
    server.deploy("burner", "behaviors", &["--cpu-ms", "2000"]);
    let url = format!("{}/default/burner/burn?ms=1000", server.url);
    assert_eq!(get(&url).await.status, 200, "a warm-up request");
    tokio::time::sleep(Duration::from_millis(1500)).await; // its record written
    let before = usage(&server, TOKEN, &["--since", "1h"]);
    let metered_before = row(&before, "default/burner")["guest_cpu_us"].as_u64().unwrap();

    let (workers_before, process_before) = (server.worker_cpu_seconds(), server.cpu_seconds());
    for _ in 0..5 {
        let reply = get(&url).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let (workers, process) = (server.worker_cpu_seconds() - workers_before, server.cpu_seconds() - process_before);
    let after = usage(&server, TOKEN, &["--since", "1h"]);
    let burner = row(&after, "default/burner");
    let metered = (burner["guest_cpu_us"].as_u64().unwrap() - metered_before) as f64 / 1e6;
    let error = (metered - workers).abs() / workers;
    eprintln!(
        "guest CPU: metered {metered:.3} s, request threads {workers:.3} s ({:.2}% apart), whole process {process:.3} s",
        error * 100.0
    );
    // The guest spins for 5 s of wall time; other tests share the cores
    // (a fresh-clone CI run got 2.35 s). 1.5 s keeps 1% at 15 ms or more.
    assert!(workers > 1.5, "the guests burned only {workers} s of CPU");
    assert!(error < 0.01, "metered {metered:.3} s against {workers:.3} s of request threads' CPU");
    assert_eq!(burner["requests"], 6);
    assert_eq!(burner["outcomes"]["ok"], 6);
    assert!(burner["inference_calls"] == 0 && burner["gb_seconds"].as_f64().unwrap() > 0.0, "{burner}");

    // Inference: 12 computes of 64 sentences each.
    let minilm = model_path("minilm");
    stdout_of(&server.cli(&["model", "push", "minilm", minilm.to_str().unwrap()]));
    let manifest = dir.path().join("probe.toml");
    std::fs::write(&manifest, "name = \"probe\"\n[limits]\ncpu_ms = 10000\n[models]\nallow = [\"minilm\"]\n").unwrap();
    server.deploy("probe", "nn_probe", &["--manifest", manifest.to_str().unwrap()]);
    let sentences: String = (0..64).map(|i| format!("sentence number {i} about metering inference time\n")).collect();
    let url = format!("{}/default/probe/timed-embed-lines?minilm", server.url);
    let mut guest_ns = 0u64;
    for _ in 0..12 {
        let reply = send("POST", &url, &[], sentences.clone()).await;
        let ns = reply.body.strip_prefix("ok compute_ns ").unwrap_or_else(|| panic!("{}", reply.body));
        guest_ns += ns.parse::<u64>().unwrap();
    }
    let report = usage(&server, TOKEN, &["--since", "1h"]);
    let probe = row(&report, "default/probe");
    let metered = probe["inference_us"]["cpu"].as_u64().unwrap() as f64 / 1e6;
    let guest = guest_ns as f64 / 1e9;
    let error = (metered - guest).abs() / guest;
    eprintln!("inference: metered {metered:.4} s, the guest's clock {guest:.4} s ({:.2}% apart)", error * 100.0);
    assert!(error < 0.01, "metered {metered} s against {guest} s measured by the guest");
    assert_eq!((probe["requests"].as_u64(), probe["inference_calls"].as_u64()), (Some(12), Some(12)));
    assert!(probe["bytes_in"].as_u64().unwrap() == 12 * sentences.len() as u64, "{probe}");
    let models = usage(&server, TOKEN, &["--since", "1h", "--by", "model"]);
    assert_eq!(row(&models, "minilm")["requests"], 12);
}

/// The CPU limit covers inference: a request whose guest computes little
/// but whose inference runs past `cpu_ms` ends with the CPU limit's answer
/// (504), and is metered as having hit a limit.
#[tokio::test]
async fn inference_counts_against_the_cpu_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir);
    let minilm = model_path("minilm");
    stdout_of(&server.cli(&["model", "push", "minilm", minilm.to_str().unwrap()]));
    let manifest = dir.path().join("probe.toml");
    std::fs::write(&manifest, "name = \"probe\"\n[limits]\ncpu_ms = 30\n[models]\nallow = [\"minilm\"]\n").unwrap();
    server.deploy("probe", "nn_probe", &["--manifest", manifest.to_str().unwrap()]);
    let url = format!("{}/default/probe/embed-lines?minilm", server.url);
    // One short sentence fits; 4 computes of 256 take far more than 30 ms.
    let one = send("POST", &url, &[], "hello").await;
    assert!(one.status == 200 && one.body.starts_with("ok tokens"), "{} {}", one.status, one.body);
    let many: String = (0..256).map(|i| format!("a longer sentence, number {i}, so that the model has work to do\n")).collect();
    let reply = send("POST", &url, &[], many).await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(reply.body.contains("exceeded its CPU time limit of 30 ms"), "{}", reply.body);
    let report = usage(&server, TOKEN, &["--since", "1h"]);
    assert_eq!(row(&report, "default/probe")["outcomes"]["limit"], 1, "{report}");
}

/// Usage and cost per tenant: a tenant sees only its own requests and is
/// refused another's; the admin sees any tenant or all; cost follows the
/// server's price table; the dedicated comparison prints.
#[tokio::test]
async fn usage_and_cost_are_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.toml");
    std::fs::write(&prices, "cpu_second = 2.0\ngb_second = 0.5\nrequest = 0.001\n[gpu_second]\ndefault = 9.0\n").unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--prices", prices.to_str().unwrap()]);
    let (acme, other) = (server.tenant("acme").await, server.tenant("other").await);
    let hello = support::wasm("hello");
    for (token, n) in [(&acme, 3), (&other, 2)] {
        let out = server.cli_as(token, &["deploy", hello.to_str().unwrap(), "--name", "hello"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tenant = if n == 3 { "acme" } else { "other" };
        for _ in 0..n {
            assert_eq!(get(&format!("{}/{tenant}/hello/", server.url)).await.status, 200);
        }
    }
    let mine = usage(&server, &acme, &[]);
    assert_eq!(mine["tenant"], "acme");
    let rows = mine["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{mine}");
    assert_eq!((rows[0]["key"].as_str(), rows[0]["requests"].as_u64()), (Some("acme/hello"), Some(3)));
    // Cost: guest CPU seconds x 2.0 + GB-seconds x 0.5 + 3 requests x 0.001.
    let t = &mine["total"];
    let by_hand = t["guest_cpu_us"].as_f64().unwrap() / 1e6 * 2.0 + t["gb_seconds"].as_f64().unwrap() * 0.5 + 3.0 * 0.001;
    assert!((t["cost"].as_f64().unwrap() - by_hand).abs() < 1e-12, "{t} against {by_hand}");
    assert!(t["bytes_out"].as_u64().unwrap() > 0 && t["wall_us"].as_u64().unwrap() > 0, "{t}");

    // A tenant may not look at another, nor at all of them.
    for args in [&["--tenant", "other"][..], &["--all"]] {
        let out = server.cli_as(&acme, &[&["usage"][..], args].concat());
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("admin token"), "{args:?}: {out:?}");
    }
    // The admin sees any tenant, or every one.
    let theirs = usage(&server, TOKEN, &["--tenant", "other"]);
    assert_eq!(theirs["total"]["requests"], 2);
    let all = usage(&server, TOKEN, &["--all", "--by", "tenant"]);
    let keys: Vec<(&str, u64)> = all["rows"].as_array().unwrap().iter().map(|r| (r["key"].as_str().unwrap(), r["requests"].as_u64().unwrap())).collect();
    assert!(keys.contains(&("acme", 3)) && keys.contains(&("other", 2)), "{keys:?}");

    // The table and the comparison with a dedicated machine.
    let out = server.cli_as(&acme, &["usage", "--since", "1h", "--compare-dedicated", "568"]);
    let text = stdout_of(&out);
    assert!(text.contains("acme/hello") && text.contains("dedicated: 568.00 a month"), "{text}");
    assert!(text.contains("serverless costs as much as dedicated at"), "{text}");
    // Bad input: clear errors.
    let out = server.cli_as(&acme, &["usage", "--since", "yesterday"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("give a duration"), "{out:?}");
    let (status, body) = server.api(&acme, "GET", "usage?by=colour", "").await;
    assert_eq!(status, 400, "{body}");
}

/// Usage survives a restart: what was written is read back (the writer
/// syncs once a second; the server also flushes on a clean shutdown).
#[tokio::test]
async fn usage_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start_in(&data);
    server.deploy("hello", "hello", &[]);
    for _ in 0..4 {
        assert_eq!(get(&format!("{}/default/hello/", server.url)).await.status, 200);
    }
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let server = Server::start_in(&data);
    let report = usage(&server, TOKEN, &["--since", "1h"]);
    assert_eq!(row(&report, "default/hello")["requests"], 4, "{report}");
    let files: Vec<String> =
        std::fs::read_dir(data.join("usage")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(files.iter().any(|f| f.starts_with("requests-")) && files.iter().any(|f| f.starts_with("minutes-")), "{files:?}");
}

/// `GET /metrics` on --metrics-listen, read by the `prometheus_client`
/// package's OpenMetrics parser: request counters and latency histograms
/// move as requests are made; instances, queue depth and the metering
/// backlog are there. With --no-metering nothing is recorded and
/// `gpuwasm usage` says so.
#[tokio::test]
async fn prometheus_scrapes_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_address();
    let server = Server::start_with(&dir.path().join("data"), &["--metrics-listen", &metrics_addr]);
    server.deploy("hello", "hello", &[]);
    server.deploy("trapper", "behaviors", &[]);
    let scrape = |expect_ok: u64, expect_trap: u64| {
        settle();
        let script = r#"
import sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
with urllib.request.urlopen(sys.argv[1]) as r:
    assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers
    text = r.read().decode()
families = {f.name: f for f in text_string_to_metric_families(text)}
def value(family, suffix, **labels):
    for s in families[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None
ok = value("gpuwasm_requests", "_total", tenant="default", deployment="hello", outcome="ok")
trap = value("gpuwasm_requests", "_total", tenant="default", deployment="trapper", outcome="trap")
count = value("gpuwasm_request_duration_seconds", "_count", tenant="default", deployment="hello")
assert ok == float(sys.argv[2]), (ok, sys.argv[2])
assert trap == float(sys.argv[3]), (trap, sys.argv[3])
assert count == ok, (count, ok)
for name in ["gpuwasm_instances_running", "gpuwasm_metering_backlog", "gpuwasm_guest_cpu_seconds", "gpuwasm_model_loads"]:
    assert name in families, (name, sorted(families))
assert families["gpuwasm_requests"].type == "counter"
assert families["gpuwasm_request_duration_seconds"].type == "histogram"
print("scraped", ok, trap)
"#;
        let url = format!("http://{metrics_addr}/metrics");
        let out = python().args(["-c", script, &url, &expect_ok.to_string(), &expect_trap.to_string()]).output().unwrap();
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    };
    for _ in 0..5 {
        assert_eq!(get(&format!("{}/default/hello/", server.url)).await.status, 200);
    }
    assert_eq!(get(&format!("{}/default/trapper/trap", server.url)).await.status, 500);
    scrape(5, 1);
    for _ in 0..3 {
        get(&format!("{}/default/hello/", server.url)).await;
    }
    scrape(8, 1);
    assert_eq!(get(&format!("http://{metrics_addr}/other")).await.status, 404);

    let off = Server::start_with(&dir.path().join("off"), &["--no-metering"]);
    let out = off.cli(&["usage"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not meter requests"), "{out:?}");
}

/// Sends `n` GETs of `url` at once (they start now); their replies, in
/// order, once all are in.
fn burst(url: String, n: usize) -> impl std::future::Future<Output = Vec<support::Reply>> {
    let sent: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    async move {
        let mut replies = Vec::new();
        for reply in sent {
            replies.push(reply.await.unwrap());
        }
        replies
    }
}

/// A tenant's request rate, set by the admin: past a second's worth at
/// once, its requests get 429 with Retry-After, counted by reason in the
/// metrics; a second tenant sending as fast is unaffected; the quota
/// refills with time and can be removed. Tenants may not set it.
#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_429_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_address();
    let server = Server::start_with(&dir.path().join("data"), &["--metrics-listen", &metrics_addr]);
    let (acme, other) = (server.tenant("acme").await, server.tenant("other").await);
    let hello = support::wasm("hello");
    for token in [&acme, &other] {
        stdout_of(&server.cli_as(token, &["deploy", hello.to_str().unwrap(), "--name", "hello"]));
    }
    let set = stdout_of(&server.cli(&["tenant", "limits", "acme", "--requests-per-second", "5"]));
    assert!(set.contains("tenant acme: 5 req/s"), "{set}");
    let refused = server.cli_as(&acme, &["tenant", "limits", "acme", "--no-rate-limit"]);
    assert!(!refused.status.success(), "a tenant cannot lift its own quota: {refused:?}");
    assert!(stdout_of(&server.cli(&["tenant", "list"])).contains("5 req/s"));

    // 20 requests each, at once: acme gets its burst of 5 (a few more if
    // the bucket refills meanwhile), other gets all 20.
    let burst = |tenant: &str| burst(format!("{}/{tenant}/hello/", server.url), 20);
    let (acme_replies, other_replies) = tokio::join!(burst("acme"), burst("other"));
    let ok = acme_replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = acme_replies.iter().filter(|r| r.status == 429).collect();
    assert!((5..=8).contains(&ok) && ok + limited.len() == 20, "acme: {ok} answered, {} refused", limited.len());
    let first = limited[0];
    assert_eq!(first.headers["retry-after"], "1");
    assert!(first.body.contains("tenant 'acme' is over its quota of 5 requests per second"), "{}", first.body);
    assert!(other_replies.iter().all(|r| r.status == 200), "the other tenant is not limited");

    let metrics = get(&format!("http://{metrics_addr}/metrics")).await.body;
    let line = format!("gpuwasm_rejected_requests_total{{tenant=\"acme\",reason=\"rate\"}} {}", limited.len());
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");

    // A second later the quota has refilled; without a quota, no limit.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&format!("{}/acme/hello/", server.url)).await.status, 200);
    stdout_of(&server.cli(&["tenant", "limits", "acme", "--no-rate-limit"]));
    let replies = burst("acme").await;
    assert!(replies.iter().all(|r| r.status == 200), "no quota, no limit");
    let (status, body) = server.api(TOKEN, "PUT", "tenants/acme/limits", r#"{"requests_per_second": 0}"#).await;
    assert_eq!(status, 400, "{body}");
}

/// W3C trace context and JSON logs: a request with a `traceparent` keeps
/// its trace id, gets a span of its own (its request id) and answers with
/// both; the guest's outgoing request carries the trace; a request without
/// one starts a trace; with `--log-format json` every log line is a JSON
/// object, and a failing request's lines name its request id and trace.
#[tokio::test]
async fn requests_carry_a_trace_and_json_logs_name_them() {
    // An upstream that reports the traceparent each request brought.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    tokio::spawn(async move {
        loop {
            let (stream, _) = upstream.accept().await.unwrap();
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let _ = seen_tx.send(req.headers().get("traceparent").map(|v| v.to_str().unwrap().to_string()));
                    async { Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from("upstream")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let launch = support::Launch { flags: &["--log-format", "json"], log: Some(&log), ..Default::default() };
    let server = Server::start_under(&dir.path().join("data"), launch);
    let manifest = dir.path().join("beh.toml");
    std::fs::write(&manifest, format!("[outbound]\nallow = [\"{upstream_addr}\"]\n")).unwrap();
    server.deploy("beh", "behaviors", &["--manifest", manifest.to_str().unwrap()]);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace}-00f067aa0ba902b7-01");
    let url = format!("{}/default/beh/outbound?to={upstream_addr}", server.url);
    let reply = send("GET", &url, &[("traceparent", &incoming)], "").await;
    assert_eq!(reply.body, "allowed: status 200");
    let request_id = reply.headers["x-request-id"].to_str().unwrap().to_string();
    let returned = reply.headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(returned, format!("00-{trace}-{request_id}-01"));
    assert!(request_id.len() == 16 && request_id != "00f067aa0ba902b7", "{request_id}");
    assert_eq!(seen.recv().await.unwrap().as_deref(), Some(returned.as_str()), "the guest's outgoing request carries the trace");

    let fresh = get(&format!("{}/default/beh/", server.url)).await;
    let started = fresh.headers["traceparent"].to_str().unwrap();
    assert!(started.len() == 55 && started.starts_with("00-") && !started.contains(trace), "{started}");

    let trap = get(&format!("{}/default/beh/trap", server.url)).await;
    assert_eq!(trap.status, 500);
    let id = trap.headers["x-request-id"].to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let failed = lines.iter().find(|l| l["fields"]["message"] == "guest failed").unwrap_or_else(|| panic!("no guest failure in\n{text}"));
    assert_eq!(failed["span"]["id"], id.as_str(), "{failed}");
    assert!(failed["span"]["trace"].as_str().is_some_and(|t| t.len() == 32), "{failed}");
    assert!(failed["fields"]["guest_output"].as_str().unwrap().contains("deliberate trap"), "{failed}");
}

/// Quotas the admin sets per tenant: instances running at once (past
/// them, requests wait, then get 503 naming the tenant's share), active
/// deployments and storage. A second tenant doing the same is unaffected;
/// `--node-defaults` gives the node's quotas back; tenants may not set
/// their own.
#[tokio::test]
async fn admin_set_quotas_hold_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &[]);
    let (acme, other) = (server.tenant("acme").await, server.tenant("other").await);
    let behaviors = support::wasm("behaviors");
    for token in [&acme, &other] {
        let args = ["deploy", behaviors.to_str().unwrap(), "--name", "slow", "--concurrency", "8", "--queue-timeout-ms", "300"];
        stdout_of(&server.cli_as(token, &args));
    }
    let set = stdout_of(&server.cli(&["tenant", "limits", "acme", "--instances", "2", "--deployments", "1", "--storage-mb", "1"]));
    assert!(set.contains("tenant acme: no rate limit, 2 instances, 1 deployments, 1 MiB storage"), "{set}");
    let (status, body) = server.api(&acme, "PUT", "tenants/acme/limits", r#"{"instances": 100}"#).await;
    assert_eq!(status, 403, "a tenant cannot raise its own quota: {body}");

    // 5 requests of 1 s each at once: acme runs 2, the other 3 wait 300 ms
    // and are refused; the other tenant runs all 5.
    let burst = |tenant: &str| burst(format!("{}/{tenant}/slow/sleep?ms=1000", server.url), 5);
    let (acme_replies, other_replies) = tokio::join!(burst("acme"), burst("other"));
    let statuses = |replies: &[support::Reply]| replies.iter().map(|r| r.status).collect::<Vec<_>>();
    assert_eq!(acme_replies.iter().filter(|r| r.status == 200).count(), 2, "acme: {:?}", statuses(&acme_replies));
    let busy: Vec<_> = acme_replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(busy.len(), 3, "acme: {:?}", statuses(&acme_replies));
    assert!(busy[0].body.contains("already runs 2 instances"), "{}", busy[0].body);
    assert!(other_replies.iter().all(|r| r.status == 200), "other: {:?}", statuses(&other_replies));

    // One active deployment: a second is refused, for acme only.
    let hello = support::wasm("hello");
    let second = server.cli_as(&acme, &["deploy", hello.to_str().unwrap(), "--name", "second"]);
    assert!(String::from_utf8_lossy(&second.stderr).contains("has 1 active deployments, its quota"), "{second:?}");
    stdout_of(&server.cli_as(&other, &["deploy", hello.to_str().unwrap(), "--name", "second"]));

    // 1 MiB of storage, part of it the component already: a file smaller
    // than the quota, but not than what is left, is refused.
    let component = std::fs::metadata(&behaviors).unwrap().len() as usize;
    let file = vec![b'z'; (1 << 20) - component / 2];
    let sha = support::sha256(&file);
    let (status, json) = server.api(&acme, "PUT", &format!("files/{sha}"), file.clone()).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(server.api(&other, "PUT", &format!("files/{sha}"), file).await.0, 201);

    // Back to the node's quotas: all 5 run, and a second deployment deploys.
    let set = stdout_of(&server.cli(&["tenant", "limits", "acme", "--node-defaults"]));
    assert!(set.contains("instances: node's, deployments: node's, storage: node's"), "{set}");
    let replies = burst("acme").await;
    assert!(replies.iter().all(|r| r.status == 200), "acme: {:?}", statuses(&replies));
    stdout_of(&server.cli_as(&acme, &["deploy", hello.to_str().unwrap(), "--name", "second"]));
    let (status, body) = server.api(TOKEN, "PUT", "tenants/acme/limits", r#"{"instances": 0}"#).await;
    assert_eq!(status, 400, "{body}");
}

/// `gpuwasm logs`: what guests print to stdout and stderr, per request
/// with its id, and why requests failed; `--follow` prints new entries as
/// requests make them; `--json` gives one object a line. Two tenants with
/// deployments of the same name never see each other's logs.
#[tokio::test]
async fn guest_logs_per_request_followed_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &[]);
    let (acme, other) = (server.tenant("acme").await, server.tenant("other").await);
    let behaviors = support::wasm("behaviors");
    for token in [&acme, &other] {
        stdout_of(&server.cli_as(token, &["deploy", behaviors.to_str().unwrap(), "--name", "app"]));
    }
    let said = get(&format!("{}/acme/app/say?hello-acme", server.url)).await;
    assert_eq!(said.status, 200);
    let id = said.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(get(&format!("{}/acme/app/trap", server.url)).await.status, 500);
    assert_eq!(get(&format!("{}/other/app/say?hello-other", server.url)).await.status, 200);
    assert_eq!(get(&format!("{}/acme/app/", server.url)).await.status, 200, "prints nothing: no entry");

    let logs = stdout_of(&server.cli_as(&acme, &["logs", "app"]));
    assert!(logs.contains(&format!(" v1 {id} | out: hello-acme")) && logs.contains(&format!(" v1 {id} | err: hello-acme")), "{logs}");
    assert!(logs.contains("deliberate trap for the tests"), "the panic message: {logs}");
    assert!(logs.contains("! deployment 'app' failed:"), "why it failed: {logs}");
    assert!(!logs.contains("hello-other"), "another tenant's output: {logs}");
    assert_eq!(logs.lines().filter(|l| l.contains(" | ") || l.contains(" ! ")).count(), logs.lines().count());
    let theirs = stdout_of(&server.cli_as(&other, &["logs", "app"]));
    assert!(theirs.contains("out: hello-other") && !theirs.contains("acme"), "{theirs}");

    let json = stdout_of(&server.cli_as(&acme, &["logs", "app", "--json"]));
    let entries: Vec<Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries.len(), 2, "{json}");
    assert_eq!(entries[0]["request_id"], id.as_str());
    assert!(entries[0]["failure"].is_null() && entries[1]["failure"].as_str().unwrap().contains("failed"), "{json}");
    assert!(entries[0]["seq"].as_u64() < entries[1]["seq"].as_u64());

    // --follow prints what comes after it started.
    let mut follow = server.cli_command(&acme, &["logs", "app", "--follow"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&format!("{}/acme/app/say?later", server.url)).await.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.iter().any(|l: &String| l.contains("err: later")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => got.push(line),
            Err(_) => panic!("--follow did not print the new entry; it printed {got:?}"),
        }
    }
    follow.kill().unwrap();
    follow.wait().unwrap();

    // Purged, its logs go with it: a new deployment of the name starts empty.
    stdout_of(&server.cli_as(&acme, &["rm", "app", "--purge"]));
    stdout_of(&server.cli_as(&acme, &["deploy", behaviors.to_str().unwrap(), "--name", "app"]));
    assert_eq!(stdout_of(&server.cli_as(&acme, &["logs", "app"])), "", "the purged deployment's logs");
    assert!(stdout_of(&server.cli_as(&other, &["logs", "app"])).contains("out: hello-other"), "another tenant's are kept");

    let missing = server.cli_as(&acme, &["logs", "nope"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no deployment named 'nope'"), "{missing:?}");
    let (status, body) = server.api(&acme, "GET", "deployments/app/logs?after=x", "").await;
    assert_eq!(status, 400, "{body}");
}
