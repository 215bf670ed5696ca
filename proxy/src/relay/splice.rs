//! Zero-copy forwarding with `splice(2)`: socket → pipe → socket, the bytes
//! never entering userspace.
//!
//! A [`Lane`] is one direction's pipe plus how many bytes it holds. The pipe
//! is taken from a node-wide [`pool`] only when the source socket is readable
//! and goes back as soon as it is empty, so idle connections hold no pipe and
//! the fds pipes use are bounded by [`MAX_PIPES`] (at 10k connections the
//! agent's two sockets per connection already press on `RLIMIT_NOFILE`).
//! When no pipe is available the caller falls back to buffered copy.
//!
//! Bytes in a lane's pipe are in flight inside the proxy, like bytes in a
//! buffer: [`Lane::drain_into`] moves them back to userspace when a hold
//! needs them queued (they are older than anything read after them).
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes one pipe holds (`F_SETPIPE_SZ`; the kernel rounds up to pages).
pub const PIPE_SIZE: usize = 256 * 1024;
/// Pipes alive at once, in use or idle, node-wide (2 fds each).
pub const MAX_PIPES: usize = 256;
/// Idle pipes kept for reuse.
const MAX_IDLE: usize = 64;

static SPLICED: AtomicU64 = AtomicU64::new(0);

/// Bytes written out of pipes since the agent started (for metrics).
pub fn spliced_bytes() -> u64 {
    SPLICED.load(Ordering::Relaxed)
}

/// One pipe, both ends non-blocking.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array, which lives for the call.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per splice; the default (64 KiB) still works.
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory.
        let _ = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Self { r, w })
    }
}

/// The node-wide pipe pool.
pub mod pool {
    use super::*;

    static IDLE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    /// An empty pipe, or `None` when [`MAX_PIPES`] are alive or the kernel
    /// refuses one (fd limit): the caller copies instead.
    pub fn take() -> Option<Pipe> {
        if let Some(p) = IDLE.lock().ok().and_then(|mut v| v.pop()) {
            return Some(p);
        }
        if LIVE.fetch_add(1, Ordering::AcqRel) >= MAX_PIPES {
            LIVE.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match Pipe::new() {
            // fds are allocated lowest first: a pipe landing near the fd limit
            // means connections are about to need those fds more than splice
            // does (a backend connect failing on EMFILE would close a client).
            Ok(p) if near_fd_limit(p.w.as_raw_fd()) => {
                discard(p);
                None
            }
            Ok(p) => Some(p),
            Err(e) => {
                LIVE.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(error = %e, "no pipe for splice; copying instead");
                None
            }
        }
    }

    fn near_fd_limit(fd: RawFd) -> bool {
        static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let limit = *LIMIT.get_or_init(|| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit into the live local.
            if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
                r.rlim_cur
            } else {
                1024
            }
        });
        u64::try_from(fd).unwrap_or(u64::MAX) >= limit.saturating_sub(limit / 8)
    }

    /// Returns an empty pipe. A pipe that may still hold bytes must be
    /// dropped through [`discard`] instead.
    pub fn give_back(p: Pipe) {
        if let Ok(mut v) = IDLE.lock() {
            if v.len() < MAX_IDLE {
                v.push(p);
                return;
            }
        }
        discard(p);
    }

    pub fn discard(p: Pipe) {
        drop(p);
        LIVE.fetch_sub(1, Ordering::AcqRel);
    }

    /// Pipes alive now (for metrics and tests).
    pub fn live() -> usize {
        LIVE.load(Ordering::Acquire)
    }
}

/// One direction's pipe and the bytes in it.
#[derive(Debug, Default)]
pub struct Lane {
    pipe: Option<Pipe>,
    len: usize,
}

/// What one attempt to fill a lane did.
pub enum Filled {
    /// `n > 0` bytes moved from the socket into the pipe.
    Bytes(usize),
    /// The peer closed its side.
    Eof,
    /// Nothing to read after all (spurious readiness).
    WouldBlock,
    /// No pipe could be had: read with a buffer instead.
    NoPipe,
    /// Bytes are queued but splice cannot move them (TCP urgent data at the
    /// head of the queue stops `tcp_splice_read`): read with a buffer, which
    /// gets past it. The socket's readiness is left set for that read.
    Stuck,
}

impl Lane {
    /// Bytes in the pipe, not yet written out.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves what `src` has (up to `max`, at most [`PIPE_SIZE`]) into the
    /// empty lane. Call when `src` is readable.
    pub fn fill_from(&mut self, src: &TcpStream, max: usize) -> io::Result<Filled> {
        debug_assert!(self.is_empty());
        let pipe = match self.pipe.take() {
            Some(p) => p,
            None => match pool::take() {
                Some(p) => p,
                None => return Ok(Filled::NoPipe),
            },
        };
        let max = max.clamp(1, PIPE_SIZE);
        // `None`: splice moved nothing although bytes are queued. Returned
        // as a success so that try_io keeps the readiness for the fallback
        // read; only a genuine EAGAIN (nothing queued) clears it.
        let r = src.try_io(Interest::READABLE, || {
            match splice(src.as_raw_fd(), pipe.w.as_raw_fd(), max) {
                Ok(0) if stuck(src) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && stuck(src) => Ok(None),
                r => r.map(Some),
            }
        });
        match r {
            Ok(None) => {
                pool::give_back(pipe);
                Ok(Filled::Stuck)
            }
            Ok(Some(0)) => {
                pool::give_back(pipe);
                Ok(Filled::Eof)
            }
            Ok(Some(n)) => {
                self.pipe = Some(pipe);
                self.len = n;
                Ok(Filled::Bytes(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pool::give_back(pipe);
                Ok(Filled::WouldBlock)
            }
            Err(e) => {
                pool::give_back(pipe);
                Err(e)
            }
        }
    }

    /// Moves what `dst` accepts from the lane to `dst`. Call when `dst` is
    /// writable. `Ok(0)`: it accepted nothing after all.
    pub fn flush_to(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let Some(pipe) = self.pipe.as_ref() else {
            return Ok(0);
        };
        let r = dst.try_io(Interest::WRITABLE, || {
            splice(pipe.r.as_raw_fd(), dst.as_raw_fd(), self.len)
        });
        match r {
            Ok(n) => {
                SPLICED.fetch_add(n as u64, Ordering::Relaxed);
                self.len -= n.min(self.len);
                if self.len == 0 {
                    if let Some(p) = self.pipe.take() {
                        pool::give_back(p);
                    }
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Reads the lane's bytes back into userspace (in order) and empties it.
    pub fn drain(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len);
        if let Some(pipe) = self.pipe.as_ref() {
            let mut buf = vec![0u8; self.len.min(PIPE_SIZE)];
            while out.len() < self.len {
                // SAFETY: reads at most buf.len() bytes into buf, which is live.
                let n = unsafe {
                    libc::read(
                        pipe.r.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len().min(self.len - out.len()),
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
            }
        }
        if out.len() != self.len {
            return Err(io::Error::other(format!(
                "pipe gave back {} of its {} bytes",
                out.len(),
                self.len
            )));
        }
        self.len = 0;
        if let Some(p) = self.pipe.take() {
            pool::give_back(p);
        }
        Ok(out)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            if self.len == 0 {
                pool::give_back(p);
            } else {
                pool::discard(p);
            }
        }
    }
}

/// `SIOCATMARK` (asm-generic/sockios.h; not exported by the libc crate).
const SIOCATMARK: libc::Ioctl = 0x8905;

/// Whether splice moved nothing although the stream goes on: the urgent
/// mark is at the head of the queue (SIOCINQ reports 0 there, so ask
/// SIOCATMARK), or bytes are queued anyway.
fn stuck(sock: &TcpStream) -> bool {
    let mut at_mark: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one c_int through the pointer, which points
    // to a live local.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCATMARK, &mut at_mark) };
    (r == 0 && at_mark != 0) || queued(sock) > 0
}

/// Bytes in `sock`'s receive queue (SIOCINQ); 0 if it cannot be read.
fn queued(sock: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD (== SIOCINQ) writes one c_int through the pointer,
    // which points to a live local.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets (both ends are a pipe or a socket); no memory passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    #[tokio::test]
    async fn splices_in_order_and_drains_back() {
        let (mut a, b) = pair().await;
        let (c, mut d) = pair().await;
        let mut lane = Lane::default();
        a.write_all(b"hello ").await.expect("write");
        b.readable().await.expect("readable");
        let Filled::Bytes(n) = lane.fill_from(&b, PIPE_SIZE).expect("fill") else {
            panic!("expected bytes");
        };
        assert_eq!(n, 6);
        c.writable().await.expect("writable");
        assert_eq!(lane.flush_to(&c).expect("flush"), 6);
        assert!(lane.is_empty());
        a.write_all(b"world").await.expect("write");
        b.readable().await.expect("readable");
        assert!(matches!(
            lane.fill_from(&b, PIPE_SIZE),
            Ok(Filled::Bytes(5))
        ));
        // A hold takes the lane's bytes back into userspace.
        assert_eq!(lane.drain().expect("drain"), b"world");
        assert!(lane.is_empty());
        let mut got = [0u8; 6];
        d.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello ");
        drop(a);
        b.readable().await.expect("readable");
        assert!(matches!(lane.fill_from(&b, PIPE_SIZE), Ok(Filled::Eof)));
    }
}
