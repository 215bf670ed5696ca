//! One agent per node. A node is a network namespace, so the lock is an
//! abstract Unix socket (abstract names are scoped to the network namespace
//! and vanish with the process: no stale lock after a crash).
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};

const LOCK_NAME: &[u8] = b"shepherd-agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another shepherd agent is already running in this network namespace{pid}; stop it before starting a new one")]
    AlreadyRunning { pid: String },
    #[error("cannot take the per-node agent lock: {0}")]
    Io(#[from] io::Error),
}

/// Holds the lock for as long as it lives.
pub struct InstanceLock {
    _listener: UnixListener,
}

pub fn acquire() -> Result<InstanceLock, InstanceError> {
    let addr = SocketAddr::from_abstract_name(LOCK_NAME)?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(InstanceLock { _listener: l }),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(InstanceError::AlreadyRunning {
            pid: holder_pid(&addr)
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The pid of the process holding the lock, via SO_PEERCRED.
fn holder_pid(addr: &SocketAddr) -> Option<i32> {
    let s = std::os::unix::net::UnixStream::connect_addr(addr).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred into the buffer we own, of the size given.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}
