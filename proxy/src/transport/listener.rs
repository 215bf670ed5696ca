//! The proxy's transparent listener. `intercept` assigns SYNs for managed
//! endpoints to it with `bpf_sk_assign`; `IP_TRANSPARENT` is mandatory or no
//! SYN-ACK goes out for a non-local destination. It is bound to loopback on an
//! ephemeral port so nothing can reach it except through the assignment.
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// A non-blocking transparent listener on 127.0.0.1:<ephemeral>.
pub fn transparent_listener(backlog: i32) -> io::Result<tokio::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_ip_transparent_v4(true).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("IP_TRANSPARENT (needs CAP_NET_ADMIN): {e}"),
        )
    })?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// A plain listener on 127.0.0.1:<ephemeral> (unit tests: no privilege).
pub fn plain_listener() -> io::Result<tokio::net::TcpListener> {
    let s = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s)
}
