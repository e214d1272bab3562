/// What went wrong loading or running a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The model's files are malformed, inconsistent or hostile.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The model is well-formed but uses something this engine lacks.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The inputs given to a graph do not fit it (names, shapes, types).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The work would need more host memory than its budget allows (see
    /// [`Budget`](crate::Budget)).
    #[error("too large: {0}")]
    TooLarge(String),
}

pub(crate) fn invalid_model(message: impl Into<String>) -> Error {
    Error::InvalidModel(message.into())
}

pub(crate) fn invalid_input(message: impl Into<String>) -> Error {
    Error::InvalidInput(message.into())
}
