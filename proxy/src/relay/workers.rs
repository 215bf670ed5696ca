//! The data plane's threads. Each owns one transparent listener and runs its
//! own single-threaded event loop; `intercept` spreads SYNs over the
//! listeners by flow hash, and a connection stays on the thread that
//! accepted it. That is HAProxy's and Envoy's model: no work stealing, so
//! no cross-thread wake-ups per connection (with one multi-threaded tokio
//! runtime they cost ~5 µs of CPU per new connection here) and no cache
//! traffic between threads. The control plane only touches connections
//! through their endpoint's mode channel, which works across runtimes.
use super::{accept_loop, Endpoints};
use crate::transport::orig_dst::OrigDst;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use tokio::sync::watch;

/// Connections each data-plane thread has accepted (for `/metrics`: an
/// uneven spread shows here). Set once, when the data plane starts.
static ACCEPTED: OnceLock<Box<[AtomicU64]>> = OnceLock::new();

/// Connections accepted so far by each data-plane thread, in thread order.
pub fn accepted_per_thread() -> Vec<u64> {
    ACCEPTED
        .get()
        .map(|a| a.iter().map(|c| c.load(Ordering::Relaxed)).collect())
        .unwrap_or_default()
}

/// The running data-plane threads. Dropping it stops them: their accept
/// loops end and their connections are dropped (closed).
pub struct DataPlane {
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

/// Resolves when a data-plane thread has ended on its own (failed to start,
/// lost its listener, or panicked), with what happened. Its connections are
/// gone and SYNs hashed to its listener would go elsewhere or unproxied: the
/// agent must stop (and be restarted) rather than limp on.
pub struct Failure(tokio::sync::mpsc::UnboundedReceiver<String>);

impl Failure {
    pub async fn wait(&mut self) -> String {
        self.0
            .recv()
            .await
            .unwrap_or_else(|| "every data-plane thread stopped".into())
    }
}

/// Sends the thread's epitaph when it ends, however it ends (a panic
/// included), unless the data plane is stopping.
struct Epitaph {
    thread: usize,
    why: Option<String>,
    stop: watch::Receiver<bool>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Epitaph {
    fn ended(mut self, why: String) {
        self.why = Some(why);
    }
}

impl Drop for Epitaph {
    fn drop(&mut self) {
        if *self.stop.borrow() {
            return;
        }
        let why = self.why.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                "panicked".into()
            } else {
                "stopped".into()
            }
        });
        let _ = self
            .tx
            .send(format!("data-plane thread {} {why}", self.thread));
    }
}

impl DataPlane {
    /// One thread per listener. One data plane per process (the per-thread
    /// counters behind `/metrics` are process-wide). `restored`: connections
    /// handed over by the previous agent, spread over the threads.
    pub fn start(
        listeners: Vec<std::net::TcpListener>,
        control: Arc<dyn Endpoints>,
        orig_dst: Arc<dyn OrigDst>,
        restored: Vec<super::Restored>,
    ) -> io::Result<(Self, Failure)> {
        let n = listeners.len();
        let counters = ACCEPTED.get_or_init(|| (0..n).map(|_| AtomicU64::new(0)).collect());
        if counters.len() != n {
            return Err(io::Error::other(
                "a data plane was already started in this process",
            ));
        }
        let (stop, _) = watch::channel(false);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut plane = Self {
            stop,
            threads: Vec::new(),
        };
        let mut shares: Vec<Vec<super::Restored>> = (0..n).map(|_| Vec::new()).collect();
        for (i, r) in restored.into_iter().enumerate() {
            shares[i % n].push(r);
        }
        for (((i, listener), accepted), share) in listeners
            .into_iter()
            .enumerate()
            .zip(counters.iter())
            .zip(shares)
        {
            let (control, orig_dst) = (control.clone(), orig_dst.clone());
            let epitaph = Epitaph {
                thread: i,
                why: None,
                stop: plane.stop.subscribe(),
                tx: tx.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("shepherd-data-{i}"))
                .spawn(move || {
                    // Built here, not by the caller: a runtime must not be
                    // dropped inside the caller's async context if the spawn
                    // fails.
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        // Wake-ups from other threads first. On a data
                        // thread those come only from the control plane: a
                        // release wakes every held connection at once, and
                        // tokio's default (one remote wake-up per 31 local
                        // tasks) queued the replays behind the echo traffic
                        // of the ones already replayed. At 9000 connections
                        // this brought "every held byte written" from
                        // 365-368 ms to 259-271 ms (bench --only scale).
                        .global_queue_interval(1)
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            return epitaph.ended(format!("could not build its runtime: {e}"));
                        }
                    };
                    let mut stop = epitaph.stop.clone();
                    let ended = rt.block_on(async {
                        for r in share {
                            super::spawn_restored(r, control.as_ref());
                        }
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => return Some(format!("could not register its listener: {e}")),
                        };
                        tokio::select! {
                            _ = accept_loop(listener, control, orig_dst, accepted) => {
                                Some("lost its listener".to_string())
                            }
                            _ = stop.wait_for(|s| *s) => None,
                        }
                    });
                    if let Some(why) = ended {
                        epitaph.ended(why);
                    }
                })?;
            plane.threads.push(thread);
        }
        Ok((plane, Failure(rx)))
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
