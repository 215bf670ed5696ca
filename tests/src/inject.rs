//! Crafted packets for tests that must provoke the kernel side: a TCP RST or
//! a bare ACK with a chosen source, sent from inside a namespace through a
//! raw socket.
use crate::netns::{in_netns, Netns};
use std::io;
use std::net::SocketAddrV4;

/// Sends one TCP RST `src → dst` (sequence number `seq`) from `ns`, routed
/// like any packet that namespace sends.
pub fn send_rst(ns: &Netns, src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> io::Result<()> {
    let builder = etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 0)
        .rst();
    let mut packet = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut packet, &[])
        .map_err(|e| io::Error::other(e.to_string()))?;
    send_raw(ns, dst, &packet)
}

/// Sends one bare TCP ACK `src → dst` (sequence `seq`, acknowledging `ack`)
/// from `ns`: what a late duplicate ACK looks like.
pub fn send_ack(
    ns: &Netns,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
) -> io::Result<()> {
    let builder = etherparse::PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 64240)
        .ack(ack);
    let mut packet = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut packet, &[])
        .map_err(|e| io::Error::other(e.to_string()))?;
    send_raw(ns, dst, &packet)
}

/// Sends a ready IPv4 packet from `ns` through a raw socket.
fn send_raw(ns: &Netns, dst: SocketAddrV4, packet: &[u8]) -> io::Result<()> {
    in_netns(ns, || {
        // SAFETY: plain socket(2); the fd is closed below on every path.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `addr` are live for the call and their lengths
        // are passed alongside.
        let sent = unsafe {
            libc::sendto(
                fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let result = if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(fd) };
        result
    })
}
