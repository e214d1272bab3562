//! Per-tenant request rates: each tenant with a requests-per-second quota
//! has a token bucket holding at most one second's requests, refilled
//! continuously; a request finding it empty is refused with the time until
//! the next one is allowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The buckets of the tenants that have a rate quota.
#[derive(Default)]
pub(crate) struct RequestRates {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RequestRates {
    /// Takes one request from `tenant`'s allowance of `rate` a second:
    /// `Err(wait)` when it has none left, `wait` being the time until it
    /// has one again.
    pub(crate) fn take(&self, tenant: &str, rate: u32) -> Result<(), Duration> {
        self.take_at(tenant, rate, Instant::now())
    }

    fn take_at(&self, tenant: &str, rate: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let mut buckets = self.buckets.lock().unwrap();
        let bucket = match buckets.get_mut(tenant) {
            Some(bucket) => bucket,
            None => buckets.entry(tenant.to_string()).or_insert(Bucket { tokens: rate, at: now }),
        };
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quota of 5 a second allows a burst of 5, then one every 0.2 s;
    /// tenants have buckets of their own.
    #[test]
    fn a_second_of_burst_then_the_rate() {
        let rates = RequestRates::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(rates.take_at("acme", 5, t0), Ok(()));
        }
        let wait = rates.take_at("acme", 5, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-9, "{wait:?}");
        assert_eq!(rates.take_at("other", 5, t0), Ok(()), "another tenant is unaffected");
        assert!(rates.take_at("acme", 5, t0 + Duration::from_millis(100)).is_err());
        assert_eq!(rates.take_at("acme", 5, t0 + Duration::from_millis(200)), Ok(()));
        // Idle for a minute: still at most a second's burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| rates.take_at("acme", 5, later).is_ok()).count(), 5);
    }
}
