//! W3C trace context for guest requests. Each request gets a span id of
//! its own, which is also its request id (a field of every log line the
//! request causes, and the `x-request-id` response header). It joins the
//! trace its `traceparent` header names, or starts a new one; the guest
//! sees `traceparent` naming this request's span as parent (the runtime
//! passes it on to the guest's outgoing requests), and the response
//! carries the same `traceparent` back.

use http::HeaderValue;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The header of the W3C trace context.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The response header naming the request id.
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// One request's place in a trace.
pub(crate) struct TraceContext {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// This request's span: 16 lower-case hex digits.
    pub span_id: String,
    /// The trace flags (2 hex digits), kept from the caller's header.
    flags: String,
}

impl TraceContext {
    /// The context of a request whose `traceparent` header is `header`: in
    /// its trace when the header is valid, in a new one otherwise.
    pub(crate) fn of(header: Option<&HeaderValue>) -> TraceContext {
        let joined = header.and_then(|v| v.to_str().ok()).and_then(parse);
        let (trace_id, flags) = joined.unwrap_or_else(|| (format!("{:016x}{:016x}", random_u64(), random_u64()), "00".into()));
        TraceContext { trace_id, span_id: format!("{:016x}", random_u64()), flags }
    }

    /// `traceparent` naming this request's span.
    pub(crate) fn traceparent(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)).expect("hex digits and dashes")
    }

    /// The request id, as a header value.
    pub(crate) fn request_id(&self) -> HeaderValue {
        HeaderValue::from_str(&self.span_id).expect("hex digits")
    }
}

/// The trace id and flags of a valid `traceparent`
/// (`VERSION-TRACE_ID-PARENT_ID-FLAGS`; a version other than 00 may add
/// fields after these four).
fn parse(value: &str) -> Option<(String, String)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2);
    valid.then(|| (trace.to_string(), flags.to_string()))
}

/// A random 64-bit number: SplitMix64 over a counter from a seed read
/// once from the OS, so ids are unique within a node and unpredictable
/// across nodes without a system call per request.
fn random_u64() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut raw = [0u8; 8];
        match std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw)) {
            Ok(()) => u64::from_le_bytes(raw),
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        }
    });
    let mut z = seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    // Never zero: an all-zero id is invalid.
    (z ^ (z >> 31)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_a_valid_trace_and_starts_one_otherwise() {
        let header = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let joined = TraceContext::of(Some(&header));
        assert_eq!((joined.trace_id.as_str(), joined.flags.as_str()), ("4bf92f3577b34da6a3ce929d0e0e4736", "01"));
        assert_ne!(joined.span_id, "00f067aa0ba902b7", "a span of its own");
        let sent = joined.traceparent();
        assert_eq!(sent.to_str().unwrap(), format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", joined.span_id));
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "nonsense",
        ] {
            let fresh = TraceContext::of(Some(&HeaderValue::from_static(bad)));
            assert_ne!(fresh.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(parse(&fresh.traceparent().to_str().unwrap().to_string()).is_some(), "{bad}: a valid new trace");
        }
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some(), "later versions may add fields");
        let (a, b) = (TraceContext::of(None), TraceContext::of(None));
        assert!(a.trace_id != b.trace_id && a.span_id != b.span_id && a.trace_id.len() == 32 && a.span_id.len() == 16);
    }
}
