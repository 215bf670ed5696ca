//! The proxy's transparent listener. `intercept` assigns SYNs for managed
//! endpoints to it with `bpf_sk_assign`; `IP_TRANSPARENT` is mandatory or no
//! SYN-ACK goes out for a non-local destination. It is bound to loopback on an
//! ephemeral port so nothing can reach it except through the assignment.
//!
//! Both listeners set `TCP_NODELAY` and `TCP_INQ`, which accepted sockets
//! inherit: replayed and relayed bytes never wait on Nagle, and reads say
//! what is left queued (see `inq`), without a setsockopt per connection.
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// `n` non-blocking transparent listeners on 127.0.0.1:<ephemeral>, one per
/// data-plane thread (each accepts only the SYNs `intercept` assigns to it).
/// Plain std listeners: each thread registers its own with its runtime.
/// Accepted sockets inherit `liveness`'s timers from them.
pub fn transparent_listeners(
    n: usize,
    backlog: i32,
    liveness: &super::liveness::Liveness,
) -> io::Result<Vec<std::net::TcpListener>> {
    (0..n)
        .map(|_| {
            let l = loopback_listener(backlog, true)?;
            liveness.apply(&l)?;
            Ok(l)
        })
        .collect()
}

/// A plain listener on 127.0.0.1:<ephemeral> (unit tests: no privilege).
pub fn plain_listener() -> io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(loopback_listener(1024, false)?)
}

/// A non-blocking `TCP_NODELAY` listener on 127.0.0.1:<ephemeral>;
/// `IP_TRANSPARENT` if `transparent`.
fn loopback_listener(backlog: i32, transparent: bool) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if transparent {
        s.set_ip_transparent_v4(true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("IP_TRANSPARENT (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
        s.set_reuse_address(true)?;
    }
    s.set_tcp_nodelay(true)?;
    // Best effort: without it reads go on until EAGAIN (see `inq`).
    let _ = super::inq::enable(&s);
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay relies on this instead of setting it per connection.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let l = plain_listener().expect("listener");
        let addr = l.local_addr().expect("addr");
        let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        assert!(s.nodelay().expect("nodelay"), "TCP_NODELAY not inherited");
    }
}
