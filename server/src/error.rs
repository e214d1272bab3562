//! Errors of the server library: the core's, and the control plane's own
//! (names, files, state on disk).

use std::path::PathBuf;

/// What can go wrong serving, deploying or storing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Validating, pre-initialising, compiling or linking a component failed.
    #[error(transparent)]
    Runtime(#[from] gpuwasm::Error),
    /// A deployment, tenant or model name is not usable.
    #[error("invalid {kind} name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")]
    InvalidName {
        /// What the name is for: `deployment`, `tenant` or `model`.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A deployment's files are not usable.
    #[error("invalid files: {0}")]
    InvalidFiles(String),
    /// A blob key is not a `/`-separated list of plain names.
    #[error("invalid blob key {0:?}")]
    BlobKey(String),
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
    /// Another process holds the state database or the data directory.
    #[error("{} is in use by another process (is another `gpuwasm serve` using this data directory?)", .0.display())]
    StateInUse(PathBuf),
    /// Persisted state could not be read back.
    #[error("corrupt state file {}: {message}", path.display())]
    CorruptState {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Another node changed the control state since this one read it.
    #[error("the control state changed on another node meanwhile ({0}); try again")]
    Conflict(String),
    /// The shared control store (PostgreSQL) cannot be reached, or failed.
    #[error("control store (PostgreSQL): {0}")]
    Store(String),
    /// The shared blob store (S3) cannot be reached, failed, or holds a
    /// blob whose content does not match its key.
    #[error("blob store (S3): {0}")]
    Blobs(String),
    /// The shared control store was set up by a newer gpuwasm.
    #[error("the control store's schema is at migration {found}; this gpuwasm knows migrations up to {known}: upgrade it")]
    NewerSchema {
        /// The highest migration applied to the store.
        found: i32,
        /// The highest migration this build carries.
        known: i32,
    },
    /// A task the server runs on a blocking thread failed.
    #[error("{0}")]
    Task(String),
}

impl Error {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { context, path: path.into(), source }
    }

    /// True when the error is the client's fault (a bad upload or bad
    /// arguments) rather than the server's.
    pub fn is_client_error(&self) -> bool {
        match self {
            Error::Runtime(e) => e.is_client_error(),
            Error::InvalidName { .. } | Error::InvalidFiles(_) => true,
            Error::BlobKey(_)
            | Error::Io { .. }
            | Error::StateInUse(_)
            | Error::CorruptState { .. }
            | Error::Conflict(_)
            | Error::Store(_)
            | Error::Blobs(_)
            | Error::NewerSchema { .. }
            | Error::Task(_)
            | Error::Tls(_) => false,
        }
    }

    /// A short machine-readable code for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Runtime(e) => e.code(),
            Error::InvalidName { .. } => "invalid_name",
            Error::InvalidFiles(_) => "invalid_files",
            Error::BlobKey(_) => "blob_key",
            Error::Io { .. } => "io",
            Error::StateInUse(_) => "state_in_use",
            Error::CorruptState { .. } => "corrupt_state",
            Error::Conflict(_) => "state_changed",
            Error::Store(_) | Error::NewerSchema { .. } => "state_unavailable",
            Error::Blobs(_) => "blobs_unavailable",
            Error::Task(_) => "internal",
            Error::Tls(_) => "tls",
        }
    }
}
