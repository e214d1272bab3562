//! What one request used, measured while it runs and reported once when it
//! has ended: the record a host meters and bills by ([`Usage`]), handed to
//! the deployment's [`UsageSink`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// Receives the [`Usage`] of every request of a deployment, once each has
/// ended (response sent, guest finished). Called on the request's thread:
/// hand the record on (a channel) rather than doing I/O in it.
pub type UsageSink = Arc<dyn Fn(Usage) + Send + Sync>;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The guest answered and finished.
    Ok,
    /// The guest trapped, answered with an error, or never answered.
    Trap,
    /// The wall-clock limit ran out.
    Timeout,
    /// A limit ended it: CPU time (guest plus inference), memory, or the
    /// body size.
    Limit,
    /// No instance was free (concurrency, tenant share or node full), or
    /// the deployment was stopped.
    Busy,
    /// The client went away before the guest finished.
    ClientGone,
}

impl Outcome {
    /// Its name in records and metrics: `ok`, `trap`, `timeout`, `limit`,
    /// `busy`, `client-gone`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Trap => "trap",
            Outcome::Timeout => "timeout",
            Outcome::Limit => "limit",
            Outcome::Busy => "busy",
            Outcome::ClientGone => "client-gone",
        }
    }
}

/// What one request used.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    /// When it arrived.
    pub started: SystemTime,
    /// From arrival until the response was sent and the guest finished.
    pub wall: Duration,
    /// CPU time of the threads running its guest, from instantiation to
    /// the instance's teardown, as the thread CPU clock measured it.
    pub guest_cpu: Duration,
    /// Time the host spent computing wasi-nn inference and generating text
    /// for it, by device (`cpu`, `wgpu:NAME`, `cuda:NAME`): the device's
    /// busy time, a share of a batch's time when requests were batched.
    pub inference: Vec<(String, Duration)>,
    /// wasi-nn `compute` calls and generations it made.
    pub inference_calls: u32,
    /// The models it loaded by name.
    pub models: Vec<String>,
    /// The largest its linear memory grew to, in bytes.
    pub peak_memory_bytes: u64,
    /// Host memory held for graphs it loaded from bytes (wasi-nn `load`),
    /// in bytes: their weights, held until the request ended.
    pub graph_bytes: u64,
    /// Request body bytes the guest read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Prompt tokens of its generations.
    pub prompt_tokens: u64,
    /// Tokens its generations produced.
    pub completion_tokens: u64,
    /// How it ended.
    pub outcome: Outcome,
}

impl Usage {
    /// Total inference time over all devices.
    pub fn inference_total(&self) -> Duration {
        self.inference.iter().map(|(_, d)| *d).sum()
    }
}

/// Measures one request: shared by the parts that serve it (the request
/// future, the guest task, the response body); when the last lets go, the
/// request has ended and its [`Usage`] goes to the sink.
pub(crate) struct Meter {
    sink: UsageSink,
    start: Instant,
    started: SystemTime,
    guest_cpu_ns: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    rest: Mutex<Rest>,
}

/// The parts of a [`Usage`] set rarely (not per poll or per frame).
#[derive(Default)]
struct Rest {
    inference: Vec<(String, Duration)>,
    inference_calls: u32,
    models: Vec<String>,
    peak_memory_bytes: u64,
    graph_bytes: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    outcome: Option<Outcome>,
}

impl Meter {
    pub(crate) fn start(sink: UsageSink) -> Arc<Meter> {
        Arc::new(Meter {
            sink,
            start: Instant::now(),
            started: SystemTime::now(),
            guest_cpu_ns: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            rest: Mutex::default(),
        })
    }

    pub(crate) fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Runs `work` on this thread, counting its CPU time as the guest's,
    /// read from `clock`.
    pub(crate) fn add_guest_cpu_of<T>(&self, clock: Clock, work: impl FnOnce() -> T) -> T {
        let before = clock.now();
        let out = work();
        let spent = clock.now().saturating_sub(before);
        self.guest_cpu_ns.fetch_add(spent.as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Counts one inference call that kept `device` busy for `time`.
    pub(crate) fn add_inference(&self, device: &str, time: Duration) {
        let mut rest = self.rest.lock().unwrap();
        rest.inference_calls += 1;
        match rest.inference.iter_mut().find(|(d, _)| d == device) {
            Some((_, total)) => *total += time,
            None => rest.inference.push((device.to_string(), time)),
        }
    }

    pub(crate) fn add_model(&self, name: &str) {
        let mut rest = self.rest.lock().unwrap();
        if !rest.models.iter().any(|m| m == name) {
            rest.models.push(name.to_string());
        }
    }

    pub(crate) fn add_tokens(&self, prompt: u64, completion: u64) {
        let mut rest = self.rest.lock().unwrap();
        rest.prompt_tokens += prompt;
        rest.completion_tokens += completion;
    }

    pub(crate) fn add_graph_bytes(&self, bytes: u64) {
        self.rest.lock().unwrap().graph_bytes += bytes;
    }

    pub(crate) fn set_peak_memory(&self, bytes: u64) {
        let mut rest = self.rest.lock().unwrap();
        rest.peak_memory_bytes = rest.peak_memory_bytes.max(bytes);
    }

    /// Records how the request ended: the first failure stands, and a
    /// failure overrides `Ok` (the guest may finish well before its answer
    /// turns out to be an error, or before the client leaves mid-body).
    pub(crate) fn set_outcome(&self, outcome: Outcome) {
        let mut rest = self.rest.lock().unwrap();
        if matches!(rest.outcome, None | Some(Outcome::Ok)) {
            rest.outcome = Some(outcome);
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let rest = std::mem::take(self.rest.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()));
        (self.sink)(Usage {
            started: self.started,
            wall: self.start.elapsed(),
            guest_cpu: Duration::from_nanos(*self.guest_cpu_ns.get_mut()),
            inference: rest.inference,
            inference_calls: rest.inference_calls,
            models: rest.models,
            peak_memory_bytes: rest.peak_memory_bytes,
            graph_bytes: rest.graph_bytes,
            bytes_in: *self.bytes_in.get_mut(),
            bytes_out: *self.bytes_out.get_mut(),
            prompt_tokens: rest.prompt_tokens,
            completion_tokens: rest.completion_tokens,
            // Nobody said how it ended: everything serving it was dropped
            // early, which is the client leaving.
            outcome: rest.outcome.unwrap_or(Outcome::ClientGone),
        });
    }
}

/// The monotonic clock's time (since boot).
fn monotonic_time() -> Duration {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// The calling thread's CPU time.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// How a section of a request's work on one thread is timed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Clock {
    /// The thread's CPU clock: what the thread ran, whatever else ran on
    /// the core meanwhile. A system call (the vDSO cannot read it), about
    /// a microsecond: for a guest's code once it has run past an epoch
    /// tick, from when on it may run as long as it likes.
    Thread,
    /// The monotonic clock (the vDSO: tens of nanoseconds), the same as
    /// the thread's CPU time but for preemption within a poll: for the
    /// host's work on the request (instantiation, tearing the instance
    /// down) and the guest's code until its first epoch tick, all of a
    /// typical request: polls of tens of microseconds to a tick.
    Monotonic,
}

impl Clock {
    /// The clock for a guest's work: [`Clock::Thread`] once `ticked` is
    /// set (by its first epoch tick, or its start on the long lane),
    /// [`Clock::Monotonic`] before.
    pub(crate) fn of_guest(ticked: &AtomicBool) -> Clock {
        if ticked.load(Ordering::Relaxed) { Clock::Thread } else { Clock::Monotonic }
    }

    fn now(self) -> Duration {
        match self {
            Clock::Thread => thread_cpu_time(),
            Clock::Monotonic => monotonic_time(),
        }
    }
}

/// A future whose every poll's time is added to a meter's guest CPU:
/// wasmtime runs the guest inside the poll of its call future. Polls are
/// timed on the [`Clock::Monotonic`], or on the [`Clock::Thread`] once
/// `ticked` is set (by the guest's first epoch tick, or its start on the
/// long lane).
pub(crate) struct GuestCpu<F> {
    inner: F,
    meter: Option<Arc<Meter>>,
    ticked: Option<Arc<AtomicBool>>,
}

impl<F: Future> GuestCpu<F> {
    pub(crate) fn new(inner: F, meter: Option<Arc<Meter>>, ticked: Option<Arc<AtomicBool>>) -> Self {
        GuestCpu { inner, meter, ticked }
    }
}

impl<F: Future> Future for GuestCpu<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `inner` is pinned structurally: it is never moved out of
        // a pinned `GuestCpu`, which has no `Drop` and is `Unpin` only when
        // `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        let Some(meter) = &this.meter else { return inner.poll(cx) };
        let clock = this.ticked.as_deref().map_or(Clock::Monotonic, Clock::of_guest);
        meter.add_guest_cpu_of(clock, || inner.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_reports_once_when_the_last_part_lets_go() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink: UsageSink = {
            let got = got.clone();
            Arc::new(move |u| got.lock().unwrap().push(u))
        };
        let meter = Meter::start(sink.clone());
        let other = meter.clone();
        meter.add_inference("cpu", Duration::from_millis(3));
        other.add_inference("cpu", Duration::from_millis(4));
        meter.add_inference("wgpu:lavapipe", Duration::from_millis(1));
        meter.add_model("minilm");
        meter.add_model("minilm");
        meter.add_bytes_in(10);
        other.add_bytes_out(20);
        meter.set_peak_memory(1 << 20);
        meter.set_peak_memory(1 << 16);
        meter.set_outcome(Outcome::Ok);
        meter.set_outcome(Outcome::Limit);
        meter.set_outcome(Outcome::Ok);
        meter.set_outcome(Outcome::Trap);
        drop(meter);
        assert!(got.lock().unwrap().is_empty(), "reported while a part still held it");
        drop(other);
        let usage = got.lock().unwrap().pop().expect("one record");
        assert_eq!(usage.inference, [("cpu".to_string(), Duration::from_millis(7)), ("wgpu:lavapipe".into(), Duration::from_millis(1))]);
        assert_eq!((usage.inference_calls, usage.inference_total()), (3, Duration::from_millis(8)));
        assert_eq!(usage.models, ["minilm"]);
        assert_eq!((usage.bytes_in, usage.bytes_out, usage.peak_memory_bytes), (10, 20, 1 << 20));
        assert_eq!(usage.outcome, Outcome::Limit, "a failure overrides ok, and the first failure stands");

        // Dropped with no outcome: the client left.
        drop(Meter::start(sink));
        assert_eq!(got.lock().unwrap().pop().unwrap().outcome, Outcome::ClientGone);
    }

    #[test]
    fn guest_cpu_counts_the_thread_time_of_polls_once_ticked() {
        let got = Arc::new(Mutex::new(None));
        let sink: UsageSink = {
            let got = got.clone();
            Arc::new(move |u| *got.lock().unwrap() = Some(u))
        };
        let meter = Meter::start(sink);
        let spin = GuestCpu::new(
            async {
                let until = thread_cpu_time() + Duration::from_millis(30);
                while thread_cpu_time() < until {
                    std::hint::black_box(0);
                }
            },
            Some(meter.clone()),
            Some(Arc::new(AtomicBool::new(true))),
        );
        block_on(spin);
        drop(meter);
        let cpu = got.lock().unwrap().take().unwrap().guest_cpu;
        assert!(cpu >= Duration::from_millis(30) && cpu < Duration::from_millis(40), "{cpu:?}");
    }

    /// A poll that sleeps 30 ms counts its wall time until the guest has
    /// ticked (the monotonic clock), and next to nothing after (the
    /// thread's CPU clock).
    #[test]
    fn guest_cpu_times_polls_on_the_monotonic_clock_until_ticked() {
        for ticked in [false, true] {
            let got = Arc::new(Mutex::new(None));
            let sink: UsageSink = {
                let got = got.clone();
                Arc::new(move |u| *got.lock().unwrap() = Some(u))
            };
            let meter = Meter::start(sink);
            let sleep = GuestCpu::new(async { std::thread::sleep(Duration::from_millis(30)) }, Some(meter.clone()), Some(Arc::new(AtomicBool::new(ticked))));
            block_on(sleep);
            drop(meter);
            let cpu = got.lock().unwrap().take().unwrap().guest_cpu;
            match ticked {
                false => assert!(cpu >= Duration::from_millis(30), "{cpu:?}"),
                true => assert!(cpu < Duration::from_millis(5), "{cpu:?}"),
            }
        }
    }

    /// Polls a future that never waits to its end.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }
}
