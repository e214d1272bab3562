//! Prometheus metrics of a node, in the OpenMetrics text format
//! (`gpuwasm serve --metrics-listen`): requests by outcome and their
//! latency, guest CPU and inference time per tenant and deployment; at each
//! scrape, instances running, queue depth per deployment, resident model
//! bytes per device, model loads, and the metering backlog.

use gpuwasm::{Outcome, Usage};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    tenant: String,
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    tenant: String,
    deployment: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    tenant: String,
    deployment: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    tenant: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResidentLabels {
    device: String,
}

type Seconds = Counter<f64, AtomicU64>;

fn latency() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The node's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    rejected: Family<RejectionLabels, Counter>,
    duration: Family<DeploymentLabels, Histogram, fn() -> Histogram>,
    guest_cpu: Family<DeploymentLabels, Seconds>,
    inference: Family<DeviceLabels, Seconds>,
    bytes_in: Family<DeploymentLabels, Counter>,
    bytes_out: Family<DeploymentLabels, Counter>,
    instances: Gauge,
    queued: Family<DeploymentLabels, Gauge>,
    resident: Family<ResidentLabels, Gauge>,
    model_loads: Counter,
    metering_backlog: Gauge,
    metering_dropped: Counter,
    /// One scrape at a time: a scrape sets the gauges it reads.
    scrape: std::sync::Mutex<()>,
}

/// What a scrape reads from the node at that moment.
pub(crate) struct Snapshot {
    pub instances: u64,
    /// Requests waiting for an instance, per (tenant, deployment).
    pub queued: Vec<(String, String, u64)>,
    /// Bytes of resident models per device.
    pub resident: Vec<(String, u64)>,
    pub model_loads: u64,
    pub metering_backlog: u64,
    pub metering_dropped: u64,
}

/// One deployment's metrics, looked up once: recording a request takes no
/// lookup unless it used a device.
pub(crate) struct DeploymentMetrics {
    tenant: String,
    deployment: String,
    outcomes: Vec<(Outcome, Counter)>,
    duration: Histogram,
    guest_cpu: Seconds,
    bytes_in: Counter,
    bytes_out: Counter,
    inference: Family<DeviceLabels, Seconds>,
}

impl DeploymentMetrics {
    /// Counts one request's usage.
    pub(crate) fn observe(&self, usage: &Usage) {
        if let Some((_, counter)) = self.outcomes.iter().find(|(o, _)| *o == usage.outcome) {
            counter.inc();
        }
        self.duration.observe(usage.wall.as_secs_f64());
        self.guest_cpu.inc_by(usage.guest_cpu.as_secs_f64());
        self.bytes_in.inc_by(usage.bytes_in);
        self.bytes_out.inc_by(usage.bytes_out);
        for (device, time) in &usage.inference {
            let labels = DeviceLabels { tenant: self.tenant.clone(), deployment: self.deployment.clone(), device: device.clone() };
            self.inference.get_or_create(&labels).inc_by(time.as_secs_f64());
        }
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpuwasm");
        let m = Metrics {
            requests: Family::default(),
            rejected: Family::default(),
            duration: Family::new_with_constructor(latency),
            guest_cpu: Family::default(),
            inference: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            instances: Gauge::default(),
            queued: Family::default(),
            resident: Family::default(),
            model_loads: Counter::default(),
            metering_backlog: Gauge::default(),
            metering_dropped: Counter::default(),
            scrape: std::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests answered, by how they ended", m.requests.clone());
        registry.register("rejected_requests", "Requests refused before reaching a deployment, by tenant and reason (rate: over its quota)", m.rejected.clone());
        registry.register("request_duration_seconds", "Time from a request's arrival until its guest finished", m.duration.clone());
        registry.register("guest_cpu_seconds", "CPU time of guests (thread CPU clock)", m.guest_cpu.clone());
        registry.register("inference_seconds", "Device time of inference done for guests", m.inference.clone());
        registry.register("request_body_bytes", "Request body bytes read by guests", m.bytes_in.clone());
        registry.register("response_body_bytes", "Response body bytes sent", m.bytes_out.clone());
        registry.register("instances_running", "Instances running now", m.instances.clone());
        registry.register("queue_depth", "Requests waiting for an instance of a deployment", m.queued.clone());
        registry.register("resident_model_bytes", "Bytes of models resident, per device", m.resident.clone());
        registry.register("model_loads", "Models loaded into the cache", m.model_loads.clone());
        registry.register("metering_backlog", "Usage records waiting to be written", m.metering_backlog.clone());
        registry.register("metering_dropped", "Usage records dropped because too many were waiting to be written", m.metering_dropped.clone());
        Metrics { registry, ..m }
    }

    /// Counts a request of `tenant` refused for `reason` before it reached
    /// a deployment.
    pub(crate) fn rejected(&self, tenant: &str, reason: &str) {
        self.rejected.get_or_create_owned(&RejectionLabels { tenant: tenant.into(), reason: reason.into() }).inc();
    }

    /// The metrics of one deployment.
    pub(crate) fn deployment(&self, tenant: &str, deployment: &str) -> DeploymentMetrics {
        let labels = DeploymentLabels { tenant: tenant.into(), deployment: deployment.into() };
        let outcome = |o: Outcome| {
            let labels = OutcomeLabels { tenant: tenant.into(), deployment: deployment.into(), outcome: o.as_str().into() };
            (o, self.requests.get_or_create_owned(&labels))
        };
        DeploymentMetrics {
            tenant: tenant.into(),
            deployment: deployment.into(),
            outcomes: [Outcome::Ok, Outcome::Trap, Outcome::Timeout, Outcome::Limit, Outcome::Busy, Outcome::ClientGone]
                .into_iter()
                .map(outcome)
                .collect(),
            duration: self.duration.get_or_create_owned(&labels),
            guest_cpu: self.guest_cpu.get_or_create_owned(&labels),
            bytes_in: self.bytes_in.get_or_create_owned(&labels),
            bytes_out: self.bytes_out.get_or_create_owned(&labels),
            inference: self.inference.clone(),
        }
    }

    /// The metrics as OpenMetrics text, with the node's state read now.
    pub(crate) fn render(&self, now: Snapshot) -> String {
        let _one = self.scrape.lock().unwrap();
        self.instances.set(now.instances as i64);
        self.queued.clear();
        for (tenant, deployment, n) in now.queued {
            self.queued.get_or_create(&DeploymentLabels { tenant, deployment }).set(n as i64);
        }
        self.resident.clear();
        for (device, bytes) in now.resident {
            self.resident.get_or_create(&ResidentLabels { device }).inc_by(bytes as i64);
        }
        self.model_loads.inc_by(now.model_loads.saturating_sub(self.model_loads.get()));
        self.metering_backlog.set(now.metering_backlog as i64);
        self.metering_dropped.inc_by(now.metering_dropped.saturating_sub(self.metering_dropped.get()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

/// The content type of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
