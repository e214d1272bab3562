//! The memory limit of one instance: every linear memory is capped, and a
//! guest that hits the cap is remembered, so its failure is reported as
//! what it is.

use wasmtime::ResourceLimiter;

/// Caps every linear memory of the instance and remembers when a guest hit
/// the cap, so the failure can be reported as what it is.
pub(crate) struct MemoryLimiter {
    pub(crate) limit: usize,
    pub(crate) exceeded: bool,
    /// The largest size a linear memory was allowed to grow to.
    pub(crate) peak: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("linear memory limit of {limit} bytes exceeded (asked for {desired})")]
struct MemoryLimitExceeded {
    limit: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Err(MemoryLimitExceeded { limit: self.limit, desired }.into());
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
