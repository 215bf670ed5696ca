//! Connections from the proxy to pods.
//!
//! Backend sockets carry `SO_MARK = BACKEND_MARK`: it must differ from the
//! interception fwmark, or the local-delivery rule would swallow our own SYN
//! (ENETUNREACH). `TCP_NODELAY` keeps replayed bytes from waiting on Nagle.
use shepherd_common::BACKEND_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

pub trait BackendConnector: Send + Sync {
    /// `exclusive_port`: take a local port no other socket holds. After a
    /// pod moves to a new address, the origin translates its old flows on
    /// the wire to the new address; connect()'s own port choice may share a
    /// port with such a flow (the kernel sees different peers), which would
    /// put two connections on one wire tuple. An explicit bind(0) never
    /// shares a port.
    fn connect(&self, dst: SocketAddrV4, exclusive_port: bool) -> ConnectFuture<'_>;
}

/// Connects with `SO_MARK` and a timeout.
pub struct MarkedConnector {
    pub timeout: Duration,
    /// Set the mark (needs CAP_NET_ADMIN); off in unprivileged unit tests.
    pub mark: bool,
    /// Keepalive and user timeout of the new socket.
    pub liveness: super::liveness::Liveness,
}

impl BackendConnector for MarkedConnector {
    fn connect(&self, dst: SocketAddrV4, exclusive_port: bool) -> ConnectFuture<'_> {
        Box::pin(async move {
            // Non-blocking from the start: no fcntl pair per connection.
            let s = Socket::new(
                Domain::IPV4,
                Type::STREAM.nonblocking(),
                Some(Protocol::TCP),
            )?;
            if self.mark {
                s.set_mark(BACKEND_MARK)?;
            }
            if exclusive_port {
                s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
            }
            s.set_tcp_nodelay(true)?;
            self.liveness.apply(&s)?;
            // Best effort: without it reads go on until EAGAIN (see `inq`).
            let _ = super::inq::enable(&s);
            let sock = TcpSocket::from_std_stream(s.into());
            match tokio::time::timeout(self.timeout, sock.connect(SocketAddr::V4(dst))).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {dst} timed out after {:?}", self.timeout),
                )),
            }
        })
    }
}

/// Bytes written to `sock` that the peer has not acknowledged yet (SIOCOUTQ).
pub fn unacked_bytes(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (== SIOCOUTQ) writes one c_int through the pointer,
    // which points to a live local; the fd is owned by `sock` for the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}
