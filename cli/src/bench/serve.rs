//! `gpuwasm bench serve`: `gpuwasm run` against `wasmtime serve`, both as
//! child processes on 127.0.0.1, for each component and concurrency level:
//! requests/s, p99 latency, the cores the server used and the kernel's share
//! of its CPU time (utime/stime from /proc/PID/stat). Each server also runs
//! pinned to one core, the per-core ceiling: with threads on several cores a
//! change to the process's page tables interrupts every core to flush its
//! TLB, and a pinned server shows what a core does without that.
//!
//! All servers of a component start together and take turns, one run each
//! per round, so drift on a shared machine hits them alike. This process is
//! the client (one keep-alive HTTP/1.1 connection per concurrent client) and
//! shares the machine's cores with the servers.

use super::http::{load, percentile};
use super::{read_listen_line, vm_rss_mib};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Components to serve (each is measured on its own).
    #[arg(default_values = ["target/wasm/hello.wasm", "target/wasm/hello-js.wasm", "target/wasm/hello-py.wasm"])]
    components: Vec<PathBuf>,
    /// The `wasmtime` executable to compare with (`wasmtime serve -S cli=y
    /// -S nn=y -O pooling-allocator=y`: the templates' handlers import
    /// wasi-nn); skipped, and said so, if it cannot run.
    #[arg(long, default_value = "wasmtime")]
    wasmtime: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds of load per run (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Runs per server and level, alternating between servers.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The core the pinned servers run on.
    #[arg(long, default_value_t = 0)]
    pin_core: usize,
    /// Skip the pinned servers.
    #[arg(long)]
    no_pinned: bool,
    /// Also measure `gpuwasm run` with these extra arguments, on all cores
    /// (repeatable; e.g. --variant "--keep-resident-mb 0").
    #[arg(long = "variant", value_name = "ARGS", allow_hyphen_values = true)]
    variants: Vec<String>,
}

/// Whether something accepts TCP connections on `addr` within `limit`.
async fn wait_for(addr: &str, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A server child process, killed on drop.
struct Server {
    label: String,
    child: Child,
    uri: http::Uri,
    authority: String,
}

impl Server {
    /// Starts `command` (which must listen on `authority`, or print
    /// gpuwasm's listen line when `authority` is `None`), pinned to `core`.
    async fn start(label: String, mut command: Command, authority: Option<String>, core: Option<usize>) -> Result<Server> {
        if let Some(core) = core {
            // SAFETY: `pin_to` runs in the child between fork and exec; it
            // allocates nothing and touches no locks.
            unsafe {
                command.pre_exec(move || crate::commands::workers::pin_to(core));
            }
        }
        let mut child = command.env("RUST_LOG", "warn").spawn().with_context(|| format!("starting {label}"))?;
        let authority = match authority {
            Some(authority) => {
                if !wait_for(&authority, Duration::from_secs(120)).await {
                    let _ = child.kill();
                    bail!("{label} did not listen on {authority} within 120 s");
                }
                authority
            }
            None => read_listen_line(&mut child)?.trim_start_matches("http://").to_string(),
        };
        let uri = format!("http://{authority}/bench").parse()?;
        Ok(Server { label, child, uri, authority })
    }

    /// (user, system) CPU time of the whole process so far, in clock ticks.
    /// The server's processes: itself and its children (`--workers`).
    fn pids(&self) -> Vec<u32> {
        let id = self.child.id();
        let tasks = std::fs::read_dir(format!("/proc/{id}/task")).into_iter().flatten().flatten();
        let children = tasks.filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok());
        let mut pids = vec![id];
        pids.extend(children.flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>()));
        pids
    }

    /// User and system CPU ticks of all its processes.
    fn cpu_ticks(&self) -> Result<(u64, u64)> {
        let mut ticks = (0, 0);
        for pid in self.pids() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // Fields after the command name, which is in parentheses: state is
            // field 3, utime 14 and stime 15.
            let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| -> Result<u64> { Ok(fields.get(n - 3).context("short /proc/PID/stat")?.parse()?) };
            ticks = (ticks.0 + field(14)?, ticks.1 + field(15)?);
        }
        Ok(ticks)
    }

    /// Resident memory of all its processes (shared pages count in each).
    fn resident_mib(&self) -> Result<f64> {
        self.pids().into_iter().map(vm_rss_mib).sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one server did at one concurrency level, summed over rounds.
#[derive(Default)]
struct Tally {
    requests: usize,
    seconds: f64,
    latencies: Vec<f64>,
    errors: u64,
    user_ticks: u64,
    system_ticks: u64,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

pub async fn run(args: ServeArgs) -> Result<ExitCode> {
    if args.concurrency.iter().any(|&c| c == 0) || args.rounds == 0 {
        bail!("--concurrency levels and --rounds must be at least 1");
    }
    if args.pin_core >= libc::CPU_SETSIZE as usize {
        bail!("--pin-core must be below {}", libc::CPU_SETSIZE);
    }
    let wasmtime_version = Command::new(&args.wasmtime).arg("--version").output().ok().filter(|o| o.status.success());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "gpuwasm bench serve: {} s per run after 0.5 s warm-up, {} rounds alternating, {cores} cores shared by servers and client",
        args.duration, args.rounds
    );
    match &wasmtime_version {
        Some(v) => println!(
            "comparing with: {} (`wasmtime serve -S cli=y -S nn=y -O pooling-allocator=y`)",
            String::from_utf8_lossy(&v.stdout).trim()
        ),
        None => println!("comparing with: NOTHING: `{} --version` did not run, wasmtime serve is skipped", args.wasmtime),
    }
    // (label suffix, extra arguments, core): gpuwasm's variants run on all cores.
    let mut setups = vec![(String::new(), Vec::new(), None)];
    if !args.no_pinned {
        setups.push((format!(", core {}", args.pin_core), Vec::new(), Some(args.pin_core)));
    }
    for variant in &args.variants {
        let extra: Vec<String> = variant.split_whitespace().map(str::to_string).collect();
        setups.push((format!(" {variant}"), extra, None));
    }
    for component in &args.components {
        let size = std::fs::metadata(component).with_context(|| format!("reading {}", component.display()))?.len();
        println!("\n{} ({:.1} MB)", component.display(), size as f64 / 1e6);
        let mut servers = Vec::new();
        for (suffix, extra, pin) in &setups {
            let mut gpuwasm = Command::new(std::env::current_exe()?);
            gpuwasm.arg("run").arg(component).args(["--listen", "127.0.0.1:0", "--concurrency", "256"]).args(extra);
            gpuwasm.stdout(Stdio::piped());
            servers.push(Server::start(format!("gpuwasm run{suffix}"), gpuwasm, None, *pin).await?);
            if wasmtime_version.is_some() && extra.is_empty() {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                let authority = format!("127.0.0.1:{port}");
                let mut wasmtime = Command::new(&args.wasmtime);
                wasmtime.args(["serve", "-S", "cli=y", "-S", "nn=y", "-O", "pooling-allocator=y", "--addr", &authority]).arg(component);
                wasmtime.stdout(Stdio::null()).stderr(Stdio::null());
                servers.push(Server::start(format!("wasmtime serve{suffix}"), wasmtime, Some(authority), *pin).await?);
            }
        }
        println!("{:<32} {:>5} {:>9} {:>9} {:>6} {:>7} {:>7}", "server", "conc", "req/s", "p99 ms", "cores", "kernel", "errors");
        for &c in &args.concurrency {
            let mut tallies: Vec<Tally> = servers.iter().map(|_| Tally::default()).collect();
            for _ in 0..args.rounds {
                for (server, tally) in servers.iter().zip(tallies.iter_mut()) {
                    load(&server.uri, &server.authority, c, Duration::from_millis(500)).await?;
                    let (u0, s0) = server.cpu_ticks()?;
                    let r = load(&server.uri, &server.authority, c, Duration::from_secs_f64(args.duration)).await?;
                    let (u1, s1) = server.cpu_ticks()?;
                    tally.requests += r.latencies.len();
                    tally.seconds += r.elapsed.as_secs_f64();
                    tally.latencies.extend(r.latencies);
                    tally.errors += r.errors;
                    tally.user_ticks += u1 - u0;
                    tally.system_ticks += s1 - s0;
                }
            }
            // SAFETY: sysconf has no preconditions.
            let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            for (server, tally) in servers.iter().zip(tallies.iter_mut()) {
                tally.latencies.sort_by(f64::total_cmp);
                let busy = (tally.user_ticks + tally.system_ticks) as f64;
                println!(
                    "{:<32} {:>5} {:>9.0} {:>9.3} {:>6.2} {:>6.0}% {:>7}",
                    server.label,
                    c,
                    tally.rate(),
                    percentile(&tally.latencies, 0.99),
                    busy / ticks_per_second / tally.seconds,
                    100.0 * tally.system_ticks as f64 / busy.max(1.0),
                    tally.errors
                );
            }
            let rate = |label: &str| tallies.iter().zip(&servers).find(|(_, s)| s.label == label).map(|(t, _)| t.rate());
            let pinned = format!("gpuwasm run, core {}", args.pin_core);
            let mut ratios = Vec::new();
            if let (Some(a), Some(b)) = (rate("gpuwasm run"), rate("wasmtime serve")) {
                ratios.push(format!("gpuwasm/wasmtime {:.2}x", a / b));
            }
            if let (Some(a), Some(b)) = (rate("gpuwasm run"), rate(&pinned)) {
                ratios.push(format!("gpuwasm all cores/one core {:.2}x", a / b));
            }
            for variant in &args.variants {
                if let (Some(a), Some(b)) = (rate(&format!("gpuwasm run {variant}")), rate("wasmtime serve")) {
                    ratios.push(format!("gpuwasm {variant}/wasmtime {:.2}x", a / b));
                }
            }
            if !ratios.is_empty() {
                println!("{:<32} {:>5} {}", "", c, ratios.join(", "));
            }
        }
        let rss: Vec<String> = servers
            .iter()
            .map(|s| Ok(format!("{} {:.0}", s.label, s.resident_mib()?)))
            .collect::<Result<_>>()?;
        println!("resident memory after the runs, MiB: {}", rss.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
