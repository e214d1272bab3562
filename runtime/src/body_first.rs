//! A request's body, read before the request takes an instance: whole
//! when it is small and its client sends it at once, so most requests
//! hold an instance only while they run; a larger body sent at once is
//! read up to 64 KiB, the rest streaming behind. A body whose client has
//! not sent it (or its first 64 KiB) within a short grace (a slow client,
//! a stream the guest answers as it goes) streams on behind what was
//! read, and the request is a slow one: slow requests may take at most
//! half of a deployment's concurrency, of its tenant's instances and of
//! the node's (see `Deployment::admit`), so slow clients cannot hold them
//! all.

use crate::failure::{BoxError, Failure};
use crate::limits::Limits;
use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, timeout_at};

/// Bodies of unknown length (chunked) are read whole before the guest
/// starts when the deployment's body limit is at most this: a body over the
/// limit then gets a clean `413` instead of a response cut off midway.
/// Larger limits stream, and a body that outgrows one ends the guest's
/// body stream with a body-size error. Other bodies are read up to this
/// before the request is admitted.
const READ_FIRST_LIMIT: u64 = 64 << 10;

/// How long after its head a request's body may take to arrive and still
/// count as sent at once.
const GRACE: Duration = Duration::from_millis(20);

/// A request body as handlers get it.
pub(crate) type BoxedBody = UnsyncBoxBody<Bytes, BoxError>;

/// A request whose body was read as far as it had arrived.
pub(crate) struct Arrived {
    pub(crate) request: Request<BoxedBody>,
    /// Whether its client was slow: the body had neither ended nor
    /// reached [`READ_FIRST_LIMIT`] within [`GRACE`].
    pub(crate) slow: bool,
}

/// Reads `request`'s body up to [`READ_FIRST_LIMIT`] bytes or its end,
/// for at most [`GRACE`] (a chunked body under a small limit: whole, until
/// `deadline`); `declared` is its content length, already checked against
/// the limit.
pub(crate) async fn read_first<B>(request: Request<B>, declared: Option<u64>, limits: &Limits, deadline: Instant) -> Result<Arrived, Failure>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let mut body = body.map_err(Into::into).boxed_unsync();
    if body.is_end_stream() {
        return Ok(Arrived { request: Request::from_parts(parts, body), slow: false });
    }
    let max = limits.max_body_bytes;
    let must_be_whole = declared.is_none() && max <= READ_FIRST_LIMIT;
    let until = if must_be_whole { deadline } else { deadline.min(Instant::now() + GRACE) };
    let (mut read, mut bytes) = (VecDeque::new(), 0u64);
    let (slow, ended) = loop {
        match timeout_at(until, body.frame()).await {
            Err(_) if must_be_whole => return Err(Failure::Timeout(limits.timeout_ms)),
            Err(_) => break (true, false),
            Ok(None) => break (false, true),
            Ok(Some(Err(e))) => return Err(Failure::BadBody(e.to_string())),
            Ok(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
                if bytes > max {
                    return Err(Failure::BodyTooLarge(max));
                }
                read.push_back(frame);
                if bytes >= READ_FIRST_LIMIT && !must_be_whole {
                    break (false, body.is_end_stream());
                }
            }
        }
    };
    let rest = (!ended).then_some(body);
    Ok(Arrived { request: Request::from_parts(parts, Prefixed { read, bytes, rest }.boxed_unsync()), slow })
}

/// A body whose first frames were read already, and the rest, if any.
struct Prefixed {
    read: VecDeque<Frame<Bytes>>,
    /// Bytes of data in `read`.
    bytes: u64,
    rest: Option<BoxedBody>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.read.pop_front() {
            self.bytes -= frame.data_ref().map_or(0, |d| d.len() as u64);
            return Poll::Ready(Some(Ok(frame)));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(|rest| rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.as_ref().map_or_else(|| SizeHint::with_exact(0), |rest| rest.size_hint());
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.bytes);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.bytes);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn limits(max_body_bytes: u64) -> Limits {
        Limits { max_body_bytes, ..Limits::default() }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// A body of `chunks`, then open (never ending) when `open`.
    struct Chunks {
        chunks: VecDeque<&'static [u8]>,
        open: bool,
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.chunks.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk))))),
                None if self.open => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn chunked(chunks: &[&'static [u8]], open: bool) -> Request<Chunks> {
        Request::new(Chunks { chunks: chunks.iter().copied().collect(), open })
    }

    async fn collect(request: Request<BoxedBody>) -> Vec<u8> {
        request.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_body_sent_at_once_is_whole_before_admission() {
        let arrived = read_first(Request::new(Full::new(Bytes::from_static(b"hello"))), Some(5), &limits(1 << 20), far()).await.unwrap();
        assert!(!arrived.slow);
        assert_eq!(arrived.request.body().size_hint().exact(), Some(5));
        assert_eq!(collect(arrived.request).await, b"hello");
    }

    #[tokio::test]
    async fn a_body_still_arriving_streams_behind_what_was_read() {
        let arrived = read_first(chunked(&[b"first;", b"second"], true), None, &limits(1 << 20), far()).await.unwrap();
        assert!(arrived.slow, "the body is still open after the grace");
        let mut body = arrived.request.into_body();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.extend_from_slice(&body.frame().await.unwrap().unwrap().into_data().unwrap());
        }
        assert_eq!(got, b"first;second");
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn a_large_body_sent_at_once_is_not_slow() {
        static CHUNK: [u8; 32 << 10] = [7; 32 << 10];
        let arrived = read_first(chunked(&[&CHUNK, &CHUNK, &CHUNK, &CHUNK], true), None, &limits(1 << 20), far()).await.unwrap();
        assert!(!arrived.slow, "64 KiB arrived within the grace");
        let mut body = arrived.request.into_body();
        let mut got = 0;
        for _ in 0..4 {
            got += body.frame().await.unwrap().unwrap().into_data().unwrap().len();
        }
        assert_eq!(got, 128 << 10, "the first 64 KiB read, the rest streaming behind");
    }

    #[tokio::test]
    async fn chunked_bodies_under_a_small_limit_are_whole_or_too_large() {
        let arrived = read_first(chunked(&[b"ab", b"cd"], false), None, &limits(4), far()).await.unwrap();
        assert!(!arrived.slow);
        assert_eq!(collect(arrived.request).await, b"abcd");
        let over = read_first(chunked(&[b"ab", b"cde"], false), None, &limits(4), far()).await;
        assert!(matches!(over, Err(Failure::BodyTooLarge(4))));
        let stalled = read_first(chunked(&[b"ab"], true), None, &limits(4), Instant::now() + Duration::from_millis(50)).await;
        assert!(matches!(stalled, Err(Failure::Timeout(_))));
    }
}
