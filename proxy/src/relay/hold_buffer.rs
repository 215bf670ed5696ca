//! The client→pod byte queue of one connection, and the budgets that cap
//! held bytes: one per endpoint and one for the node.
//!
//! Every queued byte is charged to its endpoint's budget; held bytes
//! (those queued when a hold begins and those read during it) to the
//! node's too. A forwarding connection's read-ahead towards a slow or
//! stopped pod (a few chunks per connection) thus fills only its own
//! endpoint's budget: with one node-wide budget for everything, one
//! SIGSTOPped pod with busy clients stopped every other endpoint's traffic.
//! The per-endpoint budget also keeps one held endpoint from taking all of
//! the node's, and bounds what a hold inherits from the read-ahead.
//!
//! In steady state the queue holds at most the chunk being written; while the
//! endpoint is held it is the hold buffer. Invariant: bytes leave the queue
//! only from the front, in the order they entered, and each byte leaves
//! exactly once (`consume` is the only way out). The queue never drops bytes:
//! when a cap is reached the relay simply stops reading from the client, so
//! the client's TCP window closes (back-pressure, never a reset).
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// How much one read may add to the queue.
pub const READ_CHUNK: usize = 64 * 1024;

/// Ordered client→pod bytes of one connection.
#[derive(Debug, Default)]
pub struct HoldBuffer {
    chunks: VecDeque<Bytes>,
    len: usize,
    /// Where the next read lands. Reads are split off into `chunks`, so small
    /// reads share one allocation instead of each pinning a whole chunk.
    spare: BytesMut,
}

impl HoldBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer the next read should fill, with room for at most `limit`
    /// bytes (so a read never overshoots a cap). `limit` must be > 0.
    pub fn read_target(&mut self, limit: usize) -> ReadTarget<'_> {
        let limit = limit.clamp(1, READ_CHUNK);
        if self.spare.capacity() - self.spare.len() < limit.min(4096) {
            self.spare.reserve(READ_CHUNK);
        }
        ReadTarget {
            buf: &mut self.spare,
            limit,
        }
    }

    /// Moves what the last read put into the spare buffer onto the queue.
    pub fn commit(&mut self) -> usize {
        let n = self.spare.len();
        if n > 0 {
            self.chunks.push_back(self.spare.split_to(n).freeze());
            self.len += n;
        }
        n
    }

    /// Appends bytes (used by tests and by callers that already own a chunk).
    pub fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.len += bytes.len();
            self.chunks.push_back(bytes);
        }
    }

    /// The oldest queued bytes (a cheap reference-counted handle).
    pub fn front(&self) -> Option<Bytes> {
        self.chunks.front().cloned()
    }

    /// The oldest queued chunks, at most `max_chunks` of them and about
    /// `max_bytes`, into `out` (cleared first): one vectored write replays
    /// what a client sent in many small writes during a hold, instead of one
    /// syscall (and one segment) per original write.
    pub fn front_batch(&self, out: &mut Vec<Bytes>, max_chunks: usize, max_bytes: usize) {
        out.clear();
        let mut bytes = 0;
        for c in self.chunks.iter().take(max_chunks) {
            if bytes > 0 && bytes + c.len() > max_bytes {
                break;
            }
            bytes += c.len();
            out.push(c.clone());
        }
    }

    /// Every queued byte, in order, in one buffer (for a hand-over).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for c in &self.chunks {
            out.extend_from_slice(c);
        }
        out
    }

    /// Removes `n` bytes from the front: they have been written.
    pub fn consume(&mut self, mut n: usize) {
        debug_assert!(n <= self.len);
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// A read destination limited to `limit` more bytes.
pub struct ReadTarget<'a> {
    pub buf: &'a mut BytesMut,
    pub limit: usize,
}

/// Node-wide cap on bytes queued in all [`HoldBuffer`]s.
#[derive(Debug)]
pub struct Budget {
    capacity: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes that may still be taken now.
    pub fn available(&self) -> usize {
        self.capacity.saturating_sub(self.used())
    }

    /// Accounts `n` bytes read into a queue, beyond what was reserved.
    pub fn take(&self, n: usize) {
        if n > 0 {
            self.used.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Takes up to `n` bytes of room at once, for a read about to happen:
    /// readers that each checked `available()` and then read could
    /// together overshoot the cap by a read each (found with 100 clients
    /// pushing into an 8 MiB budget: 0.5 MiB over). Returns what it took;
    /// what the read does not use goes back with `give_back`.
    pub fn reserve(&self, n: usize) -> usize {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let k = n.min(self.capacity.saturating_sub(used));
            if k == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + k,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return k,
                Err(now) => used = now,
            }
        }
    }

    /// Returns `n` bytes written out of a queue and wakes blocked readers.
    pub fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.used.fetch_sub(n, Ordering::Relaxed);
        debug_assert!(prev >= n);
        self.freed.notify_waiters();
    }

    /// Resolves after the next `give_back`.
    pub async fn wait_freed(&self) {
        self.freed.notified().await;
    }
}

/// The queued bytes of one connection: all of them charged to its
/// endpoint's budget, the held ones (always the queue's front: bytes read
/// after a release queue behind them) to the node's too. Whatever is still
/// charged is given back on drop.
#[derive(Debug)]
pub struct Charge {
    node: Arc<Budget>,
    endpoint: Arc<Budget>,
    /// Bytes charged to the endpoint: everything queued.
    queued: usize,
    /// Of those, bytes charged to the node too: the held front.
    held: usize,
    /// Room reserved for the read in progress (see [`Charge::reserve`]):
    /// from the endpoint's budget, and from the node's.
    reserved: (usize, usize),
}

impl Charge {
    pub fn new(node: Arc<Budget>, endpoint: Arc<Budget>) -> Self {
        Self {
            node,
            endpoint,
            queued: 0,
            held: 0,
            reserved: (0, 0),
        }
    }

    /// Reserves room for one read of at most `limit` bytes: the endpoint's,
    /// and while held the node's too, atomically, so that readers running
    /// at once never overshoot a budget. Returns how much may be read;
    /// [`take`](Self::take) charges what was read out of it, and
    /// [`unreserve`](Self::unreserve) gives back the rest.
    pub fn reserve(&mut self, limit: usize, holding: bool) -> usize {
        self.unreserve();
        let mut k = self.endpoint.reserve(limit);
        if holding && k > 0 {
            let n = self.node.reserve(k);
            if n < k {
                self.endpoint.give_back(k - n);
                k = n;
            }
            self.reserved.1 = k;
        }
        self.reserved.0 = k;
        k
    }

    /// Gives back what the last [`reserve`](Self::reserve) took and the
    /// read did not use.
    pub fn unreserve(&mut self) {
        let (e, n) = std::mem::take(&mut self.reserved);
        self.endpoint.give_back(e);
        self.node.give_back(n);
    }

    /// Bytes charged to the node (held) now.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Bytes that may still be read: the endpoint's room, and while held
    /// the node's too.
    pub fn available(&self, holding: bool) -> usize {
        let e = self.endpoint.available();
        if holding {
            e.min(self.node.available())
        } else {
            e
        }
    }

    /// `n` bytes were read into the queue; `holding`: they are held. What
    /// was reserved for the read is used first.
    pub fn take(&mut self, n: usize, holding: bool) {
        let e = n.min(self.reserved.0);
        self.reserved.0 -= e;
        self.endpoint.take(n - e);
        self.queued += n;
        if holding {
            let h = n.min(self.reserved.1);
            self.reserved.1 -= h;
            self.node.take(n - h);
            self.held += n;
        }
    }

    /// A hold begins with `queued` bytes in the queue: all of them are held
    /// (charged to both budgets) from now on.
    pub fn hold_all(&mut self, queued: usize) {
        let e = queued.saturating_sub(self.queued);
        self.endpoint.take(e);
        self.queued += e;
        let n = queued.saturating_sub(self.held);
        self.node.take(n);
        self.held += n;
    }

    /// `n` bytes left the front of the queue.
    pub fn give_back(&mut self, n: usize) {
        let e = n.min(self.queued);
        self.queued -= e;
        self.endpoint.give_back(e);
        let h = n.min(self.held);
        self.held -= h;
        self.node.give_back(h);
    }

    pub fn give_back_all(&mut self) {
        self.give_back(self.queued.max(self.held));
    }

    /// Both budgets (to wait on them without borrowing the charge).
    pub fn budgets(&self) -> (Arc<Budget>, Arc<Budget>) {
        (self.node.clone(), self.endpoint.clone())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.unreserve();
        self.give_back_all();
    }
}

/// Resolves when either budget frees bytes (or after 20 ms: a wake-up can
/// race with registering for it).
pub async fn wait_freed(node: &Budget, endpoint: &Budget) {
    let _ = tokio::time::timeout(std::time::Duration::from_millis(20), async {
        tokio::select! {
            () = node.wait_freed() => {}
            () = endpoint.wait_freed() => {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(buf: &mut HoldBuffer, write_size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(front) = buf.front() {
            let n = front.len().min(write_size);
            out.extend_from_slice(&front[..n]);
            buf.consume(n);
        }
        out
    }

    #[test]
    fn bytes_leave_in_order_exactly_once() {
        let mut buf = HoldBuffer::new();
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let chunk: Vec<u8> = (0..(i % 97 + 1)).map(|j| (i + j) as u8).collect();
            expected.extend_from_slice(&chunk);
            let t = buf.read_target(chunk.len());
            t.buf.extend_from_slice(&chunk);
            assert_eq!(buf.commit(), chunk.len());
        }
        assert_eq!(buf.len(), expected.len());
        // Odd write sizes split chunks; the concatenation must be unchanged.
        assert_eq!(drain(&mut buf, 13), expected);
        assert!(buf.is_empty());
        assert_eq!(buf.len(), 0);
    }

    #[test]
    fn partial_consume_keeps_the_rest() {
        let mut buf = HoldBuffer::new();
        buf.push(Bytes::from_static(b"hello "));
        buf.push(Bytes::from_static(b"world"));
        buf.consume(3);
        assert_eq!(buf.len(), 8);
        assert_eq!(buf.front().as_deref(), Some(&b"lo "[..]));
        let mut batch = Vec::new();
        buf.front_batch(&mut batch, 64, 1 << 20);
        let joined: Vec<u8> = batch.iter().flat_map(|b| b.iter().copied()).collect();
        let mut all = Vec::new();
        for c in &buf.chunks {
            all.extend_from_slice(c);
        }
        assert_eq!(joined, all, "a batch is the queue's front, in order");
        buf.consume(3);
        assert_eq!(drain(&mut buf, 100), b"world");
    }

    #[test]
    fn read_target_never_exceeds_limit_or_chunk() {
        let mut buf = HoldBuffer::new();
        assert_eq!(buf.read_target(10).limit, 10);
        assert_eq!(buf.read_target(10 * READ_CHUNK).limit, READ_CHUNK);
        assert_eq!(buf.read_target(0).limit, 1);
    }

    #[test]
    fn small_reads_share_allocations() {
        let mut buf = HoldBuffer::new();
        for _ in 0..1000 {
            let t = buf.read_target(8);
            t.buf.extend_from_slice(&[1u8; 8]);
            buf.commit();
        }
        // 8000 bytes must not have pinned 1000 separate 64 KiB chunks: the
        // spare buffer is reused, so its capacity stays one chunk's worth.
        assert!(buf.spare.capacity() <= READ_CHUNK);
        assert_eq!(buf.len(), 8000);
    }

    #[test]
    fn budget_accounts_and_saturates() {
        let b = Budget::new(100);
        b.take(60);
        assert_eq!(b.available(), 40);
        b.take(50);
        assert_eq!(b.available(), 0);
        b.give_back(110);
        assert_eq!(b.available(), 100);
        assert_eq!(b.capacity(), 100);
    }

    /// Readers on several threads, each reserving before it reads, never
    /// take more than the budget together; what they did not use comes back.
    #[test]
    fn reservations_never_overshoot_a_budget() {
        let node = Budget::new(1 << 20);
        let endpoint = Budget::new(4 << 20);
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let (node, endpoint) = (node.clone(), endpoint.clone());
                std::thread::spawn(move || {
                    let mut c = Charge::new(node.clone(), endpoint);
                    for _ in 0..10_000 {
                        let k = c.reserve(READ_CHUNK, true);
                        assert!(node.used() <= node.capacity());
                        // A read that fills half of what it may.
                        c.take(k / 2, true);
                        c.unreserve();
                    }
                    c
                })
            })
            .collect();
        let charges: Vec<Charge> = readers
            .into_iter()
            .map(|r| r.join().expect("reader"))
            .collect();
        let held: usize = charges.iter().map(Charge::held).sum();
        assert!(held <= node.capacity(), "held {held}");
        assert_eq!(node.used(), held, "nothing left reserved");
        drop(charges);
        // Every charge dropped: everything is back.
        assert_eq!((node.used(), endpoint.used()), (0, 0));
    }

    #[test]
    fn a_charge_counts_queued_bytes_to_the_endpoint_and_held_ones_to_the_node() {
        let node = Budget::new(100);
        let ep = Budget::new(30);
        let mut c = Charge::new(node.clone(), ep.clone());
        // Forwarding read-ahead: the endpoint's only.
        c.take(10, false);
        assert_eq!((node.used(), ep.used(), c.available(false)), (0, 10, 20));
        // A hold begins: what is queued is held.
        c.hold_all(10);
        assert_eq!((node.used(), ep.used(), c.held()), (10, 10, 10));
        c.take(10, true);
        assert_eq!((node.used(), ep.used(), c.available(true)), (20, 20, 10));
        // Released; 5 more read while forwarding, behind the held ones.
        c.take(5, false);
        assert_eq!((node.used(), ep.used()), (20, 25));
        c.give_back(22);
        assert_eq!((node.used(), ep.used(), c.held()), (0, 3, 0));
        drop(c);
        assert_eq!((node.used(), ep.used()), (0, 0), "given back on drop");
    }

    /// What a connection does to its queue, in any order: client reads
    /// (while forwarding or held), holds beginning, writes to the pod of
    /// any size, and the connection ending.
    #[derive(Debug, Clone)]
    enum Op {
        Read(usize, bool),
        Hold,
        Write(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (1usize..5000, any::<bool>()).prop_map(|(n, h)| Op::Read(n, h)),
            Just(Op::Hold),
            (0usize..9000).prop_map(Op::Write),
        ]
    }

    proptest::proptest! {
        /// Any interleaving keeps the queue's bytes in order and exactly
        /// once, keeps the budgets equal to what is queued (the endpoint's)
        /// and held (the node's), and gives everything back at the end.
        #[test]
        fn any_interleaving_keeps_order_and_the_budgets_straight(
            ops in proptest::collection::vec(op(), 1..200)
        ) {
            let node = Budget::new(usize::MAX / 2);
            let ep = Budget::new(usize::MAX / 2);
            let mut buf = HoldBuffer::new();
            let mut charge = Charge::new(node.clone(), ep.clone());
            let (mut next, mut out) = (0u32, Vec::<u8>::new());
            for o in ops {
                match o {
                    Op::Read(n, holding) => {
                        let t = buf.read_target(n);
                        let take = n.min(t.limit);
                        for _ in 0..take {
                            t.buf.extend_from_slice(&[(next % 251) as u8]);
                            next += 1;
                        }
                        let got = buf.commit();
                        proptest::prop_assert_eq!(got, take);
                        charge.take(got, holding);
                    }
                    Op::Hold => charge.hold_all(buf.len()),
                    Op::Write(n) => {
                        let n = n.min(buf.len());
                        let mut written = 0;
                        while written < n {
                            let Some(front) = buf.front() else { break };
                            let k = front.len().min(n - written);
                            out.extend_from_slice(&front[..k]);
                            buf.consume(k);
                            written += k;
                        }
                        charge.give_back(written);
                    }
                }
                proptest::prop_assert_eq!(ep.used(), buf.len(), "the endpoint counts what is queued");
                proptest::prop_assert!(charge.held() <= buf.len());
                proptest::prop_assert_eq!(node.used(), charge.held(), "the node counts what is held");
            }
            for (i, b) in out.iter().enumerate() {
                proptest::prop_assert_eq!(*b, (i % 251) as u8, "byte {} out of order or twice", i);
            }
            drop(charge);
            proptest::prop_assert_eq!((node.used(), ep.used()), (0, 0));
        }
    }

    #[tokio::test]
    async fn give_back_wakes_waiters() {
        let b = Budget::new(10);
        b.take(10);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.wait_freed().await });
        tokio::task::yield_now().await;
        b.give_back(5);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken")
            .expect("join");
    }
}
