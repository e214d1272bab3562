//! GPUs as shared, metered resources: memory ([`Ledger`]) and time
//! ([`DeviceGate`]).
//!
//! Memory: each GPU has a budget (most of its memory, or what the node
//! sets); each tenant a quota ([`TenantGpu::memory_mb`]). A loaded model
//! holds a [`Charge`] of its bytes against its device's budget, and one
//! against the quota of every tenant that loaded it: the same weights are
//! loaded once per device and shared, but each tenant using them pays for
//! them, as it could not run without them. Charges are given back when the
//! model is dropped, so the ledger always tells what is resident.
//!
//! Time: passes on one GPU take turns at its [`DeviceGate`]. Each tenant
//! has a virtual time, the device time its turns took divided by its
//! [`TenantGpu::weight`]; when the device is free, the waiting tenant with
//! the least virtual time goes next (its own turns in arrival order). A
//! tenant that had no work waiting comes back at the virtual time of the
//! tenant being served, never earlier, so idling banks no credit: a tenant
//! saturating the device runs ahead in virtual time, and a light tenant
//! arriving waits for at most the turn in progress.

use gpuwasm_tensor::Error;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// What a tenant may use of the node's GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantGpu {
    /// GPU memory its resident models may hold on each device, in MiB
    /// (`None`: no quota beyond the device's budget).
    pub memory_mb: Option<u64>,
    /// Its share of GPU time against other tenants with work waiting
    /// (default 1; a tenant of weight 2 gets twice the time of one of 1).
    pub weight: u32,
}

impl Default for TenantGpu {
    fn default() -> Self {
        TenantGpu { memory_mb: None, weight: 1 }
    }
}

/// Tenants' GPU settings, shared by the ledger and the gates.
#[derive(Debug, Default)]
pub(crate) struct TenantSettings {
    by_tenant: Mutex<HashMap<String, TenantGpu>>,
}

impl TenantSettings {
    pub(crate) fn set(&self, tenant: &str, settings: TenantGpu) {
        self.by_tenant.lock().unwrap().insert(tenant.to_string(), settings);
    }

    pub(crate) fn get(&self, tenant: &str) -> TenantGpu {
        self.by_tenant.lock().unwrap().get(tenant).copied().unwrap_or_default()
    }
}

/// GPU memory of the node: per device, per tenant.
#[derive(Debug)]
pub(crate) struct Ledger {
    state: Mutex<LedgerState>,
    tenants: Arc<TenantSettings>,
}

#[derive(Debug, Default)]
struct LedgerState {
    /// Device name -> (budget, bytes charged).
    devices: HashMap<String, (u64, u64)>,
    /// (tenant, device) -> bytes charged.
    tenants: HashMap<(String, String), u64>,
}

/// Bytes held against a device's budget, and a tenant's quota when it
/// has a tenant; given back when dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    ledger: Arc<Ledger>,
    device: String,
    tenant: Option<String>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut state = self.ledger.state.lock().unwrap();
        match self.tenant.take() {
            None => {
                if let Some((_, used)) = state.devices.get_mut(&self.device) {
                    *used -= self.bytes;
                }
            }
            Some(tenant) => {
                let key = (tenant, self.device.clone());
                if let Some(used) = state.tenants.get_mut(&key) {
                    *used -= self.bytes;
                    if *used == 0 {
                        state.tenants.remove(&key);
                    }
                }
            }
        }
    }
}

impl Charge {
    /// The bytes it holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Why the ledger refused a charge: the device's budget, or the tenant's
/// quota, is full now (making room may help) or smaller than the charge
/// (nothing will).
#[derive(Debug)]
pub(crate) enum Refused {
    Full(String),
    Never(String),
}

impl Refused {
    pub(crate) fn into_error(self) -> Error {
        match self {
            Refused::Full(m) | Refused::Never(m) => Error::TooLarge(m),
        }
    }
}

impl Ledger {
    /// A ledger for `devices` (name, budget in bytes).
    pub(crate) fn new(devices: impl IntoIterator<Item = (String, u64)>, tenants: Arc<TenantSettings>) -> Arc<Ledger> {
        let devices = devices.into_iter().map(|(name, budget)| (name, (budget, 0))).collect();
        Arc::new(Ledger { state: Mutex::new(LedgerState { devices, tenants: HashMap::new() }), tenants })
    }

    /// `bytes` on `device`'s budget.
    pub(crate) fn charge_device(self: &Arc<Self>, device: &str, bytes: u64) -> Result<Charge, Refused> {
        let mut state = self.state.lock().unwrap();
        let Some((budget, used)) = state.devices.get_mut(device) else {
            return Err(Refused::Never(format!("{device} is not a GPU of this node")));
        };
        if used.saturating_add(bytes) > *budget {
            let message =
                format!("{device} has {} of its {} MiB of model memory free, the model needs {} MiB", mib(*budget - *used), mib(*budget), mib(bytes));
            return Err(if bytes > *budget { Refused::Never(message) } else { Refused::Full(message) });
        }
        *used += bytes;
        Ok(Charge { ledger: self.clone(), device: device.to_string(), tenant: None, bytes })
    }

    /// `bytes` on `tenant`'s quota on `device`.
    pub(crate) fn charge_tenant(self: &Arc<Self>, tenant: &str, device: &str, bytes: u64) -> Result<Charge, Refused> {
        let quota = self.tenants.get(tenant).memory_mb.map(|mb| mb.saturating_mul(1 << 20));
        let mut state = self.state.lock().unwrap();
        let used = state.tenants.entry((tenant.to_string(), device.to_string())).or_default();
        if let Some(quota) = quota
            && used.saturating_add(bytes) > quota
        {
            let message = format!(
                "tenant '{tenant}' holds {} of its {} MiB of GPU memory on {device}, the model needs {} MiB",
                mib(*used),
                mib(quota),
                mib(bytes)
            );
            if *used == 0 {
                state.tenants.remove(&(tenant.to_string(), device.to_string()));
            }
            return Err(if bytes > quota { Refused::Never(message) } else { Refused::Full(message) });
        }
        *used += bytes;
        Ok(Charge { ledger: self.clone(), device: device.to_string(), tenant: Some(tenant.to_string()), bytes })
    }

    /// Each device's (name, budget, bytes charged).
    pub(crate) fn devices(&self) -> Vec<(String, u64, u64)> {
        let state = self.state.lock().unwrap();
        let mut all: Vec<_> = state.devices.iter().map(|(n, (b, u))| (n.clone(), *b, *u)).collect();
        all.sort();
        all
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1 << 20) as f64)
}

/// Turns on one GPU, in weighted fair shares between tenants.
#[derive(Debug)]
pub(crate) struct DeviceGate {
    state: Mutex<GateState>,
    turn_over: Condvar,
    tenants: Arc<TenantSettings>,
}

#[derive(Debug, Default)]
struct GateState {
    busy: bool,
    /// The virtual time of the tenant served last, in nanoseconds.
    now: u64,
    /// Each tenant's virtual time (tenants behind `now` are forgotten).
    vtime: HashMap<String, u64>,
    /// Each tenant's waiting turns, by arrival.
    waiting: HashMap<String, VecDeque<u64>>,
    arrivals: u64,
}

impl GateState {
    /// The arrival whose turn is next: the front of the waiting tenant
    /// with the least virtual time (earliest arrival on ties).
    fn next(&self) -> Option<u64> {
        self.waiting
            .iter()
            .filter_map(|(t, q)| Some((self.vtime.get(t).copied().unwrap_or(self.now).max(self.now), *q.front()?)))
            .min()
            .map(|(_, arrival)| arrival)
    }
}

/// A tenant's turn on a device; the next one starts when it is dropped.
pub(crate) struct Turn<'a> {
    gate: &'a DeviceGate,
    tenant: &'a str,
    started: Instant,
}

impl DeviceGate {
    pub(crate) fn new(tenants: Arc<TenantSettings>) -> DeviceGate {
        DeviceGate { state: Mutex::default(), turn_over: Condvar::new(), tenants }
    }

    /// Waits for `tenant`'s turn (blocking: passes run on their own threads).
    pub(crate) fn turn<'a>(&'a self, tenant: &'a str) -> Turn<'a> {
        let mut state = self.state.lock().unwrap();
        state.arrivals += 1;
        let me = state.arrivals;
        let now = state.now;
        let vtime = state.vtime.entry(tenant.to_string()).or_insert(now);
        *vtime = (*vtime).max(now);
        state.waiting.entry(tenant.to_string()).or_default().push_back(me);
        while state.busy || state.next() != Some(me) {
            state = self.turn_over.wait(state).unwrap();
        }
        let queue = state.waiting.get_mut(tenant).expect("queued above");
        queue.pop_front();
        if queue.is_empty() {
            state.waiting.remove(tenant);
        }
        state.busy = true;
        state.now = state.vtime.get(tenant).copied().unwrap_or(now).max(state.now);
        Turn { gate: self, tenant, started: Instant::now() }
    }

    /// Whether turns are waiting: other work wants the device.
    pub(crate) fn contended(&self) -> bool {
        !self.state.lock().unwrap().waiting.is_empty()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let weight = self.gate.tenants.get(self.tenant).weight.max(1) as u64;
        let cost = (self.started.elapsed().as_nanos() as u64 / weight).max(1);
        let mut state = self.gate.state.lock().unwrap();
        let now = state.now;
        *state.vtime.entry(self.tenant.to_string()).or_insert(now) += cost;
        state.busy = false;
        let GateState { vtime, waiting, now, .. } = &mut *state;
        vtime.retain(|t, v| *v > *now || waiting.contains_key(t));
        drop(state);
        self.gate.turn_over.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn charges_are_given_back_and_quotas_hold() {
        let tenants = Arc::new(TenantSettings::default());
        tenants.set("small", TenantGpu { memory_mb: Some(1), weight: 1 });
        let ledger = Ledger::new([("gpu".to_string(), 3 << 20)], tenants);
        let a = ledger.charge_device("gpu", 2 << 20).unwrap();
        assert!(matches!(ledger.charge_device("gpu", 2 << 20), Err(Refused::Full(_))), "over what is free of the device's budget");
        assert!(matches!(ledger.charge_device("gpu", 4 << 20), Err(Refused::Never(_))), "over the device's whole budget");
        let b = ledger.charge_device("gpu", 1 << 20).unwrap();
        assert_eq!(ledger.devices(), [("gpu".to_string(), 3 << 20, 3 << 20)]);
        drop((a, b));
        assert_eq!(ledger.devices(), [("gpu".to_string(), 3 << 20, 0)]);
        let held = ledger.charge_tenant("small", "gpu", 1 << 20).unwrap();
        let Err(Refused::Full(why)) = ledger.charge_tenant("small", "gpu", 1) else { panic!("over the quota") };
        assert!(why.contains("tenant 'small'"), "{why}");
        assert!(matches!(ledger.charge_tenant("small", "gpu", 2 << 20), Err(Refused::Never(_))), "over the whole quota");
        assert!(ledger.charge_tenant("other", "gpu", 1 << 30).is_ok(), "no quota set: only the device's budget binds");
        drop(held);
        assert!(ledger.charge_tenant("small", "gpu", 1 << 20).is_ok(), "given back");
    }

    /// Three threads of a busy tenant hold the device in turn; a light
    /// tenant asking waits for the turn in progress at most, never for the
    /// busy tenant's queued turns.
    #[test]
    fn a_light_tenant_goes_next() {
        let gate = Arc::new(DeviceGate::new(Arc::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let heavy_turns = Arc::new(AtomicUsize::new(0));
        let busy: Vec<_> = (0..3)
            .map(|_| {
                let (gate, stop, turns) = (gate.clone(), stop.clone(), heavy_turns.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _turn = gate.turn("heavy");
                        turns.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        while heavy_turns.load(Ordering::SeqCst) < 10 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..20 {
            let before = heavy_turns.load(Ordering::SeqCst);
            let turn = gate.turn("light");
            let passed = heavy_turns.load(Ordering::SeqCst) - before;
            assert!(passed <= 1, "{passed} heavy turns started while the light tenant waited");
            drop(turn);
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        busy.into_iter().for_each(|t| t.join().unwrap());
    }

    /// Weight 3 against weight 1, both always waiting: about three turns to one.
    #[test]
    fn weights_share_the_device() {
        let tenants = Arc::new(TenantSettings::default());
        tenants.set("big", TenantGpu { memory_mb: None, weight: 3 });
        let gate = Arc::new(DeviceGate::new(tenants));
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<_> = ["big", "small"]
            .into_iter()
            .flat_map(|tenant| {
                let count = Arc::new(AtomicUsize::new(0));
                (0..2).map(move |_| (tenant, count.clone())).collect::<Vec<_>>()
            })
            .map(|(tenant, count)| {
                let (gate, stop, c) = (gate.clone(), stop.clone(), count.clone());
                (tenant, count, std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _turn = gate.turn(tenant);
                        c.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, Ordering::Relaxed);
        let mut by_tenant = HashMap::new();
        for (tenant, count, thread) in counts {
            thread.join().unwrap();
            by_tenant.insert(tenant, count.load(Ordering::SeqCst));
        }
        let ratio = by_tenant["big"] as f64 / by_tenant["small"] as f64;
        assert!((2.0..4.5).contains(&ratio), "turns {by_tenant:?}: ratio {ratio:.2}, want about 3");
    }
}
