//! Relaying client connections to their pods: the accept loop hands each
//! connection to [`connection::relay`], which moves bytes both ways and obeys
//! its endpoint's hold/forward mode.
pub mod connection;
pub mod freeze;
pub mod hold_buffer;
pub mod slots;
pub mod snapshot;
pub mod splice;
pub mod workers;

use crate::endpoint::EndpointState;
use crate::transport::orig_dst::OrigDst;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// How a forwarding connection moves bytes between its two sockets. Holds
/// and replays always go through the userspace hold buffer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// `splice(2)` through a pipe: the bytes stay in the kernel.
    #[default]
    Splice,
    /// Read into a userspace buffer, write it out.
    Copy,
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mechanism::Splice => "splice",
            Mechanism::Copy => "copy",
        })
    }
}

/// What the accept loop asks of the control plane, which implements it:
/// the relay sits below the control plane and does not know it.
pub trait Endpoints: Send + Sync {
    /// The limits and collaborators every new connection gets.
    fn relay_context(&self) -> connection::RelayContext;
    /// The managed endpoint a connection to `dst` belongs to, if any.
    fn endpoint_for(&self, dst: SocketAddrV4) -> Option<Arc<EndpointState>>;
}

/// A connection the previous agent handed over, to be relayed on
/// ([`connection::resume`]).
pub struct Restored {
    pub state: snapshot::ConnState,
    pub client: std::os::fd::OwnedFd,
    pub backend: Option<std::os::fd::OwnedFd>,
    pub endpoint: Arc<EndpointState>,
    /// The hold whose replay the connection was in, if any.
    pub replay: Option<Arc<crate::endpoint::HoldStats>>,
}

/// Relays a handed-over connection on, on the current data-plane thread.
pub fn spawn_restored(r: Restored, control: &dyn Endpoints) {
    let ctx = control.relay_context();
    let slot = ctx.slots.take_anyway();
    let active = ctx.freezer.enter();
    tokio::spawn(async move {
        let _slot = slot;
        connection::resume(
            r.state,
            std::net::TcpStream::from(r.client),
            r.backend.map(std::net::TcpStream::from),
            r.endpoint,
            ctx,
            r.replay,
            active,
        )
        .await;
    });
}

/// Accepts intercepted connections until the listener fails, counting them
/// in `accepted`. A connection past the data plane's slots (see [`slots`])
/// is closed at once, with a FIN. While the data plane is frozen (see
/// [`freeze`]) it accepts nothing; once it is handed over, never again.
pub async fn accept_loop(
    listener: TcpListener,
    control: Arc<dyn Endpoints>,
    orig_dst: Arc<dyn OrigDst>,
    accepted: &AtomicU64,
) {
    use freeze::FreezeState;
    let mut last_refusal_log: Option<std::time::Instant> = None;
    let freezer = control.relay_context().freezer;
    let mut state = freezer.subscribe();
    loop {
        let next = tokio::select! {
            biased;
            _ = state.wait_for(|s| *s != FreezeState::Running) => None,
            r = listener.accept() => Some(r),
        };
        let Some(next) = next else {
            // Accepted connections all count as active by now.
            freezer.loop_paused(true);
            let verdict = state
                .wait_for(|s| !matches!(s, FreezeState::Frozen(_)))
                .await
                .map(|s| *s);
            freezer.loop_paused(false);
            if matches!(verdict, Ok(FreezeState::Running)) {
                continue;
            }
            // Handed over: the listener is the next agent's now.
            return std::future::pending().await;
        };
        let (client, peer) = match next {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let ctx = control.relay_context();
        let Some(slot) = ctx.slots.try_take() else {
            // Logged at most once a second: a flood must not become a
            // flood of log lines too.
            if last_refusal_log.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                last_refusal_log = Some(std::time::Instant::now());
                tracing::warn!(
                    %peer,
                    max_connections = ctx.slots.max(),
                    refused_total = ctx.slots.refused(),
                    "connection limit reached; closing new connections until some end \
                     (raise RLIMIT_NOFILE or --max-connections)"
                );
            }
            drop(client);
            continue;
        };
        let dst = match orig_dst.orig_dst(&client) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "no original destination; closing");
                continue;
            }
        };
        let Some(endpoint) = control.endpoint_for(dst) else {
            // Raced with `endpoint rm`: nothing to relay to. Closing is the
            // only honest answer; the SYN was assigned before the removal.
            tracing::warn!(%peer, %dst, "connection to an unmanaged destination; closing");
            continue;
        };
        // TCP_NODELAY comes from the listener (see transport::listener).
        let active = ctx.freezer.enter();
        tokio::spawn(async move {
            let _slot = slot;
            connection::relay(client, peer, dst, endpoint, ctx, active).await;
        });
    }
}
