//! Where the client meant to go. For a socket accepted through `bpf_sk_assign`
//! the kernel keeps the original destination as the socket's local address.
use std::io;
use std::net::{SocketAddr, SocketAddrV4};

pub trait OrigDst: Send + Sync {
    fn orig_dst(&self, accepted: &tokio::net::TcpStream) -> io::Result<SocketAddrV4>;
}

/// `getsockname(2)` on the accepted socket.
pub struct LocalAddr;

impl OrigDst for LocalAddr {
    fn orig_dst(&self, accepted: &tokio::net::TcpStream) -> io::Result<SocketAddrV4> {
        match accepted.local_addr()? {
            SocketAddr::V4(a) => Ok(a),
            SocketAddr::V6(a) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("IPv6 destination {a} is not managed"),
            )),
        }
    }
}

/// A fixed destination (unit tests, where nothing was intercepted).
pub struct Fixed(pub SocketAddrV4);

impl OrigDst for Fixed {
    fn orig_dst(&self, _accepted: &tokio::net::TcpStream) -> io::Result<SocketAddrV4> {
        Ok(self.0)
    }
}
