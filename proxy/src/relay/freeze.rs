//! Stopping the data plane still, for a hand-over to a new agent, and
//! starting it again if the hand-over fails.
//!
//! A freeze goes in two steps, both acknowledged, so that no connection is
//! missed: first every accept loop stops accepting and says so (from then
//! on no connection can appear), then every connection that is relaying
//! stops at its next step, takes its spliced bytes back into user space,
//! and reports what it is ([`ConnSnapshot`]). A connection ends or reports;
//! [`Freezer::freeze`] returns once every one has. Frozen connections
//! touch neither socket until the hand-over decides:
//! - [`Freezer::thaw`]: the successor failed before the commit point; they
//!   go on where they stopped, and the accept loops accept again;
//! - [`Freezer::commit`]: the successor owns their sockets now (it holds
//!   its own descriptors for them); they close theirs without a FIN or a
//!   shutdown and without undoing anything in the kernel, and end.
//!
//! Connections that already ended relaying and are only closing (the
//! linger after a failed backend) are not frozen; they finish in the old
//! agent, which waits for them before it exits.
use super::snapshot::ConnSnapshot;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Where the data plane stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezeState {
    Running,
    /// Nothing is accepted or relayed; connections wait for the verdict.
    /// The number tells one freeze from the next: a connection reports
    /// once per freeze, and a report of an earlier one is ignored.
    Frozen(u64),
    /// Handed over: frozen connections end without touching their sockets.
    Committed,
}

/// The data plane's freeze switch, shared by its accept loops and
/// connections.
pub struct Freezer {
    state: watch::Sender<FreezeState>,
    /// Connections relaying (between their accept and the end of their
    /// relay loop).
    active: AtomicUsize,
    /// Accept loops that have stopped accepting.
    paused_loops: AtomicUsize,
    frozen: Mutex<Vec<ConnSnapshot>>,
    changed: Notify,
    /// The last freeze's number.
    generation: std::sync::atomic::AtomicU64,
    /// A hand-over is under way (from before the control plane's freeze
    /// to its outcome): stopping the agent must wait for the outcome.
    handing_over: std::sync::atomic::AtomicBool,
    /// The agent is stopping (see [`Freezer::stop`]).
    stopping: std::sync::atomic::AtomicBool,
}

/// A connection counted as relaying; dropping it uncounts it.
pub struct Active(Arc<Freezer>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Why a freeze did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("the data plane did not stop within {0:?}: {1} of {2} connections reported, {3} of {4} accept loops paused")]
    Timeout(Duration, usize, usize, usize, usize),
}

impl Freezer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts a connection as relaying, from its accept (before it is
    /// spawned, so a freeze cannot miss it).
    pub fn enter(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    pub fn subscribe(&self) -> watch::Receiver<FreezeState> {
        self.state.subscribe()
    }

    pub fn state(&self) -> FreezeState {
        *self.state.borrow()
    }

    /// A connection frozen by freeze `generation` reports itself; a
    /// report of an earlier freeze (that timed out) is dropped.
    pub fn report(&self, generation: u64, s: ConnSnapshot) {
        if let Ok(mut f) = self.frozen.lock() {
            if *self.state.borrow() == FreezeState::Frozen(generation) {
                f.push(s);
            }
        }
        self.changed.notify_waiters();
    }

    /// Marks a hand-over as under way, unless the agent is stopping;
    /// returns whether it did. With [`stop`](Self::stop), exactly one of
    /// the two wins.
    pub fn begin_handover(&self) -> bool {
        let Ok(_g) = self.frozen.lock() else {
            return false;
        };
        if self.stopping.load(Ordering::Acquire) {
            return false;
        }
        self.handing_over.store(true, Ordering::Release);
        true
    }

    /// The agent is stopping: no hand-over may begin. Returns whether one
    /// is under way (the caller waits for its outcome).
    pub fn stop(&self) -> bool {
        let Ok(_g) = self.frozen.lock() else {
            return self.handing_over();
        };
        self.stopping.store(true, Ordering::Release);
        self.handing_over()
    }

    /// Marks a hand-over as over (`false`).
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::Release);
    }

    /// Whether a hand-over is under way.
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// An accept loop stopped accepting (`true`) or starts again.
    pub fn loop_paused(&self, paused: bool) {
        if paused {
            self.paused_loops.fetch_add(1, Ordering::AcqRel);
        } else {
            self.paused_loops.fetch_sub(1, Ordering::AcqRel);
        }
        self.changed.notify_waiters();
    }

    /// Stops the data plane's `loops` accept loops and every relaying
    /// connection, and returns what the connections are. On a timeout the
    /// data plane is thawed again.
    pub async fn freeze(
        &self,
        loops: usize,
        timeout: Duration,
    ) -> Result<Vec<ConnSnapshot>, FreezeError> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if let Ok(mut f) = self.frozen.lock() {
            f.clear();
            self.state.send_replace(FreezeState::Frozen(generation));
        }
        let done = || {
            let reported = self.frozen.lock().map(|f| f.len()).unwrap_or(0);
            let paused = self.paused_loops.load(Ordering::Acquire);
            let active = self.active.load(Ordering::Acquire);
            (
                paused >= loops && reported >= active,
                reported,
                active,
                paused,
            )
        };
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if done().0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if waited.is_err() {
            let (_, reported, active, paused) = done();
            self.thaw();
            return Err(FreezeError::Timeout(
                timeout, reported, active, paused, loops,
            ));
        }
        Ok(self
            .frozen
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default())
    }

    /// The hand-over failed: everything goes on where it stopped.
    pub fn thaw(&self) {
        if let Ok(mut f) = self.frozen.lock() {
            f.clear();
            self.state.send_replace(FreezeState::Running);
        }
    }

    /// The hand-over is committed: frozen connections end silently.
    pub fn commit(&self) {
        self.state.send_replace(FreezeState::Committed);
    }
}

impl Default for Freezer {
    fn default() -> Self {
        let (state, _) = watch::channel(FreezeState::Running);
        Self {
            state,
            active: AtomicUsize::new(0),
            paused_loops: AtomicUsize::new(0),
            frozen: Mutex::new(Vec::new()),
            changed: Notify::new(),
            generation: Default::default(),
            handing_over: Default::default(),
            stopping: Default::default(),
        }
    }
}
