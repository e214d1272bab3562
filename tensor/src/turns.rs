//! Tenants in turn: the round robin both schedulers use (wasi-nn batches
//! in the runtime, LLM admissions in [`crate::llm::engine`]).

use std::collections::BTreeMap;
use std::sync::Arc;

/// The tenant with work queued after `last` in name order, wrapping
/// round to the first; `None` when nothing is queued.
pub fn next_after<T>(queues: &BTreeMap<Arc<str>, T>, last: Option<&Arc<str>>) -> Option<Arc<str>> {
    let after = last.and_then(|l| queues.range::<str, _>((std::ops::Bound::Excluded(l.as_ref()), std::ops::Bound::Unbounded)).next());
    after.or_else(|| queues.iter().next()).map(|(t, _)| t.clone())
}
