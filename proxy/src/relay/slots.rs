//! How many connections the data plane may hold at once, so that it can
//! never take the descriptors the agent needs to be reached.
//!
//! Each relayed connection holds two descriptors (client and backend), and
//! the splice pipe pool up to [`MAX_PIPES`] pairs more. Everything else the
//! agent opens — the API socket and its callers, eBPF maps, programs and
//! links, netlink, logs — comes from a fixed reserve. A connection accepted
//! when every slot is taken is closed at once and counted (a FIN; a client
//! that had already sent bytes gets a reset, as from any server that closes
//! unread input: draining it would hold the descriptor we lack); connections already established are not touched. Without this,
//! a flood (or a loop: an endpoint that leads back to the agent) takes
//! every descriptor, and then the API cannot accept the call that would
//! repair things. HAProxy's `maxconn`, derived from the same limit, is the
//! model.
use super::splice::MAX_PIPES;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Descriptors kept for everything but relayed connections and pipes.
pub const CONTROL_RESERVE: u64 = 256;

/// The most connections `nofile` descriptors can carry with the reserve
/// and the pipe pool set aside (0: too few descriptors to relay at all).
pub fn max_for_fd_limit(nofile: u64) -> usize {
    let set_aside = CONTROL_RESERVE + 2 * MAX_PIPES as u64;
    (nofile.saturating_sub(set_aside) / 2) as usize
}

/// The data plane's connection slots.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    live: AtomicUsize,
    refused: AtomicU64,
    ended: AtomicU64,
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            live: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            ended: AtomicU64::new(0),
        })
    }

    /// Takes a slot, or counts a refusal and returns `None` if all are taken.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Slot(self.clone())),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Takes a slot even past the maximum: a connection handed over by the
    /// previous agent exists already, and refusing it would close it.
    pub fn take_anyway(self: &Arc<Self>) -> Slot {
        self.live.fetch_add(1, Ordering::AcqRel);
        Slot(self.clone())
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections holding a slot now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Connections that held a slot and ended, since the start.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// Connections closed at accept because every slot was taken.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_and_free() {
        let s = Slots::new(2);
        let a = s.try_take().expect("first");
        let _b = s.try_take().expect("second");
        assert!(s.try_take().is_none(), "a third slot past the cap");
        assert_eq!((s.live(), s.refused()), (2, 1));
        drop(a);
        assert!(s.try_take().is_some(), "a freed slot is taken again");
    }

    #[test]
    fn the_fd_limit_keeps_a_reserve() {
        // 20,000 descriptors: 256 reserved, 512 for pipes, 2 per connection.
        assert_eq!(max_for_fd_limit(20_000), (20_000 - 256 - 512) / 2);
        assert_eq!(max_for_fd_limit(500), 0);
    }
}
