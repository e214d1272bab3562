//! Metering: every request's [`Usage`], written durably in batches and
//! aggregated per minute per deployment; usage reports with their cost.
//!
//! Requests add their record to their deployment version's batch, a
//! vector under a lock of its own that the writer takes only to swap the
//! vector (no allocation, message or wake per request; beyond [`QUEUE`]
//! records waiting, a record is dropped and counted). A writer thread
//! takes the batches once a second, counts them into the request metrics,
//! and appends their records, each as a line of
//! `usage/requests-DAY.jsonl`, and each minute's totals per tenant,
//! deployment and models as a line of `usage/minutes-DAY.jsonl` (the
//! second's additions: a minute's lines sum to its totals), then syncs
//! both to disk. A crash loses at most the last second. Files older than
//! the retention are removed at start-up and hourly. Reports read the
//! minute files.
//!
//! Nodes sharing a state ([`SharedUsage`], PostgreSQL) also append the
//! minute lines there, and reports read every node's from there. Lines the
//! shared store refused are tried again each second (up to
//! [`PENDING_LINES`]).

use crate::api::{UsageReport, UsageRow};
use crate::metrics::DeploymentMetrics;
use gpuwasm::Usage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Records waiting for the writer at most; beyond, records are dropped
/// (and at half, the writer is woken early).
const QUEUE: usize = 1 << 16;
/// How often the writer appends and syncs.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Minute lines kept for the shared store while it fails; beyond, the
/// oldest are dropped (this node's files still have them).
const PENDING_LINES: usize = 1 << 20;

/// Where every node's minute lines go, besides each node's files, so
/// that a report through any node covers them all.
pub(crate) trait SharedUsage: Send + Sync {
    /// Appends lines, all or none.
    fn append(&self, lines: &[MinuteLine]) -> Result<(), crate::Error>;
    /// The lines of minutes from `minute` on, of `tenant` (`None`: all).
    fn since(&self, minute: u64, tenant: Option<&str>) -> Result<Vec<MinuteLine>, crate::Error>;
    /// Removes the lines of minutes before `minute`; how many.
    fn forget_before(&self, minute: u64) -> Result<u64, crate::Error>;
}

/// Prices that turn usage into cost (`gpuwasm serve --prices FILE`, TOML).
/// Every price defaults to 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Per second of CPU: guest CPU time plus inference on the CPU.
    #[serde(default)]
    pub cpu_second: f64,
    /// Per second of a GPU busy with a request's inference, by device
    /// (`cuda:NVIDIA H200`, `wgpu:...`, as usage reports name them) or
    /// device kind (`cuda`, `wgpu`); `default` for the others.
    #[serde(default)]
    pub gpu_second: BTreeMap<String, f64>,
    /// Per GB-second of memory: a request's peak linear memory, plus the
    /// graphs it loaded from bytes, times its wall time.
    #[serde(default)]
    pub gb_second: f64,
    /// Per million tokens, prompt and completion.
    #[serde(default)]
    pub million_tokens: f64,
    /// Per request that reached an instance (not refused as busy).
    #[serde(default)]
    pub request: f64,
}

impl Prices {
    /// Reads a price table from a TOML file.
    pub fn load(path: &Path) -> Result<Prices, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let prices: Prices = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let all = [prices.cpu_second, prices.gb_second, prices.million_tokens, prices.request];
        if all.iter().chain(prices.gpu_second.values()).any(|p| !p.is_finite() || *p < 0.0) {
            return Err(format!("{}: prices must be finite and not negative", path.display()));
        }
        Ok(prices)
    }

    /// The price of a second of `device` (`cpu`, `cuda:NAME`, `wgpu:NAME`).
    fn device_second(&self, device: &str) -> f64 {
        if device == "cpu" {
            return self.cpu_second;
        }
        let kind = device.split(':').next().unwrap_or(device);
        [device, kind, "default"].iter().find_map(|k| self.gpu_second.get(*k)).copied().unwrap_or(0.0)
    }

    /// What `totals` cost. Requests refused as busy (no instance was
    /// free) are not charged the per-request price.
    pub fn cost(&self, totals: &Totals) -> f64 {
        let charged = totals.requests - totals.outcomes.get("busy").copied().unwrap_or(0).min(totals.requests);
        let devices: f64 = totals.inference_us.iter().map(|(d, us)| *us as f64 / 1e6 * self.device_second(d)).sum();
        totals.guest_cpu_us as f64 / 1e6 * self.cpu_second
            + devices
            + totals.gb_seconds * self.gb_second
            + (totals.prompt_tokens + totals.completion_tokens) as f64 / 1e6 * self.million_tokens
            + charged as f64 * self.request
    }
}

/// Summed usage of some requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests.
    pub requests: u64,
    /// Requests by outcome (`ok`, `trap`, `timeout`, `limit`, `busy`,
    /// `client-gone`).
    pub outcomes: BTreeMap<String, u64>,
    /// Wall time, microseconds.
    pub wall_us: u64,
    /// Guest CPU time, microseconds.
    pub guest_cpu_us: u64,
    /// Inference time by device, microseconds.
    pub inference_us: BTreeMap<String, u64>,
    /// wasi-nn computes and generations.
    pub inference_calls: u64,
    /// Peak linear memory plus graphs loaded from bytes, times wall time,
    /// GB-seconds (GB = 2^30 bytes).
    pub gb_seconds: f64,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

impl Totals {
    /// Adds one request's usage (allocating only for an outcome or device
    /// not seen yet: the writer does this per request).
    fn add_usage(&mut self, usage: &Usage) {
        fn count(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
            match map.get_mut(key) {
                Some(total) => *total += n,
                None => drop(map.insert(key.to_string(), n)),
            }
        }
        self.requests += 1;
        count(&mut self.outcomes, usage.outcome.as_str(), 1);
        self.wall_us += usage.wall.as_micros() as u64;
        self.guest_cpu_us += usage.guest_cpu.as_micros() as u64;
        for (device, time) in &usage.inference {
            count(&mut self.inference_us, device, time.as_micros() as u64);
        }
        self.inference_calls += usage.inference_calls as u64;
        self.gb_seconds += (usage.peak_memory_bytes + usage.graph_bytes) as f64 / (1u64 << 30) as f64 * usage.wall.as_secs_f64();
        self.bytes_in += usage.bytes_in;
        self.bytes_out += usage.bytes_out;
        self.prompt_tokens += usage.prompt_tokens;
        self.completion_tokens += usage.completion_tokens;
    }

    /// Adds `other` to these.
    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
        self.wall_us += other.wall_us;
        self.guest_cpu_us += other.guest_cpu_us;
        for (k, v) in &other.inference_us {
            *self.inference_us.entry(k.clone()).or_default() += v;
        }
        self.inference_calls += other.inference_calls;
        self.gb_seconds += other.gb_seconds;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// One request, as `requests-DAY.jsonl` keeps it.
#[derive(Serialize)]
struct RequestLine<'a> {
    /// Arrival, milliseconds since the Unix epoch.
    at_ms: u64,
    tenant: &'a str,
    deployment: &'a str,
    version: u64,
    outcome: &'static str,
    wall_us: u64,
    guest_cpu_us: u64,
    inference_us: BTreeMap<&'a str, u64>,
    inference_calls: u32,
    models: &'a [String],
    peak_memory_bytes: u64,
    graph_bytes: u64,
    bytes_in: u64,
    bytes_out: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// What one second added to a minute's totals, as `minutes-DAY.jsonl`
/// keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MinuteLine {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    pub tenant: String,
    pub deployment: String,
    /// The models its requests loaded, `+`-joined (empty: none).
    pub models: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// The records of one deployment version not yet written: its requests
/// add theirs to `filling`; the writer swaps in `spare` (the vector it
/// wrote last time, cleared) and takes them all at once, so that in a
/// steady state neither side allocates. An idle version keeps neither.
struct Pending {
    tenant: Arc<str>,
    deployment: Arc<str>,
    version: u64,
    /// The deployment's request metrics, which the writer counts the
    /// records into as it takes them.
    metrics: DeploymentMetrics,
    batch: Mutex<Batch>,
}

#[derive(Default)]
struct Batch {
    filling: Vec<Usage>,
    spare: Vec<Usage>,
}

/// What the recorders and the writer share.
#[derive(Default)]
struct Queue {
    /// Every recorder's pending records; the writer forgets those of a
    /// recorder that is gone once it has written them.
    pending: Mutex<Vec<Arc<Pending>>>,
    /// Records added and not yet written.
    backlog: AtomicU64,
    /// Records dropped because the backlog was full.
    dropped: AtomicU64,
    /// The writer, woken early by a backlog half full.
    writer: OnceLock<std::thread::Thread>,
}

/// The node's metering: the records waiting, the writer thread that takes
/// them, and reports over what it wrote.
pub(crate) struct Metering {
    dir: PathBuf,
    shared: Option<Arc<dyn SharedUsage>>,
    queue: Arc<Queue>,
    /// Asks the writer to write now, and answers once it has.
    flushes: Sender<Flush>,
}

/// A caller waiting for the writer to take every record added so far.
struct Flush {
    /// Answered once the records are written (and shared), or, when
    /// `counted_only`, once they are counted into the metrics.
    ack: SyncSender<()>,
    counted_only: bool,
}

/// Adds a deployment's records to its pending batch (see
/// [`Metering::recorder`]).
pub(crate) struct Recorder {
    queue: Arc<Queue>,
    pending: Arc<Pending>,
}

impl Recorder {
    /// Adds `usage` to what the writer takes next; never waits on the
    /// disk (the writer holds the batch's lock only to swap its vector).
    /// Beyond [`QUEUE`] records waiting, it is dropped and counted.
    pub(crate) fn record(&self, usage: Usage) {
        let waiting = self.queue.backlog.fetch_add(1, Ordering::Relaxed);
        if waiting >= QUEUE as u64 {
            self.queue.backlog.fetch_sub(1, Ordering::Relaxed);
            if self.queue.dropped.fetch_add(1, Ordering::Relaxed) % 10_000 == 0 {
                tracing::warn!("metering backlog full: usage records dropped (see gpuwasm_metering_dropped_total)");
            }
            return;
        }
        self.pending.batch.lock().unwrap().filling.push(usage);
        if waiting == QUEUE as u64 / 2 {
            if let Some(writer) = self.queue.writer.get() {
                writer.unpark();
            }
        }
    }
}

impl Metering {
    /// Starts metering into `dir` (and `shared`), keeping `retention_days`.
    pub(crate) fn start(dir: PathBuf, retention_days: u32, shared: Option<Arc<dyn SharedUsage>>) -> std::io::Result<Metering> {
        std::fs::create_dir_all(&dir)?;
        let queue = Arc::new(Queue::default());
        let (flushes, rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            dir: dir.clone(),
            retention_days,
            queue: queue.clone(),
            checked: HashSet::new(),
            last_sweep: None,
            sharer: None,
        };
        if let Some(shared) = &shared {
            let (tx, rx) = std::sync::mpsc::channel();
            let sharer = Sharer { shared: shared.clone(), retention_days, pending: Vec::new(), failing: false };
            std::thread::Builder::new().name("gpuwasm-usage-share".into()).spawn(move || sharer.run(rx))?;
            writer.sharer = Some(tx);
        }
        // Not joined: it ends once the metering and every recorder are gone.
        let thread = std::thread::Builder::new().name("gpuwasm-metering".into()).spawn(move || writer.run(rx))?;
        let _ = queue.writer.set(thread.thread().clone());
        Ok(Metering { dir, shared, queue, flushes })
    }

    /// A recorder for the requests of one deployment version, counted into
    /// `metrics` too.
    pub(crate) fn recorder(&self, tenant: &str, deployment: &str, version: u64, metrics: DeploymentMetrics) -> Recorder {
        let pending = Arc::new(Pending { tenant: tenant.into(), deployment: deployment.into(), version, metrics, batch: Mutex::default() });
        self.queue.pending.lock().unwrap().push(pending.clone());
        Recorder { queue: self.queue.clone(), pending }
    }

    /// Records waiting and not yet written.
    pub(crate) fn backlog(&self) -> u64 {
        self.queue.backlog.load(Ordering::Relaxed)
    }

    /// Records dropped because the backlog was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Writes every record added so far. Blocking.
    pub(crate) fn flush(&self) {
        self.wait_for_writer(false);
    }

    /// Counts every record added so far into the request metrics, without
    /// waiting for them to be written or shared (only for a write under
    /// way). Blocking.
    pub(crate) fn count(&self) {
        self.wait_for_writer(true);
    }

    fn wait_for_writer(&self, counted_only: bool) {
        let (ack, rx) = std::sync::mpsc::sync_channel(1);
        if self.flushes.send(Flush { ack, counted_only }).is_ok() {
            if let Some(writer) = self.queue.writer.get() {
                writer.unpark();
            }
            let _ = rx.recv();
        }
    }

    /// Usage of `tenant` (all tenants: `None`) since `since`, grouped `by`,
    /// with its cost at `prices`: every node's when usage is shared, else
    /// this node's. Blocking: reads the minute files or the shared store.
    pub(crate) fn report(&self, tenant: Option<&str>, since: SystemTime, by: GroupBy, prices: &Prices) -> Result<UsageReport, crate::Error> {
        self.flush();
        let since_minute = unix_secs(since) / 60;
        let until = SystemTime::now();
        let lines = match &self.shared {
            Some(shared) => shared.since(since_minute, tenant)?,
            None => self.read_minutes(since_minute, until)?,
        };
        let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
        for row in lines.iter().filter(|row| row.minute >= since_minute && tenant.is_none_or(|t| t == row.tenant)) {
            let key = match by {
                GroupBy::Deployment => format!("{}/{}", row.tenant, row.deployment),
                GroupBy::Model => if row.models.is_empty() { "(none)".into() } else { row.models.clone() },
                GroupBy::Day => date(row.minute / (24 * 60)),
                GroupBy::Tenant => row.tenant.clone(),
            };
            groups.entry(key).or_default().add(&row.totals);
        }
        let mut total = Totals::default();
        let rows = groups
            .into_iter()
            .map(|(key, totals)| {
                total.add(&totals);
                UsageRow { cost: prices.cost(&totals), key, totals }
            })
            .collect();
        Ok(UsageReport {
            tenant: tenant.map(String::from),
            since_unix: since_minute * 60,
            until_unix: unix_secs(until),
            by: by.as_str().into(),
            prices: prices.clone(),
            rows,
            total: UsageRow { key: "total".into(), cost: prices.cost(&total), totals: total },
        })
    }

    /// This node's minute lines from `since_minute` to `until`.
    fn read_minutes(&self, since_minute: u64, until: SystemTime) -> Result<Vec<MinuteLine>, crate::Error> {
        let mut lines = Vec::new();
        for day in day_of(since_minute * 60)..=day_of(unix_secs(until)) {
            let path = self.dir.join(format!("minutes-{}.jsonl", date(day)));
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::Error::io("reading usage", path, e)),
            };
            for line in text.lines().filter(|l| !l.is_empty()) {
                match serde_json::from_str::<MinuteLine>(line) {
                    Ok(row) => lines.push(row),
                    Err(_) => tracing::warn!(file = %path.display(), "skipping an unreadable metering line (cut short by a crash?)"),
                }
            }
        }
        Ok(lines)
    }
}

impl Drop for Metering {
    fn drop(&mut self) {
        // The writer ends once every recorder is gone too; deployments may
        // still hold some: what they add is written.
        self.flush();
    }
}

/// How a usage report groups requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// By tenant and deployment.
    Deployment,
    /// By the models requests loaded.
    Model,
    /// By UTC day.
    Day,
    /// By tenant.
    Tenant,
}

impl GroupBy {
    /// Parses `deployment`, `model`, `day` or `tenant`.
    pub fn parse(text: &str) -> Option<GroupBy> {
        Some(match text {
            "deployment" => GroupBy::Deployment,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "tenant" => GroupBy::Tenant,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            GroupBy::Deployment => "deployment",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::Tenant => "tenant",
        }
    }
}

struct Writer {
    dir: PathBuf,
    retention_days: u32,
    queue: Arc<Queue>,
    /// Files whose end this process has checked (see [`Writer::append`]).
    checked: HashSet<PathBuf>,
    last_sweep: Option<Instant>,
    /// Takes the minute lines to the shared store, if usage is shared.
    sharer: Option<std::sync::mpsc::Sender<Share>>,
}

/// Minute lines for the shared store, and flushes waiting for them.
struct Share {
    lines: Vec<MinuteLine>,
    acks: Vec<SyncSender<()>>,
}

/// Appends minute lines to the shared store on a thread of its own, so
/// that a slow or absent store never holds up the node's own files (nor
/// the records requests add).
struct Sharer {
    shared: Arc<dyn SharedUsage>,
    retention_days: u32,
    /// Lines not yet in the shared store.
    pending: Vec<MinuteLine>,
    /// Whether the last append failed (logged once).
    failing: bool,
}

impl Writer {
    /// Sleeps until the next write is due (or a flush, or a backlog half
    /// full, wakes it), then takes every recorder's batch and writes it.
    /// Requests never wake it: a wake per record (a futex wake and a
    /// context switch) cost 10% of a small handler's throughput. It ends
    /// when the [`Metering`] and every recorder are gone.
    fn run(&mut self, flushes: Receiver<Flush>) {
        let (mut counting, mut waiting): (Vec<SyncSender<()>>, Vec<SyncSender<()>>) = (Vec::new(), Vec::new());
        let mut due = Instant::now() + FLUSH_EVERY;
        let mut closed = false;
        loop {
            if self.last_sweep.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                self.sweep();
            }
            std::thread::park_timeout(due.saturating_duration_since(Instant::now()));
            loop {
                match flushes.try_recv() {
                    Ok(Flush { ack, counted_only: true }) => counting.push(ack),
                    Ok(Flush { ack, counted_only: false }) => waiting.push(ack),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let urgent = self.queue.backlog.load(Ordering::Relaxed) >= QUEUE as u64 / 2;
            if waiting.is_empty() && counting.is_empty() && !closed && !urgent && Instant::now() < due {
                continue;
            }
            let pending = self.queue.pending.lock().unwrap().clone();
            let mut taken: Vec<(&Pending, Vec<Usage>)> = Vec::new();
            for p in &pending {
                let mut batch = p.batch.lock().unwrap();
                if batch.filling.is_empty() {
                    // Idle: its vectors are given back.
                    batch.filling = Vec::new();
                    batch.spare = Vec::new();
                } else {
                    let spare = std::mem::take(&mut batch.spare);
                    taken.push((p, std::mem::replace(&mut batch.filling, spare)));
                }
            }
            for (p, usages) in &taken {
                usages.iter().for_each(|u| p.metrics.observe(u));
            }
            for ack in counting.drain(..) {
                let _ = ack.send(());
            }
            let records: usize = taken.iter().map(|(_, usages)| usages.len()).sum();
            let lines = minute_lines(&taken);
            if let Err(e) = self.write(&taken, &lines) {
                tracing::error!(error = %e, dir = %self.dir.display(), records, "writing usage records failed; they are lost");
            }
            self.queue.backlog.fetch_sub(records as u64, Ordering::Relaxed);
            for (p, mut usages) in taken {
                // Kept for the next swap, at about the size a second needs.
                let len = usages.len();
                usages.clear();
                usages.shrink_to(2 * len);
                p.batch.lock().unwrap().spare = usages;
            }
            // A recorder that is gone (the list holds the only reference)
            // adds nothing more: forgotten once what it added is taken. A
            // recorder made meanwhile holds one too, so it stays.
            drop(pending);
            self.queue.pending.lock().unwrap().retain(|p| Arc::strong_count(p) > 1 || !p.batch.lock().unwrap().filling.is_empty());
            if let Some(sharer) = &self.sharer {
                // The sharer answers the flushes once their lines are shared.
                let _ = sharer.send(Share { lines, acks: std::mem::take(&mut waiting) });
            }
            for ack in waiting.drain(..) {
                let _ = ack.send(());
            }
            if closed && self.queue.pending.lock().unwrap().is_empty() {
                return;
            }
            due = Instant::now() + FLUSH_EVERY;
        }
    }

    fn write(&mut self, taken: &[(&Pending, Vec<Usage>)], lines: &[MinuteLine]) -> std::io::Result<()> {
        if taken.is_empty() {
            return Ok(());
        }
        let mut requests: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (r, u) in taken.iter().flat_map(|(p, usages)| usages.iter().map(move |u| (p, u))) {
            let at = u.started.duration_since(UNIX_EPOCH).unwrap_or_default();
            let line = RequestLine {
                at_ms: at.as_millis() as u64,
                tenant: &r.tenant,
                deployment: &r.deployment,
                version: r.version,
                outcome: u.outcome.as_str(),
                wall_us: u.wall.as_micros() as u64,
                guest_cpu_us: u.guest_cpu.as_micros() as u64,
                inference_us: u.inference.iter().map(|(d, t)| (d.as_str(), t.as_micros() as u64)).collect(),
                inference_calls: u.inference_calls,
                models: &u.models,
                peak_memory_bytes: u.peak_memory_bytes,
                graph_bytes: u.graph_bytes,
                bytes_in: u.bytes_in,
                bytes_out: u.bytes_out,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            };
            let text = requests.entry(day_of(at.as_secs())).or_default();
            serde_json::to_writer(&mut *text, &line).expect("a usage line serialises");
            text.push(b'\n');
        }
        let mut by_day: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for line in lines {
            let text = by_day.entry(line.minute / (24 * 60)).or_default();
            serde_json::to_writer(&mut *text, line).expect("a minute line serialises");
            text.push(b'\n');
        }
        for (day, text) in &requests {
            self.append(&format!("requests-{}.jsonl", date(*day)), text)?;
        }
        for (day, text) in &by_day {
            self.append(&format!("minutes-{}.jsonl", date(*day)), text)?;
        }
        Ok(())
    }

    /// Appends `text` to the file `name` and syncs it. The first time this
    /// process appends to a file, a last line cut short by a crash is
    /// ended, so that it does not run into the next one.
    fn append(&mut self, name: &str, text: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(name);
        let mut file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&path)?;
        let mut prefix = "";
        if self.checked.insert(path) && file.metadata()?.len() > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                prefix = "\n";
            }
        }
        file.write_all(prefix.as_bytes())?;
        file.write_all(text)?;
        file.sync_data()
    }

    /// Removes files older than the retention.
    fn sweep(&mut self) {
        self.last_sweep = Some(Instant::now());
        let oldest = date(oldest_kept_day(self.retention_days));
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let day = name.strip_suffix(".jsonl").and_then(|n| n.strip_prefix("requests-").or_else(|| n.strip_prefix("minutes-")));
            if day.is_some_and(|d| d < oldest.as_str()) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::info!(file = %name, "usage file past its retention removed"),
                    Err(e) => tracing::warn!(file = %name, error = %e, "removing an old usage file failed"),
                }
            }
        }
    }
}

impl Sharer {
    /// Takes what the writer sends until it ends: appends it, with any
    /// lines left from failed appends, and removes lines past the
    /// retention hourly.
    fn run(mut self, rx: Receiver<Share>) {
        let mut last_sweep: Option<Instant> = None;
        while let Ok(first) = rx.recv() {
            let mut acks = Vec::new();
            for share in std::iter::once(first).chain(rx.try_iter()) {
                self.pending.extend(share.lines);
                acks.extend(share.acks);
            }
            if last_sweep.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                last_sweep = Some(Instant::now());
                match self.shared.forget_before(oldest_kept_day(self.retention_days) * 24 * 60) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(lines = n, "shared usage lines past their retention removed"),
                    Err(e) => tracing::warn!(error = %e, "removing old shared usage lines failed"),
                }
            }
            self.append();
            for ack in acks {
                let _ = ack.send(());
            }
        }
    }

    fn append(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.shared.append(&self.pending) {
            Ok(()) => {
                if self.failing {
                    tracing::info!(lines = self.pending.len(), "usage lines reach the shared store again");
                }
                self.failing = false;
                self.pending.clear();
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "the shared store refused usage lines; trying again with the next ones");
                }
                self.failing = true;
                let excess = self.pending.len().saturating_sub(PENDING_LINES);
                if excess > 0 {
                    self.pending.drain(..excess);
                    tracing::warn!(dropped = excess, "usage lines dropped from the shared store's backlog (this node's files keep them)");
                }
            }
        }
    }
}

/// What the `taken` records add to each minute's totals per tenant,
/// deployment and models.
fn minute_lines(taken: &[(&Pending, Vec<Usage>)]) -> Vec<MinuteLine> {
    let mut minutes: HashMap<(u64, &str, &str, String), Totals> = HashMap::new();
    for (r, u) in taken.iter().flat_map(|(p, usages)| usages.iter().map(move |u| (p, u))) {
        let at = u.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut models = u.models.clone();
        models.sort();
        minutes.entry((at.as_secs() / 60, &*r.tenant, &*r.deployment, models.join("+"))).or_default().add_usage(u);
    }
    minutes
        .into_iter()
        .map(|((minute, tenant, deployment, models), totals)| MinuteLine { minute, tenant: tenant.into(), deployment: deployment.into(), models, totals })
        .collect()
}

/// Parses a duration: seconds (`3600`) or a number with a unit, `s`, `m`,
/// `h` or `d` (`90m`, `24h`, `7d`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(secs).map(Duration::from_secs)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The day (since the Unix epoch) of a time in seconds.
/// The first day (since the epoch) still kept with `retention_days`.
fn oldest_kept_day(retention_days: u32) -> u64 {
    day_of(unix_secs(SystemTime::now())).saturating_sub(u64::from(retention_days))
}

fn day_of(secs: u64) -> u64 {
    secs / 86_400
}

/// `YYYY-MM-DD` of a day since the Unix epoch (the proleptic Gregorian
/// calendar, as in Howard Hinnant's `civil_from_days`).
pub(crate) fn date(day: u64) -> String {
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwasm::Outcome;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        for bad in ["", "h", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_782), "2024-02-29");
        assert_eq!(date(20_790), "2026-12-03");
    }

    /// Every request line written in `dir`, whatever its day (a test may
    /// run across midnight).
    fn request_lines(dir: &Path) -> Vec<String> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("requests-")).collect();
        names.sort();
        names.iter().flat_map(|p| std::fs::read_to_string(p).unwrap().lines().map(String::from).collect::<Vec<_>>()).collect()
    }

    fn usage(cpu_ms: u64, gpu_ms: u64, outcome: Outcome) -> Usage {
        Usage {
            started: SystemTime::now(),
            wall: Duration::from_millis(2000),
            guest_cpu: Duration::from_millis(cpu_ms),
            inference: vec![("cpu".into(), Duration::from_millis(500)), ("cuda:NVIDIA H200".into(), Duration::from_millis(gpu_ms))],
            inference_calls: 2,
            models: vec!["minilm".into()],
            peak_memory_bytes: 512 << 20,
            graph_bytes: 0,
            bytes_in: 10,
            bytes_out: 20,
            prompt_tokens: 300_000,
            completion_tokens: 200_000,
            outcome,
        }
    }

    /// Cost arithmetic against values computed by hand.
    #[test]
    fn cost_by_hand() {
        let prices = Prices {
            cpu_second: 0.01,
            gpu_second: [("cuda".to_string(), 1.0), ("default".into(), 100.0)].into(),
            gb_second: 0.1,
            million_tokens: 2.0,
            request: 0.5,
        };
        let mut totals = Totals::default();
        totals.add_usage(&usage(1500, 250, Outcome::Ok));
        totals.add_usage(&usage(500, 750, Outcome::Trap));
        assert_eq!(totals.outcomes, [("ok".to_string(), 1), ("trap".into(), 1)].into());
        // CPU: 2 s of guest + 1 s of CPU inference = 3 s at 0.01 = 0.03.
        // GPU: 1 s at 1.0 (by kind; `default` does not apply) = 1.0.
        // Memory: 0.5 GB x 2 s x 2 requests = 2 GB-s at 0.1 = 0.2.
        // Tokens: 1 million at 2.0 = 2.0. Requests: 2 at 0.5 = 1.0.
        let cost = prices.cost(&totals);
        assert!((cost - 4.23).abs() < 1e-9, "{cost}");
        // A device named exactly wins over its kind; an unknown kind
        // takes `default`.
        let named = Prices { gpu_second: [("cuda:NVIDIA H200".to_string(), 3.0), ("cuda".into(), 1.0)].into(), ..Prices::default() };
        assert!((named.cost(&totals) - 3.0).abs() < 1e-9);
        let other = Prices { gpu_second: [("default".to_string(), 2.0)].into(), ..Prices::default() };
        assert!((other.cost(&totals) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn records_are_written_per_minute_and_reported_by_group() {
        let dir = tempfile::tempdir().unwrap();
        let metering = Metering::start(dir.path().to_path_buf(), 30, None).unwrap();
        let a = metering.recorder("acme", "api", 1, crate::metrics::Metrics::new().deployment("acme", "api"));
        let b = metering.recorder("other", "api", 3, crate::metrics::Metrics::new().deployment("other", "api"));
        a.record(usage(1000, 0, Outcome::Ok));
        a.record(usage(1000, 0, Outcome::Limit));
        b.record(usage(3000, 0, Outcome::Ok));
        let prices = Prices { cpu_second: 1.0, ..Prices::default() };
        let since = SystemTime::now() - Duration::from_secs(3600);
        let report = metering.report(Some("acme"), since, GroupBy::Deployment, &prices).unwrap();
        assert_eq!(report.rows.len(), 1, "{report:?}");
        assert_eq!((report.rows[0].key.as_str(), report.rows[0].totals.requests), ("acme/api", 2));
        // 2 s of guest CPU and 1 s of CPU inference at 1 per second.
        assert!((report.total.cost - 3.0).abs() < 1e-9, "{}", report.total.cost);
        let all = metering.report(None, since, GroupBy::Tenant, &prices).unwrap();
        assert_eq!(all.rows.iter().map(|r| (r.key.as_str(), r.totals.requests)).collect::<Vec<_>>(), [("acme", 2), ("other", 1)]);
        let models = metering.report(None, since, GroupBy::Model, &prices).unwrap();
        assert_eq!((models.rows[0].key.as_str(), models.rows[0].totals.requests), ("minilm", 3));
        assert_eq!(metering.backlog(), 0);

        // Each request is a line; a line cut short by a crash is ended
        // before the next append, and skipped by reports.
        let today = date(day_of(unix_secs(SystemTime::now())));
        let requests = std::fs::read_to_string(dir.path().join(format!("requests-{today}.jsonl"))).unwrap();
        assert_eq!(requests.lines().count(), 3);
        drop(metering);
        let minutes = dir.path().join(format!("minutes-{today}.jsonl"));
        std::fs::OpenOptions::new().append(true).open(&minutes).unwrap().write_all(b"{\"minute\":1").unwrap();
        let metering = Metering::start(dir.path().to_path_buf(), 30, None).unwrap();
        metering.recorder("acme", "api", 2, crate::metrics::Metrics::new().deployment("acme", "api")).record(usage(1000, 0, Outcome::Ok));
        let report = metering.report(Some("acme"), since, GroupBy::Day, &prices).unwrap();
        assert_eq!((report.rows[0].key.as_str(), report.total.totals.requests), (today.as_str(), 3));
    }

    /// What a recorder added is written after it is gone, and counted into
    /// its deployment's request metrics; then the writer forgets it.
    #[test]
    fn a_recorder_gone_is_written_counted_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let metering = Metering::start(dir.path().to_path_buf(), 30, None).unwrap();
        let metrics = crate::metrics::Metrics::new();
        let recorder = metering.recorder("acme", "api", 1, metrics.deployment("acme", "api"));
        recorder.record(usage(1000, 0, Outcome::Ok));
        recorder.record(usage(1000, 0, Outcome::Trap));
        drop(recorder);
        metering.flush();
        assert_eq!(metering.backlog(), 0);
        assert!(metering.queue.pending.lock().unwrap().is_empty(), "the recorder gone is still listed");
        assert_eq!(request_lines(dir.path()).len(), 2);
        let none = crate::metrics::Snapshot { instances: 0, queued: vec![], resident: vec![], model_loads: 0, metering_backlog: 0, metering_dropped: 0 };
        let text = metrics.render(none);
        for outcome in ["ok", "trap"] {
            let line = format!("gpuwasm_requests_total{{tenant=\"acme\",deployment=\"api\",outcome=\"{outcome}\"}} 1");
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    /// Recorders made while the writer writes (a deploy on a busy node)
    /// are not taken for gone: their records are written.
    #[test]
    fn recorders_made_during_a_write_keep_their_records() {
        let dir = tempfile::tempdir().unwrap();
        let metering = Arc::new(Metering::start(dir.path().to_path_buf(), 30, None).unwrap());
        let metrics = crate::metrics::Metrics::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Rounds that write and sync, one after another.
        let busy = {
            let (metering, stop, recorder) = (metering.clone(), stop.clone(), metering.recorder("acme", "busy", 1, metrics.deployment("acme", "busy")));
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    recorder.record(usage(1, 0, Outcome::Ok));
                    metering.flush();
                    n += 1;
                }
                n
            })
        };
        let recorders: Vec<Recorder> = (0..100)
            .map(|v| {
                std::thread::sleep(Duration::from_millis(1));
                metering.recorder("acme", "api", v, metrics.deployment("acme", "api"))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        recorders.iter().for_each(|r| r.record(usage(1, 0, Outcome::Ok)));
        stop.store(true, Ordering::Relaxed);
        let busy_records = busy.join().unwrap();
        metering.flush();
        let requests = request_lines(dir.path());
        assert_eq!(requests.iter().filter(|l| l.contains("\"deployment\":\"api\"")).count(), 100);
        assert_eq!(requests.len(), 100 + busy_records);
        assert_eq!(metering.backlog(), 0);
    }

    #[test]
    fn files_past_the_retention_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("minutes-2001-01-01.jsonl");
        let kept = dir.path().join(format!("minutes-{}.jsonl", date(day_of(unix_secs(SystemTime::now())) - 2)));
        std::fs::write(&old, "").unwrap();
        std::fs::write(&kept, "").unwrap();
        let metering = Metering::start(dir.path().to_path_buf(), 7, None).unwrap();
        metering.flush();
        assert!(!old.exists() && kept.exists());
    }
}
