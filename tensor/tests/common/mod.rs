//! What the tensor crate's tests share.

use gpuwasm_tensor::backend::cpu::{CpuBackend, Isa};
use gpuwasm_tensor::backend::{Devices, SharedBackend};
use std::sync::Arc;

/// Every backend this machine has, the CPU first, then the CPU again with
/// each other set of float kernels it runs (portable, AVX2, AVX-512: their
/// names are in `DeviceInfo::driver`): the conformance tests run on each. Software Vulkan devices (Mesa's lavapipe) count, so CI
/// runs the wgpu kernels without a GPU. A backend named in
/// `GPUWASM_REQUIRE_BACKENDS` (comma-separated: `wgpu`, `cuda`;
/// scripts/test.sh requires `wgpu`) that is missing fails the test; one
/// that is merely absent is said out loud, never skipped quietly.
pub fn backends() -> Vec<SharedBackend> {
    let devices = Devices::discover(true);
    let mut all = vec![devices.cpu().clone()];
    for isa in Isa::available().into_iter().filter(|&isa| isa != Isa::best()) {
        eprintln!("conformance: also running on the CPU with its {} kernels", isa.name());
        all.push(Arc::new(CpuBackend::with_isa(isa).expect("an available kernel set")));
    }
    for info in devices.list().into_iter().skip(1) {
        eprintln!("conformance: also running on {} ({}, {})", info.kind.name(), info.name, info.driver);
    }
    all.extend(devices.gpus().iter().cloned());
    let present: Vec<&str> = all.iter().map(|b| b.info().kind.name()).collect();
    for note in devices.notes() {
        eprintln!("conformance: NOT running on a GPU backend: {note}");
    }
    let required = std::env::var("GPUWASM_REQUIRE_BACKENDS").unwrap_or_default();
    for kind in required.split(',').filter(|k| !k.is_empty()) {
        assert!(present.contains(&kind), "GPUWASM_REQUIRE_BACKENDS names {kind}, which this machine lacks: {:?}", devices.notes());
    }
    all
}

