//! Per-deployment resource limits.

use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Limits enforced on every request a deployment serves.
///
/// The defaults suit small HTTP handlers; every field can be changed per
/// deployment (`gpuwasm deploy --memory-mb ...`, or the admin API's query
/// parameters of the same names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest size, in MiB, that any one linear memory of an instance may
    /// grow to. Growing past it ends the request with `500`.
    pub memory_mb: u64,
    /// Time, in milliseconds, an instance may spend executing WebAssembly
    /// per request (measured in epoch ticks while guest code runs; time
    /// spent waiting on I/O does not count). Past it the request ends with
    /// `504`.
    pub cpu_ms: u64,
    /// Wall-clock time, in milliseconds, a request may take from admission
    /// until the response head is ready, and in all until the body is done.
    pub timeout_ms: u64,
    /// Largest request body, in bytes. Larger bodies get `413`.
    pub max_body_bytes: u64,
    /// Instances of this deployment that may run at once.
    pub concurrency: u32,
    /// Requests that may wait for an instance; beyond that `503`, sent
    /// after the runtime's [refusal delay](crate::RuntimeBuilder::refusal_delay).
    pub queue: u32,
    /// How long, in milliseconds, a queued request waits for an instance
    /// before it gets `503` with `Retry-After`.
    pub queue_timeout_ms: u64,
    /// Tokens one generation may produce (`gpuwasm:llm`); a guest asking
    /// for more gets this many, and is told.
    pub max_tokens: u32,
    /// Wall-clock time, in milliseconds, of a request that starts a
    /// generation (instead of `timeout_ms`, when longer): streamed answers
    /// take longer than ordinary requests.
    pub stream_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: 128,
            cpu_ms: 5_000,
            timeout_ms: 60_000,
            max_body_bytes: 16 << 20,
            concurrency: 64,
            queue: 1024,
            queue_timeout_ms: 10_000,
            max_tokens: 1024,
            stream_ms: 300_000,
        }
    }
}

impl Limits {
    /// The highest limits a deployment may ask for unless the runtime is
    /// configured otherwise ([`RuntimeBuilder::max_limits`](crate::RuntimeBuilder::max_limits)):
    /// 1 GiB of memory, a minute of CPU, ten minutes of wall clock (long
    /// enough for streamed responses), 1 GiB bodies, 256 instances, a
    /// queue of 4096 waiting a minute at most, 32768 generated tokens and
    /// an hour of streaming.
    pub fn default_ceilings() -> Limits {
        Limits {
            memory_mb: 1024,
            cpu_ms: 60_000,
            timeout_ms: 600_000,
            max_body_bytes: 1 << 30,
            concurrency: 256,
            queue: 4096,
            queue_timeout_ms: 60_000,
            max_tokens: 32_768,
            stream_ms: 3_600_000,
        }
    }

    /// No ceiling at all (what a manifest is parsed against before a
    /// server checks it against its own).
    pub fn unbounded() -> Limits {
        Limits {
            memory_mb: u64::MAX,
            cpu_ms: u64::MAX,
            timeout_ms: u64::MAX,
            max_body_bytes: u64::MAX,
            concurrency: u32::MAX,
            queue: u32::MAX,
            queue_timeout_ms: u64::MAX,
            max_tokens: u32::MAX,
            stream_ms: u64::MAX,
        }
    }

    /// Every field as a (name, value) pair, in the serialised names.
    fn fields(&self) -> [(&'static str, u64); 9] {
        [
            ("memory_mb", self.memory_mb),
            ("cpu_ms", self.cpu_ms),
            ("timeout_ms", self.timeout_ms),
            ("max_body_bytes", self.max_body_bytes),
            ("concurrency", u64::from(self.concurrency)),
            ("queue", u64::from(self.queue)),
            ("queue_timeout_ms", self.queue_timeout_ms),
            ("max_tokens", u64::from(self.max_tokens)),
            ("stream_ms", self.stream_ms),
        ]
    }

    /// Checks that every limit is usable and at most the runtime's
    /// `ceilings` (the server's maxima), naming the first that is not.
    pub fn validate(&self, ceilings: &Limits) -> Result<(), Error> {
        for ((name, value), (_, max)) in self.fields().into_iter().zip(ceilings.fields()) {
            let must_be_positive = !matches!(name, "max_body_bytes" | "queue");
            if must_be_positive && value == 0 {
                return Err(Error::InvalidLimits(format!("limit `{name}` must be greater than 0")));
            }
            if value > max {
                return Err(Error::InvalidLimits(format!("limit `{name}` = {value} exceeds this server's maximum of {max}")));
            }
        }
        Ok(())
    }

    /// Sets the field named `name` (as in the serialised form) from a
    /// decimal string. Used by the admin API and the CLI.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Error> {
        let parse = |v: &str| -> Result<u64, Error> {
            v.parse::<u64>()
                .map_err(|_| Error::InvalidLimits(format!("limit `{name}` must be a non-negative integer, got {v:?}")))
        };
        let small = |v: u64| -> Result<u32, Error> {
            u32::try_from(v).map_err(|_| Error::InvalidLimits(format!("limit `{name}` is too large: {v}")))
        };
        match name {
            "memory_mb" => self.memory_mb = parse(value)?,
            "cpu_ms" => self.cpu_ms = parse(value)?,
            "timeout_ms" => self.timeout_ms = parse(value)?,
            "max_body_bytes" => self.max_body_bytes = parse(value)?,
            "concurrency" => self.concurrency = small(parse(value)?)?,
            "queue" => self.queue = small(parse(value)?)?,
            "queue_timeout_ms" => self.queue_timeout_ms = parse(value)?,
            "max_tokens" => self.max_tokens = small(parse(value)?)?,
            "stream_ms" => self.stream_ms = parse(value)?,
            _ => return Err(Error::InvalidLimits(format!("unknown limit `{name}`"))),
        }
        Ok(())
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub(crate) fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_and_rejects() {
        let mut l = Limits::default();
        l.set("memory_mb", "64").unwrap();
        l.set("concurrency", "3").unwrap();
        assert_eq!((l.memory_mb, l.concurrency), (64, 3));
        assert!(l.set("memory_mb", "-1").unwrap_err().to_string().contains("memory_mb"));
        assert!(l.set("bogus", "1").unwrap_err().to_string().contains("unknown limit `bogus`"));
        assert!(l.set("queue", "99999999999").unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let ceilings = Limits { memory_mb: 512, ..Limits::default_ceilings() };
        let mut l = Limits::default();
        assert!(l.validate(&ceilings).is_ok());
        l.cpu_ms = 0;
        assert!(l.validate(&ceilings).unwrap_err().to_string().contains("cpu_ms"));
        l.cpu_ms = 10;
        l.memory_mb = 1024;
        assert!(l.validate(&ceilings).unwrap_err().to_string().contains("`memory_mb` = 1024 exceeds this server's maximum of 512"));
        // The attack from the security review: limits at their type's maximum.
        let greedy = Limits { timeout_ms: u64::MAX, concurrency: 1000, ..Limits::default() };
        assert!(greedy.validate(&ceilings).unwrap_err().to_string().contains("`timeout_ms` = 18446744073709551615 exceeds"));
        let greedy = Limits { concurrency: 1000, ..Limits::default() };
        assert!(greedy.validate(&ceilings).unwrap_err().to_string().contains("`concurrency` = 1000 exceeds this server's maximum of 256"));
        assert!(Limits::default().validate(&Limits::default_ceilings()).is_ok(), "the defaults fit the default ceilings");
    }
}
