//! Write gpuwasm handlers in a few lines.
//!
//! A handler is a plain function from [`Request`] to [`Response`];
//! [`export!`] turns it into a standard `wasi:http/proxy` component that
//! gpuwasm (or any other wasi:http host) runs:
//!
//! ```ignore
//! use gpuwasm_guest::{Request, Response};
//!
//! fn handle(request: Request) -> Response {
//!     Response::text(200, format!("hello from {}\n", request.path()))
//! }
//!
//! gpuwasm_guest::export!(handle);
//! ```
//!
//! Expensive setup goes in an init function, run once at deploy time and
//! snapshotted, so requests start from its result at no cost:
//!
//! ```ignore
//! static TABLE: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
//!
//! fn setup() {
//!     TABLE.get_or_init(|| (0..100_000).map(|i| i * i).collect());
//! }
//!
//! gpuwasm_guest::export!(handle, init = setup);
//! ```
//!
//! Each request runs in a fresh instance: what a request changes is gone
//! for the next one, and what `init` built is there for every one.
//!
//! Build it with `crate-type = ["cdylib"]` for the `wasm32-wasip2` target
//! (`scripts/build-guests.sh` in the gpuwasm repository shows how).
//! Models are reached through [`nn`] (wasi-nn): `nn::Graph::load_by_name`.
//!
//! Request bodies can be read whole ([`Request::body`]) or streamed
//! ([`Request::body_reader`]); responses can carry bytes or be streamed as
//! they are produced ([`Response::stream`]).

use std::io::{Read, Write};
use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::{InputStream, OutputStream};

#[doc(hidden)]
pub use wasip2 as __wasip2;

pub mod llm;
pub mod nn;

/// Why a host call failed ([`nn`] or [`llm`]): the host's error code and
/// its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The error code, as its WIT name: wasi-nn's (`not-found`,
    /// `invalid-argument`, `security`, `too-large`, ...) or `gpuwasm:llm`'s
    /// (`not-found`, `denied`, `invalid-argument`, `too-large`,
    /// `unsupported`, `runtime-error`).
    pub code: &'static str,
    /// What the host said.
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// `n` bytes from the host's secure random source (`wasi:random`), fresh
/// for every request even in an instance restored from a snapshot.
pub fn random_bytes(n: usize) -> Vec<u8> {
    wasip2::random::random::get_random_bytes(n as u64)
}

/// Bindings for the `gpuwasm:runtime/init` export (wit/init.wit).
#[doc(hidden)]
pub mod __init_bindings {
    wit_bindgen::generate!({
        path: "../wit/init.wit",
        world: "initializable",
        pub_export_macro: true,
        export_macro_name: "__export_init",
        default_bindings_module: "gpuwasm_guest::__init_bindings",
    });
}

/// An incoming HTTP request.
pub struct Request {
    inner: IncomingRequest,
}

impl Request {
    /// The method, upper-case (`GET`, `POST`, ...).
    pub fn method(&self) -> String {
        match self.inner.method() {
            Method::Get => "GET".into(),
            Method::Head => "HEAD".into(),
            Method::Post => "POST".into(),
            Method::Put => "PUT".into(),
            Method::Delete => "DELETE".into(),
            Method::Connect => "CONNECT".into(),
            Method::Options => "OPTIONS".into(),
            Method::Trace => "TRACE".into(),
            Method::Patch => "PATCH".into(),
            Method::Other(other) => other,
        }
    }

    /// The path and query, e.g. `/items?id=3`. Under gpuwasm's path
    /// routing the deployment prefix is already removed.
    pub fn path_with_query(&self) -> String {
        self.inner.path_with_query().unwrap_or_else(|| "/".into())
    }

    /// The path without the query.
    pub fn path(&self) -> String {
        let pq = self.path_with_query();
        pq.split('?').next().unwrap_or("/").to_string()
    }

    /// The query string after `?`, if any.
    pub fn query(&self) -> Option<String> {
        self.path_with_query().split_once('?').map(|(_, q)| q.to_string())
    }

    /// The first value of header `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<String> {
        let values = self.inner.headers().get(&name.to_ascii_lowercase());
        values.first().map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// All headers as (name, value) pairs.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        self.inner.headers().entries()
    }

    /// Reads the whole body.
    pub fn body(self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        self.body_reader()?.read_to_end(&mut body)?;
        Ok(body)
    }

    /// Streams the body as it arrives.
    pub fn body_reader(self) -> std::io::Result<BodyReader> {
        let body = self.inner.consume().map_err(|()| other("request body already consumed"))?;
        let stream = body.stream().map_err(|()| other("request body stream unavailable"))?;
        Ok(BodyReader { stream, _body: body, _request: self.inner })
    }
}

/// A request body being read; implements [`std::io::Read`].
pub struct BodyReader {
    // Field order is drop order: the stream before its body and request.
    stream: InputStream,
    _body: IncomingBody,
    _request: IncomingRequest,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Read::read(&mut self.stream, buf)
    }
}

/// A response body being written; implements [`std::io::Write`].
pub struct BodyWriter {
    stream: OutputStream,
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Write::write(&mut self.stream, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Write::flush(&mut self.stream)
    }
}

enum Body {
    Bytes(Vec<u8>),
    Stream(Box<dyn FnOnce(&mut BodyWriter) -> std::io::Result<()>>),
}

/// An HTTP response to send.
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Body,
}

impl Response {
    /// A response with `status` and an empty body.
    pub fn new(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Body::Bytes(Vec::new()) }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self::new(status).header("content-type", "text/plain; charset=utf-8").body(text.into().into_bytes())
    }

    /// An `application/json` response from already-serialised JSON.
    pub fn json(status: u16, json: impl Into<String>) -> Self {
        Self::new(status).header("content-type", "application/json").body(json.into().into_bytes())
    }

    /// A response whose body `write` produces while it is being sent,
    /// chunk by chunk (for example tokens as they are generated).
    pub fn stream(status: u16, write: impl FnOnce(&mut BodyWriter) -> std::io::Result<()> + 'static) -> Self {
        Self { status, headers: Vec::new(), body: Body::Stream(Box::new(write)) }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Bytes(body.into());
        self
    }
}

fn other(message: &str) -> std::io::Error {
    std::io::Error::other(message.to_string())
}

/// Sends `response` through `out`. Used by [`export!`].
#[doc(hidden)]
pub fn __respond(response: Response, out: ResponseOutparam) {
    let (status, headers, body) = match Fields::from_list(&response.headers) {
        Ok(fields) => (response.status, fields, response.body),
        Err(e) => (500, Fields::new(), Body::Bytes(format!("handler set an invalid header: {e:?}\n").into_bytes())),
    };
    let outgoing = OutgoingResponse::new(headers);
    if outgoing.set_status_code(status).is_err() {
        let _ = outgoing.set_status_code(500);
    }
    let Ok(outgoing_body) = outgoing.body() else { return };
    ResponseOutparam::set(out, Ok(outgoing));
    let Ok(stream) = outgoing_body.write() else { return };
    let mut writer = BodyWriter { stream };
    let written = match body {
        Body::Bytes(bytes) => writer.write_all(&bytes).and_then(|()| writer.flush()),
        Body::Stream(write) => write(&mut writer).and_then(|()| writer.flush()),
    };
    drop(writer);
    if written.is_ok() {
        let _ = OutgoingBody::finish(outgoing_body, None);
    }
}

#[doc(hidden)]
pub fn __request(inner: IncomingRequest) -> Request {
    Request { inner }
}

/// Exports `handler: fn(Request) -> Response` as the component's
/// `wasi:http/incoming-handler`, and optionally `init = setup` (a `fn()`)
/// as its `gpuwasm:runtime/init` export, run once at deploy time.
#[macro_export]
macro_rules! export {
    ($handler:path) => {
        struct __GpuwasmHandler;

        impl $crate::__wasip2::exports::http::incoming_handler::Guest for __GpuwasmHandler {
            fn handle(
                request: $crate::__wasip2::http::types::IncomingRequest,
                out: $crate::__wasip2::http::types::ResponseOutparam,
            ) {
                $crate::__respond($handler($crate::__request(request)), out);
            }
        }

        $crate::__wasip2::http::proxy::export!(__GpuwasmHandler with_types_in $crate::__wasip2);
    };
    ($handler:path, init = $init:path) => {
        $crate::export!($handler);

        struct __GpuwasmInit;

        impl $crate::__init_bindings::exports::gpuwasm::runtime::init::Guest for __GpuwasmInit {
            fn init() {
                $init()
            }
        }

        $crate::__init_bindings::__export_init!(__GpuwasmInit with_types_in $crate::__init_bindings);
    };
}
