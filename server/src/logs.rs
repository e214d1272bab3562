//! What guests print, kept per deployment for `gpuwasm logs`: each
//! request's [`GuestLog`] (its output, capped at 64 KiB by the runtime,
//! and why it failed) becomes a numbered [`LogEntry`]; a deployment keeps
//! its newest entries up to [`KEPT_BYTES`] of output. Numbers grow over
//! the whole node, so a follower asks for what came after the last it
//! saw. In memory only: a restart forgets them, and so does purging the
//! deployment (`rm --purge`).

use crate::api::LogEntry;
use gpuwasm::GuestLog;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

/// Bytes of output (and failure messages) kept per deployment.
pub(crate) const KEPT_BYTES: usize = 1 << 20;

/// Entries one read returns at most.
pub(crate) const PAGE: usize = 1000;

/// Every deployment's recent guest logs.
#[derive(Default)]
pub(crate) struct GuestLogs {
    last: AtomicU64,
    by_deployment: Mutex<HashMap<(String, String), Kept>>,
}

#[derive(Default)]
struct Kept {
    entries: VecDeque<LogEntry>,
    bytes: usize,
}

fn size(entry: &LogEntry) -> usize {
    entry.output.len() + entry.failure.as_ref().map_or(0, String::len)
}

impl GuestLogs {
    /// Keeps `log` of version `version` of `tenant`'s deployment `name`,
    /// dropping its oldest entries beyond [`KEPT_BYTES`].
    pub(crate) fn add(&self, tenant: &str, name: &str, version: u64, log: GuestLog) {
        let mut all = self.by_deployment.lock().unwrap();
        // Numbered under the lock: each deployment's entries stay in order.
        let entry = LogEntry {
            seq: self.last.fetch_add(1, Ordering::Relaxed) + 1,
            at_unix_ms: log.started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            version,
            request_id: log.request_id,
            output: log.output,
            failure: log.failure,
        };
        let kept = all.entry((tenant.to_string(), name.to_string())).or_default();
        kept.bytes += size(&entry);
        kept.entries.push_back(entry);
        while kept.bytes > KEPT_BYTES && kept.entries.len() > 1 {
            let dropped = kept.entries.pop_front().expect("more than one entry");
            kept.bytes -= size(&dropped);
        }
    }

    /// Forgets the entries of `tenant`'s deployment `name` (when it is
    /// purged).
    pub(crate) fn forget(&self, tenant: &str, name: &str) {
        self.by_deployment.lock().unwrap().remove(&(tenant.to_string(), name.to_string()));
    }

    /// The entries of `tenant`'s deployment `name` numbered after `after`,
    /// oldest first, at most [`PAGE`] of them.
    pub(crate) fn after(&self, tenant: &str, name: &str, after: u64) -> Vec<LogEntry> {
        let all = self.by_deployment.lock().unwrap();
        let Some(kept) = all.get(&(tenant.to_string(), name.to_string())) else { return Vec::new() };
        let first = kept.entries.partition_point(|e| e.seq <= after);
        kept.entries.range(first..).take(PAGE).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn log(output: &str) -> GuestLog {
        GuestLog { started: SystemTime::now(), request_id: Some("id".into()), output: output.into(), failure: None }
    }

    /// Entries are numbered in order, read after a number, kept per
    /// deployment and tenant, and bounded in bytes, oldest dropped first.
    #[test]
    fn numbered_per_deployment_and_bounded() {
        let logs = GuestLogs::default();
        logs.add("acme", "api", 1, log("one"));
        logs.add("other", "api", 1, log("theirs"));
        logs.add("acme", "api", 2, log("two"));
        let mine: Vec<_> = logs.after("acme", "api", 0).into_iter().map(|e| (e.seq, e.version, e.output)).collect();
        assert_eq!(mine, vec![(1, 1, "one".to_string()), (3, 2, "two".to_string())]);
        assert_eq!(logs.after("acme", "api", 1).len(), 1);
        assert!(logs.after("acme", "api", 3).is_empty());
        assert!(logs.after("acme", "nope", 0).is_empty());

        let big = "x".repeat(KEPT_BYTES / 4 + 1);
        for _ in 0..8 {
            logs.add("acme", "api", 2, log(&big));
        }
        let kept = logs.after("acme", "api", 0);
        assert_eq!(kept.len(), 3, "three of a quarter each fit in the bound");
        assert_eq!(kept.last().unwrap().seq, 11);
        logs.forget("acme", "api");
        assert!(logs.after("acme", "api", 0).is_empty());
        assert_eq!(logs.after("other", "api", 0).len(), 1);
        let entry = LogEntry { at_unix_ms: 86_400_000 + 3_723_004, ..kept[0].clone() };
        assert_eq!(entry.arrived(), "1970-01-02T01:02:03.004Z");
    }
}
