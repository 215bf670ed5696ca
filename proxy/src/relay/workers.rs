//! The data plane's threads. Each owns one transparent listener and runs its
//! own single-threaded event loop; `intercept` spreads SYNs over the
//! listeners by flow hash, and a connection stays on the thread that
//! accepted it. That is HAProxy's and Envoy's model: no work stealing, so
//! no cross-thread wake-ups per connection (with one multi-threaded tokio
//! runtime they cost ~5 µs of CPU per new connection here) and no cache
//! traffic between threads. The control plane only touches connections
//! through their endpoint's mode channel, which works across runtimes.
use super::accept_loop;
use crate::control::Control;
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

impl DataPlane {
    /// One thread per listener.
    pub fn start(
        listeners: Vec<std::net::TcpListener>,
        control: Arc<Control>,
        orig_dst: Arc<dyn OrigDst>,
    ) -> io::Result<Self> {
        let n = listeners.len();
        let counters = ACCEPTED.get_or_init(|| (0..n).map(|_| AtomicU64::new(0)).collect());
        let (stop, _) = watch::channel(false);
        let mut plane = Self {
            stop,
            threads: Vec::new(),
        };
        for (i, listener) in listeners.into_iter().enumerate() {
            let Some(accepted) = counters.get(i) else {
                break;
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (control, orig_dst) = (control.clone(), orig_dst.clone());
            let mut stop = plane.stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("shepherd-data-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(thread = i, error = %e, "cannot register the listener; this thread accepts nothing");
                                return;
                            }
                        };
                        tokio::select! {
                            _ = accept_loop(listener, control, orig_dst, accepted) => {}
                            _ = stop.wait_for(|s| *s) => {}
                        }
                    });
                })?;
            plane.threads.push(thread);
        }
        Ok(plane)
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
