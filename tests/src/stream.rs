//! Client-side measurements: what a client of the pod observes.
//!
//! Each helper creates its socket inside the client namespace (see
//! [`crate::netns::in_netns`]) and then uses it from ordinary threads.
//! - [`CounterStream`]: a steady trickle of 8-byte big-endian counters through
//!   an echo server; checks every value comes back exactly once and in order,
//!   and measures the longest gap between arrivals (the client-visible pause
//!   of a migration).
//! - [`bulk_echo`]: pushes a deterministic pseudo-random byte stream through an
//!   echo server and verifies every byte of the echo.
//! - [`request_response`]: connect, send, time until the full echo; for
//!   connections opened while an endpoint is held.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{in_netns, Netns};

/// How long to wait for a connect, and for the echo's EOF after shutdown.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const EOF_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeouts that let worker threads notice a stop request.
const POLL: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connects to `dst` from inside `ns`; returns the stream and the time it took.
pub fn connect_in(ns: &Netns, dst: SocketAddrV4) -> io::Result<(TcpStream, Duration)> {
    let t0 = Instant::now();
    let s = in_netns(ns, || {
        TcpStream::connect_timeout(&dst.into(), CONNECT_TIMEOUT)
    })?;
    Ok((s, t0.elapsed()))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

// ---------------------------------------------------------------------------
// CounterStream

/// What a [`CounterStream`] observed.
#[derive(Debug, Clone)]
pub struct CounterReport {
    /// Counter values fully written.
    pub sent: u64,
    /// Counter values read back.
    pub received: u64,
    /// Every value read was exactly the next expected one.
    pub in_order: bool,
    /// The first out-of-order value, or a trailing partial value.
    pub first_error: Option<String>,
    /// Longest time between two consecutive values' arrivals.
    pub max_gap: Duration,
    /// Read, write and shutdown errors (a reset shows here).
    pub io_errors: Vec<String>,
    /// The client's local address, as the pod or proxy sees it.
    pub local_addr: SocketAddr,
    /// How long the connect took.
    pub connect_time: Duration,
    /// Whether the echo's EOF arrived after our shutdown.
    pub eof: bool,
    /// Arrival time of each value, since the connect completed.
    pub arrivals: Vec<Duration>,
}

impl CounterReport {
    /// Everything sent came back, once, in order, and the stream ended cleanly.
    pub fn is_ok(&self) -> bool {
        self.in_order
            && self.first_error.is_none()
            && self.io_errors.is_empty()
            && self.eof
            && self.received == self.sent
    }

    /// Panics with the whole report unless [`is_ok`](Self::is_ok).
    pub fn assert_ok(&self) {
        assert!(
            self.is_ok(),
            "counter stream not clean: sent {} received {} in_order {} eof {} first_error {:?} \
             io_errors {:?} (local {})",
            self.sent,
            self.received,
            self.in_order,
            self.eof,
            self.first_error,
            self.io_errors,
            self.local_addr
        );
    }
}

#[derive(Debug)]
struct CounterState {
    received: u64,
    expected: u64,
    in_order: bool,
    first_error: Option<String>,
    arrivals: Vec<Instant>,
    max_gap: Duration,
    eof: bool,
}

impl CounterState {
    /// Nothing received yet; in order until proven otherwise.
    fn new() -> CounterState {
        CounterState {
            received: 0,
            expected: 0,
            in_order: true,
            first_error: None,
            arrivals: Vec::new(),
            max_gap: Duration::ZERO,
            eof: false,
        }
    }
}

#[derive(Debug)]
struct CounterShared {
    stop_writing: AtomicBool,
    /// Set by `stop`: the reader gives up waiting for EOF after this instant.
    eof_deadline: Mutex<Option<Instant>>,
    sent: AtomicU64,
    state: Mutex<CounterState>,
    io_errors: Mutex<Vec<String>>,
}

impl CounterShared {
    fn error(&self, e: String) {
        lock(&self.io_errors).push(e);
    }
}

/// A running counter stream; see the module docs.
#[derive(Debug)]
pub struct CounterStream {
    shared: Arc<CounterShared>,
    stream: TcpStream,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    connect_time: Duration,
    connected_at: Instant,
}

impl CounterStream {
    /// Connects from `ns` to `dst` and starts sending a counter every
    /// `interval`. Panics if the connection can't be made.
    pub fn start(ns: &Netns, dst: SocketAddrV4, interval: Duration) -> CounterStream {
        let (stream, connect_time) = connect_in(ns, dst)
            .unwrap_or_else(|e| panic!("counter stream: connect to {dst} from {}: {e}", ns.name()));
        let connected_at = Instant::now();
        let local_addr = stream.local_addr().expect("counter stream: local_addr");
        stream
            .set_nodelay(true)
            .expect("counter stream: TCP_NODELAY");
        stream
            .set_read_timeout(Some(POLL))
            .expect("counter stream: read timeout");
        stream
            .set_write_timeout(Some(POLL))
            .expect("counter stream: write timeout");
        let shared = Arc::new(CounterShared {
            stop_writing: AtomicBool::new(false),
            eof_deadline: Mutex::new(None),
            sent: AtomicU64::new(0),
            state: Mutex::new(CounterState::new()),
            io_errors: Mutex::new(Vec::new()),
        });
        let w = stream.try_clone().expect("counter stream: clone socket");
        let r = stream.try_clone().expect("counter stream: clone socket");
        let (ws, rs) = (Arc::clone(&shared), Arc::clone(&shared));
        let writer = std::thread::Builder::new()
            .name("counter-writer".into())
            .spawn(move || counter_writer(w, &ws, interval))
            .expect("spawn counter writer");
        let reader = std::thread::Builder::new()
            .name("counter-reader".into())
            .spawn(move || counter_reader(r, &rs))
            .expect("spawn counter reader");
        CounterStream {
            shared,
            stream,
            writer: Some(writer),
            reader: Some(reader),
            local_addr,
            connect_time,
            connected_at,
        }
    }

    /// The client's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Values written so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Values read back so far.
    pub fn received(&self) -> u64 {
        lock(&self.shared.state).received
    }

    /// Longest gap between consecutive arrivals so far (not counting the gap
    /// still in progress; see [`since_last_arrival`](Self::since_last_arrival)).
    pub fn max_gap_so_far(&self) -> Duration {
        lock(&self.shared.state).max_gap
    }

    /// The longest wait for a value since `since`: between two arrivals
    /// after it, from the last arrival before it to the first after it, or
    /// from the last arrival to now.
    pub fn max_gap_since(&self, since: Instant) -> Duration {
        let st = lock(&self.shared.state);
        let from = st.arrivals.partition_point(|t| *t < since);
        let mut prev = if from > 0 {
            st.arrivals[from - 1]
        } else {
            self.connected_at
        };
        let mut max = Duration::ZERO;
        for t in &st.arrivals[from..] {
            max = max.max(t.saturating_duration_since(prev));
            prev = *t;
        }
        max.max(prev.elapsed())
    }

    /// Whether the stream has ended (an error, or the reader stopped).
    pub fn has_failed(&self) -> bool {
        let broken = {
            let st = lock(&self.shared.state);
            !st.in_order || st.first_error.is_some() || st.eof
        };
        broken || !lock(&self.shared.io_errors).is_empty()
    }

    /// Time since the last value arrived (since the connect if none has).
    pub fn since_last_arrival(&self) -> Duration {
        let last = lock(&self.shared.state).arrivals.last().copied();
        last.unwrap_or(self.connected_at).elapsed()
    }

    /// Stops writing, shuts down our write side, waits (≤ 10 s) for the echo to
    /// reach EOF, and reports.
    pub fn stop(mut self) -> CounterReport {
        self.finish();
        let st = lock(&self.shared.state);
        CounterReport {
            sent: self.shared.sent.load(Ordering::SeqCst),
            received: st.received,
            in_order: st.in_order,
            first_error: st.first_error.clone(),
            max_gap: st.max_gap,
            io_errors: lock(&self.shared.io_errors).clone(),
            local_addr: self.local_addr,
            connect_time: self.connect_time,
            eof: st.eof,
            arrivals: st
                .arrivals
                .iter()
                .map(|t| t.saturating_duration_since(self.connected_at))
                .collect(),
        }
    }

    fn finish(&mut self) {
        self.shared.stop_writing.store(true, Ordering::SeqCst);
        if let Some(w) = self.writer.take() {
            w.thread().unpark();
            if w.join().is_err() {
                self.shared.error("writer thread panicked".into());
            }
        }
        let Some(r) = self.reader.take() else {
            return;
        };
        *lock(&self.shared.eof_deadline) = Some(Instant::now() + EOF_TIMEOUT);
        if let Err(e) = self.stream.shutdown(Shutdown::Write) {
            self.shared.error(format!("shutdown(Write): {e}"));
        }
        if r.join().is_err() {
            self.shared.error("reader thread panicked".into());
        }
    }
}

impl Drop for CounterStream {
    fn drop(&mut self) {
        self.finish();
    }
}

fn counter_writer(mut s: TcpStream, shared: &CounterShared, interval: Duration) {
    let mut next: u64 = 0;
    'values: while !shared.stop_writing.load(Ordering::SeqCst) {
        let bytes = next.to_be_bytes();
        let mut off = 0;
        let mut stop_seen: Option<Instant> = None;
        while off < bytes.len() {
            match s.write(&bytes[off..]) {
                Ok(0) => {
                    shared.error("write: wrote 0 bytes".into());
                    return;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    // Back-pressure (e.g. a full hold buffer). Give up only when
                    // asked to stop: at once if nothing of this value went out,
                    // else after EOF_TIMEOUT, to keep the stream whole.
                    if shared.stop_writing.load(Ordering::SeqCst) {
                        if off == 0 {
                            break 'values;
                        }
                        let since = *stop_seen.get_or_insert_with(Instant::now);
                        if since.elapsed() > EOF_TIMEOUT {
                            shared.error(format!("write: value {next} stuck half-written"));
                            return;
                        }
                    }
                }
                Err(e) => {
                    shared.error(format!("write: {e}"));
                    return;
                }
            }
        }
        next += 1;
        shared.sent.store(next, Ordering::SeqCst);
        std::thread::park_timeout(interval);
    }
}

fn counter_reader(mut s: TcpStream, shared: &CounterShared) {
    let mut buf = [0u8; 4096];
    let mut partial = [0u8; 8];
    let mut have = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let mut st = lock(&shared.state);
                st.eof = true;
                if have != 0 && st.first_error.is_none() {
                    st.first_error = Some(format!("EOF after a partial value ({have} bytes)"));
                }
                return;
            }
            Ok(n) => {
                let now = Instant::now();
                let mut st = lock(&shared.state);
                for &b in &buf[..n] {
                    partial[have] = b;
                    have += 1;
                    if have == 8 {
                        have = 0;
                        counter_value(&mut st, u64::from_be_bytes(partial), now);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                if lock(&shared.eof_deadline).is_some_and(|d| Instant::now() >= d) {
                    shared.error(format!("no EOF within {EOF_TIMEOUT:?} after shutdown"));
                    return;
                }
            }
            Err(e) => {
                shared.error(format!("read: {e}"));
                return;
            }
        }
    }
}

fn counter_value(st: &mut CounterState, value: u64, now: Instant) {
    if value != st.expected {
        st.in_order = false;
        if st.first_error.is_none() {
            st.first_error = Some(format!(
                "value #{} was {value}, expected {}",
                st.received, st.expected
            ));
        }
    }
    st.expected = value.wrapping_add(1);
    st.received += 1;
    if let Some(&last) = st.arrivals.last() {
        st.max_gap = st.max_gap.max(now - last);
    }
    st.arrivals.push(now);
}

// ---------------------------------------------------------------------------
// bulk_echo

/// What [`bulk_echo`] observed.
#[derive(Debug, Clone)]
pub struct BulkReport {
    /// Bytes written.
    pub sent: u64,
    /// Bytes read back.
    pub received: u64,
    /// All `total_bytes` came back, equal to what was sent, then EOF.
    pub verified: bool,
    /// Offset of the first byte that differed from the pattern.
    pub first_mismatch: Option<u64>,
    /// The client's local address.
    pub local_addr: SocketAddr,
    /// From connect completed to the echo's EOF.
    pub elapsed: Duration,
    /// Read, write and shutdown errors.
    pub io_errors: Vec<String>,
}

impl BulkReport {
    /// Panics with the whole report unless `verified` and error-free.
    pub fn assert_ok(&self) {
        assert!(
            self.verified && self.io_errors.is_empty(),
            "bulk echo not clean: sent {} received {} first_mismatch {:?} io_errors {:?} (local {})",
            self.sent,
            self.received,
            self.first_mismatch,
            self.io_errors,
            self.local_addr
        );
    }

    /// Echoed bytes per second.
    pub fn throughput(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the bulk pattern's bytes `offset..offset+buf.len()` for
/// `seed`: 8-byte little-endian words `splitmix64(seed ^ word_index · φ)`.
/// Any window of the stream can be computed on its own.
pub fn pattern_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    let mut off = offset;
    while pos < buf.len() {
        let word = splitmix64(seed ^ (off / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        let within = (off % 8) as usize;
        let take = (8 - within).min(buf.len() - pos);
        buf[pos..pos + take].copy_from_slice(&word[within..within + take]);
        pos += take;
        off += take as u64;
    }
}

/// One connection from `ns` to the echo server at `dst`: a writer thread sends
/// `total_bytes` of the pattern for `seed` then shuts down its write side,
/// while this thread verifies every echoed byte and reads to EOF. Panics if
/// the connection can't be made; everything after is in the report.
pub fn bulk_echo(ns: &Netns, dst: SocketAddrV4, total_bytes: u64, seed: u64) -> BulkReport {
    bulk_echo_paced(ns, dst, total_bytes, seed, None)
}

/// [`bulk_echo`], writing at most `per_s` bytes a second (`None`: as fast
/// as the connection takes them), in 64 KiB writes.
pub fn bulk_echo_paced(
    ns: &Netns,
    dst: SocketAddrV4,
    total_bytes: u64,
    seed: u64,
    per_s: Option<u64>,
) -> BulkReport {
    let (mut s, _) = connect_in(ns, dst)
        .unwrap_or_else(|e| panic!("bulk echo: connect to {dst} from {}: {e}", ns.name()));
    let t0 = Instant::now();
    let local_addr = s.local_addr().expect("bulk echo: local_addr");
    s.set_read_timeout(Some(CONNECT_TIMEOUT))
        .expect("bulk echo: read timeout");
    let mut w = s.try_clone().expect("bulk echo: clone socket");
    let writer = std::thread::Builder::new()
        .name("bulk-writer".into())
        .spawn(move || -> (u64, Vec<String>) {
            let mut errors = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            let start = Instant::now();
            while sent < total_bytes {
                if let Some(rate) = per_s.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                let n = (total_bytes - sent).min(buf.len() as u64) as usize;
                pattern_fill(seed, sent, &mut buf[..n]);
                if let Err(e) = w.write_all(&buf[..n]) {
                    errors.push(format!("write at {sent}: {e}"));
                    return (sent, errors);
                }
                sent += n as u64;
            }
            if let Err(e) = w.shutdown(Shutdown::Write) {
                errors.push(format!("shutdown(Write): {e}"));
            }
            (sent, errors)
        })
        .expect("spawn bulk writer");

    let mut io_errors = Vec::new();
    let mut received = 0u64;
    let mut first_mismatch = None;
    let mut eof = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                if first_mismatch.is_none() {
                    pattern_fill(seed, received, &mut expect[..n]);
                    if let Some(i) = buf[..n].iter().zip(&expect[..n]).position(|(a, b)| a != b) {
                        first_mismatch = Some(received + i as u64);
                    }
                }
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                io_errors.push(format!("read at {received}: {e}"));
                break;
            }
        }
    }
    let elapsed = t0.elapsed();
    if !eof {
        // Unblock a writer stuck on a full window before joining it.
        let _ = s.shutdown(Shutdown::Both);
    }
    let (sent, werrs) = writer
        .join()
        .unwrap_or_else(|_| (0, vec!["writer panicked".into()]));
    io_errors.extend(werrs);
    BulkReport {
        sent,
        received,
        verified: eof && first_mismatch.is_none() && sent == total_bytes && received == total_bytes,
        first_mismatch,
        local_addr,
        elapsed,
        io_errors,
    }
}

// ---------------------------------------------------------------------------
// request_response

/// Connects from `ns` to `dst`, sends `msg`, and waits (≤ 30 s) for its full
/// echo. Returns (connect time, time from the connect completing to the full
/// echo having arrived). An echo that differs is an `InvalidData` error.
pub fn request_response(
    ns: &Netns,
    dst: SocketAddrV4,
    msg: &[u8],
) -> io::Result<(Duration, Duration)> {
    let (mut s, connect_time) = connect_in(ns, dst)?;
    let t0 = Instant::now();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    let response_time = t0.elapsed();
    if back != msg {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo of {} bytes differs from what was sent", msg.len()),
        ));
    }
    s.shutdown(Shutdown::Write)?;
    Ok((connect_time, response_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_windows_agree() {
        let mut whole = vec![0u8; 1000];
        pattern_fill(7, 0, &mut whole);
        for (off, len) in [(0, 1), (3, 17), (8, 8), (13, 500), (999, 1)] {
            let mut part = vec![0u8; len];
            pattern_fill(7, off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "window {off}+{len}");
        }
        let mut other = vec![0u8; 1000];
        pattern_fill(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn counter_checks_order_and_gaps() {
        let mut st = CounterState::new();
        let t = Instant::now();
        counter_value(&mut st, 0, t);
        counter_value(&mut st, 1, t + Duration::from_millis(5));
        counter_value(&mut st, 2, t + Duration::from_millis(500));
        assert!(st.in_order);
        assert_eq!(st.max_gap, Duration::from_millis(495));
        counter_value(&mut st, 4, t + Duration::from_millis(501));
        assert!(!st.in_order);
        assert_eq!(
            st.first_error.as_deref(),
            Some("value #3 was 4, expected 3")
        );
    }
}
