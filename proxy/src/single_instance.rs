//! One agent per node. Two locks, both taken at start and held for life:
//!
//! 1. **A lock file next to the API socket** (`<socket>.lock`, `flock`), in
//!    the socket's root-only directory: only root can take it, so no other
//!    user can keep the agent from starting. It holds the owner's pid for
//!    the message a second agent prints. The kernel drops the lock when the
//!    process dies, so a crash leaves nothing stale.
//! 2. **An abstract Unix socket name**, scoped to the network namespace (a
//!    node), which catches a second agent started with another
//!    `--api-socket`. Any local user can bind an abstract name, so its
//!    holder's credentials are checked: a holder running as root (or as
//!    this agent's user) is an agent, and this one refuses to start; anyone
//!    else is squatting, is named in a warning, and ignored: the lock file
//!    still guards this socket (a second agent with another `--api-socket`
//!    goes unnoticed while the squatter holds the name; the warning says so).
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};

const LOCK_NAME: &[u8] = b"shepherd-agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("another shepherd agent is already running in this network namespace{pid}; stop it before starting a new one")]
    AlreadyRunning { pid: String },
    #[error("cannot take the per-node agent lock {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}")]
    Unsafe(String),
}

/// Holds the locks for as long as it lives.
pub struct InstanceLock {
    _file: nix::fcntl::Flock<File>,
    _listener: Option<UnixListener>,
}

/// Takes the node's agent locks for an agent serving `api_socket`.
pub fn acquire(api_socket: &Path) -> Result<InstanceLock, InstanceError> {
    let path = lock_path(api_socket);
    let io_err = |source| InstanceError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::private_dir::ensure(dir).map_err(|e| match e {
            crate::private_dir::DirError::Io(e) => io_err(e),
            crate::private_dir::DirError::Unsafe(m) => InstanceError::Unsafe(m),
        })?;
    }
    // Never through a symlink, and only a plain file of ours: the pid is
    // written into it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me || meta.nlink() != 1 {
        return Err(InstanceError::Unsafe(format!(
            "{} is not a plain file of uid {me} with one link; remove it",
            path.display()
        )));
    }
    let mut file = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(f) => f,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(InstanceError::AlreadyRunning {
                pid: shown_pid(pid.trim().parse().ok()),
            });
        }
        Err((_, e)) => return Err(io_err(e.into())),
    };
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(InstanceLock {
        _file: file,
        _listener: abstract_lock()?,
    })
}

impl InstanceLock {
    /// The lock file's and the abstract socket's descriptors, for a
    /// hand-over.
    pub fn fds(&self) -> (std::os::fd::RawFd, Option<std::os::fd::RawFd>) {
        use std::os::fd::AsRawFd;
        (
            self._file.as_raw_fd(),
            self._listener.as_ref().map(AsRawFd::as_raw_fd),
        )
    }

    /// The locks a predecessor handed over: the same open lock file (so
    /// the same lock) and abstract socket. Writes this process's pid.
    pub fn adopt(
        file: std::os::fd::OwnedFd,
        listener: Option<std::os::fd::OwnedFd>,
    ) -> Result<Self, InstanceError> {
        let io_err = |source| InstanceError::Io {
            path: "(handed over)".into(),
            source,
        };
        // The lock belongs to the open file, which this descriptor shares
        // with the predecessor: taking it again succeeds at once.
        let mut file = nix::fcntl::Flock::lock(
            File::from(file),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| io_err(e.into()))?;
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(Self {
            _file: file,
            _listener: listener.map(UnixListener::from),
        })
    }

    /// Lets go of the locks after a hand-over: closes this process's
    /// descriptors without unlocking. The successor holds the same open
    /// lock file, so the lock stays (an unlock would release it for the
    /// successor too), and the same abstract socket.
    pub fn hand_over(self) {
        use std::os::fd::AsRawFd;
        let Self { _file, _listener } = self;
        // Not dropped: `Flock`'s drop unlocks. Its descriptor is closed
        // here instead (closing one descriptor of an open file keeps its
        // lock while another, the successor's, is open).
        let fd = _file.as_raw_fd();
        std::mem::forget(_file);
        // SAFETY: `fd` was the forgotten `File`'s; nothing else closes it.
        unsafe { libc::close(fd) };
        drop(_listener);
    }
}

/// The lock file of an agent serving `api_socket`.
pub fn lock_path(api_socket: &Path) -> PathBuf {
    let mut p = api_socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

fn shown_pid(pid: Option<i32>) -> String {
    pid.filter(|p| *p > 0)
        .map(|p| format!(" (pid {p})"))
        .unwrap_or_default()
}

/// Binds the namespace-wide abstract name; `None` if a non-agent holds it.
fn abstract_lock() -> Result<Option<UnixListener>, InstanceError> {
    let io_err = |source| InstanceError::Io {
        path: "@shepherd-agent.lock".into(),
        source,
    };
    let addr = SocketAddr::from_abstract_name(LOCK_NAME).map_err(io_err)?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            match holder() {
                // An agent listens, so a connect reaches it at once and says
                // who it is. Anyone else (not root, or a socket that does not
                // listen, or one whose queue is full) is not an agent.
                Some(c) if c.uid == 0 || c.uid == me => Err(InstanceError::AlreadyRunning {
                    pid: shown_pid(Some(c.pid)),
                }),
                c => {
                    tracing::warn!(
                        pid = c.map_or(0, |c| c.pid),
                        uid = c.map(|c| c.uid),
                        "the abstract name @shepherd-agent.lock is held by a process that is not \
                         an agent (not root); ignoring it. The lock file next to the API socket \
                         still refuses a second agent on this socket, but one started with another \
                         --api-socket would not be noticed until that process lets the name go"
                    );
                    Ok(None)
                }
            }
        }
        Err(e) => Err(io_err(e)),
    }
}

/// The credentials of the process holding the abstract name, via
/// SO_PEERCRED. The connect never blocks (a holder that does not listen, or
/// lets its queue fill, would otherwise stall the agent's start).
fn holder() -> Option<libc::ucred> {
    use std::os::unix::ffi::OsStrExt;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).ok()?;
    s.set_nonblocking(true).ok()?;
    let mut name = vec![0u8];
    name.extend_from_slice(LOCK_NAME);
    let addr = socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&name)).ok()?;
    s.connect(&addr).ok()?;
    peer_cred(std::os::fd::AsFd::as_fd(&s))
}

/// The credentials of a connected Unix socket's peer (SO_PEERCRED).
pub fn peer_cred(s: std::os::fd::BorrowedFd<'_>) -> Option<libc::ucred> {
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
    (r == 0 && cred.pid > 0).then_some(cred)
}
