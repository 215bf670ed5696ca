//! Giving memory that connections freed back to the system.
//!
//! glibc's allocator returns freed memory to the kernel only from the top of
//! each heap. A burst of connections spreads its buffers over the heaps of
//! the data-plane threads; once they close, the memory is free but stays
//! resident wherever something longer-lived sits above it, and the next
//! burst does not reuse all of it. Measured: twelve bursts of 4,000 short
//! connections took the agent from 22 to 271 MB, though every connection
//! had ended (`MALLOC_TRIM_THRESHOLD_=0` did not help: it only trims the
//! top). `malloc_trim(0)` releases free pages anywhere in every heap; after
//! it the same bursts leave the agent at its starting size.
//!
//! Trimming walks the heaps under their locks, so it runs only when it can
//! matter: at most every [`TRIM_INTERVAL`], and only after at least
//! [`TRIM_AFTER_ENDED`] connections have ended since the last trim. HAProxy
//! does the same when it releases its pools. Other C libraries (musl) give
//! freed memory back by themselves; there this does nothing.
use std::time::{Duration, Instant};

/// How often the agent considers trimming.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// Connections that must have ended since the last trim.
pub const TRIM_AFTER_ENDED: u64 = 256;

/// Decides when to trim, from the count of connections ended so far.
#[derive(Debug, Default)]
pub struct Trimmer {
    ended_at_last: u64,
}

impl Trimmer {
    /// Trims if enough connections have ended since the last trim; returns
    /// how long the trim took, if it ran.
    pub fn tick(&mut self, ended_total: u64) -> Option<Duration> {
        if !self.due(ended_total) {
            return None;
        }
        let t0 = Instant::now();
        trim();
        Some(t0.elapsed())
    }

    fn due(&mut self, ended_total: u64) -> bool {
        if ended_total.saturating_sub(self.ended_at_last) < TRIM_AFTER_ENDED {
            return false;
        }
        self.ended_at_last = ended_total;
        true
    }
}

/// Releases free heap memory to the kernel.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own heaps; it takes
    // their locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_enough_connections_ended() {
        let mut t = Trimmer::default();
        assert!(!t.due(TRIM_AFTER_ENDED - 1));
        assert!(t.due(TRIM_AFTER_ENDED));
        assert!(!t.due(TRIM_AFTER_ENDED + 10), "counted from the last trim");
        assert!(t.due(3 * TRIM_AFTER_ENDED));
    }
}
