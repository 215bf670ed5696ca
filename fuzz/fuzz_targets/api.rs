//! The control API, end to end through its router, with the real control
//! plane over an in-memory stand-in for the kernel: up to eight requests per
//! input, sharing one agent's state, so sequences (hold, then release in
//! another mode, then a repeat...) are reached too.
//!
//! Input: requests separated by 0x00; in each, the first byte picks the
//! method, the bytes up to the first newline are the path and query, the
//! rest is the body. Every answer must be below 500 (the stand-in kernel
//! never fails), and every error must be the API's `{error, detail}` JSON.
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use shepherd::control::{Control, ControlConfig};
use shepherd::intercept::RecordingInterception;
use shepherd::relay::connection::RelayContext;
use shepherd::relay::hold_buffer::Budget;
use shepherd::relay::slots::Slots;
use shepherd::relay::Mechanism;
use shepherd::transport::backend::MarkedConnector;
use shepherd::transport::liveness::Liveness;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

fn control() -> Arc<Control> {
    let relay = RelayContext {
        connector: Arc::new(MarkedConnector {
            timeout: Duration::from_millis(50),
            mark: false,
            liveness: Liveness::OFF,
        }),
        budget: Budget::new(1 << 20),
        hold_cap_per_conn: 1 << 16,
        hold_cap_per_endpoint: 1 << 20,
        close_linger: Duration::from_millis(50),
        next_id: Arc::new(AtomicU64::new(1)),
        slots: Slots::new(16),
        liveness: Liveness::OFF,
        freezer: shepherd::relay::freeze::Freezer::new(),
    };
    Control::new(
        ControlConfig {
            default_deadline: Duration::from_secs(1),
            quiesce_timeout: Duration::from_millis(10),
            default_relay: Mechanism::Copy,
            max_endpoints: 8,
            own_listeners: Vec::new(),
        },
        Arc::new(RecordingInterception::default()),
        relay,
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let app = shepherd::api::router(control());
        for req in data.split(|b| *b == 0).take(8) {
            let Some((&m, rest)) = req.split_first() else {
                continue;
            };
            let method = match m % 5 {
                0 => Method::GET,
                1 => Method::POST,
                2 => Method::PUT,
                3 => Method::DELETE,
                _ => Method::PATCH,
            };
            let (path, body) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let Ok(request) = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::from(body.to_vec()))
            else {
                continue;
            };
            let Ok(answer) = app.clone().oneshot(request).await;
            let status = answer.status();
            assert!(
                status.as_u16() < 500 || status.as_u16() == 501,
                "{status} for {:?}",
                String::from_utf8_lossy(req)
            );
            if status.is_client_error() {
                let bytes = axum::body::to_bytes(answer.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
                assert!(v["error"].is_string() && v["detail"].is_string(), "{v}");
            }
        }
    });
});
