//! Helpers for the end-to-end tests: a real `gpuwasm serve` process on
//! 127.0.0.1 with an ephemeral port, the real CLI, and a real HTTP client.

#![allow(dead_code)] // each test binary uses a different subset

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const TOKEN: &str = "test-admin-token";

/// The guest components built by scripts/build-guests.sh.
pub fn wasm(name: &str) -> PathBuf {
    let dir = std::env::var_os("GPUWASM_TEST_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/build-guests.sh first (scripts/test.sh does)", path.display());
    path
}

/// The Python of the project's virtual environment (`target/venv`, made by
/// scripts/python-env.sh with the test tools), or `$GPUWASM_PYTHON`.
pub fn python() -> Command {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv/bin/python");
    let python = std::env::var_os("GPUWASM_PYTHON").map(PathBuf::from).unwrap_or(venv);
    assert!(python.exists(), "{} is missing: run scripts/python-env.sh first (scripts/test.sh does)", python.display());
    Command::new(python)
}

pub fn gpuwasm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpuwasm"))
}

/// A running `gpuwasm serve`, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on a fresh data directory inside `dir`.
    pub fn start(dir: &tempfile::TempDir) -> Server {
        Self::start_in(&dir.path().join("data"))
    }

    /// Starts a server on `data_dir` (which may hold earlier state).
    pub fn start_in(data_dir: &Path) -> Server {
        Self::start_with(data_dir, &[])
    }

    /// Starts a server on `data_dir` with extra `gpuwasm serve` flags.
    pub fn start_with(data_dir: &Path, flags: &[&str]) -> Server {
        Self::start_under(data_dir, Launch { flags, ..Launch::default() })
    }

    /// Starts a server on `data_dir` as `launch` says.
    pub fn start_under(data_dir: &Path, launch: Launch) -> Server {
        let Launch { flags, soft_nofile, env, log } = launch;
        // Enough instances for the tests that send hundreds of requests at once.
        let pool: &[&str] = if flags.contains(&"--max-instances") { &[] } else { &["--max-instances", "300"] };
        let mut command = match soft_nofile {
            None => gpuwasm(),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", &format!("ulimit -S -n {n} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_gpuwasm")]);
                sh
            }
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-token", TOKEN])
            .args(pool)
            .arg("--data-dir")
            .arg(data_dir)
            .args(flags)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("creating the server's log file")),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("starting gpuwasm serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("reading the listen line");
        let url = line
            .trim()
            .strip_prefix("gpuwasm listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from gpuwasm serve: {line:?}"))
            .to_string();
        Server { child, url, data_dir: data_dir.to_path_buf() }
    }

    /// Runs a gpuwasm CLI command against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        gpuwasm().args(args).env("GPUWASM_SERVER", &self.url).env("GPUWASM_TOKEN", TOKEN).output().expect("running gpuwasm")
    }

    /// Deploys `wasm_name` as `name` with extra CLI flags; panics on failure.
    pub fn deploy(&self, name: &str, wasm_name: &str, flags: &[&str]) {
        let file = wasm(wasm_name);
        let mut args = vec!["deploy", file.to_str().unwrap(), "--name", name];
        args.extend_from_slice(flags);
        let out = self.cli(&args);
        assert!(out.status.success(), "deploy {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
        kb * 1024
    }

    /// CPU time the server has used (user + system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) in parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    /// CPU time the server's tokio worker threads (and its long lane's)
    /// have used, in seconds, from the scheduler's nanosecond counters
    /// (/proc/PID/task/*/schedstat): the threads that run requests, without
    /// the node's own background threads (epoch ticker, metering writer,
    /// model schedulers).
    pub fn worker_cpu_seconds(&self) -> f64 {
        self.threads("tokio-").iter().chain(&self.threads("gpuwasm-long")).map(|t| t.cpu_seconds).sum()
    }

    /// The server's threads whose names start with `prefix`: their CPU
    /// time and nice value.
    pub fn threads(&self, prefix: &str) -> Vec<ThreadStat> {
        let mut threads = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let ns = schedstat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            // Fields after the command name (which may hold spaces) in
            // parentheses; nice is the 19th field of the line.
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let nice = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(16)?.parse().ok()).unwrap_or(0);
            threads.push(ThreadStat { cpu_seconds: ns as f64 / 1e9, nice });
        }
        threads
    }

    /// File descriptors the server holds open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }

    /// Runs a gpuwasm CLI command against this server with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.cli_command(token, args).output().expect("running gpuwasm")
    }

    /// A gpuwasm CLI command against this server with `token`, to start.
    pub fn cli_command(&self, token: &str, args: &[&str]) -> Command {
        let mut command = gpuwasm();
        command.args(args).env("GPUWASM_SERVER", &self.url).env("GPUWASM_TOKEN", token);
        command
    }

    /// Calls the admin API with `token`; returns (status, JSON body).
    pub async fn api(&self, token: &str, method: &str, path: &str, body: impl Into<Bytes>) -> (u16, serde_json::Value) {
        let url = format!("{}/_gpuwasm/v1/{path}", self.url);
        let reply = send(method, &url, &[("authorization", &format!("Bearer {token}"))], body).await;
        let json = serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", reply.body));
        (reply.status, json)
    }

    /// Creates tenant `name` with the admin token; returns its token.
    pub async fn tenant(&self, name: &str) -> String {
        let (status, json) = self.api(TOKEN, "POST", "tenants", format!(r#"{{"name":"{name}"}}"#)).await;
        assert_eq!(status, 201, "{json}");
        json["token"].as_str().unwrap().to_string()
    }

    /// Sends the server `signal` (libc::SIGTERM, SIGINT, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0, "kill({signal})");
    }

    /// Waits up to `limit` for the server to exit (looking at least once);
    /// its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server like a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read to the end.
/// How [`Server::start_under`] starts a server.
#[derive(Default)]
pub struct Launch<'a> {
    /// Extra `gpuwasm serve` flags.
    pub flags: &'a [&'a str],
    /// The soft limit on open files of the shell it starts from.
    pub soft_nofile: Option<u32>,
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// Where its stderr goes (default: the test's).
    pub log: Option<&'a Path>,
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request with `body` and extra `headers`.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut request = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client().request(request.body(Full::new(body.into())).unwrap()).await.expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("reading the body").to_bytes();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() }
}

/// One server thread's CPU time (seconds) and nice value.
#[derive(Debug)]
pub struct ThreadStat {
    pub cpu_seconds: f64,
    pub nice: i32,
}

pub async fn get(url: &str) -> Reply {
    send("GET", url, &[], Bytes::new()).await
}

/// A request body fed from a channel, so the test decides when each chunk
/// is sent.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// One HTTP/1.1 connection to `server` for requests with a [`ChannelBody`],
/// and the authority to send as `Host`.
pub async fn streaming_connection(server: &Server) -> (hyper::client::conn::http1::SendRequest<ChannelBody>, String) {
    let authority = server.url.strip_prefix("http://").unwrap().to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    (sender, authority)
}

/// A loopback address with a port free now, for a second listener
/// (`--metrics-listen`).
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// The hex SHA-256 of `bytes`, as the admin API names uploads.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// stdout of a finished command, or a panic with its stderr.
pub fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A PostgreSQL server of its own on 127.0.0.1 (Debian's `postgresql-15`,
/// which scripts/test.sh installs), in a temporary data directory, with
/// user `gpuwasm` trusted; stopped on drop. As root (CI) it runs as the
/// `postgres` user: PostgreSQL refuses to run as root.
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts one. Without PostgreSQL installed, says so loudly and gives
    /// `None` (the caller skips), unless `GPUWASM_REQUIRE_POSTGRES=1`
    /// (scripts/test.sh sets it), which makes it a failure.
    pub fn start() -> Option<Postgres> {
        let bin = std::env::var_os("GPUWASM_PG_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into());
        if !bin.join("initdb").exists() {
            let required = std::env::var("GPUWASM_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
            assert!(!required, "GPUWASM_REQUIRE_POSTGRES=1 and {} has no initdb: install postgresql-15", bin.display());
            eprintln!("SKIPPED: PostgreSQL is not installed ({} has no initdb); scripts/test.sh installs it", bin.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let user = (unsafe { libc::geteuid() } == 0).then(|| {
            let id = |flag: &str| stdout_of(&Command::new("id").args([flag, "postgres"]).output().unwrap()).trim().parse::<u32>().unwrap();
            let (uid, gid) = (id("-u"), id("-g"));
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            (uid, gid)
        });
        let mut pg = Postgres { child: None, port: 0, bin, user, dir };
        let out = pg
            .command("initdb")
            .args(["--username", "gpuwasm", "--auth", "trust", "--encoding", "UTF8", "--no-sync", "-D"])
            .arg(pg.dir.path().join("data"))
            .output()
            .unwrap();
        stdout_of(&out);
        pg.port = free_address().rsplit(':').next().unwrap().parse().unwrap();
        pg.run();
        Some(pg)
    }

    /// `postgres://` URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://gpuwasm@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data directory and port.
    pub fn run(&mut self) {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("postgres.log")).unwrap();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-k"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let ready = || self.command("pg_isready").args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()]).status().unwrap().success();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ready() {
            let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            assert!(std::time::Instant::now() < deadline, "PostgreSQL did not start in 30 s:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sql` with psql; its rows, one per line, fields split by `|`.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.command("psql").args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "gpuwasm", "-d", "postgres", "-c", sql]).output().unwrap();
        stdout_of(&out)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid).current_dir(self.dir.path());
        }
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An S3-compatible server of its own on 127.0.0.1: `s3s-fs` from crates.io
/// (scripts/install-s3s.sh puts it in target/tools/bin), storing buckets as
/// folders of a temporary directory; bucket `gpuwasm` exists. Stopped on
/// drop. Without it, like [`Postgres::start`]: skipped loudly, unless
/// `GPUWASM_REQUIRE_S3=1` (scripts/test.sh sets it).
pub struct S3 {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl S3 {
    pub fn start() -> Option<S3> {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/s3s-fs");
        if !bin.exists() {
            let required = std::env::var("GPUWASM_REQUIRE_S3").is_ok_and(|v| v == "1");
            assert!(!required, "GPUWASM_REQUIRE_S3=1 and {} is missing: run scripts/install-s3s.sh", bin.display());
            eprintln!("SKIPPED: {} is missing; scripts/install-s3s.sh installs it (scripts/test.sh does)", bin.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("gpuwasm")).unwrap();
        let port: u16 = free_address().rsplit(':').next().unwrap().parse().unwrap();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "test-key", "--secret-key", "test-secret"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "s3s-fs did not listen in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(S3 { child, port, dir })
    }

    /// The `AWS_*` settings that reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test-key".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test-secret".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The file that holds `key` of bucket `gpuwasm`.
    pub fn file(&self, key: &str) -> PathBuf {
        self.dir.path().join("gpuwasm").join(key)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
