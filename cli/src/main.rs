//! The `gpuwasm` command: a thin shell over the `gpuwasm` core (embedding,
//! `run`, benchmarks) and `gpuwasm-server` (`serve` and the admin API the
//! other commands call). One module per command in `commands/`; argument
//! types they share in `args.rs`.

mod args;
mod bench;
mod client;
mod commands;

use args::{Cli, Command};
use clap::Parser;
use commands::deployments;

/// Task polls between two looks for ready sockets and due timers (see
/// `main`).
const EVENT_INTERVAL: u32 = 8;

fn main() -> std::process::ExitCode {
    keep_tensor_buffers_in_the_heap();
    raise_open_file_limit();
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Run(_) | Command::Dev(_)) { "info" } else { "warn" };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        args::LogFormat::Text => logs.init(),
        args::LogFormat::Json => logs.json().init(),
    }
    // A worker of `gpuwasm run --workers` takes its core before any thread starts.
    if let Command::Run(args) = &cli.command
        && let Some(slot) = args.worker
        && let Err(e) = commands::workers::become_worker(slot)
    {
        eprintln!("error: worker {slot} cannot take its core: {e}");
        return std::process::ExitCode::FAILURE;
    }
    // Short guests run on the same workers as the connections, in slices
    // of an epoch tick (5 ms; long ones move to the runtime's long lane):
    // tokio looks for ready sockets every `event_interval` task polls (61
    // by default: 300 ms of spinning guests), so before the long lane
    // other tenants' requests waited seconds behind CPU hogs. Every eighth
    // poll costs no measurable throughput (scripts/bench-neighbours.sh;
    // docs/performance.md).
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().event_interval(EVENT_INTERVAL).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Serve(args) => commands::serve::run(args).await,
        Command::Run(args) => commands::run::run(args).await,
        Command::New(args) => commands::new::run(args),
        Command::Build(args) => commands::build::run(args),
        Command::Dev(args) => commands::dev::run(args).await,
        Command::Deploy(args) => commands::deploy::run(args).await,
        Command::List(args) => deployments::list(args).await,
        Command::Rm(args) => deployments::rm(args).await,
        Command::Versions(args) => deployments::versions(args).await,
        Command::Rollback(args) => deployments::rollback(args).await,
        Command::Tenant(cmd) => commands::tenant::run(cmd).await,
        Command::Token(cmd) => commands::token::run(cmd).await,
        Command::Model(cmd) => commands::model::run(cmd).await,
        Command::Whoami(server) => commands::whoami::run(server).await,
        Command::Usage(args) => commands::usage::run(args).await,
        Command::Logs(args) => commands::logs::run(args).await,
        Command::Invoke(args) => commands::invoke::run(args).await,
        Command::Info(args) => commands::info::run(args),
        Command::Bench(args) => bench::run(args).await,
    }
}

/// Every deployment maps its compiled component from a file and every
/// connection is a socket: lift the soft limit on open files to the hard
/// limit, so a busy server does not fail at a default of 1024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Inference allocates and frees buffers of a few MiB per layer on each
/// model's scheduler thread. With glibc's defaults such buffers are mapped
/// and unmapped (or trimmed) every time, and refaulting their pages cost
/// 10-20% of an embedding pass in `gpuwasm bench nn`; serving buffers up
/// to 32 MiB from the heap and trimming only past 128 MiB removes that.
fn keep_tensor_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}
