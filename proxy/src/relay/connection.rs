//! One relayed connection: client socket, backend socket, and the two
//! directions between them, in a single task.
//!
//! Client→pod bytes always pass through the connection's [`HoldBuffer`]. In
//! `Forwarding` mode the buffer is drained into the backend as fast as it
//! accepts; in `Holding` mode nothing is written to the backend, client bytes
//! accumulate up to the caps, and the connection reports itself quiescent once
//! the backend has acknowledged everything already written. On release the
//! buffer drains in order — that drain is the replay.
//!
//! This task must never drop a client byte, write one twice, or reset the
//! client: when the backend fails, the client is closed with a FIN after the
//! bytes the pod sent have been delivered.
//!
//! During a hold, the pod's end of the backend connection does not reach
//! the client: a FIN, a reset or an error is recorded ([`BackendEnd`]) and
//! the release decides. Kubernetes checkpoints a container and leaves it
//! running; the controller then stops the original, whose sockets close
//! while the hold is on, and restores the checkpoint elsewhere. A
//! `reconnect` release opens a new backend connection and replays what it
//! defines; `resume` and abort (or the deadline) find the backend gone and
//! close the client cleanly, after every byte the pod sent.
use super::freeze::{Active, FreezeState, Freezer};
use super::hold_buffer::{wait_freed, Budget, Charge, HoldBuffer, READ_CHUNK};
use super::snapshot::{ConnSnapshot, ConnState, DirectionState, EndedInHold};
use super::splice::{Filled, Lane, PIPE_SIZE};
use super::Mechanism;
use crate::endpoint::{BackendSocket, ConnInfo, EndpointState, HoldStats, Mode};
use crate::transport::backend::{unacked_bytes, BackendConnector};
use crate::transport::inq;
use crate::transport::liveness::Liveness;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::future::pending;
use std::io::{self, IoSlice};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Limits and collaborators shared by all connections.
#[derive(Clone)]
pub struct RelayContext {
    pub connector: Arc<dyn BackendConnector>,
    /// Node-wide cap on held bytes.
    pub budget: Arc<Budget>,
    /// Max client bytes queued per connection while held.
    pub hold_cap_per_conn: usize,
    /// Max held bytes of one endpoint's connections together.
    pub hold_cap_per_endpoint: usize,
    /// How long to keep draining a client we are closing before giving up.
    pub close_linger: Duration,
    pub next_id: Arc<AtomicU64>,
    /// The data plane's connection slots (see [`super::slots`]).
    pub slots: Arc<super::slots::Slots>,
    /// Backend sockets' timers, taken off during a hold and put back after.
    pub liveness: Liveness,
    /// Stops every connection still for a hand-over (see [`super::freeze`]).
    pub freezer: Arc<Freezer>,
}

/// How far a forwarding connection reads ahead of a slow backend.
const FORWARD_READ_AHEAD: usize = 4 * READ_CHUNK;
/// Chunks one write to the backend may gather (a hold queues one chunk per
/// client read, so a long hold of a chatty client queues thousands).
const WRITE_BATCH_CHUNKS: usize = 64;
/// Reads at least this big switch a direction to splice (splice mode);
/// smaller ones switch it back to copy.
const SPLICE_MIN: usize = 16 * 1024;
/// Events a connection handles before it lets the thread's other
/// connections run.
const YIELD_EVERY: u32 = 16;
/// How often a held connection re-checks its backend's unacknowledged bytes.
const QUIESCE_POLL: Duration = Duration::from_millis(2);

enum Event {
    ModeChanged,
    BackendWrote(io::Result<usize>),
    ClientWrote(io::Result<usize>),
    /// A socket has bytes; the handler reads them, spliced (`true`: into
    /// the direction's pipe) or copied. Copied reads go through
    /// `inq::read_buf`, not `AsyncRead`, whose short-read heuristic clears
    /// readiness: a read stops short at TCP's urgent mark with more bytes
    /// queued behind it, and those would then wait for a segment that may
    /// never come. `read_buf` clears it only when the kernel reports the
    /// queue empty; splice reads go on until EAGAIN.
    ClientReadable(io::Result<()>, bool),
    BackendReadable(io::Result<()>, bool),
    /// Splice mode: a socket can take the lane's bytes.
    BackendWritable(io::Result<()>),
    ClientWritable(io::Result<()>),
    Tick,
    /// The data plane is being frozen for a hand-over.
    Freeze,
}

/// How a connection's relay loop ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Both directions are done.
    Done,
    /// Handed over to the next agent, which owns the sockets now.
    HandedOver,
}

struct Backend {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
}

/// How the pod's end of a backend connection ended while a hold was on.
/// The client is not told until the release says what it means.
#[derive(Debug)]
enum BackendEnd {
    /// A FIN: the pod (or its stopped original) closed the connection.
    Fin,
    /// A reset or an error, with what failed.
    Failed(ConnError),
}

/// Why a relayed connection ended before both of its directions were done:
/// the step that failed, with its cause. Its message goes to the log and,
/// when a hold is involved, to the migration's status (`reason`).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("backend {backend} unreachable: {source}")]
    Unreachable {
        backend: SocketAddrV4,
        source: io::Error,
    },
    /// `op` is "read from" or "write to".
    #[error("{op} backend {backend} failed: {source}")]
    Backend {
        op: &'static str,
        backend: SocketAddrV4,
        source: io::Error,
    },
    #[error(
        "the pod closed the connection during the hold and the release did not reconnect: \
         the client got a FIN after every byte the pod sent"
    )]
    ClosedDuringHold,
    #[error("{0} (during the hold; the release did not reconnect)")]
    FailedDuringHold(#[source] Box<ConnError>),
    #[error("client read failed: {0}")]
    ClientRead(#[source] io::Error),
    #[error("client write failed: {0}")]
    ClientWrite(#[source] io::Error),
    #[error("taking spliced bytes back: {0}")]
    TakeBack(#[source] io::Error),
    #[error("endpoint removed")]
    EndpointRemoved,
    /// Ended in the previous agent, which handed the connection over.
    #[error("{0} (in the previous agent)")]
    Inherited(String),
}

/// One direction of a connection: the bytes read and not yet written
/// (`buf`), the same in a splice pipe (`lane`; splice mode), and how its
/// two ends stand. The lane is used only when `buf` is empty, so a
/// direction's bytes are in one place at a time, in order.
struct Direction<B> {
    buf: B,
    lane: Lane,
    /// The last read was big, so splice the next one. Small messages are
    /// copied (one syscall fewer than a pipe round trip each way, and no
    /// pipe to take); bulk is spliced.
    bulk: bool,
    /// The reading end sent its FIN (or, downstream, the backend ended).
    eof: bool,
    /// Its FIN was passed on: the writing end is shut down.
    shut: bool,
}

impl<B> Direction<B> {
    fn new(buf: B) -> Self {
        Self {
            buf,
            lane: Lane::default(),
            bulk: false,
            eof: false,
            shut: false,
        }
    }
}

/// The replay of one hold: how many bytes at the front of a connection's
/// queue are that hold's, counted into its `bytes_replayed` as they are
/// written. A hold that starts before the replay is done takes the rest
/// over ([`Replay::hand_on`]), and the ended hold counts them as handed
/// on, so that its `bytes_replayed` still reaches its `bytes_held`.
#[derive(Default)]
struct Replay {
    left: usize,
    stats: Option<Arc<HoldStats>>,
}

impl Replay {
    /// The hold `stats` ended with `queued` bytes at the front of the queue.
    fn begin(queued: usize, stats: Arc<HoldStats>) -> Self {
        Self {
            left: queued,
            stats: Some(stats),
        }
    }

    /// `n` bytes left the front of the queue.
    fn written(&mut self, n: usize) {
        let r = n.min(self.left);
        if r == 0 {
            return;
        }
        self.left -= r;
        if let Some(h) = &self.stats {
            h.bytes_replayed.fetch_add(r as u64, Ordering::Relaxed);
        }
    }

    /// The hold being replayed (its epoch) and its bytes still queued.
    fn pending(&self) -> Option<(u64, usize)> {
        self.stats
            .as_ref()
            .filter(|_| self.left > 0)
            .map(|h| (h.epoch, self.left))
    }

    /// A new hold begins: what is left is no longer this replay's.
    fn hand_on(&mut self) {
        if let Some(h) = self.stats.take() {
            h.bytes_replayed
                .fetch_add(self.left as u64, Ordering::Relaxed);
        }
        self.left = 0;
    }
}

/// Relays one accepted client connection until both directions are done.
/// `active` counts it for a freeze from its accept on.
pub async fn relay(
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddrV4,
    endpoint: Arc<EndpointState>,
    ctx: RelayContext,
    active: Active,
) {
    let info = Arc::new(ConnInfo {
        id: ctx.next_id.fetch_add(1, Ordering::Relaxed),
        client: peer,
        orig_dst,
        opened: SystemTime::now(),
        backend: Default::default(),
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        bytes_spliced: AtomicU64::new(0),
        queued: Default::default(),
        quiesced_epoch: AtomicU64::new(0),
        translated_flow: Default::default(),
    });
    let guard = endpoint.register(info.clone());
    let mut conn = Conn::new(client, info, endpoint, ctx);
    conn.active = Some(active);
    if let Mode::Holding(h) = &conn.mode {
        // Accepted during a hold: queued; it connects after release and has
        // nothing in flight towards the pod, so it is quiescent already.
        h.connections_queued.fetch_add(1, Ordering::Relaxed);
        conn.info.quiesced_epoch.store(h.epoch, Ordering::Release);
    }
    drive(conn, guard).await;
}

/// Rebuilds a connection the previous agent handed over, from its state
/// and its two sockets, and relays it on from where it stopped. `replay`:
/// the hold its state's replay counts for, if that hold is known.
/// Must run inside the data-plane thread's runtime.
pub async fn resume(
    state: ConnState,
    client: std::net::TcpStream,
    backend: Option<std::net::TcpStream>,
    endpoint: Arc<EndpointState>,
    ctx: RelayContext,
    replay: Option<Arc<HoldStats>>,
    active: Active,
) {
    let peer = state.client;
    let register = |s: std::net::TcpStream| {
        s.set_nonblocking(true)?;
        TcpStream::from_std(s)
    };
    let client = match register(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "a handed-over client socket could not be registered; closing it");
            return;
        }
    };
    let backend = match backend.map(register).transpose() {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "a handed-over backend socket could not be registered; closing the connection");
            return;
        }
    };
    let info = Arc::new(ConnInfo {
        id: state.id,
        client: state.client,
        orig_dst: state.orig_dst,
        opened: state.opened,
        backend: std::sync::Mutex::new(
            state
                .backend
                .map(|(local, peer)| BackendSocket { local, peer }),
        ),
        bytes_up: AtomicU64::new(state.bytes_up),
        bytes_down: AtomicU64::new(state.bytes_down),
        bytes_spliced: AtomicU64::new(state.bytes_spliced),
        queued: std::sync::atomic::AtomicUsize::new(state.up.bytes.len()),
        quiesced_epoch: AtomicU64::new(state.quiesced_epoch),
        translated_flow: std::sync::Mutex::new(state.translation),
    });
    let guard = endpoint.adopt(info.clone());
    let mut conn = Conn::new(client, info, endpoint, ctx);
    conn.active = Some(active);
    conn.restore(state, backend, replay);
    tracing::debug!(%peer, "resumed");
    drive(conn, guard).await;
}

/// Runs a connection to its end, then lets it go.
async fn drive(mut conn: Conn, mut guard: crate::endpoint::ConnGuard) {
    let (peer, orig_dst) = (conn.info.client, conn.info.orig_dst);
    let outcome = conn.run().await;
    // Not relaying any more: a freeze no longer waits for it.
    conn.active = None;
    match &outcome {
        Ok(Ended::HandedOver) => {
            // The next agent owns the sockets and the translation: close
            // our descriptors only (no FIN: it holds its own), undo nothing.
            guard.handed_over();
            tracing::debug!(%peer, %orig_dst, "connection handed over");
            conn.release_budget();
            conn.let_go();
            return;
        }
        Ok(Ended::Done) => {
            conn.linger_if_translated().await;
            tracing::debug!(%peer, %orig_dst, "connection finished");
        }
        Err(reason) => tracing::info!(%peer, %orig_dst, %reason, "connection ended"),
    }
    conn.release_budget();
}

struct Conn {
    info: Arc<ConnInfo>,
    endpoint: Arc<EndpointState>,
    ctx: RelayContext,
    mode_rx: tokio::sync::watch::Receiver<Mode>,
    mode: Mode,
    client_r: OwnedReadHalf,
    client_w: OwnedWriteHalf,
    backend: Option<Backend>,
    /// Client → pod: the hold buffer (whose drain after a release is the
    /// replay), the client's EOF and the backend's shutdown.
    up: Direction<HoldBuffer>,
    /// What `up` and its lane hold, charged to the endpoint's budget, and
    /// of it what is held, charged to the node's too (always the front:
    /// bytes read after a release queue behind them).
    charge: Charge,
    /// The front of `up` being written (reused between iterations).
    batch: Vec<Bytes>,
    /// Pod → client: bytes read and not yet written, the backend's EOF and
    /// the client's shutdown.
    down: Direction<Bytes>,
    down_spare: BytesMut,
    /// Splice mode: bytes between sockets in a pipe (see [`Direction`]).
    splice: bool,
    /// How many client bytes the next read may take (caps and budget).
    room: usize,
    /// What of `up` the hold that just ended still has to replay.
    replay: Replay,
    /// The endpoint's reconnect count this connection has acted on.
    reconnects_seen: u64,
    /// The backend ended during a hold; the release decides what the
    /// client sees (see the module doc).
    ended_in_hold: Option<BackendEnd>,
    freeze_rx: tokio::sync::watch::Receiver<FreezeState>,
    /// Events handled (see [`YIELD_EVERY`]).
    turns: u32,
    /// Counts it as relaying for a freeze; dropped once it only closes.
    active: Option<Active>,
}

impl Conn {
    fn new(
        client: TcpStream,
        info: Arc<ConnInfo>,
        endpoint: Arc<EndpointState>,
        ctx: RelayContext,
    ) -> Self {
        let (client_r, client_w) = client.into_split();
        let mut mode_rx = endpoint.subscribe();
        let mode = mode_rx.borrow_and_update().clone();
        // Read after the mode: a reconnect counted before it is one this
        // connection, which has no backend yet, has nothing to do for; one
        // counted after it arrives as a mode change too. (Read before, a
        // count that moved in between would make it drop the backend it is
        // about to open, at the next hold.)
        let reconnects_seen = endpoint.reconnects();
        let splice = endpoint.relay() == Mechanism::Splice;
        let charge = Charge::new(ctx.budget.clone(), endpoint.hold_budget());
        let freeze_rx = ctx.freezer.subscribe();
        Self {
            turns: 0,
            active: None,
            freeze_rx,
            charge,
            info,
            endpoint,
            ctx,
            mode_rx,
            mode,
            client_r,
            client_w,
            backend: None,
            up: Direction::new(HoldBuffer::new()),
            batch: Vec::new(),
            down: Direction::new(Bytes::new()),
            down_spare: BytesMut::new(),
            splice,
            room: 0,
            replay: Replay::default(),
            reconnects_seen,
            ended_in_hold: None,
        }
    }

    fn holding(&self) -> Option<Arc<HoldStats>> {
        self.mode.hold().cloned()
    }

    /// Sets up what a handed-over connection's state says (see [`resume`]).
    fn restore(
        &mut self,
        state: ConnState,
        backend: Option<TcpStream>,
        replay: Option<Arc<HoldStats>>,
    ) {
        self.backend = backend.map(|b| {
            let (r, w) = b.into_split();
            Backend { r, w }
        });
        let up_len = state.up.bytes.len();
        let held = state.held.min(up_len);
        self.up.buf.push(Bytes::from(state.up.bytes));
        (self.up.eof, self.up.shut, self.up.bulk) = (state.up.eof, state.up.shut, state.up.bulk);
        self.down.buf = Bytes::from(state.down.bytes);
        (self.down.eof, self.down.shut, self.down.bulk) =
            (state.down.eof, state.down.shut, state.down.bulk);
        // Charged as the previous agent had it: the held front to both
        // budgets, the rest to the endpoint's.
        self.charge.take(held, true);
        self.charge.take(up_len - held, false);
        self.splice = state.splice;
        self.replay = match (state.replay, replay) {
            (Some((_, left)), Some(stats)) => Replay::begin(left.min(up_len), stats),
            _ => Replay::default(),
        };
        self.reconnects_seen = state.reconnects_seen;
        self.ended_in_hold = state.ended_in_hold.map(|e| match e {
            EndedInHold::Fin => BackendEnd::Fin,
            EndedInHold::Failed(why) => BackendEnd::Failed(ConnError::Inherited(why)),
        });
        // The sockets' options (keepalive, user timeout, marks) are the
        // sockets' own: they came over with them.
    }

    /// What this connection is, with its sockets' descriptors, once its
    /// splice pipes are emptied back into its buffers.
    fn snapshot(&mut self) -> Result<ConnSnapshot, ConnError> {
        if !self.up.lane.is_empty() {
            // The up lane is used only when the queue is empty.
            let b = self.up.lane.drain().map_err(ConnError::TakeBack)?;
            self.up.buf.push(Bytes::from(b));
            self.info.queued.store(self.up.buf.len(), Ordering::Relaxed);
        }
        if !self.down.lane.is_empty() {
            let b = self.down.lane.drain().map_err(ConnError::TakeBack)?;
            self.down.buf = Bytes::from(b);
        }
        let info = &self.info;
        let state = ConnState {
            id: info.id,
            client: info.client,
            orig_dst: info.orig_dst,
            opened: info.opened,
            backend: info
                .backend
                .lock()
                .ok()
                .and_then(|b| *b)
                .filter(|_| self.backend.is_some())
                .map(|b| (b.local, b.peer)),
            bytes_up: info.bytes_up.load(Ordering::Relaxed),
            bytes_down: info.bytes_down.load(Ordering::Relaxed),
            bytes_spliced: info.bytes_spliced.load(Ordering::Relaxed),
            quiesced_epoch: info.quiesced_epoch.load(Ordering::Acquire),
            translation: info.translated_flow.lock().map(|t| *t).unwrap_or_default(),
            up: DirectionState {
                bytes: self.up.buf.to_vec(),
                eof: self.up.eof,
                shut: self.up.shut,
                bulk: self.up.bulk,
            },
            down: DirectionState {
                bytes: self.down.buf.to_vec(),
                eof: self.down.eof,
                shut: self.down.shut,
                bulk: self.down.bulk,
            },
            held: self.charge.held(),
            replay: self.replay.pending(),
            reconnects_seen: self.reconnects_seen,
            ended_in_hold: self.ended_in_hold.as_ref().map(|e| match e {
                BackendEnd::Fin => EndedInHold::Fin,
                BackendEnd::Failed(why) => EndedInHold::Failed(why.to_string()),
            }),
            splice: self.splice,
        };
        Ok(ConnSnapshot {
            state,
            endpoint: self.endpoint.clone(),
            client: self.client_r.as_ref().as_raw_fd(),
            backend: self.backend.as_ref().map(|b| b.r.as_ref().as_raw_fd()),
        })
    }

    /// The data plane is frozen: reports this connection and waits for the
    /// hand-over's verdict, touching neither socket meanwhile.
    async fn freeze(&mut self, generation: u64) -> Result<FreezeState, ConnError> {
        let snapshot = self.snapshot()?;
        self.ctx.freezer.report(generation, snapshot);
        // Until this freeze ends: committed, thawed, or another freeze
        // (after this one timed out), which this connection reports to anew.
        let verdict = self
            .freeze_rx
            .wait_for(|s| *s != FreezeState::Frozen(generation))
            .await
            .map(|s| *s)
            .unwrap_or(FreezeState::Committed);
        Ok(verdict)
    }

    async fn run(&mut self) -> Result<Ended, ConnError> {
        loop {
            // Frozen for a hand-over (after any mode change, which the
            // control plane made before it froze).
            let mode_pending = self.mode_rx.has_changed().unwrap_or(false);
            let freeze = *self.freeze_rx.borrow_and_update();
            if !mode_pending {
                match freeze {
                    FreezeState::Running => {}
                    FreezeState::Committed => return Ok(Ended::HandedOver),
                    FreezeState::Frozen(g) => match self.freeze(g).await? {
                        FreezeState::Committed => return Ok(Ended::HandedOver),
                        _ => continue,
                    },
                }
            }
            let hold = self.holding();
            if hold.is_none() && self.backend.is_none() && !self.down.eof && !mode_pending {
                // A freeze gives up the connect (a half-open socket is
                // nothing to hand over): the next agent connects afresh.
                let connector = self.ctx.connector.clone();
                let peer = self.endpoint.backend();
                let moved = self.endpoint.moved();
                let mut frx = self.freeze_rx.clone();
                let connected = tokio::select! {
                    r = connector.connect(peer, moved) => r,
                    _ = frx.wait_for(|s| *s != FreezeState::Running) => continue,
                };
                match connected {
                    Ok(stream) => self.adopt_backend(stream, peer),
                    Err(e) => {
                        let reason = ConnError::Unreachable {
                            backend: peer,
                            source: e,
                        };
                        self.fail_backend(&reason).await;
                        return Err(reason);
                    }
                }
            }
            if hold.is_none()
                && self.backend.is_some()
                && self.up.buf.is_empty()
                && self.up.lane.is_empty()
                && self.up.eof
                && !self.up.shut
            {
                // The client's FIN follows all its bytes to the pod.
                if let Some(b) = self.backend.as_mut() {
                    let _ = b.w.shutdown().await;
                }
                self.up.shut = true;
            }
            if self.down.eof
                && self.down.buf.is_empty()
                && self.down.lane.is_empty()
                && !self.down.shut
                && hold.is_none()
            {
                // The pod's FIN follows all its bytes to the client (after
                // the release, if it came during a hold: the release may
                // give the client a new backend connection instead).
                let _ = self.client_w.shutdown().await;
                self.down.shut = true;
            }
            if self.up.eof && self.up.shut && self.down.eof && self.down.shut {
                return Ok(Ended::Done);
            }
            let mut tick = false;
            if let Some(h) = &hold {
                if self.info.quiesced_epoch.load(Ordering::Acquire) != h.epoch {
                    // A backend that ended during the hold acknowledges
                    // nothing more (a reset leaves SIOCOUTQ as it was).
                    let unacked = match &self.backend {
                        Some(b) if self.ended_in_hold.is_none() => {
                            unacked_bytes(b.w.as_ref()).unwrap_or(0)
                        }
                        _ => 0,
                    };
                    if unacked == 0 {
                        self.info.quiesced_epoch.store(h.epoch, Ordering::Release);
                        h.quiesced.notify_waiters();
                    } else {
                        tick = true;
                    }
                }
            }

            let cap = if hold.is_some() {
                self.ctx.hold_cap_per_conn
            } else {
                FORWARD_READ_AHEAD.min(self.ctx.hold_cap_per_conn)
            };
            let room = cap
                .saturating_sub(self.up.buf.len())
                .min(self.charge.available(hold.is_some()));
            self.room = room;
            // The up lane is empty whenever anything else happens upstream.
            let up_lane_busy = !self.up.lane.is_empty();
            let read_client = !self.up.eof && room > 0 && !up_lane_busy;
            // Splice client bytes only when nothing is queued ahead of them.
            let splice_up = self.splice
                && self.up.bulk
                && hold.is_none()
                && self.backend.is_some()
                && self.up.buf.is_empty();
            // Blocked only by a budget: wake up when it frees.
            let budget_blocked = !self.up.eof && self.up.buf.len() < cap && room == 0;
            if hold.is_none() {
                self.up
                    .buf
                    .front_batch(&mut self.batch, WRITE_BATCH_CHUNKS, READ_CHUNK);
            } else {
                self.batch.clear();
            }
            let read_backend =
                !self.down.eof && self.down.buf.is_empty() && self.down.lane.is_empty();
            let write_client = !self.down.buf.is_empty() || !self.down.lane.is_empty();
            let (node_budget, endpoint_budget) = self.charge.budgets();
            let (backend_w, backend_r) = match self.backend.as_mut() {
                Some(b) => (Some(&mut b.w), Some(&mut b.r)),
                None => (None, None),
            };
            let splice_down = self.splice && self.down.bulk;

            // A mode change goes first (a hold must take the up lane's bytes
            // back before anything else moves); the data branches are then
            // polled in random order, so neither direction can starve the
            // other while both stay busy.
            let mode_changed = match self.mode_rx.has_changed() {
                Ok(c) => c,
                Err(_) => return Err(ConnError::EndpointRemoved),
            };
            let event = if mode_changed {
                Event::ModeChanged
            } else {
                tokio::select! {
                r = self.mode_rx.changed() => match r {
                    Ok(()) => Event::ModeChanged,
                    // The endpoint state is gone (agent shutting down).
                    Err(_) => return Err(ConnError::EndpointRemoved),
                },
                _ = self.freeze_rx.changed() => Event::Freeze,
                e = to_backend(backend_w, &self.batch, up_lane_busy && hold.is_none()) => e,
                e = to_client(&mut self.client_w, &self.down.buf), if write_client => e,
                e = from_backend(backend_r, splice_down), if read_backend => e,
                e = from_client(&mut self.client_r, splice_up), if read_client => e,
                _ = tokio::time::sleep(QUIESCE_POLL), if tick => Event::Tick,
                () = wait_freed(&node_budget, &endpoint_budget), if budget_blocked => Event::Tick,
                }
            };
            self.handle(event).await?;
            self.turns = self.turns.wrapping_add(1);
            if self.turns.is_multiple_of(YIELD_EVERY) {
                // A busy connection's events are all ready at once, and
                // tokio lets a task run 128 of them (32 MiB spliced)
                // before others get the thread: give it up now and then.
                tokio::task::yield_now().await;
            }
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), ConnError> {
        match event {
            Event::Tick | Event::Freeze => {}
            Event::ModeChanged => {
                let new = self.mode_rx.borrow_and_update().clone();
                // A reconnect release counts even if a later mode hid it.
                let reconnects = self.endpoint.reconnects();
                if reconnects != self.reconnects_seen {
                    // First, so a hold that starts here counts the
                    // connection as queued (it has no backend any more).
                    self.drop_backend_for_reconnect();
                }
                self.reconnects_seen = reconnects;
                match (&self.mode, &new) {
                    (Mode::Forwarding { .. }, Mode::Holding(h)) => {
                        // Bytes spliced but not yet written join the hold
                        // buffer; nothing is queued ahead of them.
                        if !self.up.lane.is_empty() {
                            match self.up.lane.drain() {
                                Ok(b) => {
                                    self.up.buf.push(Bytes::from(b));
                                    self.info.queued.store(self.up.buf.len(), Ordering::Relaxed);
                                }
                                Err(e) => return Err(ConnError::TakeBack(e)),
                            }
                        }
                        // Everything queued is held now, the forwarding
                        // read-ahead (charged to the endpoint only) and the
                        // spliced bytes just taken back alike.
                        self.charge.hold_all(self.up.buf.len());
                        // What the last replay had left is this hold's now.
                        self.replay.hand_on();
                        self.start_hold(h);
                        self.backend_timers(false);
                    }
                    (Mode::Holding(last), Mode::Holding(h)) if !Arc::ptr_eq(last, h) => {
                        // A release and the next hold, seen as one change:
                        // everything the last hold queued is this one's to
                        // replay.
                        self.hand_on_queue(last);
                        self.start_hold(h);
                    }
                    (Mode::Holding(last), Mode::Forwarding { after, .. }) => {
                        self.backend_timers(true);
                        match after {
                            Some(a) if Arc::ptr_eq(last, a) => {
                                self.replay = Replay::begin(self.up.buf.len(), a.clone());
                            }
                            // The release of a later hold, whose hold passed
                            // unseen (its quiescence timed out): that hold
                            // never counted these bytes, so they count as
                            // the last one's, handed on.
                            _ => {
                                self.hand_on_queue(last);
                                self.replay = Replay::default();
                            }
                        }
                    }
                    _ => {}
                }
                self.mode = new;
                if self.mode.hold().is_none() {
                    if let Some(end) = self.ended_in_hold.take() {
                        self.settle_end_in_hold(end).await?;
                    }
                }
            }
            Event::ClientReadable(Err(e), _) => return Err(ConnError::ClientRead(e)),
            Event::ClientReadable(Ok(()), false) => self.copy_from_client()?,
            Event::ClientReadable(Ok(()), true) => {
                // Spliced only while forwarding: the endpoint's room.
                let room = self.charge.reserve(self.room.clamp(1, PIPE_SIZE), false);
                let filled = if room == 0 {
                    Ok(Filled::WouldBlock)
                } else {
                    self.up.lane.fill_from(self.client_r.as_ref(), room)
                };
                if let Ok(Filled::Bytes(n)) = &filled {
                    // Spliced bytes wait in the pipe as read-ahead: the
                    // endpoint's budget counts them as queued.
                    self.charge.take(*n, false);
                }
                self.charge.unreserve();
                match filled {
                    Ok(Filled::Bytes(n)) => {
                        self.up.bulk = n >= SPLICE_MIN;
                        self.info.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Filled::Eof) => self.up.eof = true,
                    Ok(Filled::WouldBlock) => {}
                    // No pipe to be had, or urgent data that only a plain
                    // read gets past: copy this read instead.
                    Ok(Filled::NoPipe | Filled::Stuck) => self.copy_from_client()?,
                    Err(e) => return Err(ConnError::ClientRead(e)),
                }
            }
            Event::BackendWritable(r) => {
                let r = match (r, self.backend.as_ref()) {
                    (Ok(()), Some(b)) => self.up.lane.flush_to(b.w.as_ref()).map(|n| {
                        self.info
                            .bytes_spliced
                            .fetch_add(n as u64, Ordering::Relaxed);
                        self.charge.give_back(n);
                    }),
                    (r, _) => r,
                };
                if let Err(e) = r {
                    return self.backend_failed("write to", e).await;
                }
            }
            Event::BackendReadable(Err(e), _) => return self.backend_failed("read from", e).await,
            Event::BackendReadable(Ok(()), false) => self.copy_from_backend().await?,
            Event::BackendReadable(Ok(()), true) => {
                let filled = match self.backend.as_ref() {
                    Some(b) => self.down.lane.fill_from(b.r.as_ref(), PIPE_SIZE),
                    None => Ok(Filled::WouldBlock),
                };
                match filled {
                    Ok(Filled::Bytes(n)) => {
                        self.down.bulk = n >= SPLICE_MIN;
                        self.info.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(Filled::Eof) => self.backend_ended(),
                    Ok(Filled::WouldBlock) => {}
                    Ok(Filled::NoPipe | Filled::Stuck) => {
                        // As on the client side; the next read decides
                        // afresh whether to splice.
                        self.copy_from_backend().await?;
                        self.down.bulk = false;
                    }
                    Err(e) => return self.backend_failed("read from", e).await,
                }
            }
            Event::ClientWritable(r) => {
                match r.and_then(|()| self.down.lane.flush_to(self.client_w.as_ref())) {
                    Ok(n) => {
                        self.info
                            .bytes_spliced
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => return Err(ConnError::ClientWrite(e)),
                }
            }
            Event::BackendWrote(Ok(n)) => {
                self.up.buf.consume(n);
                if self.up.buf.is_empty() && self.batch.capacity() > 4 {
                    // A replay grew it; idle connections should not keep 2 KiB.
                    self.batch = Vec::new();
                }
                self.charge.give_back(n);
                self.info.queued.store(self.up.buf.len(), Ordering::Relaxed);
                self.replay.written(n);
            }
            Event::BackendWrote(Err(e)) => return self.backend_failed("write to", e).await,
            Event::ClientWrote(Ok(n)) => self.down.buf.advance(n),
            Event::ClientWrote(Err(e)) => return Err(ConnError::ClientWrite(e)),
        }
        Ok(())
    }

    /// A translated backend flow needs its eBPF entry until the pod has
    /// acknowledged everything, FIN included: closing the socket and removing
    /// the entry earlier would send its last segments (or retransmissions) to
    /// the old address. Bounded by the close linger.
    async fn linger_if_translated(&self) {
        let translated = matches!(
            self.info.translated_flow.lock().map(|t| *t),
            Ok(crate::endpoint::FlowTranslation::Installed(_))
        );
        let Some(b) = self.backend.as_ref().filter(|_| translated) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + self.ctx.close_linger;
        while unacked_bytes(b.w.as_ref()).unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(QUIESCE_POLL).await;
        }
    }

    /// A buffered read from the backend finished.
    async fn backend_read(&mut self, r: io::Result<usize>) -> Result<(), ConnError> {
        match r {
            Ok(0) => self.backend_ended(),
            Ok(n) => {
                self.down.bulk = n >= SPLICE_MIN;
                self.down.buf = self.down_spare.split_to(n).freeze();
                self.info.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return self.backend_failed("read from", e).await,
        }
        Ok(())
    }

    /// The pod sent its FIN. During a hold it is only recorded: the
    /// release decides whether the client sees it.
    fn backend_ended(&mut self) {
        self.down.eof = true;
        self.end_in_hold(BackendEnd::Fin);
    }

    /// During a hold, records how the backend ended (counted once per
    /// connection; an error after a FIN says more, so it replaces it) and
    /// returns true. Outside a hold, returns false.
    fn end_in_hold(&mut self, end: BackendEnd) -> bool {
        let Some(h) = self.mode.hold() else {
            return false;
        };
        tracing::info!(client = %self.info.client, ?end, "backend ended during a hold; the release decides");
        match (&self.ended_in_hold, &end) {
            (Some(_), BackendEnd::Fin) => return true,
            (None, _) => {
                h.backends_ended.fetch_add(1, Ordering::Relaxed);
            }
            (Some(_), BackendEnd::Failed(_)) => {}
        }
        self.ended_in_hold = Some(end);
        true
    }

    /// `op` ("read from", "write to") the backend failed. During a hold it
    /// is recorded and the connection waits for the release (nothing more
    /// is read from that socket); otherwise the client is closed cleanly
    /// (see [`Conn::fail_backend`]) and the reason returned.
    async fn backend_failed(&mut self, op: &'static str, e: io::Error) -> Result<(), ConnError> {
        let reason = ConnError::Backend {
            op,
            backend: self.info.orig_dst,
            source: e,
        };
        if self.mode.hold().is_some() {
            self.end_in_hold(BackendEnd::Failed(reason));
            self.down.eof = true;
            return Ok(());
        }
        self.fail_backend(&reason).await;
        Err(reason)
    }

    /// The hold ended (a release or an abort) with the backend gone during
    /// it, and no reconnect gave the connection a new one: the pod this
    /// socket reached is not coming back (a stopped process, or a frozen
    /// one whose checkpoint was restored elsewhere without it). The client
    /// gets every byte the pod sent, then a clean FIN; its held bytes are
    /// not written into the dead socket; the status says why.
    async fn settle_end_in_hold(&mut self, end: BackendEnd) -> Result<(), ConnError> {
        let reason = match end {
            BackendEnd::Fin => ConnError::ClosedDuringHold,
            BackendEnd::Failed(reason) => ConnError::FailedDuringHold(Box::new(reason)),
        };
        self.fail_backend(&reason).await;
        Err(reason)
    }

    /// Reads what the client sent into the hold buffer (as much as `room`
    /// allows); nothing if it turns out there was nothing.
    fn copy_from_client(&mut self) -> Result<(), ConnError> {
        // The room, taken before the read: other connections read at once.
        let room = self
            .charge
            .reserve(self.room.clamp(1, READ_CHUNK), self.mode.hold().is_some());
        if room == 0 {
            // Spent by another connection meanwhile: the next turn waits.
            return Ok(());
        }
        let target = self.up.buf.read_target(room);
        let limit = target.limit;
        let r = match inq::read_buf(self.client_r.as_ref(), &mut target.buf.limit(limit)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => self.client_read(r),
        };
        self.charge.unreserve();
        r
    }

    /// Reads what the pod sent into `down`.
    async fn copy_from_backend(&mut self) -> Result<(), ConnError> {
        // Taken when there is something to read, not before: an idle
        // connection holds no read buffer.
        if self.down_spare.capacity() < 4096 {
            self.down_spare.reserve(READ_CHUNK);
        }
        let r = match self.backend.as_ref() {
            Some(b) => inq::read_buf(b.r.as_ref(), &mut self.down_spare),
            None => return Ok(()),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => self.backend_read(r).await,
        }
    }

    /// A buffered read from the client finished.
    fn client_read(&mut self, r: io::Result<usize>) -> Result<(), ConnError> {
        match r {
            Ok(0) => self.up.eof = true,
            Ok(_) => {
                let n = self.up.buf.commit();
                self.up.bulk = n >= SPLICE_MIN;
                self.charge.take(n, self.mode.hold().is_some());
                self.info.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                self.info.queued.store(self.up.buf.len(), Ordering::Relaxed);
                if let Some(h) = self.mode.hold() {
                    h.bytes_held.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            // The client reset or vanished: nobody is left to deliver to.
            Err(e) => return Err(ConnError::ClientRead(e)),
        }
        Ok(())
    }

    /// Puts the backend socket's keepalive and user timeout on (`true`) or
    /// takes them off for a hold: a frozen pod answers no probe.
    fn backend_timers(&self, on: bool) {
        let Some(b) = self.backend.as_ref() else {
            return;
        };
        let s: &TcpStream = b.w.as_ref();
        let r = if on {
            self.ctx.liveness.apply(s)
        } else {
            Liveness::suspend(s)
        };
        if let Err(e) = r {
            tracing::debug!(client = %self.info.client, error = %e, "backend timers not changed");
        }
    }

    /// Counts this connection in hold `h`, with what it has queued.
    fn start_hold(&self, h: &HoldStats) {
        if self.backend.is_some() {
            h.connections_held.fetch_add(1, Ordering::Relaxed);
        } else {
            h.connections_queued.fetch_add(1, Ordering::Relaxed);
        }
        if self.ended_in_hold.is_some() {
            // Ended during the last hold, whose release this connection
            // never saw: it is this hold's to settle.
            h.backends_ended.fetch_add(1, Ordering::Relaxed);
        }
        // Bytes queued but not yet written are held too.
        h.bytes_held
            .fetch_add(self.up.buf.len() as u64, Ordering::Relaxed);
    }

    /// The hold `last` ends for this connection without it having seen the
    /// release: everything it queued is the next hold's (or the stream's)
    /// to replay, and `last` counts it as handed on.
    fn hand_on_queue(&self, last: &HoldStats) {
        last.bytes_replayed
            .fetch_add(self.up.buf.len() as u64, Ordering::Relaxed);
    }

    /// The pod came back without this connection (a reconnect release):
    /// what it acknowledged before the hold is consumed, and what is still
    /// queued goes to a fresh backend connection, opened once nothing holds
    /// it.
    fn drop_backend_for_reconnect(&mut self) {
        if self.backend.is_none() {
            return;
        }
        if self.down.eof && self.ended_in_hold.is_none() {
            // The pod closed its side before the hold: a new connection
            // would revive what it had ended. Its FIN goes on to the
            // client now, as it would have without the hold.
            return;
        }
        self.forget_backend();
        self.down.eof = false;
        self.up.shut = false;
        // Whatever ended the old socket, the new one starts afresh.
        self.ended_in_hold = None;
    }

    /// Drops the backend socket and everything that names it: the status's
    /// backend flow (a `target` must not translate a dead flow) and its
    /// translation (a stale entry could catch a new flow on its port).
    fn forget_backend(&mut self) {
        self.backend = None;
        if let Some(key) = self.info.forget_backend() {
            self.endpoint.remove_translation(key);
        }
    }

    /// A new backend connection to `peer` is this connection's.
    fn adopt_backend(&mut self, stream: TcpStream, peer: SocketAddrV4) {
        if let Ok(mut b) = self.info.backend.lock() {
            *b = stream
                .local_addr()
                .ok()
                .map(|local| BackendSocket { local, peer });
        }
        let (r, w) = stream.into_split();
        self.backend = Some(Backend { r, w });
    }

    /// The backend is gone: deliver what the pod already sent, then close the
    /// client with a FIN (never a RST), and record why.
    async fn fail_backend(&mut self, reason: &ConnError) {
        // Only closing from here (up to the linger): a freeze need not wait
        // for it; it finishes in this agent.
        self.active = None;
        tracing::warn!(client = %self.info.client, %reason, "closing client connection cleanly");
        // Attribute the close to the hold in progress, or the one that just ended.
        let hold = match &self.mode {
            Mode::Holding(h) => Some(h),
            Mode::Forwarding { after, .. } => after.as_ref(),
        };
        if let Some(h) = hold {
            h.record_close(&reason.to_string());
        }
        // The socket is gone: its translation goes now, not after the
        // client's linger (a new flow could take the port meanwhile).
        self.forget_backend();
        let linger = self.ctx.close_linger;
        let mut down = std::mem::take(&mut self.down.buf);
        if !self.down.lane.is_empty() {
            // `down` and the down lane are never both non-empty.
            match self.down.lane.drain() {
                Ok(b) => down = Bytes::from(b),
                Err(e) => tracing::warn!(
                    client = %self.info.client,
                    error = %e,
                    "pod bytes in a splice pipe could not be delivered before closing"
                ),
            }
        }
        let _ = tokio::time::timeout(linger, async {
            if !down.is_empty() {
                let _ = self.client_w.write_all(&down).await;
            }
            let _ = self.client_w.shutdown().await;
            // Read until the client's FIN so closing does not turn unread bytes
            // into a RST.
            // Readiness stays until the queue is empty (see `Event`): a
            // read that stops at an urgent mark must not end the drain.
            let mut sink = BytesMut::with_capacity(4096);
            while !self.up.eof && self.client_r.readable().await.is_ok() {
                sink.clear();
                match inq::read_buf(self.client_r.as_ref(), &mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        })
        .await;
    }

    /// Closes this process's descriptors of a handed-over connection and
    /// nothing else: a write half dropped the usual way shuts its socket
    /// down for writing, which would send a FIN on the successor's socket.
    fn let_go(self) {
        let Conn {
            client_w, backend, ..
        } = self;
        client_w.forget();
        if let Some(b) = backend {
            b.w.forget();
        }
    }

    fn release_budget(&mut self) {
        let n = self.up.buf.len();
        self.up.buf.consume(n);
        self.charge.give_back_all();
        self.info.queued.store(0, Ordering::Relaxed);
    }
}

/// Client→pod towards the backend: write the queue's front, or (splice
/// mode) wait until the backend can take the up lane's bytes.
async fn to_backend(w: Option<&mut OwnedWriteHalf>, batch: &[Bytes], lane: bool) -> Event {
    match (w, batch) {
        (Some(w), [one]) => Event::BackendWrote(w.write(one).await),
        (Some(w), [_, ..]) => {
            let slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
            Event::BackendWrote(w.write_vectored(&slices).await)
        }
        (Some(w), []) if lane => Event::BackendWritable(w.as_ref().writable().await),
        _ => pending().await,
    }
}

/// Pod→client towards the client: write `down`, or wait until the client can
/// take the down lane's bytes.
async fn to_client(w: &mut OwnedWriteHalf, down: &Bytes) -> Event {
    if down.is_empty() {
        Event::ClientWritable(w.as_ref().writable().await)
    } else {
        Event::ClientWrote(w.write(down).await)
    }
}

async fn from_backend(r: Option<&mut OwnedReadHalf>, splice: bool) -> Event {
    match r {
        Some(r) => Event::BackendReadable(r.readable().await, splice),
        None => pending().await,
    }
}

async fn from_client(r: &mut OwnedReadHalf, splice: bool) -> Event {
    Event::ClientReadable(r.readable().await, splice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(h: &HoldStats) -> u64 {
        h.bytes_replayed.load(Ordering::Relaxed)
    }

    #[test]
    fn a_connections_end_names_its_step_and_keeps_its_cause() {
        let backend: SocketAddrV4 = "10.0.0.1:80".parse().expect("addr");
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        let e = ConnError::FailedDuringHold(Box::new(ConnError::Backend {
            op: "read from",
            backend,
            source: reset(),
        }));
        let text = e.to_string();
        assert!(
            text.starts_with("read from backend 10.0.0.1:80 failed")
                && text.ends_with("(during the hold; the release did not reconnect)"),
            "{text}"
        );
        // The chain down to the socket's error.
        let inner = std::error::Error::source(&e).expect("the backend's error");
        let io = inner.source().expect("the socket's error");
        assert_eq!(io.to_string(), reset().to_string());
        let e = ConnError::Unreachable {
            backend,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert!(e.to_string().contains("unreachable"), "{e}");
    }

    #[test]
    fn a_replay_counts_its_hold_bytes_once_and_no_more() {
        let h = Arc::new(HoldStats::default());
        let mut r = Replay::begin(100, h.clone());
        r.written(30);
        assert_eq!(replayed(&h), 30);
        // Bytes read after the release queue behind the replay: not its.
        r.written(100);
        assert_eq!(replayed(&h), 100);
        r.written(5);
        assert_eq!(replayed(&h), 100);
    }

    #[test]
    fn a_hold_that_starts_mid_replay_takes_the_rest_over() {
        let first = Arc::new(HoldStats::default());
        let mut r = Replay::begin(100, first.clone());
        r.written(40);
        r.hand_on();
        // The first hold's count reaches what it held; nothing is counted
        // twice afterwards.
        assert_eq!(replayed(&first), 100);
        r.written(60);
        assert_eq!(replayed(&first), 100);
        // Without a hold that ended, writes count nowhere.
        let mut none = Replay::default();
        none.written(10);
        none.hand_on();
    }
}
