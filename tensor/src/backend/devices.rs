//! The devices of a node and which backend a model runs on.
//!
//! [`Devices::discover`] finds them once per process: the CPU always; CUDA
//! devices when the driver library loads (feature `cuda`); wgpu adapters
//! otherwise (feature `wgpu`: Vulkan, Metal or DX12, including software
//! ones such as Mesa's lavapipe). [`Devices::select`] picks one for a model
//! from what the guest asks (`execution-target` of wasi-nn) and what the
//! deployment allows ([`Target`]).

use super::cpu::CpuBackend;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use super::Backend;
use super::{DeviceInfo, DeviceKind, SharedBackend};
use crate::error::Error;
use std::sync::{Arc, OnceLock};

/// Where a deployment's models may run (`[models] target` in gpuwasm.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Where the guest asks: a GPU when it asks for one and the node has
    /// one, else the CPU.
    #[default]
    Auto,
    /// Always a GPU: a guest's load fails with `unsupported-operation` on a
    /// node without one.
    Gpu,
    /// Always the CPU.
    Cpu,
}

/// The node's devices: the CPU and the GPUs found. GPUs are looked for
/// the first time they are asked about (starting a Vulkan instance takes a
/// few hundred milliseconds, which a server without models need not pay).
/// Cheap to clone; clones share what was found.
#[derive(Clone)]
pub struct Devices {
    cpu: SharedBackend,
    found: Arc<OnceLock<Found>>,
    /// Whether software Vulkan devices count (for discovery).
    software: bool,
}

#[derive(Default)]
struct Found {
    gpus: Vec<SharedBackend>,
    /// Why GPU backends found nothing, for `gpuwasm info`.
    notes: Vec<String>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").field("discovered", &self.found.get().is_some()).field("software", &self.software).finish()
    }
}

impl Devices {
    /// The CPU only.
    pub fn cpu_only() -> Devices {
        let found = OnceLock::new();
        let _ = found.set(Found::default());
        Devices { cpu: Arc::new(CpuBackend::new()), found: Arc::new(found), software: false }
    }

    /// The CPU and every GPU found (when first asked): CUDA devices first,
    /// then wgpu adapters of other devices (a wgpu adapter for an NVIDIA
    /// device that CUDA drives is skipped: one backend per device).
    /// Software Vulkan devices (Mesa's lavapipe, which computes on the CPU,
    /// slower than the CPU backend) count as GPUs only when `software` is
    /// set: tests use them to run the wgpu kernels on a machine without a
    /// GPU.
    pub fn discover(software: bool) -> Devices {
        Devices { cpu: Arc::new(CpuBackend::new()), found: Arc::new(OnceLock::new()), software }
    }

    fn found(&self) -> &Found {
        self.found.get_or_init(|| {
            #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_mut))]
            let mut found = Found::default();
            #[cfg(feature = "cuda")]
            match super::cuda::CudaBackend::all() {
                Ok(all) => found.gpus.extend(all.into_iter().map(|b| Arc::new(b) as SharedBackend)),
                Err(why) => found.notes.push(format!("cuda: {why}")),
            }
            #[cfg(feature = "wgpu")]
            {
                let cuda_names: Vec<String> = found.gpus.iter().map(|g| g.info().name.clone()).collect();
                match super::wgpu::WgpuBackend::all(self.software) {
                    Ok(all) => found.gpus.extend(
                        all.into_iter().filter(|b| !cuda_names.contains(&b.info().name)).map(|b| Arc::new(b) as SharedBackend),
                    ),
                    Err(why) => found.notes.push(format!("wgpu: {why}")),
                }
            }
            found
        })
    }

    /// Every device, the CPU first.
    pub fn list(&self) -> Vec<DeviceInfo> {
        std::iter::once(&self.cpu).chain(self.gpus()).map(|b| b.info().clone()).collect()
    }

    /// Why backends found no device (driver missing, no adapter).
    pub fn notes(&self) -> &[String] {
        &self.found().notes
    }

    /// The CPU backend.
    pub fn cpu(&self) -> &SharedBackend {
        &self.cpu
    }

    /// The GPU backends found.
    pub fn gpus(&self) -> &[SharedBackend] {
        &self.found().gpus
    }

    /// The best GPU: CUDA when there is one, else a wgpu adapter.
    pub fn gpu(&self) -> Option<&SharedBackend> {
        self.gpus().iter().find(|g| g.info().kind == DeviceKind::Cuda).or_else(|| self.gpus().first())
    }

    /// The backend for a model a guest asked to run on a GPU (`wants_gpu`)
    /// or the CPU, under the deployment's `target`.
    pub fn select(&self, wants_gpu: bool, target: Target) -> Result<SharedBackend, Error> {
        match (target, wants_gpu) {
            (Target::Cpu, _) | (Target::Auto, false) => return Ok(self.cpu.clone()),
            _ => {}
        }
        match (target, self.gpu()) {
            (_, Some(gpu)) => Ok(gpu.clone()),
            (Target::Auto, None) => Ok(self.cpu.clone()),
            _ => Err(Error::Unsupported(format!(
                "this deployment runs its models on a GPU (`[models] target = \"gpu\"`), and this node has none{}",
                if self.notes().is_empty() { String::new() } else { format!(" ({})", self.notes().join("; ")) }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_follows_the_guest_and_the_target() {
        let cpu_only = Devices::cpu_only();
        assert_eq!(cpu_only.select(true, Target::Auto).unwrap().info().kind, DeviceKind::Cpu, "no GPU: the CPU");
        assert_eq!(cpu_only.select(false, Target::Auto).unwrap().info().kind, DeviceKind::Cpu);
        let err = cpu_only.select(false, Target::Gpu).err().unwrap();
        assert!(err.to_string().contains("this node has none"), "{err}");
        assert_eq!(cpu_only.list().len(), 1);
    }
}
