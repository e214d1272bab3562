//! What one request's store holds: its WASI and wasi:http contexts, the
//! resources the guest holds, its wasi-nn state, its memory limiter and
//! output, and the CPU ticks it used.

use crate::capabilities::{Capabilities, OutboundPolicy, SharedCapabilities};
use crate::memory_limit::MemoryLimiter;
use crate::nn::Models;
use crate::nn::host::{GenerationLimits, NnCtx, NnView};
use crate::output::GuestOutput;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Everything one request's store holds.
pub(crate) struct RequestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: OutboundPolicy,
    nn: NnCtx,
    pub(crate) limiter: MemoryLimiter,
    output: GuestOutput,
    pub(crate) cpu: CpuBudget,
}

/// A request's CPU time against its limit: the epoch ticks observed while
/// its guest code ran, plus the time the host computed wasi-nn inference
/// for it. `ticked`, set at the first tick (or when the guest starts on
/// the long lane), starts the measuring on the thread's CPU clock that
/// moves a long guest to the long lane ([`crate::lanes`]) and meters it.
pub(crate) struct CpuBudget {
    pub(crate) limit_ms: u64,
    ticks: u64,
    inference: std::time::Duration,
    pub(crate) exceeded: bool,
    pub(crate) ticked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CpuBudget {
    pub(crate) fn new(limit_ms: u64) -> Self {
        CpuBudget { limit_ms, ticks: 0, inference: std::time::Duration::ZERO, exceeded: false, ticked: Default::default() }
    }

    /// Counts one tick of guest code; true once the limit is reached.
    pub(crate) fn tick(&mut self) -> bool {
        self.ticks += 1;
        if self.ticks == 1 {
            self.ticked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.check()
    }

    /// Counts `time` of inference; true once the limit is reached.
    pub(crate) fn charge_inference(&mut self, time: std::time::Duration) -> bool {
        self.inference += time;
        self.check()
    }

    fn check(&mut self) -> bool {
        let used = self.ticks * crate::engine::TICK.as_millis() as u64 + self.inference.as_millis() as u64;
        self.exceeded |= used >= self.limit_ms;
        self.exceeded
    }
}

impl RequestState {
    pub(crate) fn new(
        memory_limit: usize,
        cpu_ms: u64,
        capabilities: &Capabilities,
        shared: &SharedCapabilities,
        models: &Models,
    ) -> Result<Self, String> {
        let output = GuestOutput::default();
        let mut wasi = WasiCtx::builder();
        wasi.stdout(output.clone()).stderr(output.clone());
        for (key, value) in &capabilities.env {
            wasi.env(key, value);
        }
        if let Some(dir) = &capabilities.files {
            wasi.preopened_dir(dir, "/", wasmtime_wasi::FsPerms::ReadOnly)
                .map_err(|e| format!("opening the deployment's files at {}: {e}", dir.display()))?;
        }
        // No network: the default address check already refuses every
        // address; say so explicitly.
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        Ok(Self {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundPolicy { allow: shared.outbound.clone(), traceparent: None },
            nn: NnCtx { models: models.clone(), access: shared.models.clone(), held: 0, limit: memory_limit, generation: None, meter: None },
            limiter: MemoryLimiter { limit: memory_limit, exceeded: false, peak: 0 },
            output,
            cpu: CpuBudget::new(cpu_ms),
        })
    }

    /// Lets the guest generate text under `limits`: at most `max_tokens` a
    /// generation, and `stream_ms` of wall clock for the request once it
    /// starts one (moving `deadline`).
    pub(crate) fn allow_generation(&mut self, limits: &crate::Limits, deadline: std::sync::Arc<crate::deadline::Deadline>) {
        self.nn.generation = Some(GenerationLimits { max_tokens: limits.max_tokens, stream_ms: limits.stream_ms, deadline, started: 0 });
    }

    /// Meters this request's inference, models and tokens into `meter`.
    pub(crate) fn set_meter(&mut self, meter: std::sync::Arc<crate::usage::Meter>) {
        self.nn.meter = Some(meter);
    }

    /// Passes the incoming request's `traceparent` on to the guest's
    /// outgoing requests that have none.
    pub(crate) fn set_traceparent(&mut self, traceparent: Option<http::HeaderValue>) {
        self.hooks.traceparent = traceparent;
    }

    /// The wasi-nn view of this request's state.
    pub(crate) fn nn(&mut self) -> NnView<'_> {
        NnView { ctx: &mut self.nn, table: &mut self.table, cpu: &mut self.cpu }
    }

    /// Host resources the guest holds (streams, sockets, files, ...).
    pub(crate) fn open_resources(&mut self) -> usize {
        self.table.iter_mut().count()
    }

    /// What kinds of host resources the guest holds, for error messages.
    pub(crate) fn open_resource_kinds(&mut self) -> Vec<&'static str> {
        use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, TcpSocket, UdpSocket};
        let mut kinds: Vec<&'static str> = self
            .table
            .iter_mut()
            .map(|entry| {
                let entry: &dyn std::any::Any = entry;
                if entry.is::<DynOutputStream>() {
                    "an output stream: stdout/stderr after printing, or a file or HTTP body being written"
                } else if entry.is::<DynInputStream>() {
                    "an input stream"
                } else if entry.is::<DynPollable>() {
                    "a pollable (a timer or stream subscription)"
                } else if entry.is::<TcpSocket>() || entry.is::<UdpSocket>() {
                    "a socket"
                } else if entry.is::<wasmtime_wasi::filesystem::Descriptor>() {
                    "an open file or directory"
                } else {
                    "another host resource"
                }
            })
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        kinds
    }

    /// The end of what the guest printed to stdout and stderr.
    pub(crate) fn output_text(&self) -> String {
        self.output.text()
    }
}

impl WasiView for RequestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for RequestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}
