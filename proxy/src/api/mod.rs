//! The control API: HTTP/JSON on a root-only Unix socket.
//!
//! Routes (all bodies JSON; errors are `{error, detail}`):
//! - `GET /healthz`, `GET /metrics` (Prometheus text)
//! - `GET /v1/endpoints`, `POST /v1/endpoints` `{endpoints: [..]}`,
//!   `DELETE /v1/endpoints/{ip:port}`
//! - `GET /v1/connections`
//! - `GET /v1/migrations`, `GET /v1/migrations/{id}`,
//!   `PUT /v1/migrations/{id}/hold` `{endpoints, deadline_ms?, quiesce_timeout_ms?, to?}`,
//!   `POST /v1/migrations/{id}/release` `{mode?, to?}`,
//!   `POST /v1/migrations/{id}/abort` `{reason?}`,
//!   `PUT /v1/migrations/{id}/target` `{to}` (origin: the pod's new address)
//! - destination side: `PUT /v1/migrations/{id}/incoming`
//!   `{endpoints, to?, flows?, deadline_ms?}`, `GET /v1/migrations/{id}/incoming`,
//!   `POST /v1/migrations/{id}/incoming/complete` `{reason?}`,
//!   `DELETE /v1/migrations/{id}/incoming` (the pod has left this node)
//!
//! Bodies are read with a hard size limit and parsed here, so malformed or
//! oversized input gets a JSON error rather than a framework default.
pub mod error;
pub mod serve;
pub mod socket;
pub mod types;

use crate::control::Control;
use crate::endpoint::EndpointAddr;
use crate::migration::ReleaseMode;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use error::ApiError;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use types::*;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a request body may take to arrive once its headers have.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/endpoints", get(list_endpoints).post(add_endpoints))
        .route("/v1/endpoints/{addr}", delete(remove_endpoint))
        .route("/v1/connections", get(connections))
        .route("/v1/migrations", get(list_migrations))
        .route("/v1/migrations/{id}", get(migration_status))
        .route("/v1/migrations/{id}/hold", put(hold))
        .route("/v1/migrations/{id}/release", post(release))
        .route("/v1/migrations/{id}/abort", post(abort))
        .route("/v1/migrations/{id}/target", put(target))
        .route(
            "/v1/migrations/{id}/incoming",
            put(incoming).get(incoming_status).delete(retire_incoming),
        )
        .route(
            "/v1/migrations/{id}/incoming/complete",
            post(complete_incoming),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see `shepherd --help`",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(control)
}

type Ctl = State<Arc<Control>>;

/// The wire form of what the control plane gave.
fn wire<T, W: From<T>>(v: Vec<T>) -> Vec<W> {
    v.into_iter().map(W::from).collect()
}

/// A path parameter (a migration id, an endpoint), with axum's rejection
/// (invalid UTF-8 or percent-encoding) answered in the API's JSON form.
struct Param(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Param {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(p)) => Ok(Self(p)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                format!("invalid path parameter: {}", e.body_text()),
            )),
        }
    }
}

/// Whether reading a body failed because it was longer than allowed (and
/// not, say, because its chunked framing was malformed).
fn too_long(e: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Reads and parses a JSON body; an empty body parses as `{}` when allowed.
async fn json_body<T: DeserializeOwned>(body: Body, empty_ok: bool) -> Result<T, ApiError> {
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ))
        }
        Ok(Err(e)) if too_long(&e) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {MAX_BODY} bytes"),
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                format!("could not read the request body: {e}"),
            ))
        }
        Ok(Ok(b)) => b,
    };
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) && empty_ok {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            format!("invalid JSON body: {e}"),
        )
    })
}

/// Liveness, and who the agent is: version, pid, start time, and what it
/// received in the hand-over it started with.
async fn healthz(State(c): Ctl) -> Json<serde_json::Value> {
    let a = c.agent();
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    Json(serde_json::json!({
        "status": "ok",
        "version": a.version,
        "instance": a.instance,
        "pid": a.pid,
        "started_unix_ms": a.started.map(ms),
        "handovers": a.handovers,
        "lost_in_crash": a.lost_in_crash,
        "took_over": a.took_over.map(|t| serde_json::json!({
            "from_version": t.from_version,
            "connections": t.connections,
            "endpoints": t.endpoints,
            "migrations": t.migrations,
            "took_ms": t.took.as_millis() as u64,
            "paused_ms": t.paused.as_secs_f64() * 1e3,
        })),
    }))
}

async fn metrics(State(c): Ctl) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.metrics(),
    )
}

async fn list_endpoints(State(c): Ctl) -> Json<EndpointList> {
    Json(EndpointList {
        endpoints: wire(c.list_endpoints()),
    })
}

async fn add_endpoints(State(c): Ctl, body: Body) -> Result<Json<EndpointList>, ApiError> {
    let req: EndpointsRequest = json_body(body, false).await?;
    Ok(Json(EndpointList {
        endpoints: wire(c.add_endpoints(&req.endpoints, req.relay, req.allow_local)?),
    }))
}

async fn remove_endpoint(State(c): Ctl, Param(addr): Param) -> Result<StatusCode, ApiError> {
    let addr: EndpointAddr = addr
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_endpoint", e))?;
    c.remove_endpoint(&addr)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connections(State(c): Ctl) -> Json<ConnectionList> {
    Json(ConnectionList {
        connections: wire(c.connections()),
    })
}

async fn list_migrations(State(c): Ctl) -> Json<MigrationList> {
    Json(MigrationList {
        migrations: wire(c.list_migrations()),
    })
}

/// `?flows=false` omits `backend_flows` (cheap polling at scale).
async fn migration_status(
    State(c): Ctl,
    Param(id): Param,
    uri: axum::http::Uri,
) -> Result<Json<MigrationStatus>, ApiError> {
    let flows = !uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "flows=false"));
    Ok(Json(c.status_with(&id, flows)?.into()))
}

async fn hold(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<MigrationStatus>, ApiError> {
    let req: HoldRequest = json_body(body, false).await?;
    Ok(Json(c.hold(&id, &req.into()).await?.into()))
}

async fn release(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<MigrationStatus>, ApiError> {
    let req: ReleaseRequest = json_body(body, true).await?;
    Ok(Json(
        c.release(
            &id,
            req.mode.unwrap_or(ReleaseMode::Resume),
            req.to.as_deref(),
        )?
        .into(),
    ))
}

async fn abort(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<MigrationStatus>, ApiError> {
    let req: AbortRequest = json_body(body, true).await?;
    Ok(Json(c.abort(&id, req.reason)?.into()))
}

async fn target(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<MigrationStatus>, ApiError> {
    let req: TargetRequest = json_body(body, false).await?;
    Ok(Json(c.target(&id, req.to)?.into()))
}

async fn incoming(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<IncomingStatus>, ApiError> {
    let req: IncomingRequest = json_body(body, false).await?;
    Ok(Json(c.incoming(&id, &req.into())?.into()))
}

async fn incoming_status(
    State(c): Ctl,
    Param(id): Param,
) -> Result<Json<IncomingStatus>, ApiError> {
    Ok(Json(c.incoming_status(&id)?.into()))
}

async fn retire_incoming(State(c): Ctl, Param(id): Param) -> Result<StatusCode, ApiError> {
    c.retire_incoming(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn complete_incoming(
    State(c): Ctl,
    Param(id): Param,
    body: Body,
) -> Result<Json<IncomingStatus>, ApiError> {
    let req: AbortRequest = json_body(body, true).await?;
    Ok(Json(c.complete_incoming(&id, req.reason)?.into()))
}
