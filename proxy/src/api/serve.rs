//! Serving the API: HTTP/1.1 on the Unix socket, with limits no caller can
//! outstay. A caller that opens a connection and sends half a request, or
//! nothing, or keeps an idle connection, is disconnected after
//! [`HEADER_TIMEOUT`]; a body must arrive within [`super::BODY_TIMEOUT`];
//! at most [`MAX_CONNECTIONS`] are served at once, and one more is answered
//! `503` and closed. Their descriptors come from the reserve the data plane
//! leaves (`relay::slots`), so a flood of connections to pods cannot lock
//! the operator out, and a flood of API callers cannot starve the pods.
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// API connections served at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a caller has to send a request's headers, from the moment it
/// connects or its last answer was sent.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping agent waits for answers in progress.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in progress finish (for at most a few seconds).
pub async fn serve(listener: UnixListener, app: Router, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            conns.spawn(refuse(stream));
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "API connection ended");
                    }
                    false
                }
                () = async { let _ = stop.wait_for(|s| *s).await; } => true,
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, conn).await;
            }
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
}

/// Answers a connection past the limit with a JSON 503 and closes it.
async fn refuse(mut s: UnixStream) {
    let body = format!(
        r#"{{"error":"busy","detail":"the API is serving {MAX_CONNECTIONS} connections, its limit; retry, and close idle connections"}}"#
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await;
}
