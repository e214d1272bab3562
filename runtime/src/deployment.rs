//! A deployment: a linked component that answers each HTTP request with a
//! fresh instance, under its limits: admission (its concurrency, its
//! tenant's share of the pool, the pool), CPU and wall-clock deadlines,
//! body limits, and a guest that ends when its client leaves.

use crate::body_first::{Arrived, read_first};
use crate::capabilities::{Capabilities, SharedCapabilities};
use crate::deadline::Deadline;
use crate::error::{Error, chain};
use crate::failure::{BoxError, Failure, ResponseBody, Saturated};
use crate::host_state::RequestState;
use crate::limits::Limits;
use crate::lanes::{self, Lane};
use crate::nn::models::Warm;
use crate::output::{GuestLog, LogSink, RequestId};
use crate::runtime::{Runtime, TenantShare};
use crate::usage::{Clock, GuestCpu, Meter, Outcome, UsageSink};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::{LengthLimitError, Limited};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;
use tracing::Instrument;
use tokio::time::{Instant, timeout_at};
use wasmtime::Store;
use wasmtime::component::InstancePre;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

/// A component ready to serve: every request gets a fresh instance.
///
/// Cheap to clone. Mount it in your own hyper service by calling
/// [`Deployment::handle`] from `service_fn`.
#[derive(Clone)]
pub struct Deployment {
    inner: Arc<DeploymentInner>,
}

struct DeploymentInner {
    name: String,
    limits: Limits,
    capabilities: Capabilities,
    /// The allow-list and model access, shared by every request.
    shared: SharedCapabilities,
    pre: ProxyPre<RequestState>,
    /// Instances of this deployment that may run at once.
    slots: Arc<Semaphore>,
    /// Its tenant's share of the instance pool.
    tenant_share: Arc<TenantShare>,
    /// Requests waiting for a slot.
    queued: AtomicU32,
    /// Requests admitted while their bodies still arrive.
    slow_bodies: AtomicU32,
    /// Whether its last request to end ran long, and its turns on the
    /// long lane ([`lanes`]).
    lane: Arc<Lane>,
    /// Set once by [`Deployment::stop`].
    stop: watch::Sender<bool>,
    runtime: Runtime,
    /// Where each request's usage goes, once set.
    usage_sink: OnceLock<UsageSink>,
    /// The models it keeps resident ([`Deployment::warm`]).
    warm: Mutex<Vec<Warm>>,
    /// Where what its guests print goes, once set.
    log_sink: OnceLock<LogSink>,
}

/// Decrements the queue count when a waiting request leaves the queue.
struct QueueTicket<'a>(&'a AtomicU32);

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Deployment {
    pub(crate) fn new(
        runtime: &Runtime,
        name: &str,
        instance_pre: InstancePre<RequestState>,
        limits: Limits,
        capabilities: Capabilities,
    ) -> Result<Deployment, Error> {
        let pre = ProxyPre::new(instance_pre).map_err(|e| Error::NotAHandler(chain(&e)))?;
        Ok(Deployment {
            inner: Arc::new(DeploymentInner {
                name: name.to_string(),
                slots: Arc::new(Semaphore::new(limits.concurrency as usize)),
                tenant_share: runtime.tenant_share(&capabilities.models.tenant),
                queued: AtomicU32::new(0),
                slow_bodies: AtomicU32::new(0),
                lane: Arc::new(Lane::new()),
                stop: watch::Sender::new(false),
                limits,
                shared: SharedCapabilities::of(&capabilities),
                capabilities,
                pre,
                runtime: runtime.clone(),
                usage_sink: OnceLock::new(),
                warm: Mutex::default(),
                log_sink: OnceLock::new(),
            }),
        })
    }

    /// The deployment's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The limits every request of this deployment runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// What its instances may reach: environment, files, outbound hosts, models.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    /// Meters every request from now on: when a request has ended
    /// (response sent, guest finished, or the client gone), its
    /// [`Usage`](crate::Usage) goes to `sink`. Set once; a second sink is
    /// refused (returns `false`). Unmetered requests skip the measuring.
    pub fn set_usage_sink(&self, sink: UsageSink) -> bool {
        self.inner.usage_sink.set(sink).is_ok()
    }

    /// Requests waiting for an instance of this deployment now.
    pub fn queued(&self) -> u32 {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Stops every request running on this deployment now (their guests
    /// are interrupted and their instances freed) and answers any later
    /// request with `503`. For a deployment taken out of service; requests
    /// keep running on a deployment that is merely replaced.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
        self.inner.warm.lock().unwrap().clear();
    }

    /// Sends what its guests print (and why requests failed) to `sink`,
    /// one [`GuestLog`] per request that printed something or failed
    /// after its instance started. Set once; later calls are ignored.
    pub fn set_log_sink(&self, sink: LogSink) {
        let _ = self.inner.log_sink.set(sink);
    }

    /// Loads the models its capabilities keep warm (`[models] warm`) and
    /// holds them resident, whatever the idle timeout, until it is stopped
    /// or dropped. Call it before it takes traffic: its first requests
    /// then find their models loaded.
    pub async fn warm(&self) -> Result<(), Error> {
        let access = &self.inner.capabilities.models;
        let models = self.inner.runtime.models();
        let mut held = Vec::with_capacity(access.warm.len());
        for name in &access.warm {
            let loaded = models.get(access, name).await;
            let loaded = loaded.map_err(|e| Error::Model(format!("'{name}', kept warm by [models] warm, could not be loaded: {}", e.message())))?;
            held.push(Warm::new(loaded));
        }
        let mut warm = self.inner.warm.lock().unwrap();
        // Stopped meanwhile: it keeps nothing.
        if !*self.inner.stop.borrow() {
            *warm = held;
        }
        Ok(())
    }

    /// Instantiates the component once, fresh, under its limits, and drops
    /// the instance: a component that cannot start (say, its initial memory
    /// is over the memory limit) is refused before it takes traffic.
    pub async fn check(&self) -> Result<(), Error> {
        let (limits, inner) = (&self.inner.limits, &self.inner);
        // The instance takes a slot of the pool like a request's does.
        let runtime = &inner.runtime.inner;
        let until = Instant::now() + limits.queue_timeout();
        let busy = |_| Error::Instantiate("no instance of this node became free to check it; retry".into());
        let tenant_full = Saturated::Tenant(inner.tenant_share.size.load(Ordering::Relaxed));
        let _tenant = acquire_until(&inner.tenant_share.permits, until, tenant_full).await.map_err(busy)?;
        let _node = acquire_until(&runtime.instances, until, Saturated::Node(runtime.pool.max_instances)).await.map_err(busy)?;
        let mut store = inner
            .runtime
            .new_store(limits.memory_bytes(), limits.cpu_ms, &inner.capabilities, &inner.shared)
            .map_err(Error::Instantiate)?;
        let instantiated = timeout_at(Instant::now() + limits.timeout(), self.inner.pre.instantiate_async(&mut store)).await;
        let instantiated = instantiated.map_err(|_| Error::Instantiate(format!("it did not start within its time limit of {} ms", limits.timeout_ms)))?;
        match instantiated {
            Ok(_) => Ok(()),
            Err(err) => Err(Error::Instantiate(
                match Failure::from_call(store.data(), &err, limits.cpu_ms, limits.memory_mb) {
                    Failure::Memory(mb) => format!("its memory does not fit the limit of {mb} MiB"),
                    _ => chain(&err),
                },
            )),
        }
    }

    /// Answers `request` with a fresh instance of the component.
    ///
    /// The request body streams into the guest and the response body
    /// streams out of it. Failures become HTTP answers with a short
    /// plain-text message: `503` (with `Retry-After`) when the deployment
    /// stays at its concurrency limit, `413` for a body over the limit,
    /// `504` when the CPU or wall-clock limit runs out, `500` when the
    /// guest traps or outgrows its memory limit. A `503` comes no sooner
    /// than the runtime's [refusal delay](crate::RuntimeBuilder::refusal_delay)
    /// after the request arrived. Every response gets a
    /// `Server-Timing: gpuwasm;dur=MS` header: the time from arrival to
    /// the response head, before that delay.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let start = std::time::Instant::now();
        let meter = self.inner.usage_sink.get().map(|sink| Meter::start(sink.clone()));
        let mut refused = false;
        let mut response = match self.try_handle(request, meter.clone()).await {
            Ok(response) => response,
            Err(failure) => {
                tracing::debug!(deployment = %self.inner.name, ?failure, "request failed");
                if let Some(meter) = &meter {
                    meter.set_outcome(failure.outcome());
                }
                refused = matches!(failure, Failure::Busy(_));
                failure.into_response(&self.inner.name)
            }
        };
        // Time from arrival to the response head, as the server saw it.
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if let Ok(value) = http::HeaderValue::from_str(&format!("gpuwasm;dur={ms:.3}")) {
            response.headers_mut().append("server-timing", value);
        }
        if refused {
            // Metered as it was, without the pause.
            drop(meter);
            self.inner.runtime.pause_refusal(start).await;
        }
        response
    }

    async fn try_handle<B>(&self, request: Request<B>, meter: Option<Arc<Meter>>) -> Result<Response<ResponseBody>, Failure>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let me = &self.inner;
        let limits = &me.limits;
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limits.max_body_bytes) {
            return Err(Failure::BodyTooLarge(limits.max_body_bytes));
        }
        if *me.stop.borrow() {
            return Err(Failure::Stopped);
        }
        let deadline = Instant::now() + limits.timeout();
        // The guest's own deadline: a generation it starts moves it to `stream_ms`.
        let guest_deadline = Arc::new(Deadline::new(limits.timeout_ms));
        let Arrived { request, slow } = read_first(request, declared, limits, deadline).await?;
        let request = with_authority(request);
        let permits = self.admit(slow).await?;
        // A deployment whose requests run long instantiates no more at once
        // than the long lane takes turns ([`lanes`]).
        let turn = timeout_at(deadline, me.lane.turn()).await.map_err(|_| Failure::Timeout(limits.timeout_ms))?;

        let mut store = me
            .runtime
            .new_store(limits.memory_bytes(), limits.cpu_ms, &me.capabilities, &me.shared)
            .map_err(Failure::Trap)?;
        store.data_mut().allow_generation(limits, guest_deadline.clone());
        if let Some(meter) = &meter {
            store.data_mut().set_meter(meter.clone());
        }
        store.data_mut().set_traceparent(request.headers().get("traceparent").cloned());
        let log = me.log_sink.get().cloned().map(|sink| (sink, SystemTime::now(), request.extensions().get::<RequestId>().map(|id| id.0.clone())));

        let body_too_large = Arc::new(AtomicBool::new(false));
        let request = limit_body(request, limits.max_body_bytes, body_too_large.clone(), meter.clone());
        let (cpu_ms, memory_mb) = (limits.cpu_ms, limits.memory_mb);
        let instantiate = GuestCpu::new(me.pre.instantiate_async(&mut store), meter.clone(), None);
        let proxy = match timeout_at(deadline, instantiate).await {
            Err(_) => return Err(Failure::Timeout(limits.timeout_ms)),
            Ok(Err(err)) => return Err(Failure::from_call(store.data(), &err, cpu_ms, memory_mb)),
            Ok(Ok(proxy)) => proxy,
        };
        let setup = |store: &mut Store<RequestState>| -> wasmtime::Result<_> {
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(Scheme::Http, request)?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let out = http.new_response_outparam(tx)?;
            Ok((req, out, rx))
        };
        let (req, out, rx) = setup(&mut store).map_err(|e| Failure::Trap(chain(&e)))?;

        let name = me.name.clone();
        let head_deadline = guest_deadline.clone();
        let mut stopped = me.stop.subscribe();
        let guest_meter = meter.clone();
        let (ticked, lane) = (store.data().cpu.ticked.clone(), me.lane.clone());
        let cpu_ticked = ticked.clone();
        let guest = tokio::spawn(lanes::run(async move {
            let _permits = permits;
            let handle = proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out);
            let call = GuestCpu::new(handle, guest_meter.clone(), Some(cpu_ticked));
            // The guest yields to the executor at every epoch tick, so
            // dropping `call` (timeout, stop, or an abort of this task when
            // the client leaves) interrupts it within a tick. One that
            // computes past a tick goes on in the long lane (`lanes`).
            let result = tokio::select! {
                called = guest_deadline.run(call) => match called {
                    None => Err(Failure::Timeout(guest_deadline.limit_ms())),
                    Some(Err(err)) => Err(Failure::from_call(store.data(), &err, cpu_ms, memory_mb)),
                    Some(Ok(())) => Ok(()),
                },
                _ = stopped.wait_for(|&stop| stop) => Err(Failure::Stopped),
            };
            if let Some(meter) = &guest_meter {
                meter.set_peak_memory(store.data().limiter.peak as u64);
                meter.set_outcome(result.as_ref().map_or_else(Failure::outcome, |()| Outcome::Ok));
            }
            let output = store.data().output_text();
            match &result {
                Err(failure) => tracing::warn!(deployment = %name, ?failure, guest_output = %output, "guest failed"),
                Ok(()) if !output.is_empty() => tracing::debug!(deployment = %name, guest_output = %output),
                Ok(()) => {}
            }
            if let Some((sink, started, request_id)) = log.filter(|_| result.is_err() || !output.is_empty()) {
                let failure = result.as_ref().err().map(|f| f.explain(&name).1);
                sink(GuestLog { started, request_id, output, failure });
            }
            // Tearing the instance down (resetting its memory) is the
            // request's work too, timed as its last polls were.
            match &guest_meter {
                Some(meter) => meter.add_guest_cpu_of(Clock::of_guest(&store.data().cpu.ticked), || drop(store)),
                None => drop(store),
            }
            result
        }
        .in_current_span(), ticked, lane, turn));

        // Until the response is complete, the guest lives only as long as
        // someone waits for it: a client that leaves (this future or the
        // response body dropped) stops it.
        let guard = AbortOnDrop(Some(guest.abort_handle()));
        let too_large = || Failure::BodyTooLarge(me.limits.max_body_bytes);
        // The head may wait as long as the guest may run: `stream_ms` once
        // it generates (a whole, unstreamed answer comes at the end).
        match head_deadline.run(rx).await {
            // A guest that answers after its request body was cut off at
            // the limit answered a truncated request: the client learns why.
            Some(Ok(_)) if body_too_large.load(Ordering::Relaxed) => Err(too_large()),
            Some(Ok(Ok(response))) => Ok(response.map(|body| GuestBody { body, guard, meter }.boxed_unsync())),
            Some(Ok(Err(code))) => Err(Failure::Guest(format!("{code:?}"))),
            Some(Err(_)) => match guest.await {
                _ if body_too_large.load(Ordering::Relaxed) => Err(too_large()),
                Ok(Err(failure)) => Err(failure),
                Ok(Ok(())) => Err(Failure::NoResponse),
                Err(join) => Err(Failure::Trap(format!("guest task failed: {join}"))),
            },
            None => {
                guest.abort();
                Err(Failure::Timeout(head_deadline.limit_ms()))
            }
        }
    }

    /// Waits for a slot of this deployment, of its tenant's share and of
    /// the shared pool, or fails with [`Failure::Busy`] naming the one
    /// that stayed full when the queue is full or the wait ends. A
    /// `slow` request (its body still arriving) is refused at once when
    /// slow requests hold half the deployment's concurrency, half its
    /// tenant's share or half the node's instances already.
    async fn admit(&self, slow: bool) -> Result<Admitted, Failure> {
        let me = &self.inner;
        let slow_body = if slow { Some(SlowBody::enter(me)?) } else { None };
        let wait_until = Instant::now() + me.limits.queue_timeout();
        let deployment_full = Saturated::Deployment(me.limits.concurrency);
        let slot = match me.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if me.queued.fetch_add(1, Ordering::Relaxed) >= me.limits.queue {
                    me.queued.fetch_sub(1, Ordering::Relaxed);
                    return Err(Failure::Busy(deployment_full));
                }
                let _ticket = QueueTicket(&me.queued);
                acquire_until(&me.slots, wait_until, deployment_full).await?
            }
        };
        let runtime = &me.runtime.inner;
        let tenant_full = Saturated::Tenant(me.tenant_share.size.load(Ordering::Relaxed));
        let tenant = acquire_until(&me.tenant_share.permits, wait_until, tenant_full).await?;
        let instance = acquire_until(&runtime.instances, wait_until, Saturated::Node(runtime.pool.max_instances)).await?;
        Ok(Admitted { _permits: [slot, tenant, instance], _slow_body: slow_body })
    }
}

/// What an admitted request holds until its guest ends.
struct Admitted {
    _permits: [OwnedSemaphorePermit; 3],
    _slow_body: Option<SlowBody>,
}

/// A request admitted while its body still arrives, counted against its
/// deployment's, its tenant's and the node's allowances of such requests
/// (half of each pool, at least one) until it ends.
struct SlowBody(Arc<DeploymentInner>);

impl SlowBody {
    fn enter(me: &Arc<DeploymentInner>) -> Result<SlowBody, Failure> {
        let (share, node) = (&me.tenant_share, &me.runtime.inner);
        let allowances: [(&AtomicU32, u32, fn(u32) -> Saturated); 3] = [
            (&me.slow_bodies, me.limits.concurrency, Saturated::SlowBodies),
            (&share.slow_bodies, share.size.load(Ordering::Relaxed), Saturated::TenantSlowBodies),
            (&node.slow_bodies, node.pool.max_instances, Saturated::NodeSlowBodies),
        ];
        for (i, &(count, pool, full)) in allowances.iter().enumerate() {
            let allowed = (pool / 2).max(1);
            if count.fetch_add(1, Ordering::Relaxed) >= allowed {
                for (taken, _, _) in &allowances[..=i] {
                    taken.fetch_sub(1, Ordering::Relaxed);
                }
                return Err(Failure::Busy(full(allowed)));
            }
        }
        Ok(SlowBody(me.clone()))
    }
}

impl Drop for SlowBody {
    fn drop(&mut self) {
        self.0.slow_bodies.fetch_sub(1, Ordering::Relaxed);
        self.0.tenant_share.slow_bodies.fetch_sub(1, Ordering::Relaxed);
        self.0.runtime.inner.slow_bodies.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn acquire_until(sem: &Arc<Semaphore>, until: Instant, full: Saturated) -> Result<OwnedSemaphorePermit, Failure> {
    match timeout_at(until, sem.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(Failure::Busy(full)),
    }
}

/// Aborts a guest's task when dropped, unless disarmed.
struct AbortOnDrop(Option<AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}

/// A guest's response body. Dropped before its end (the client went
/// away), it stops the guest; once it has ended, the guest may finish
/// what it does after responding, within its limits.
struct GuestBody<B> {
    body: B,
    guard: AbortOnDrop,
    /// Counts the bytes sent; the request's metering ends when the body
    /// and the guest are both done.
    meter: Option<Arc<Meter>>,
}

impl<B> http_body::Body for GuestBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx).map_err(Into::into);
        match &polled {
            Poll::Ready(None) => self.guard.0 = None,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(meter), Some(data)) = (&self.meter, frame.data_ref()) {
                    meter.add_bytes_out(data.len());
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// wasi:http needs an authority: give requests without a URI authority or
/// `Host` header the host `localhost`.
fn with_authority<B>(mut request: Request<B>) -> Request<B> {
    if request.uri().authority().is_none() && !request.headers().contains_key(http::header::HOST) {
        request.headers_mut().insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
    }
    request
}

/// Caps the request body at `max` bytes; going over sets `flag` and ends
/// the guest's body stream with a body-size error. The bytes read are
/// counted into `meter`.
fn limit_body<B>(
    request: Request<B>,
    max: u64,
    flag: Arc<AtomicBool>,
    meter: Option<Arc<Meter>>,
) -> Request<impl http_body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let max_usize = usize::try_from(max).unwrap_or(usize::MAX);
    request.map(move |body| {
        let counted = body.map_frame(move |frame| {
            if let (Some(meter), Some(data)) = (&meter, frame.data_ref()) {
                meter.add_bytes_in(data.len());
            }
            frame
        });
        Limited::new(counted, max_usize).map_err(move |err: BoxError| {
            if err.is::<LengthLimitError>() {
                flag.store(true, Ordering::Relaxed);
                wasmtime_wasi_http::Error::HttpRequestBodySize(Some(max))
            } else {
                wasmtime_wasi_http::Error::InternalError(Some(err.to_string()))
            }
        })
    })
}
