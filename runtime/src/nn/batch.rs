//! Batching: compute calls on one graph from many instances are merged
//! into one pass of the engine, on a thread of the graph's own, so
//! inference never blocks tokio's workers.
//!
//! A call waits at most [`BatchSettings::max_wait`] for company, and only
//! while other instances hold execution contexts on the same graph (a lone
//! caller runs at once; on the CPU straight on the CPU's thread pool,
//! without passing through the scheduler's thread). Batches take calls round-robin over tenants, so
//! a tenant flooding a shared public model delays another tenant's call by
//! at most one turn per batch.
//!
//! On a GPU, passes take turns at the device's gate (see [`super::gpu`]):
//! a pass holds one tenant's calls, tenants take turns, and while another
//! tenant has work waiting (for this model or at the device) a pass holds
//! one call, so no tenant holds the device for longer than one of its
//! calls takes. A tenant alone batches as many calls as end within a time
//! slice (20 ms, or one call), so a tenant arriving waits little.

use super::gpu::DeviceGate;
use gpuwasm_tensor::turns::next_after;
use gpuwasm_tensor::{Budget, Error, Graph, MemoryPool, Tensor};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Named tensors, as graphs take and give them.
pub(crate) type Tensors = Vec<(String, Tensor)>;

/// How calls are batched.
#[derive(Clone, Debug)]
pub struct BatchSettings {
    /// The longest a call waits for others to join its batch (default 2 ms).
    pub max_wait: Duration,
    /// The most calls in one batch (default 32).
    pub max_calls: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings { max_wait: Duration::from_millis(2), max_calls: 32 }
    }
}

/// Host memory inference may allocate (see [`gpuwasm_tensor::Budget`]).
#[derive(Clone, Debug)]
pub struct InferenceMemory {
    /// What one compute call may allocate, in MiB (default 512). A batch
    /// of `n` calls may allocate `n` times this.
    pub per_call_mb: u64,
    /// What all calls on the node may allocate at once, in MiB (default 4096).
    pub node_mb: u64,
}

impl Default for InferenceMemory {
    fn default() -> Self {
        InferenceMemory { per_call_mb: 512, node_mb: 4096 }
    }
}

/// Budgets for passes: per call, within the node's pool.
#[derive(Clone, Debug)]
pub(crate) struct Budgets {
    per_call: u64,
    node: Arc<MemoryPool>,
}

impl Budgets {
    pub(crate) fn new(memory: &InferenceMemory) -> Budgets {
        Budgets { per_call: memory.per_call_mb.saturating_mul(1 << 20), node: MemoryPool::new(memory.node_mb.saturating_mul(1 << 20)) }
    }

    /// The budget of a pass running `calls` calls.
    pub(crate) fn for_calls(&self, calls: usize) -> Budget {
        Budget::new(self.per_call.saturating_mul(calls as u64)).within(self.node.clone())
    }
}

struct Job {
    tenant: Arc<str>,
    inputs: Tensors,
    /// The outputs, with this call's share of its pass's time.
    reply: oneshot::Sender<Result<(Tensors, Duration), Error>>,
}

/// The front of one graph's scheduler thread (or, for a graph one
/// instance loaded for itself, of tokio's blocking pool).
pub(crate) struct Batcher {
    /// `None` for a graph that runs each call on a blocking thread.
    jobs: Option<Sender<Job>>,
    graph: Arc<dyn Graph>,
    budgets: Budgets,
    /// The device's turns, on a GPU.
    gate: Option<Arc<DeviceGate>>,
    /// Execution contexts instances hold on this graph: callers that may
    /// compute soon.
    pub(crate) contexts: Arc<AtomicUsize>,
    /// Batches run and calls in them.
    pub(crate) stats: Arc<BatchStats>,
}

/// Counters of one batcher.
#[derive(Default, Debug)]
pub(crate) struct BatchStats {
    batches: AtomicUsize,
    calls: AtomicUsize,
    largest: AtomicUsize,
}

/// What a loaded model has done since it was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelStatus {
    /// Engine passes run (for a text model: steps).
    pub batches: usize,
    /// Compute calls answered (for a text model: generations started).
    pub calls: usize,
    /// The most calls merged into one pass (for a text model: sequences
    /// in one step).
    pub largest_batch: usize,
    /// A text model's engine now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationStatus>,
}

/// What a text model's engine is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationStatus {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting to be admitted.
    pub waiting: usize,
    /// Blocks of its key/value cache free.
    pub free_blocks: usize,
    /// Blocks of its key/value cache.
    pub total_blocks: usize,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Generations cancelled because their reader went away.
    pub cancelled: u64,
    /// Sequences preempted and recomputed later.
    pub preempted: u64,
}

impl BatchStats {
    pub(crate) fn status(&self) -> ModelStatus {
        ModelStatus {
            batches: self.batches.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            largest_batch: self.largest.load(Ordering::Relaxed),
            generation: None,
        }
    }
}

impl Batcher {
    /// Starts the scheduler thread of `graph`, taking turns at `gate` on a
    /// GPU; it ends when the batcher is dropped.
    pub(crate) fn start(graph: Arc<dyn Graph>, settings: BatchSettings, budgets: Budgets, gate: Option<Arc<DeviceGate>>) -> Batcher {
        let (jobs, rx) = channel();
        let stats = Arc::new(BatchStats::default());
        let contexts = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler { graph: graph.clone(), settings, budgets: budgets.clone(), stats: stats.clone(), contexts: contexts.clone(), gate: gate.clone() };
        std::thread::Builder::new()
            .name("gpuwasm-nn-batch".into())
            .spawn(move || scheduler.run(rx))
            .expect("spawning a batch thread");
        Batcher { jobs: Some(jobs), graph, budgets, gate, contexts, stats }
    }

    /// A graph one instance loaded from bytes: no thread of its own (an
    /// instance may load many), each call runs on tokio's blocking pool
    /// (in its tenant's turn at `gate` on a GPU).
    pub(crate) fn unbatched(graph: Arc<dyn Graph>, budgets: Budgets, gate: Option<Arc<DeviceGate>>) -> Batcher {
        Batcher { jobs: None, graph, budgets, gate, contexts: Arc::default(), stats: Arc::default() }
    }

    /// The graph.
    pub(crate) fn graph(&self) -> &Arc<dyn Graph> {
        &self.graph
    }

    /// What the graph takes and gives.
    pub(crate) fn signature(&self) -> String {
        self.graph.signature()
    }

    /// Queues one call for `tenant` and waits for its answer.
    pub(crate) async fn compute(&self, tenant: Arc<str>, inputs: Tensors) -> Result<(Tensors, Duration), Error> {
        let Some(jobs) = &self.jobs else {
            let (graph, budget, gate) = (self.graph.clone(), self.budgets.for_calls(1), self.gate.clone());
            return tokio::task::spawn_blocking(move || {
                let _turn = gate.as_ref().map(|g| g.turn(&tenant));
                let started = Instant::now();
                graph.run(inputs, &budget).map(|outputs| (outputs, started.elapsed()))
            })
                .await
                .unwrap_or_else(|_| Err(Error::Unsupported("the engine failed on this input".into())));
        };
        let (reply, answer) = oneshot::channel();
        let job = Job { tenant, inputs, reply };
        if self.gate.is_none() && self.contexts.load(Ordering::Relaxed) <= 1 {
            // On the CPU, with no other instance about to compute on this
            // graph, there is nothing to batch with: the call runs at once
            // on the CPU's pool, where its pass would run anyway, instead of
            // hopping through the scheduler's thread first (two thread
            // wake-ups less, about a tenth of a short embedding's time).
            let (graph, budgets, stats) = (self.graph.clone(), self.budgets.clone(), self.stats.clone());
            // A panic is caught inside; should anything else unwind, the
            // caller gets an error (its reply dropped), not a dead process.
            rayon::spawn(move || {
                let pass = std::panic::AssertUnwindSafe(|| run_pass(graph.as_ref(), &budgets, &stats, vec![job]));
                let _ = std::panic::catch_unwind(pass);
            });
        } else if jobs.send(job).is_err() {
            return Err(Error::Unsupported("the model's scheduler stopped".into()));
        }
        answer.await.unwrap_or_else(|_| Err(Error::Unsupported("the model's scheduler stopped".into())))
    }
}

/// One graph's scheduler thread.
struct Scheduler {
    graph: Arc<dyn Graph>,
    settings: BatchSettings,
    budgets: Budgets,
    stats: Arc<BatchStats>,
    contexts: Arc<AtomicUsize>,
    gate: Option<Arc<DeviceGate>>,
}

impl Scheduler {
    /// The loop: gather a batch, run it, answer, repeat.
    fn run(self, rx: Receiver<Job>) {
        let settings = &self.settings;
        let mut queues: BTreeMap<Arc<str>, VecDeque<Job>> = BTreeMap::new();
        let mut queued = 0usize;
        // The tenant served first in the last batch; the next starts after it.
        let mut last_first: Option<Arc<str>> = None;
        let mut slice = Slice::default();
        loop {
            if queued == 0 {
                match rx.recv() {
                    Ok(job) => {
                        queues.entry(job.tenant.clone()).or_default().push_back(job);
                        queued += 1;
                    }
                    Err(_) => return,
                }
            }
            // Wait for company only while other instances hold contexts.
            let deadline = Instant::now() + settings.max_wait;
            while queued < settings.max_calls.min(self.contexts.load(Ordering::Relaxed)) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(job) => {
                        queues.entry(job.tenant.clone()).or_default().push_back(job);
                        queued += 1;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(job) = rx.try_recv() {
                queues.entry(job.tenant.clone()).or_default().push_back(job);
                queued += 1;
            }
            let batch = match &self.gate {
                None => take_round_robin(&mut queues, &mut last_first, settings.max_calls),
                Some(gate) => {
                    // On a GPU: one tenant's calls a pass, tenants in turn;
                    // one call when another tenant has work waiting, here
                    // or at the device, so a pass is never longer than one
                    // call while the device is shared.
                    let tenant = next_after(&queues, last_first.as_ref()).expect("calls are queued");
                    last_first = Some(tenant.clone());
                    let shared = queues.len() > 1 || gate.contended();
                    let queue = queues.get_mut(&tenant).expect("a queued tenant");
                    let take = if shared { 1 } else { queue.len().min(settings.max_calls).min(slice.calls()) };
                    let batch: Vec<Job> = queue.drain(..take).collect();
                    queues.retain(|_, q| !q.is_empty());
                    queued -= batch.len();
                    let _turn = gate.turn(&tenant);
                    let started = Instant::now();
                    let calls = batch.len();
                    self.pass(batch);
                    slice.record(calls, started.elapsed());
                    continue;
                }
            };
            queued -= batch.len();
            self.pass(batch);
        }
    }

    fn pass(&self, batch: Vec<Job>) {
        run_pass(self.graph.as_ref(), &self.budgets, &self.stats, batch)
    }
}

/// Runs `batch` as one pass of `graph` and answers its calls.
fn run_pass(graph: &dyn Graph, budgets: &Budgets, stats: &BatchStats, batch: Vec<Job>) {
    let (inputs, replies): (Vec<Tensors>, Vec<_>) = batch.into_iter().map(|j| (j.inputs, j.reply)).unzip();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.calls.fetch_add(inputs.len(), Ordering::Relaxed);
    stats.largest.fetch_max(inputs.len(), Ordering::Relaxed);
    let count = inputs.len();
    // Each call's share of the pass's time: its part of the input bytes
    // (calls of several tenants may share a pass; a small call beside a
    // large one pays for little).
    let weights: Vec<u64> = inputs.iter().map(|call| call.iter().map(|(_, t)| t.memory_bytes()).sum::<u64>().max(1)).collect();
    let total: u64 = weights.iter().sum();
    let budget = budgets.for_calls(count);
    let started = Instant::now();
    // A panic in the engine is a bug; it fails this batch, not the model.
    let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| graph.run_batch(inputs, &budget)))
        .unwrap_or_else(|_| (0..count).map(|_| Err(Error::Unsupported("the engine failed on this input".into()))).collect());
    let took = started.elapsed();
    for ((reply, result), weight) in replies.into_iter().zip(results).zip(weights) {
        let share = took.mul_f64(weight as f64 / total as f64);
        let _ = reply.send(result.map(|outputs| (outputs, share)));
    }
}

/// How many calls a GPU pass may hold so that it ends within a time
/// slice, [`SLICE`] or one call's time if that is longer: a tenant alone
/// on the device still batches, but never into a pass that a tenant
/// arriving next would wait long for (passes are not preempted).
#[derive(Default)]
struct Slice {
    /// Seconds one call of a pass takes, on average (recent passes weigh more).
    per_call: Option<f64>,
}

/// The time a pass on a GPU aims to end within.
const SLICE: Duration = Duration::from_millis(20);

impl Slice {
    fn calls(&self) -> usize {
        match self.per_call {
            None => 1,
            Some(per_call) => ((SLICE.as_secs_f64() / per_call) as usize).max(1),
        }
    }

    fn record(&mut self, calls: usize, took: Duration) {
        let per_call = took.as_secs_f64() / calls.max(1) as f64;
        self.per_call = Some(self.per_call.map_or(per_call, |old| 0.7 * old + 0.3 * per_call));
    }
}

/// Up to `max` jobs, one per tenant per turn, starting after the tenant
/// that went first last time.
fn take_round_robin(queues: &mut BTreeMap<Arc<str>, VecDeque<Job>>, last_first: &mut Option<Arc<str>>, max: usize) -> Vec<Job> {
    let mut tenants: Vec<Arc<str>> = queues.keys().cloned().collect();
    if let Some(last) = last_first.as_ref() {
        let split = tenants.iter().position(|t| t > last).unwrap_or(0);
        tenants.rotate_left(split);
    }
    *last_first = tenants.first().cloned();
    let mut batch = Vec::new();
    'turns: loop {
        let mut took = false;
        for tenant in &tenants {
            if batch.len() == max {
                break 'turns;
            }
            if let Some(job) = queues.get_mut(tenant).and_then(VecDeque::pop_front) {
                batch.push(job);
                took = true;
            }
        }
        if !took {
            break;
        }
    }
    queues.retain(|_, q| !q.is_empty());
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tenant: &str, n: u8) -> Job {
        let tensor = Tensor::from_bytes(vec![1], gpuwasm_tensor::DType::U8, &[n]).unwrap();
        Job { tenant: tenant.into(), inputs: vec![("x".into(), tensor)], reply: oneshot::channel().0 }
    }

    fn tag(job: &Job) -> u8 {
        match job.inputs[0].1.data() {
            gpuwasm_tensor::Data::U8(v) => v[0],
            _ => unreachable!(),
        }
    }

    #[test]
    fn batches_alternate_between_tenants() {
        let mut queues: BTreeMap<Arc<str>, VecDeque<Job>> = BTreeMap::new();
        for n in 0..10 {
            queues.entry("busy".into()).or_default().push_back(job("busy", n));
        }
        queues.entry("quiet".into()).or_default().push_back(job("quiet", 100));
        let mut last = None;
        let first = take_round_robin(&mut queues, &mut last, 4);
        // The quiet tenant's one call is in the first batch, not after the flood.
        assert_eq!(first.iter().map(tag).collect::<Vec<_>>(), vec![0, 100, 1, 2]);
        let second = take_round_robin(&mut queues, &mut last, 4);
        assert_eq!(second.iter().map(tag).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    }
}
