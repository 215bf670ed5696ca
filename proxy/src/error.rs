//! Errors of the control plane. Each variant names what went wrong and, in
//! its message, what the caller should do; `api::error` is the one place that
//! maps them to HTTP statuses.
use crate::endpoint::EndpointAddr;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("endpoint {0} is not registered; add it first with `shepherd endpoint add {0}`")]
    UnknownEndpoint(EndpointAddr),
    #[error("no migration with id {0:?}; start one with `shepherd migrate hold --id {0} IP:PORT`")]
    UnknownMigration(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    /// A configured limit would be exceeded; nothing was changed.
    #[error("{0}")]
    Limit(String),
    /// The agent cannot take the call now (a hand-over is in progress).
    #[error("{0}")]
    Unavailable(String),
    #[error("kernel interception failed: {0}")]
    Intercept(crate::intercept::InterceptError),
}

impl From<crate::intercept::InterceptError> for ControlError {
    /// A full kernel map is a limit reached, not an internal error: the
    /// caller can remove something or raise it.
    fn from(e: crate::intercept::InterceptError) -> Self {
        if e.is_full() {
            ControlError::Limit(format!(
                "{e}: the kernel table has no room (endpoint entries: --max-endpoints, with \
                 room for removed endpoints still draining and destination shields); nothing \
                 was changed"
            ))
        } else {
            ControlError::Intercept(e)
        }
    }
}
