//! Passing descriptors between two processes over a Unix `SOCK_SEQPACKET`
//! socket with `SCM_RIGHTS`, in batches.
//!
//! Linux carries at most 253 descriptors in one message (`SCM_MAX_FD`), and
//! a sender may not have more descriptors in flight than its
//! `RLIMIT_NOFILE`, so every [`ACK_EVERY`] batches (and after the last)
//! the sender waits for the receiver's acknowledgement. Each message carries a small header (the batch's
//! descriptor count), so a receiver can tell a truncated batch (its own
//! descriptor limit reached: the kernel closes what does not fit and says
//! so) from a whole one, and refuse it. A passed descriptor is the same
//! socket in both processes, with all its options (`IP_TRANSPARENT`,
//! keepalive, `SO_MARK`, sockhash membership): the old process must close
//! its copy, never shut it down.
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most descriptors one message carries (Linux's `SCM_MAX_FD`).
pub const MAX_PER_MESSAGE: usize = 253;

/// The acknowledgement of a batch.
const ACK: u8 = 0x06;

/// Batches between acknowledgements (and the last one is acknowledged):
/// 2,024 descriptors in flight at most, far below any `RLIMIT_NOFILE` an
/// agent runs with, and a round trip per 2,024 instead of per 253.
pub const ACK_EVERY: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ScmError {
    #[error("sending a batch of {count} descriptors: {source}")]
    Send { count: usize, source: Errno },
    #[error("receiving a batch of descriptors: {source}")]
    Receive { source: Errno },
    #[error(
        "a batch of descriptors arrived truncated (this process's RLIMIT_NOFILE is too low \
         for what is handed over: raise it)"
    )]
    Truncated,
    #[error("the peer closed the channel before the hand-over was done")]
    Closed,
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// Sends `fds`, in batches of at most [`MAX_PER_MESSAGE`], each waiting for
/// the receiver's acknowledgement. `chan` is one end of a `SOCK_SEQPACKET`
/// socket.
pub fn send_fds(chan: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> Result<(), ScmError> {
    let batches = fds.len().div_ceil(MAX_PER_MESSAGE);
    for (i, batch) in fds.chunks(MAX_PER_MESSAGE).enumerate() {
        let raw: Vec<RawFd> = batch.iter().map(AsRawFd::as_raw_fd).collect();
        let header = (raw.len() as u32).to_le_bytes();
        let iov = [IoSlice::new(&header)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(chan.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(
            |source| ScmError::Send {
                count: raw.len(),
                source,
            },
        )?;
        if !(i + 1).is_multiple_of(ACK_EVERY) && i + 1 != batches {
            continue;
        }
        let mut ack = [0u8; 1];
        match nix::unistd::read(chan, &mut ack) {
            Ok(1) if ack[0] == ACK => {}
            Ok(0) => return Err(ScmError::Closed),
            Ok(_) => return Err(ScmError::Malformed("unexpected acknowledgement".into())),
            Err(source) => return Err(ScmError::Receive { source }),
        }
    }
    Ok(())
}

/// Receives `expected` descriptors sent by [`send_fds`], acknowledging each
/// batch. Every descriptor received is owned (closed on drop), also those of
/// a batch that turns out malformed.
pub fn recv_fds(chan: BorrowedFd<'_>, expected: usize) -> Result<Vec<OwnedFd>, ScmError> {
    let mut out = Vec::with_capacity(expected.min(4 * MAX_PER_MESSAGE));
    let mut batches: usize = 0;
    while out.len() < expected {
        let mut header = [0u8; 4];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_PER_MESSAGE]);
        let (bytes, fds_cut, data_cut, received) = {
            let mut iov = [IoSliceMut::new(&mut header)];
            let msg = recvmsg::<()>(
                chan.as_raw_fd(),
                &mut iov,
                Some(cmsg.as_mut_slice()),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|source| ScmError::Receive { source })?;
            let mut received = Vec::new();
            // MSG_CTRUNC: descriptors did not fit (nix reports it as an
            // error of `cmsgs`); MSG_TRUNC: more data than a header.
            let fds_cut = match msg.cmsgs() {
                Ok(cmsgs) => {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            // SAFETY: the kernel just installed these
                            // descriptors in this process for us; nothing
                            // else owns them.
                            received.extend(
                                fds.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    false
                }
                Err(_) => true,
            };
            let data_cut = msg.flags.contains(MsgFlags::MSG_TRUNC);
            (msg.bytes, fds_cut, data_cut, received)
        };
        if bytes == 0 && received.is_empty() && !fds_cut {
            return Err(ScmError::Closed);
        }
        if fds_cut {
            return Err(ScmError::Truncated);
        }
        if data_cut {
            return Err(ScmError::Malformed(
                "a message longer than a batch header".into(),
            ));
        }
        if bytes != header.len() {
            return Err(ScmError::Malformed(format!("a {bytes}-byte header")));
        }
        let count = u32::from_le_bytes(header) as usize;
        if count != received.len() || count == 0 || out.len() + count > expected {
            return Err(ScmError::Malformed(format!(
                "header says {count} descriptors, {} arrived, {} of {expected} expected so far",
                received.len(),
                out.len()
            )));
        }
        out.extend(received);
        batches += 1;
        if batches.is_multiple_of(ACK_EVERY) || out.len() == expected {
            nix::unistd::write(chan, &[ACK])
                .map_err(|source| ScmError::Send { count: 0, source })?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn channel() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    /// 600 sockets (three batches) go across and are the same sockets:
    /// what is written into a received one comes out of its peer here.
    #[test]
    fn descriptors_cross_in_batches_and_stay_the_same_sockets() {
        let (a, b) = channel();
        let pairs: Vec<(UnixStream, UnixStream)> = (0..600)
            .map(|_| UnixStream::pair().expect("pair"))
            .collect();
        let sender = std::thread::spawn(move || {
            let fds: Vec<BorrowedFd<'_>> = pairs.iter().map(|(x, _)| x.as_fd()).collect();
            send_fds(a.as_fd(), &fds).map(|()| pairs)
        });
        let got = recv_fds(b.as_fd(), 600).expect("receive");
        let pairs = sender.join().expect("sender").expect("send");
        assert_eq!(got.len(), 600);
        for (i, (fd, (_, peer))) in got.into_iter().zip(&pairs).enumerate() {
            let mut s = UnixStream::from(fd);
            s.write_all(&(i as u32).to_le_bytes()).expect("write");
            let mut b = [0u8; 4];
            (&*peer).read_exact(&mut b).expect("read");
            assert_eq!(
                u32::from_le_bytes(b),
                i as u32,
                "descriptor {i} crossed in order"
            );
        }
    }

    #[test]
    fn a_peer_that_goes_away_is_an_error_not_a_hang() {
        let (a, b) = channel();
        drop(a);
        assert!(matches!(recv_fds(b.as_fd(), 1), Err(ScmError::Closed)));
    }

    #[test]
    fn a_batch_whose_header_lies_is_refused_and_its_descriptors_closed() {
        let (a, b) = channel();
        let (x, mut y) = UnixStream::pair().expect("pair");
        let raw = [x.as_raw_fd()];
        let header = 2u32.to_le_bytes();
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&header)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        assert!(matches!(
            recv_fds(b.as_fd(), 2),
            Err(ScmError::Malformed(_))
        ));
        // The copy that arrived was closed with the refusal: once ours goes
        // too, the socket's peer sees the end.
        drop(x);
        y.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        y.read_to_end(&mut rest).expect("EOF");
        // Garbage of the wrong size, with no descriptor.
        nix::unistd::write(a.as_fd(), b"xyzzy!").expect("write");
        assert!(matches!(
            recv_fds(b.as_fd(), 1),
            Err(ScmError::Malformed(_))
        ));
    }
}
