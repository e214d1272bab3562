//! `gpuwasm run --workers N`: one process per core, each pinned to its
//! core, all accepting on the same port (SO_REUSEPORT: the kernel spreads
//! connections over them).
//!
//! Why processes: resetting an instance's memory, and the copy-on-write
//! faults of the next instance on the pages it unmapped, flush the TLB of
//! every core that runs the process. One process on all cores interrupts
//! every core at each reset; a process whose threads share one core
//! interrupts none (docs/performance.md). Each worker loads the component
//! (compiled once, through the cache) and its local models itself, and
//! applies the connection limits to its own connections.
//!
//! The parent supervises: it prints the address once every worker
//! listens, passes SIGTERM and Ctrl-C on to them (each drains as one
//! server would; a second signal stops them at once) and, with TLS,
//! SIGHUP (each reloads its certificate), and stops them all, with an
//! error, when one exits on its own.

use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};

/// How many worker processes `gpuwasm run` starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Workers {
    /// One per core this process may run on.
    Auto,
    Count(usize),
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Workers::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("expected a number of workers (1 or more) or `auto`, got `{n}`")),
                Ok(n) => Ok(Workers::Count(n)),
            },
        }
    }
}

impl Workers {
    pub fn count(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => allowed_cpus().len().max(1),
        }
    }
}

/// Set in a worker's environment: its supervisor's process id.
const SUPERVISOR: &str = "GPUWASM_SUPERVISOR_PID";

/// A listener on `addr` that other processes may bind too (SO_REUSEPORT).
pub fn shared_listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = reusable_socket(addr)?;
    socket.listen(1024).with_context(|| format!("listening on {addr}"))
}

fn reusable_socket(addr: SocketAddr) -> Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseport(true)?;
    socket.bind(addr).with_context(|| format!("binding {addr}"))?;
    Ok(socket)
}

/// Makes this process worker `slot`: pinned, with the threads it starts
/// after, to the `slot`-th core it may run on (wrapping around), and sent
/// SIGTERM when its parent dies. Call before any thread starts.
pub fn become_worker(slot: usize) -> std::io::Result<usize> {
    // SAFETY: prctl and getppid take and return plain integers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent died before the line above: nobody would stop us.
        let supervisor = std::env::var(SUPERVISOR).ok().and_then(|pid| pid.parse::<libc::pid_t>().ok());
        if supervisor != Some(libc::getppid()) {
            return Err(std::io::Error::other("its supervising gpuwasm is gone"));
        }
    }
    pin_to_core(slot)
}

fn pin_to_core(slot: usize) -> std::io::Result<usize> {
    let cpus = allowed_cpus();
    let Some(&cpu) = cpus.get(slot % cpus.len().max(1)) else {
        return Err(std::io::Error::other("no core to run on"));
    };
    pin_to(cpu)?;
    Ok(cpu)
}

/// Pins the calling thread, and the threads it starts after, to core
/// `cpu`. Allocates nothing and takes no lock: a child may call it between
/// fork and exec.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: `set` is a plain bit set, zeroed and then filled with
    // CPU_SET; sched_setaffinity reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The cores this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin_to`; sched_getaffinity fills `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// Starts `count` workers of this `gpuwasm run` on `listen` and waits for
/// them; `tls` says whether they serve HTTPS (and reload on SIGHUP).
pub async fn supervise(count: usize, listen: SocketAddr, tls: bool) -> Result<ExitCode> {
    // The address must be free, as for one process: SO_REUSEPORT alone
    // would let the workers join another server's port.
    let probe = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let addr = probe.local_addr()?;
    drop(probe);
    // Holds the port (bound, never listening: it takes no connections)
    // so that port 0 names one port for all the workers.
    let reserved = reusable_socket(addr)?;
    let (mut term, mut interrupt, mut hangup) =
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    // One at a time: the first compiles the component into the cache, the
    // others load it from there. A signal meanwhile stops those started
    // (dropped, they are killed).
    let starting = async {
        let mut workers = Vec::with_capacity(count);
        for slot in 0..count {
            workers.push(start(slot, addr).await?);
        }
        anyhow::Ok(workers)
    };
    let workers = tokio::select! {
        workers = starting => workers?,
        _ = term.recv() => return Ok(ExitCode::SUCCESS),
        _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
    };
    let scheme = if tls { "https" } else { "http" };
    println!("gpuwasm listening on {scheme}://{addr}");
    tracing::info!(workers = count, "one worker process per core, each serving the component");
    // Workers not reaped yet, by slot: only those are ever signalled.
    let mut running: Vec<Option<libc::pid_t>> = workers.iter().map(|w| w.id().and_then(|id| id.try_into().ok())).collect();
    let tell = |running: &[Option<libc::pid_t>], sig: libc::c_int| {
        for &pid in running.iter().flatten() {
            // SAFETY: kill takes plain integers. `pid` is a child of ours
            // whose exit this loop has not seen yet: at most just reaped by
            // its waiting task, and an id is not reused that soon.
            unsafe { libc::kill(pid, sig) };
        }
    };
    let mut exits = tokio::task::JoinSet::new();
    for (slot, mut worker) in workers.into_iter().enumerate() {
        exits.spawn(async move { (slot, worker.wait().await) });
    }
    let mut stopping = false;
    let mut failed = false;
    loop {
        tokio::select! {
            _ = term.recv() => { stopping = true; tell(&running, libc::SIGTERM) }
            _ = interrupt.recv() => { stopping = true; tell(&running, libc::SIGTERM) }
            _ = hangup.recv() => if tls { tell(&running, libc::SIGHUP) },
            exit = exits.join_next() => {
                let Some(exit) = exit else { break };
                let (slot, status) = exit.context("waiting for a worker")?;
                running[slot] = None;
                let status = status.context("waiting for a worker")?;
                if !stopping {
                    tell(&running, libc::SIGKILL);
                    bail!("worker {slot} exited ({status}) while serving; stopped the others");
                }
                failed |= !status.success();
            }
        }
    }
    drop(reserved);
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Starts worker `slot`: this command again with `--listen addr` and
/// `--worker slot`, on one tokio thread, in its own process group (a
/// Ctrl-C reaches it through the parent only, once); returns once it
/// listens.
async fn start(slot: usize, addr: SocketAddr) -> Result<Child> {
    let mut command = Command::new(std::env::current_exe().context("finding the gpuwasm executable")?);
    command
        .args(worker_args(std::env::args_os().skip(1), addr, slot))
        .env("TOKIO_WORKER_THREADS", "1")
        .env(SUPERVISOR, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().context("starting a worker process")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    match lines.next_line().await? {
        Some(line) if line.starts_with("gpuwasm listening on ") => {}
        first => {
            let _ = child.start_kill();
            let status = child.wait().await?;
            bail!("worker {slot} stopped before it listened ({status}; it printed {first:?}); its errors are above");
        }
    }
    // Anything else it prints goes to our stdout.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("{line}");
        }
    });
    Ok(child)
}

/// This command's arguments for a worker: without `--workers` and
/// `--listen` (either form), with `--listen addr --worker slot` right
/// after `run` (before any `--`).
fn worker_args(args: impl Iterator<Item = OsString>, addr: SocketAddr, slot: usize) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    let mut after_run = None;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if text == "--workers" || text == "--listen" {
            skip_value = true;
        } else if !(text.starts_with("--workers=") || text.starts_with("--listen=")) {
            if after_run.is_none() && text == "run" {
                after_run = Some(kept.len() + 1);
            }
            kept.push(arg);
        }
    }
    let own: [OsString; 4] = ["--listen".into(), addr.to_string().into(), "--worker".into(), slot.to_string().into()];
    let at = after_run.unwrap_or(kept.len());
    kept.splice(at..at, own);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_gets_the_command_without_workers_and_listen_then_its_own() {
        let args = ["--log-format", "json", "run", "--workers", "auto", "--listen=0.0.0.0:0", "--cpu-ms", "5", "--listen", "x", "--", "app.wasm"];
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let got = worker_args(args.iter().map(OsString::from), addr, 1);
        let want = ["--log-format", "json", "run", "--listen", "127.0.0.1:8080", "--worker", "1", "--cpu-ms", "5", "--", "app.wasm"];
        assert_eq!(got, want.iter().map(OsString::from).collect::<Vec<_>>());
    }

    #[test]
    fn workers_parse_counts_and_auto_and_refuse_zero() {
        assert_eq!("auto".parse(), Ok(Workers::Auto));
        assert_eq!("3".parse(), Ok(Workers::Count(3)));
        assert!("0".parse::<Workers>().is_err());
        assert!("many".parse::<Workers>().is_err());
        assert!(Workers::Auto.count() >= 1);
    }
}
