//! Reads that also say how much is left queued (`TCP_INQ`).
//!
//! tokio's readiness is edge-triggered: a socket stays "readable" until a
//! read returns EAGAIN. A read that comes back short is no proof that the
//! queue is empty (TCP stops a read at the urgent mark with the rest of the
//! stream behind it), so the relay read again until EAGAIN, which cost one
//! `recv` per message. With `TCP_INQ` each read reports what is still
//! queued; when that is nothing, readiness is cleared as an EAGAIN would
//! clear it, and the extra `recv` is saved. When the report is missing (the
//! option is off, or an old kernel), nothing changes.
use bytes::BufMut;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Asks the kernel to report, with every read, the bytes still queued.
/// Accepted sockets inherit it from their listener.
pub fn enable(sock: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INQ,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One non-blocking read from `stream` into `buf`'s spare capacity, like
/// `try_read_buf`. `Ok(0)` is the end of the stream; WouldBlock means
/// nothing was there. If the kernel reports that the read took everything
/// queued, the stream's read readiness is cleared, so the caller waits for
/// the next segment instead of reading again to find EAGAIN.
pub fn read_buf(stream: &TcpStream, buf: &mut impl BufMut) -> io::Result<usize> {
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let chunk = buf.chunk_mut();
        let (n, left) = recv(stream.as_raw_fd(), chunk.as_mut_ptr(), chunk.len())?;
        got = Some(n);
        if n > 0 && left == Some(0) {
            // Drained: let tokio clear readiness (only if no new segment
            // has arrived since it last polled the socket).
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match got {
        Some(n) => {
            // SAFETY: `recv` initialised the first `n` bytes of the chunk.
            unsafe { buf.advance_mut(n) };
            Ok(n)
        }
        None => r,
    }
}

/// `recvmsg` into `len` bytes at `ptr`; returns the bytes read and, if the
/// kernel sent it, how many are still queued.
fn recv(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<(usize, Option<u32>)> {
    let mut iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // Room for one `cmsghdr` and an int, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; the pointers set below stay live
    // for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes `len` writable bytes at `ptr` (the caller's
    // spare capacity) and `control`, all live for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut left = None;
    // SAFETY: the CMSG_* walk stays inside `control`, which the kernel
    // filled and described in `msg.msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_TCP && (*c).cmsg_type == libc::TCP_CM_INQ {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                left = Some(u32::try_from(v).unwrap_or(1));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = crate::transport::listener::plain_listener().expect("listener");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    async fn readable_soon(s: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(50), s.readable())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_drained_socket_waits_for_the_next_segment() {
        let (mut c, s) = pair().await;
        c.write_all(b"hello").await.expect("write");
        s.readable().await.expect("readable");
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(read_buf(&s, &mut buf).expect("read"), 5);
        assert_eq!(&buf[..], b"hello");
        assert!(!readable_soon(&s).await, "drained: readiness cleared");
        c.write_all(b"more").await.expect("write");
        assert!(readable_soon(&s).await, "a new segment wakes it");
        assert_eq!(read_buf(&s, &mut buf).expect("read"), 4);
        drop(c);
        assert!(readable_soon(&s).await, "the FIN wakes it");
        assert_eq!(read_buf(&s, &mut buf).expect("eof"), 0);
    }

    #[tokio::test]
    async fn a_short_read_with_bytes_left_keeps_readiness() {
        let (mut c, s) = pair().await;
        c.write_all(b"0123456789").await.expect("write");
        s.readable().await.expect("readable");
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(read_buf(&s, &mut (&mut buf).limit(4)).expect("read"), 4);
        assert!(readable_soon(&s).await, "six bytes left: still readable");
        assert_eq!(read_buf(&s, &mut buf).expect("read"), 6);
        assert_eq!(&buf[..], b"0123456789");
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_inq() {
        let (_c, s) = pair().await;
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_TCP,
                libc::TCP_INQ,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        assert_eq!(v, 1, "TCP_INQ not inherited from the listener");
    }
}
