//! Errors of the library API.

/// What can go wrong while validating, pre-initialising, compiling or
/// linking a component.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary: it does not start with the `\\0asm` magic bytes")]
    NotWasm,
    /// The bytes are a core module; gpuwasm runs components.
    #[error(
        "this is a core WebAssembly module, not a component; build for the \
         `wasm32-wasip2` target (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// The component failed to parse, validate or compile.
    #[error("invalid component: {0}")]
    InvalidComponent(String),
    /// The component imports something this runtime does not provide.
    #[error("unsupported import: {0}")]
    UnsupportedImport(String),
    /// The component does not export `wasi:http/incoming-handler`.
    #[error("component does not export wasi:http/incoming-handler (the wasi:http/proxy world): {0}")]
    NotAHandler(String),
    /// The component's init function failed or left state that cannot be
    /// snapshotted.
    #[error("pre-initialisation failed: {0}")]
    InitFailed(String),
    /// The component cannot be instantiated under its limits.
    #[error("component cannot be instantiated: {0}")]
    Instantiate(String),
    /// A limit is out of range.
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    /// A capability (environment, outbound allow-list) is malformed.
    #[error("{0}")]
    InvalidCapabilities(String),
    /// A host name (or `host:port`) is malformed.
    #[error("invalid host {0}")]
    InvalidHost(String),
    /// A model the deployment keeps warm could not be loaded.
    #[error("model {0}")]
    Model(String),
    /// The engine could not be built.
    #[error("engine setup failed: {0}")]
    Engine(String),
}

impl Error {
    /// True when the error is the client's fault (a bad upload or bad
    /// arguments) rather than the server's.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Error::NotWasm
                | Error::CoreModule
                | Error::InvalidComponent(_)
                | Error::UnsupportedImport(_)
                | Error::NotAHandler(_)
                | Error::InitFailed(_)
                | Error::Instantiate(_)
                | Error::InvalidLimits(_)
                | Error::InvalidCapabilities(_)
                | Error::InvalidHost(_)
                | Error::Model(_)
        )
    }

    /// A short machine-readable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotWasm => "not_wasm",
            Error::CoreModule => "core_module",
            Error::InvalidComponent(_) => "invalid_component",
            Error::UnsupportedImport(_) => "unsupported_import",
            Error::NotAHandler(_) => "not_a_handler",
            Error::InitFailed(_) => "init_failed",
            Error::Instantiate(_) => "instantiate_failed",
            Error::InvalidLimits(_) => "invalid_limits",
            Error::InvalidCapabilities(_) | Error::InvalidHost(_) => "invalid_spec",
            Error::Model(_) => "model_unavailable",
            Error::Engine(_) => "engine",
        }
    }
}

/// Formats a wasmtime error with its whole cause chain on one line.
pub(crate) fn chain(err: &wasmtime::Error) -> String {
    format!("{err:#}")
}
