//! Where a guest's stdout and stderr go: a per-request buffer that keeps
//! the last [`CAPACITY`] bytes and silently drops older ones, so a guest
//! that logs a lot is never stopped for it, and the end of its output (a
//! panic message, say) is there for the server log and, as a [`GuestLog`],
//! for the deployment's log sink.

use bytes::Bytes;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of output kept per request.
const CAPACITY: usize = 64 << 10;

/// The id a host gives a request, as a request extension; the
/// [`GuestLog`] of the request carries it.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// What a guest printed while serving one request (stdout and stderr
/// interleaved, the last 64 KiB of it), and why the request failed if it
/// did. Made for requests that printed something or failed.
#[derive(Clone, Debug)]
pub struct GuestLog {
    /// When the request arrived.
    pub started: SystemTime,
    /// Its [`RequestId`], when the host gave one.
    pub request_id: Option<String>,
    /// What the guest printed, lossily decoded; `[N earlier bytes
    /// dropped]` first when it printed more than is kept.
    pub output: String,
    /// Why the request failed (the message its client got), if it did.
    pub failure: Option<String>,
}

/// Where a deployment's [`GuestLog`]s go ([`Deployment::set_log_sink`](crate::Deployment::set_log_sink)).
pub type LogSink = Arc<dyn Fn(GuestLog) + Send + Sync>;

#[derive(Clone, Default)]
pub(crate) struct GuestOutput {
    inner: Arc<Mutex<Tail>>,
}

#[derive(Default)]
struct Tail {
    bytes: VecDeque<u8>,
    dropped: u64,
}

impl GuestOutput {
    fn append(&self, data: &[u8]) {
        let mut tail = self.inner.lock().unwrap();
        let data = if data.len() > CAPACITY {
            tail.dropped += (data.len() - CAPACITY) as u64;
            &data[data.len() - CAPACITY..]
        } else {
            data
        };
        let overflow = (tail.bytes.len() + data.len()).saturating_sub(CAPACITY);
        tail.bytes.drain(..overflow);
        tail.dropped += overflow as u64;
        tail.bytes.extend(data);
    }

    /// The output kept, lossily decoded, noting how much was dropped.
    pub(crate) fn text(&self) -> String {
        let tail = self.inner.lock().unwrap();
        let (a, b) = tail.bytes.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).trim_end().to_string();
        match tail.dropped {
            0 => text,
            n => format!("[{n} earlier bytes dropped]\n{text}"),
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(CAPACITY)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_counts_what_it_dropped() {
        let out = GuestOutput::default();
        out.append(b"hello\n");
        assert_eq!(out.text(), "hello");
        out.append(&vec![b'x'; CAPACITY]);
        out.append(b"\npanicked at the end");
        let text = out.text();
        assert!(text.starts_with(&format!("[{} earlier bytes dropped]\n", 6 + 20)), "{}", &text[..60]);
        assert!(text.ends_with("xx\npanicked at the end"));
        out.append(&vec![b'y'; 2 * CAPACITY]);
        assert!(out.text().ends_with(&"y".repeat(100)));
    }
}
