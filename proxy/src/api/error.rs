//! The one place where errors become HTTP statuses and `{error, detail}` bodies.
use super::types::ErrorBody;
use crate::error::ControlError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let (status, error) = match &e {
            ControlError::UnknownEndpoint(_) => (StatusCode::NOT_FOUND, "unknown_endpoint"),
            ControlError::UnknownMigration(_) => (StatusCode::NOT_FOUND, "unknown_migration"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ControlError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
            ControlError::Limit(_) => (StatusCode::CONFLICT, "limit_reached"),
            ControlError::Intercept(_) => (StatusCode::INTERNAL_SERVER_ERROR, "kernel"),
            ControlError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        Self::new(status, error, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.error.to_string(),
                detail: self.detail,
            }),
        )
            .into_response()
    }
}
