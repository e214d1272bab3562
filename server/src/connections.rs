//! Accepting HTTP/1.1 and HTTP/2 connections (over TLS, HTTP/2 by ALPN;
//! in plain text, HTTP/2 by prior knowledge, "h2c") within limits (how many, from whom, how slow and how large their
//! request heads), and draining them at shutdown.

use bytes::Bytes;
use crate::Tls;
use gpuwasm::{BoxError, ResponseBody};
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request body as handlers get it: the client must keep it coming. A
/// reader that waits longer than the body timeout for the next bytes gets
/// an error instead (time the reader spends elsewhere does not count: a
/// reader in another task, as when the runtime reads the start of a body
/// before the guest reads the rest, starts its own wait).
pub struct RequestBody {
    inner: Incoming,
    idle: Duration,
    /// While a reader waits for bytes: when it gives up, and who it is.
    waiting: Option<(Pin<Box<tokio::time::Sleep>>, Waker)>,
}

impl RequestBody {
    fn new(inner: Incoming, idle: Duration) -> Self {
        RequestBody { inner, idle, waiting: None }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = None;
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                if !this.waiting.as_ref().is_some_and(|(_, reader)| reader.will_wake(cx.waker())) {
                    this.waiting = Some((Box::pin(tokio::time::sleep(this.idle)), cx.waker().clone()));
                }
                let (sleep, _) = this.waiting.as_mut().expect("set above");
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!("the client sent no body bytes for {:?}", this.idle).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How [`serve_connections`] takes connections: its limits, and TLS. A
/// connection over a count limit is answered `503` with `Retry-After` and
/// closed.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Speak HTTPS with this identity (HTTP/2 where the client offers
    /// `h2` by ALPN); `None`: plain HTTP (HTTP/2 by prior knowledge).
    pub tls: Option<Tls>,
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one client address at most.
    pub max_per_client: usize,
    /// Time a client has to send a request's head (start line and
    /// headers); the connection is closed after it.
    pub header_timeout: Duration,
    /// Size of a request's head at most, in bytes; `431` beyond it (and
    /// beyond 100 header fields).
    pub max_header_bytes: usize,
    /// Time a reader of a request body may wait for its next bytes (see
    /// [`RequestBody`]).
    pub body_timeout: Duration,
}

/// Requests one HTTP/2 connection may have open at once.
const HTTP2_STREAMS: u32 = 128;

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            tls: None,
            max_connections: 10_000,
            max_per_client: 1_000,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections in all and per client address.
#[derive(Default)]
struct Open {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted connection's place in [`Open`], given back on drop.
struct Admitted {
    open: Arc<Mutex<Open>>,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        open.total -= 1;
        if let Some(n) = open.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.client);
            }
        }
    }
}

/// Admits a connection from `client`, or says which limit it is over.
fn admit(open: &Arc<Mutex<Open>>, limits: &ConnectionLimits, client: IpAddr) -> Result<Admitted, &'static str> {
    let mut guard = open.lock().unwrap();
    if guard.total >= limits.max_connections {
        return Err("the server has as many connections open as it takes");
    }
    if guard.per_client.get(&client).copied().unwrap_or(0) >= limits.max_per_client {
        return Err("your address has as many connections open as one client may");
    }
    *guard.per_client.entry(client).or_insert(0) += 1;
    guard.total += 1;
    Ok(Admitted { open: open.clone(), client })
}

/// Answers a connection over a limit with `503` and closes it.
async fn refuse(mut stream: TcpStream, why: &str) {
    let body = format!("{why}; try again later\n");
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
    let _ = stream.shutdown().await;
    // Read what the client sent until it closes (at most a second and
    // 64 KiB): closing with unread bytes would reset the connection, and
    // the client could lose the answer.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = 64usize << 10;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// What a client starts an HTTP/2 connection with, when it knows the
/// server speaks it (RFC 9113, 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client on `stream` starts with the HTTP/2 preface, looking
/// at its first bytes without taking them; `None` when it sent nothing
/// that tells within `timeout`, or closed.
async fn speaks_http2(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let look = async {
        let mut first = [0u8; HTTP2_PREFACE.len()];
        let mut pause = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut first).await.ok().filter(|&n| n > 0)?;
            if first[..n] != HTTP2_PREFACE[..n] {
                return Some(false);
            }
            if n == HTTP2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface so far (peek returns at once while bytes
            // wait): look again later, less and less often, so that a
            // client sending it byte by byte costs little.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    };
    tokio::time::timeout(timeout, look).await.ok().flatten()
}

/// Runs `conn` to its end; when `closing` changes first, asks it to
/// finish the requests it is on and close (`shutdown`), and runs it to
/// that end.
async fn drive<C>(conn: C, shutdown: impl FnOnce(Pin<&mut C>), mut closing: tokio::sync::watch::Receiver<bool>) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        _ = closing.changed() => {
            shutdown(conn.as_mut());
            conn.await
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 connections from `listener` within `limits`, answering
/// each request with `handler`, until `stop` completes (pass
/// [`std::future::pending`] to serve until the returned future is
/// dropped). Then it stops accepting, lets each open connection finish the
/// request it is on, streamed bodies included, closes it, and returns once
/// every connection has closed.
pub async fn serve_connections<H, F>(listener: TcpListener, handler: H, limits: ConnectionLimits, stop: impl Future<Output = ()>) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let open = Arc::new(Mutex::new(Open::default()));
    let mut connections = tokio::task::JoinSet::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).max_header_size(limits.max_header_bytes);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(HTTP2_STREAMS)
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut stop => break,
        };
        let admitted = match admit(&open, &limits, peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                tracing::debug!(%peer, why, "connection refused");
                connections.spawn(refuse(stream, why));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let closing = closing_rx.clone();
        let (http1, http2) = (http1.clone(), http2.clone());
        let (body_timeout, header_timeout, tls) = (limits.body_timeout, limits.header_timeout, limits.tls.clone());
        connections.spawn(async move {
            let _admitted = admitted;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let fut = handler(req.map(|body| RequestBody::new(body, body_timeout)));
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let result = match tls {
                Some(tls) => {
                    let stream = match tokio::time::timeout(header_timeout, tls.acceptor().accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    match stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        true => drive(http2.serve_connection(TokioIo::new(stream), service), |c| c.graceful_shutdown(), closing).await,
                        false => drive(http1.serve_connection(TokioIo::new(stream), service), |c| c.graceful_shutdown(), closing).await,
                    }
                }
                None => match speaks_http2(&stream, header_timeout).await {
                    None => return,
                    Some(true) => drive(http2.serve_connection(TokioIo::new(stream), service), |c| c.graceful_shutdown(), closing).await,
                    Some(false) => drive(http1.serve_connection(TokioIo::new(stream), service), |c| c.graceful_shutdown(), closing).await,
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.send_replace(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}
