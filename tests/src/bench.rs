//! Client-side load generators for `cargo xtask bench` (steady-state section).
//!
//! Plain std: blocking sockets created inside the client namespace (see
//! [`crate::netns`]), one thread per direction or per client. Every generator
//! checks what comes back, cheaply enough not to become the bottleneck, and
//! fails with an error instead of reporting a figure for garbage:
//! - [`bulk`]: N connections each push `bytes_per_conn` through an echo server
//!   and read it back concurrently; every echoed byte is compared (memcmp)
//!   with a precomputed pattern whose period (1 MiB + 13 bytes) no read or
//!   write size divides, so a lost, duplicated or reordered chunk shows.
//! - [`RrClient`] / [`request_response`]: one `TCP_NODELAY` connection, one
//!   message in flight, each echo compared in full; every round trip's time.
//! - [`conn_rate`]: clients that connect, echo one byte, close (client first),
//!   as fast as they can for a while.
//!
//! All sockets get read/write timeouts, so a stalled path fails the run
//! instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use crate::netns::{enter, Netns};
use crate::stream::{connect_in, pattern_fill};

/// How long any single read, write or connect may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of the bulk pattern: prime-ish, larger than any socket buffer and
/// not a multiple of any read or write size used on the path.
const PATTERN_LEN: usize = (1 << 20) + 13;
const BULK_WRITE_CHUNK: usize = 128 * 1024;
const BULK_READ_BUF: usize = 256 * 1024;

fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v = vec![0u8; PATTERN_LEN];
        pattern_fill(0x5eed_be4c, 0, &mut v);
        v
    })
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

// ---------------------------------------------------------------------------
// bulk

/// What [`bulk`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Bytes sent (and echoed back, verified) in each direction, all
    /// connections together.
    pub bytes_each_way: u64,
    /// From all connections starting to send to the last echo's EOF.
    pub elapsed: Duration,
}

impl Bulk {
    /// Throughput in each direction, MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes_each_way as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens `conns` connections from `ns` to the echo server at `dst` and, once
/// all are up, pushes `bytes_per_conn` through each (a writer and a reader
/// thread per connection), verifying every echoed byte and the echo's EOF.
pub fn bulk(ns: &Netns, dst: SocketAddrV4, conns: usize, bytes_per_conn: u64) -> io::Result<Bulk> {
    bulk_with(
        || connect_in(ns, dst).map(|(s, _)| s),
        conns,
        bytes_per_conn,
    )
}

fn bulk_with(
    connect: impl Fn() -> io::Result<TcpStream>,
    conns: usize,
    bytes_per_conn: u64,
) -> io::Result<Bulk> {
    let pat = pattern();
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = connect()?;
        timeouts(&s)?;
        streams.push(s);
    }
    let start = Barrier::new(2 * conns + 1);
    let (t0, results) = std::thread::scope(|scope| -> io::Result<_> {
        let mut handles = Vec::new();
        for (i, s) in streams.iter().enumerate() {
            // Each connection starts at a different place in the pattern.
            let first = (i * 7919 * 13) % PATTERN_LEN;
            let (w, r) = (s.try_clone()?, s.try_clone()?);
            let start = &start;
            handles.push(scope.spawn(move || {
                start.wait();
                bulk_write(w, pat, first, bytes_per_conn).map(|()| None)
            }));
            handles.push(scope.spawn(move || {
                start.wait();
                bulk_read(r, pat, first, bytes_per_conn).map(Some)
            }));
        }
        start.wait();
        let t0 = Instant::now();
        let results: Vec<io::Result<Option<Instant>>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("bulk thread panicked")))
            })
            .collect();
        Ok((t0, results))
    })?;
    let mut end = t0;
    let mut first_err: Option<io::Error> = None;
    for r in results {
        match r {
            Ok(Some(t)) => end = end.max(t),
            Ok(None) => {}
            // A verification failure explains the resets it causes elsewhere.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(Bulk {
        bytes_each_way: bytes_per_conn * conns as u64,
        elapsed: end - t0,
    })
}

fn bulk_write(mut s: TcpStream, pat: &[u8], first: usize, total: u64) -> io::Result<()> {
    let mut pos = first;
    let mut sent = 0u64;
    let res = (|| {
        while sent < total {
            let n = BULK_WRITE_CHUNK
                .min(PATTERN_LEN - pos)
                .min(usize::try_from(total - sent).unwrap_or(usize::MAX));
            s.write_all(&pat[pos..pos + n])
                .map_err(|e| io::Error::new(e.kind(), format!("bulk write at {sent}: {e}")))?;
            sent += n as u64;
            pos = (pos + n) % PATTERN_LEN;
        }
        s.shutdown(Shutdown::Write)
    })();
    if res.is_err() {
        // Unblock the reader of this connection.
        let _ = s.shutdown(Shutdown::Both);
    }
    res
}

/// Reads and verifies the echo to EOF; returns when the EOF arrived.
fn bulk_read(mut s: TcpStream, pat: &[u8], first: usize, total: u64) -> io::Result<Instant> {
    let mut buf = vec![0u8; BULK_READ_BUF];
    let mut got = 0u64;
    let mut pos = first;
    let res = (|| loop {
        let n = match s.read(&mut buf) {
            Ok(0) if got == total => return Ok(Instant::now()),
            Ok(0) => return Err(invalid(format!("bulk: EOF after {got} of {total} bytes"))),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("bulk read at {got} of {total}: {e}"),
                ))
            }
        };
        if got + n as u64 > total {
            return Err(invalid(format!(
                "bulk: echo longer than the {total} bytes sent"
            )));
        }
        let mut off = 0;
        while off < n {
            let take = (n - off).min(PATTERN_LEN - pos);
            if buf[off..off + take] != pat[pos..pos + take] {
                return Err(invalid(format!(
                    "bulk: echoed bytes differ from those sent near offset {}",
                    got + off as u64
                )));
            }
            off += take;
            pos = (pos + take) % PATTERN_LEN;
        }
        got += n as u64;
    })();
    if res.is_err() {
        // Unblock the writer of this connection.
        let _ = s.shutdown(Shutdown::Both);
    }
    res
}

// ---------------------------------------------------------------------------
// request_response

/// One `TCP_NODELAY` connection to an echo server, one message of a fixed
/// size in flight at a time; every echo is compared in full with its request
/// (each request differs from the previous one). Several of these, one per
/// path, can take turns in small blocks, so that slow changes of the machine
/// (vCPU placement, a neighbour's load) hit all paths alike.
#[derive(Debug)]
pub struct RrClient {
    s: TcpStream,
    msg: Vec<u8>,
    back: Vec<u8>,
    done: u64,
}

impl RrClient {
    /// Connects from `ns` to the echo server at `dst`, for messages of
    /// `msg_len` (≥ 1) bytes.
    pub fn connect(ns: &Netns, dst: SocketAddrV4, msg_len: usize) -> io::Result<RrClient> {
        RrClient::on(connect_in(ns, dst)?.0, msg_len)
    }

    fn on(s: TcpStream, msg_len: usize) -> io::Result<RrClient> {
        assert!(msg_len > 0, "RrClient: empty message");
        timeouts(&s)?;
        s.set_nodelay(true)?;
        let mut msg = vec![0u8; msg_len];
        pattern_fill(msg_len as u64, 0, &mut msg);
        Ok(RrClient {
            s,
            back: vec![0u8; msg_len],
            msg,
            done: 0,
        })
    }

    /// `n` round trips; pushes each one's time, in microseconds, to `out`
    /// (if given).
    pub fn round_trips(&mut self, n: usize, mut out: Option<&mut Vec<f64>>) -> io::Result<()> {
        for _ in 0..n {
            let i = self.done;
            let tag = i.to_le_bytes();
            let k = tag.len().min(self.msg.len());
            self.msg[..k].copy_from_slice(&tag[..k]);
            let t0 = Instant::now();
            self.s.write_all(&self.msg)?;
            self.s
                .read_exact(&mut self.back)
                .map_err(|e| io::Error::new(e.kind(), format!("rr: reading echo #{i}: {e}")))?;
            let dt = t0.elapsed();
            if self.back != self.msg {
                return Err(invalid(format!(
                    "rr: echo #{i} of {} bytes differs from the request",
                    self.msg.len()
                )));
            }
            if let Some(out) = out.as_deref_mut() {
                out.push(dt.as_secs_f64() * 1e6);
            }
            self.done += 1;
        }
        Ok(())
    }

    /// Closes cleanly: shuts down our side and expects the echo's EOF with
    /// nothing before it.
    pub fn close(mut self) -> io::Result<()> {
        self.s.shutdown(Shutdown::Write)?;
        let mut rest = [0u8; 1];
        match self.s.read(&mut rest)? {
            0 => Ok(()),
            _ => Err(invalid("rr: unexpected bytes after the last echo".into())),
        }
    }
}

/// One [`RrClient`] from `ns` to `dst`: `warmup` untimed round trips of
/// `msg_len` bytes, then `round_trips` timed ones, then a clean close.
/// Returns each timed round trip, in microseconds.
pub fn request_response(
    ns: &Netns,
    dst: SocketAddrV4,
    msg_len: usize,
    warmup: usize,
    round_trips: usize,
) -> io::Result<Vec<f64>> {
    let mut c = RrClient::connect(ns, dst, msg_len)?;
    let mut samples = Vec::with_capacity(round_trips);
    c.round_trips(warmup, None)?;
    c.round_trips(round_trips, Some(&mut samples))?;
    c.close()?;
    Ok(samples)
}

// ---------------------------------------------------------------------------
// conn_rate

/// What [`conn_rate`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ConnRate {
    /// Connections that completed connect → 1-byte echo → close.
    pub connections: u64,
    /// From the clients' start to the last one stopping.
    pub elapsed: Duration,
}

impl ConnRate {
    /// Completed connections per second.
    pub fn per_s(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `clients` threads in `ns`, each repeating for `duration`: connect to the
/// echo server at `dst`, write one byte, read its echo, close (the client
/// closes first, so the client keeps the TIME_WAIT: give the client namespace
/// a wide `ip_local_port_range` and `tcp_tw_reuse=1` for long runs).
pub fn conn_rate(
    ns: &Netns,
    dst: SocketAddrV4,
    clients: usize,
    duration: Duration,
) -> io::Result<ConnRate> {
    conn_rate_with(|| enter(ns), dst, clients, duration)
}

/// [`conn_rate`] with each client thread first calling `enter` and keeping
/// what it returns (a namespace guard) until it stops.
fn conn_rate_with<G>(
    enter: impl Fn() -> G + Sync,
    dst: SocketAddrV4,
    clients: usize,
    duration: Duration,
) -> io::Result<ConnRate> {
    let start = Arc::new(Barrier::new(clients + 1));
    let dst = SocketAddr::V4(dst);
    let (t0, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (start, enter) = (Arc::clone(&start), &enter);
                scope.spawn(move || -> io::Result<u64> {
                    let _in_ns = enter();
                    start.wait();
                    let deadline = Instant::now() + duration;
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        let b = [(done as u8) ^ (c as u8)];
                        one_exchange(dst, b[0]).map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("conn rate: connection #{done} of client {c}: {e}"),
                            )
                        })?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let results: Vec<io::Result<u64>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("conn rate thread panicked")))
            })
            .collect();
        (t0, results)
    });
    let elapsed = t0.elapsed();
    let mut connections = 0;
    for r in results {
        connections += r?;
    }
    Ok(ConnRate {
        connections,
        elapsed,
    })
}

fn one_exchange(dst: SocketAddr, byte: u8) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&[byte])?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back)?;
    if back[0] != byte {
        return Err(invalid(format!(
            "echoed byte {:#04x}, sent {byte:#04x}",
            back[0]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_period_is_odd_sized() {
        let p = pattern();
        assert_eq!(p.len(), PATTERN_LEN);
        assert_ne!(PATTERN_LEN % BULK_WRITE_CHUNK, 0);
        assert_ne!(PATTERN_LEN % BULK_READ_BUF, 0);
        assert_ne!(PATTERN_LEN % 4096, 0);
    }

    #[test]
    fn generators_on_loopback() {
        // An echo server on loopback in the current namespace.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match l.local_addr().expect("local_addr") {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    let _ = io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        let connect = || TcpStream::connect(addr);
        let b = bulk_with(connect, 2, 3 << 20).expect("bulk");
        assert_eq!(b.bytes_each_way, 6 << 20);
        for len in [1, 4096] {
            let mut c = RrClient::on(connect().expect("connect"), len).expect("rr client");
            let mut rr = Vec::new();
            c.round_trips(10, None).expect("rr warm-up");
            c.round_trips(100, Some(&mut rr)).expect("rr");
            c.close().expect("rr close");
            assert_eq!(rr.len(), 100);
        }
        let c = conn_rate_with(|| (), addr, 2, Duration::from_millis(100)).expect("conn rate");
        assert!(c.connections > 0);
    }

    #[test]
    fn bulk_detects_a_corrupting_echo() {
        // An "echo" that flips one byte in the middle of the stream.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("local_addr");
        std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut buf = vec![0u8; 4096];
            let mut seen = 0usize;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if seen <= 100_000 && 100_000 < seen + n {
                    buf[100_000 - seen] ^= 1;
                }
                seen += n;
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
        let e = bulk_with(|| TcpStream::connect(addr), 1, 1 << 20).expect_err("corruption");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
