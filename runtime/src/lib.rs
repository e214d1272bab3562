#![warn(missing_docs)]
//! gpuwasm: the embeddable core of a serverless function runtime for
//! WebAssembly components.
//!
//! Handlers are components targeting the standard `wasi:http/proxy` world.
//! Every request runs in a fresh, isolated instance taken from a pooling
//! allocator with copy-on-write memory images, under per-deployment
//! [`Limits`] on memory, CPU time, wall time, body size and concurrency,
//! reaching only what its [`Capabilities`] allow. Handlers run inference
//! through `wasi:nn` on the node's shared model cache ([`nn`]).
//!
//! A component becomes a [`Deployment`] in steps any host can arrange:
//! [`Runtime::validate`], [`Runtime::preinitialize`] (run its init export
//! once and snapshot the result), [`Runtime::compile`] (an artifact to keep)
//! and [`Runtime::deserialize_file`] (map one back), [`Runtime::deployment`]
//! (link it), [`Deployment::check`]. [`Runtime::load`] does them all in
//! memory. The multi-tenant server (`gpuwasm-server`) is built on exactly
//! this API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use http_body_util::BodyExt;
//!
//! // One runtime per process: an engine, an instance pool, an epoch ticker
//! // (and, once a guest runs long, the long lane's threads: `in_long_lane`).
//! let runtime = gpuwasm::Runtime::builder().max_instances(64).build()?;
//! let wasm = std::fs::read("hello.wasm")?;
//! let limits = gpuwasm::Limits { memory_mb: 64, ..Default::default() };
//! let hello = runtime.load("hello", &wasm, limits).await?;
//!
//! // Each call is a fresh instance; mount `handle` in a hyper service to serve.
//! let request = http::Request::get("http://localhost/").body(String::new())?;
//! let response = hello.handle(request).await;
//! assert_eq!(response.status(), 200);
//! let body = response.into_body().collect().await?.to_bytes();
//! println!("{}", String::from_utf8_lossy(&body));
//! # Ok(()) }
//! ```

mod body_first;
mod capabilities;
mod deadline;
mod deployment;
mod engine;
mod error;
mod failure;
mod host_state;
mod lanes;
mod limits;
mod memory_limit;
pub mod nn;
mod output;
mod preinit;
mod runtime;
mod usage;

pub use capabilities::{Capabilities, check_env, check_host_pattern, check_outbound};
pub use deployment::Deployment;
pub use error::Error;
pub use failure::{BoxError, ResponseBody, text_response};
pub use lanes::in_long_lane;
pub use limits::Limits;
pub use output::{GuestLog, LogSink, RequestId};
pub use runtime::{Compiled, DEFAULT_KEEP_RESIDENT_MB, DEFAULT_REFUSAL_DELAY, Runtime, RuntimeBuilder, check_header};
pub use usage::{Outcome, Usage, UsageSink};
