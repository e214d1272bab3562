//! Errors of the library API.

use std::path::PathBuf;

/// What can go wrong while loading, storing or deploying a component.
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
    /// A deployment's files are not usable.
    #[error("invalid files: {0}")]
    InvalidFiles(String),
    /// A deployment, tenant or model name is not usable.
    #[error("invalid {kind} name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")]
    InvalidName {
        /// What the name is for: `deployment`, `tenant` or `model`.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// A limit is out of range.
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    /// The engine could not be built.
    #[error("engine setup failed: {0}")]
    Engine(String),
    /// Reading or writing state on disk failed.
    #[error("{context} ({}): {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the state database.
    #[error("the state database {} is in use by another process (is another `gpuwasm serve` using this data directory?)", .0.display())]
    StateInUse(PathBuf),
    /// Persisted state could not be read back.
    #[error("corrupt state file {}: {message}", path.display())]
    CorruptState {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { context, path: path.into(), source }
    }

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
                | Error::InvalidName { .. }
                | Error::InvalidLimits(_)
                | Error::InvalidFiles(_)
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
            Error::InvalidName { .. } => "invalid_name",
            Error::InvalidLimits(_) => "invalid_limits",
            Error::InvalidFiles(_) => "invalid_files",
            Error::Engine(_) => "engine",
            Error::Io { .. } => "io",
            Error::StateInUse(_) => "state_in_use",
            Error::CorruptState { .. } => "corrupt_state",
        }
    }
}

/// Formats a wasmtime error with its whole cause chain on one line.
pub(crate) fn chain(err: &wasmtime::Error) -> String {
    format!("{err:#}")
}
