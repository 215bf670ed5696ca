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
    #[error("kernel interception failed: {0}")]
    Intercept(#[from] crate::intercept::InterceptError),
}
