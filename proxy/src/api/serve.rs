//! Serving the API: HTTP/1.1 on the Unix socket, with limits no caller can
//! outstay. A caller that opens a connection and sends half a request, or
//! nothing, or keeps an idle connection, is disconnected after
//! [`HEADER_TIMEOUT`]; a body must arrive within [`super::BODY_TIMEOUT`]; a
//! caller that stops reading its answer is disconnected once a write has
//! made no progress for [`WRITE_TIMEOUT`]; at most [`MAX_CONNECTIONS`] are
//! served at once, and one more is answered `503` and closed (at most
//! [`MAX_REFUSING`] of those at a time; past that they are just closed). Their descriptors come from the reserve the data plane
//! leaves (`relay::slots`), so a flood of connections to pods cannot lock
//! the operator out, and a flood of API callers cannot starve the pods.
use crate::relay::freeze::FreezeState;
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
/// How long a write to a caller may make no progress.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Callers being answered `503` at once.
pub const MAX_REFUSING: usize = 32;
/// How long a stopping agent waits for answers in progress.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// requests in progress finish (for at most a few seconds). While the
/// agent is frozen for a hand-over (`freeze`) it accepts nothing: callers
/// wait in the socket's queue for whoever serves next, this agent again or
/// its successor, which takes the socket over. Once handed over it stops
/// as on `shutdown`.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    mut freeze: watch::Receiver<FreezeState>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let state = *freeze.borrow_and_update();
        match state {
            FreezeState::Committed => break,
            FreezeState::Frozen(_) => {
                tokio::select! {
                    () = &mut shutdown => break,
                    r = freeze.changed() => if r.is_err() { break },
                }
                continue;
            }
            FreezeState::Running => {}
        }
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = freeze.changed() => { if r.is_err() { break } continue }
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
            if let Ok(r) = refusing.clone().try_acquire_owned() {
                conns.spawn(async move {
                    let _r = r;
                    refuse(stream).await;
                });
            }
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(Timed::new(stream)), svc);
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

/// A caller's stream whose writes fail once one has made no progress for
/// [`WRITE_TIMEOUT`] (a caller that stops reading would otherwise keep its
/// connection, and a permit, for good).
struct Timed {
    inner: UnixStream,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Timed {
    fn new(inner: UnixStream) -> Self {
        Self {
            inner,
            stalled: None,
        }
    }
}

impl tokio::io::AsyncRead for Timed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Timed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the caller stopped reading its answer",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
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
