//! Many counter streams from one thread: each connection sends the next
//! 8-byte big-endian counter every `interval` through an echo server and
//! checks that every value comes back once, in order; the longest gap
//! between two arrivals on a connection is the pause its client saw.
//!
//! [`crate::stream::CounterStream`] spends two threads per connection, and
//! a few hundred of them make a 2-core machine's scheduler the loudest
//! thing measured (gaps of 100–400 ms with no hand-over at all). Here one
//! thread drives every socket with `poll(2)`, so thousands of connections
//! can be measured at all and hundreds with millisecond noise.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{in_netns, Netns};

struct Conn {
    s: TcpStream,
    next_send: u64,
    expected: u64,
    partial: Vec<u8>,
    last_arrival: Instant,
    /// Gaps longer than two ticks, with the instant each ended.
    gaps: Vec<(Duration, Instant)>,
    error: Option<String>,
    eof: bool,
    write_shut: bool,
}

/// What [`Tickers::stop`] found.
#[derive(Debug, Clone)]
pub struct TickerReport {
    pub conns: usize,
    /// Connections with a wrong value, an I/O error, a missing value or no
    /// clean EOF, with what went wrong (at most 10 listed).
    pub failed: usize,
    pub failures: Vec<String>,
    pub sent: u64,
    pub received: u64,
    /// Longest gap between arrivals on any connection.
    pub max_gap: Duration,
}

impl TickerReport {
    pub fn assert_ok(&self) {
        assert!(
            self.failed == 0 && self.sent == self.received,
            "{} of {} connections failed (sent {}, received {}): {:?}",
            self.failed,
            self.conns,
            self.sent,
            self.received,
            self.failures
        );
    }
}

/// The running streams (see the module docs).
pub struct Tickers {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Vec<Conn>>>,
    thread: Option<JoinHandle<()>>,
}

impl Tickers {
    /// Opens `n` connections to `dst` from `ns` and starts ticking.
    pub fn start(
        ns: &Netns,
        dst: SocketAddrV4,
        n: usize,
        interval: Duration,
    ) -> io::Result<Tickers> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let s = in_netns(ns, || {
                TcpStream::connect_timeout(&dst.into(), Duration::from_secs(30))
            })?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            conns.push(Conn {
                s,
                next_send: 0,
                expected: 0,
                partial: Vec::new(),
                last_arrival: Instant::now(),
                gaps: Vec::new(),
                error: None,
                eof: false,
                write_shut: false,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(conns));
        let (st, sh) = (stop.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("tickers".into())
            .spawn(move || run(&sh, &st, interval))?;
        Ok(Tickers {
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// The longest gap any connection saw that ended after `since`
    /// (`since` itself inside the gap counts).
    pub fn max_gap_since(&self, since: Instant) -> Duration {
        let conns = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let mut worst = Duration::ZERO;
        for c in conns.iter() {
            for (gap, ended) in &c.gaps {
                if *ended >= since {
                    worst = worst.max(*gap);
                }
            }
            // A gap still open.
            if c.error.is_none() && !c.eof {
                worst = worst.max(c.last_arrival.elapsed());
            }
        }
        worst
    }

    /// How many connections saw a gap longer than `over` end after `since`.
    pub fn paused_since(&self, since: Instant, over: Duration) -> usize {
        let conns = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter(|c| c.gaps.iter().any(|(g, end)| *end >= since && *g > over))
            .count()
    }

    /// The longest gap that ended after `since`, and when it ended.
    pub fn worst_gap_since(&self, since: Instant) -> Option<(Duration, Instant)> {
        let conns = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .flat_map(|c| c.gaps.iter().copied())
            .filter(|(_, ended)| *ended >= since)
            .max_by_key(|(g, _)| *g)
    }

    /// Stops sending, half-closes every connection, waits (≤ 10 s) for
    /// every echo and EOF, and reports.
    pub fn stop(mut self) -> TickerReport {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let conns = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = TickerReport {
            conns: conns.len(),
            failed: 0,
            failures: Vec::new(),
            sent: 0,
            received: 0,
            max_gap: Duration::ZERO,
        };
        for (i, c) in conns.iter().enumerate() {
            r.sent += c.next_send;
            r.received += c.expected;
            for (g, _) in &c.gaps {
                r.max_gap = r.max_gap.max(*g);
            }
            let why = if let Some(e) = &c.error {
                Some(e.clone())
            } else if c.expected != c.next_send {
                Some(format!("sent {} received {}", c.next_send, c.expected))
            } else if !c.eof {
                Some("no EOF".into())
            } else {
                None
            };
            if let Some(w) = why {
                r.failed += 1;
                if r.failures.len() < 10 {
                    r.failures.push(format!("conn {i}: {w}"));
                }
            }
        }
        r
    }
}

impl Drop for Tickers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Mutex<Vec<Conn>>, stop: &AtomicBool, interval: Duration) {
    let mut next_tick = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut buf = [0u8; 4096];
    loop {
        let now = Instant::now();
        let mut conns = shared.lock().unwrap_or_else(|p| p.into_inner());
        if stop.load(Ordering::Acquire) && stopping_since.is_none() {
            stopping_since = Some(now);
            for c in conns.iter_mut() {
                let _ = c.s.shutdown(Shutdown::Write);
                c.write_shut = true;
            }
        }
        if let Some(t) = stopping_since {
            let done = conns.iter().all(|c| c.eof || c.error.is_some());
            if done || t.elapsed() > Duration::from_secs(10) {
                return;
            }
        } else if now >= next_tick {
            for c in conns.iter_mut().filter(|c| c.error.is_none()) {
                match c.s.write(&c.next_send.to_be_bytes()) {
                    Ok(8) => c.next_send += 1,
                    // A full send buffer: skip this tick (the echo is
                    // stalled; the gap shows it).
                    Ok(_) => c.error = Some("short write".into()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => c.error = Some(format!("write: {e}")),
                }
            }
            next_tick += interval;
            if next_tick < now {
                next_tick = now + interval;
            }
        }
        let mut fds: Vec<libc::pollfd> = conns
            .iter()
            .map(|c| libc::pollfd {
                fd: c.s.as_raw_fd(),
                events: if c.eof || c.error.is_some() {
                    0
                } else {
                    libc::POLLIN
                },
                revents: 0,
            })
            .collect();
        drop(conns);
        let wait = next_tick
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(20));
        // SAFETY: `fds` is a live array of pollfd of the length given.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis() as i32,
            )
        };
        if n <= 0 {
            continue;
        }
        let mut conns = shared.lock().unwrap_or_else(|p| p.into_inner());
        for (c, p) in conns.iter_mut().zip(&fds) {
            if p.revents == 0 {
                continue;
            }
            loop {
                match c.s.read(&mut buf) {
                    Ok(0) => {
                        c.eof = true;
                        if !c.write_shut {
                            c.error = Some("EOF before the end".into());
                        }
                        break;
                    }
                    Ok(k) => {
                        let at = Instant::now();
                        let gap = at - c.last_arrival;
                        // Only the gaps worth a look (a tick is `interval`).
                        if gap > interval * 2 && c.gaps.len() < 10_000 {
                            c.gaps.push((gap, at));
                        }
                        c.last_arrival = at;
                        c.partial.extend_from_slice(&buf[..k]);
                        while c.partial.len() >= 8 {
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&c.partial[..8]);
                            c.partial.drain(..8);
                            let v = u64::from_be_bytes(v);
                            if v != c.expected && c.error.is_none() {
                                c.error = Some(format!("got {v}, expected {}", c.expected));
                            }
                            c.expected += 1;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        c.error = Some(format!("read: {e}"));
                        break;
                    }
                }
            }
        }
    }
}
