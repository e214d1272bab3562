#![warn(missing_docs)]
//! gpuwasm: a serverless function runtime for WebAssembly components.
//!
//! Handlers are components targeting the standard `wasi:http/proxy` world.
//! Every request runs in a fresh, isolated instance taken from a pooling
//! allocator with copy-on-write memory images, under per-deployment limits
//! on memory, CPU time, wall time, body size and concurrency.
//!
//! The library has two layers:
//! - [`Runtime`] and [`Deployment`]: embed components in your own Rust host
//!   and call them with `http::Request`s (see `examples/embed-host`).
//! - [`server`]: the multi-tenant HTTP server behind `gpuwasm serve`, with
//!   its token-protected admin API, versioned deployments and durable state
//!   ([`store`]).

mod artifacts;
pub mod blobs;
mod engine;
mod error;
mod limits;
pub mod nn;
mod output;
mod preinit;
mod request;
mod runtime;
mod sandbox;
pub mod manifest;
pub mod server;
pub mod store;

pub use error::Error;
pub use limits::Limits;
pub use request::{BoxError, ResponseBody};
pub use runtime::{Deployment, Runtime, RuntimeBuilder};
pub use sandbox::Sandbox;
