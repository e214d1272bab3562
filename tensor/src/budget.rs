//! Host memory a pass of a model may allocate.
//!
//! Every buffer an operator is about to allocate is first reserved from
//! the pass's [`Budget`]: its size (elements times width, in checked
//! arithmetic) is charged against the pass's own limit and against the
//! node's shared [`MemoryPool`], and a reservation that does not fit fails
//! the pass with [`Error::TooLarge`] before anything is allocated. A
//! [`Reservation`] gives its bytes back when it is dropped, so a pass holds
//! only what it still uses, and a pass that fails leaves nothing behind.

use crate::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Memory shared by every pass on a node (or any other group of passes):
/// the sum of their reservations never exceeds its limit.
#[derive(Debug)]
pub struct MemoryPool {
    limit: u64,
    used: AtomicU64,
}

impl MemoryPool {
    /// A pool of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryPool> {
        Arc::new(MemoryPool { limit, used: AtomicU64::new(0) })
    }

    /// Bytes reserved from it now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Adds `bytes` if they fit under the limit.
    fn take(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|&n| n <= self.limit))
            .is_ok()
    }

    fn give_back(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What one pass (or one batch of passes) may allocate: its own limit, and
/// optionally a share of a [`MemoryPool`]. Clones share their pools.
#[derive(Debug, Clone)]
pub struct Budget {
    own: Arc<MemoryPool>,
    shared: Option<Arc<MemoryPool>>,
}

impl Budget {
    /// A budget of `limit` bytes of its own.
    pub fn new(limit: u64) -> Budget {
        Budget { own: MemoryPool::new(limit), shared: None }
    }

    /// A budget that never refuses (tools and tests that run trusted models).
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    /// The same budget, also drawing on `pool`.
    pub fn within(mut self, pool: Arc<MemoryPool>) -> Budget {
        self.shared = Some(pool);
        self
    }

    /// A budget of an `n`th of this one's limit, drawing on the same pool:
    /// one call's share of a batch's budget.
    pub fn share(&self, n: usize) -> Budget {
        Budget { own: MemoryPool::new(self.own.limit / n.max(1) as u64), shared: self.shared.clone() }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.own.used()
    }

    /// Reserves `bytes` for `what` (named in the error when they do not fit).
    pub fn reserve(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<Reservation, Error> {
        if !self.own.take(bytes) {
            return Err(Error::TooLarge(format!(
                "{} needs {} more, over this call's host memory limit of {} ({} already in use)",
                what(),
                human(bytes),
                human(self.own.limit),
                human(self.own.used())
            )));
        }
        if let Some(pool) = &self.shared
            && !pool.take(bytes)
        {
            self.own.give_back(bytes);
            return Err(Error::TooLarge(format!(
                "{} needs {}, and the node's inference memory ({}) is in use by other calls; retry later",
                what(),
                human(bytes),
                human(pool.limit)
            )));
        }
        Ok(Reservation { own: self.own.clone(), shared: self.shared.clone(), bytes })
    }

    /// Reserves room for a tensor of `shape` with elements of `width` bytes.
    pub fn reserve_tensor(&self, shape: &[usize], width: usize, what: impl FnOnce() -> String) -> Result<Reservation, Error> {
        let bytes = shape.iter().try_fold(width as u64, |n, &d| n.checked_mul(d as u64));
        match bytes {
            Some(bytes) => self.reserve(bytes, || format!("{} of dimensions {shape:?}", what())),
            None => Err(Error::TooLarge(format!("{} of dimensions {shape:?} is larger than any memory", what()))),
        }
    }
}

/// Bytes held from a [`Budget`] until dropped (it may outlive the
/// `Budget` value: it holds the pools it drew on).
#[derive(Debug)]
#[must_use = "a reservation gives its bytes back when dropped"]
pub struct Reservation {
    own: Arc<MemoryPool>,
    shared: Option<Arc<MemoryPool>>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.own.give_back(self.bytes);
        if let Some(pool) = &self.shared {
            pool.give_back(self.bytes);
        }
    }
}

/// `bytes` for people: B, KiB, MiB, GiB.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_capped_and_given_back() {
        let pool = MemoryPool::new(1000);
        let a = Budget::new(600).within(pool.clone());
        let b = Budget::new(600).within(pool.clone());
        let r1 = a.reserve(500, || "x".into()).unwrap();
        let err = a.reserve(200, || "y".into()).unwrap_err();
        assert!(matches!(&err, Error::TooLarge(m) if m.contains("y needs 200 B") && m.contains("600 B")), "{err}");
        let r2 = b.reserve(400, || "z".into()).unwrap();
        // Both budgets have room of their own, the pool does not.
        let err = b.reserve(150, || "w".into()).unwrap_err();
        assert!(err.to_string().contains("node's inference memory"), "{err}");
        assert_eq!((pool.used(), a.used(), b.used()), (900, 500, 400));
        drop((r1, r2));
        assert_eq!((pool.used(), a.used(), b.used()), (0, 0, 0));
        // A share of a batch's budget: a third of its limit, the same pool.
        let share = Budget::new(900).within(pool.clone()).share(3);
        assert!(share.reserve(300, || "x".into()).is_ok());
        assert!(share.reserve(301, || "x".into()).is_err());
    }

    #[test]
    fn tensor_sizes_use_checked_arithmetic() {
        let budget = Budget::new(1 << 30);
        assert!(budget.reserve_tensor(&[1000, 1000], 4, || "t".into()).is_ok());
        let err = budget.reserve_tensor(&[100_000, 100_000, 1], 4, || "Add output".into()).unwrap_err();
        assert!(err.to_string().contains("Add output of dimensions [100000, 100000, 1] needs 37.3 GiB"), "{err}");
        let err = budget.reserve_tensor(&[usize::MAX, 4], 4, || "t".into()).unwrap_err();
        assert!(err.to_string().contains("larger than any memory"), "{err}");
    }
}
