//! A checking Redis client: one connection, `INCR` on a key of its own at a
//! steady pace, every answer checked. A key only this client touches goes
//! 1, 2, 3, …: an answer that skips a value means a command ran twice (or
//! ran where the client never saw it), one that repeats a value means a
//! command's effect was lost, and no answer at all is a failed command.
//! That is what a user of a stateful pod checks after a migration.
use crate::netns::Netns;
use crate::stream::connect_in;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one command may wait for its answer before it counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a [`RedisCounter`] saw.
#[derive(Debug, Clone, Default)]
pub struct RedisReport {
    /// Commands answered with the value expected.
    pub ok: u64,
    /// Commands that failed (wrong value, error, no answer); the client
    /// stops at the first.
    pub failed: u64,
    pub first_error: Option<String>,
    /// The longest a command waited for its answer.
    pub slowest: Duration,
    /// When each answer arrived, from the client's start.
    pub answered_at: Vec<Duration>,
}

impl RedisReport {
    /// Panics with the report unless every command was answered right.
    pub fn assert_ok(&self, min_ok: u64) {
        assert!(
            self.failed == 0 && self.first_error.is_none() && self.ok >= min_ok,
            "redis client not clean (wanted ≥ {min_ok} ok): ok {} failed {} first error {:?}",
            self.ok,
            self.failed,
            self.first_error
        );
    }
}

/// A running checking client; [`stop`](Self::stop) ends it.
pub struct RedisCounter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<RedisReport>>,
}

impl RedisCounter {
    /// Connects from `ns` to `server` and sends `INCR key` every
    /// `interval`, each after the last answer. Panics if it cannot connect.
    pub fn start(ns: &Netns, server: SocketAddrV4, key: &str, interval: Duration) -> RedisCounter {
        let (stream, _) = connect_in(ns, server)
            .unwrap_or_else(|e| panic!("redis client: connect to {server}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let key = key.to_string();
        let thread = std::thread::spawn(move || run(stream, &key, interval, &flag));
        RedisCounter {
            stop,
            thread: Some(thread),
        }
    }

    /// Whether the client has stopped by itself: at its first failure.
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops after the command in flight and returns what the client saw.
    pub fn stop(mut self) -> RedisReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => RedisReport {
                first_error: Some("the client thread panicked".into()),
                failed: 1,
                ..RedisReport::default()
            },
        }
    }
}

impl Drop for RedisCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(
    stream: std::net::TcpStream,
    key: &str,
    interval: Duration,
    stop: &AtomicBool,
) -> RedisReport {
    let mut r = RedisReport::default();
    let start = Instant::now();
    let setup = stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .and_then(|()| stream.try_clone());
    let mut reader = match setup {
        Ok(s) => BufReader::new(s),
        Err(e) => {
            r.failed = 1;
            r.first_error = Some(format!("socket setup: {e}"));
            return r;
        }
    };
    let mut writer = stream;
    let command = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
    let mut line = String::new();
    let mut expected = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        line.clear();
        let answer = writer
            .write_all(command.as_bytes())
            .and_then(|()| reader.read_line(&mut line));
        r.slowest = r.slowest.max(t0.elapsed());
        let error = match answer {
            Err(e) => Some(format!("command {expected}: {e}")),
            Ok(0) => Some(format!("command {expected}: the connection ended")),
            Ok(_) if line == format!(":{expected}\r\n") => None,
            Ok(_) => Some(format!(
                "command {expected}: answered {:?}, expected :{expected} \
                 (a command lost or run twice)",
                line.trim_end()
            )),
        };
        if let Some(e) = error {
            r.failed += 1;
            r.first_error = Some(e);
            break;
        }
        r.ok += 1;
        r.answered_at.push(start.elapsed());
        expected += 1;
        std::thread::sleep(interval);
    }
    r
}

/// Opens a new connection from `ns` to `server` and sends `PING`: returns
/// (connect time, time from the request to the `+PONG`).
pub fn ping(ns: &Netns, server: SocketAddrV4) -> std::io::Result<(Duration, Duration)> {
    let (stream, connect) = connect_in(ns, server)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let t0 = Instant::now();
    writer.write_all(b"PING\r\n")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line != "+PONG\r\n" {
        return Err(std::io::Error::other(format!("PING answered {line:?}")));
    }
    Ok((connect, t0.elapsed()))
}
