//! The successor's side of a hand-over (see [`super::server`] for the
//! running agent's): ask, load the programs with the running agent's maps,
//! receive the state and every descriptor, and commit once everything is
//! ready to run. Any error before the commit leaves the running agent
//! serving; the successor exits non-zero and says why.
use super::scm;
use super::wire::{self, Kernel, Msg, State, WireError};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no running agent answers on {path} ({source}); an agent that holds the lock but no hand-over socket is older than hand-overs, or is starting: stop it first")]
    NoAgent {
        path: String,
        source: std::io::Error,
    },
    #[error("the running agent refused the hand-over: {0}")]
    Refused(String),
    #[error("the running agent failed the hand-over: {0}")]
    Failed(String),
    #[error("hand-over: {0}")]
    Wire(#[from] WireError),
    #[error("hand-over: {0}")]
    Scm(#[from] scm::ScmError),
    #[error("hand-over: unexpected {0}")]
    Unexpected(String),
}

/// A running agent that agreed to hand over.
pub struct Offer {
    chan: OwnedFd,
    pub predecessor_version: String,
    pub kernel: Kernel,
    /// The maps' and links' descriptors, as `kernel` lists them.
    pub kernel_fds: Vec<OwnedFd>,
}

/// Everything handed over, not committed yet.
pub struct Received {
    chan: OwnedFd,
    pub state: State,
    pub fds: Fds,
}

/// The descriptors, in [`State`]'s order.
pub struct Fds {
    pub lock_file: OwnedFd,
    pub lock_listener: Option<OwnedFd>,
    pub api: OwnedFd,
    pub listeners: Vec<OwnedFd>,
    /// Each connection's client socket and backend socket (if it has one).
    pub conns: Vec<(OwnedFd, Option<OwnedFd>)>,
}

/// Asks the agent behind `path` to hand over, speaking `protocol`.
pub fn connect(path: &Path, protocol: u32) -> Result<Offer, TakeoverError> {
    let no_agent = |source: std::io::Error| TakeoverError::NoAgent {
        path: path.display().to_string(),
        source,
    };
    let chan = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| no_agent(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| no_agent(e.into()))?;
    socket::connect(chan.as_raw_fd(), &addr).map_err(|e| no_agent(e.into()))?;
    let t = nix::sys::time::TimeVal::new(super::server::STEP_TIMEOUT.as_secs() as i64, 0);
    let _ = socket::setsockopt(&chan, socket::sockopt::ReceiveTimeout, &t);
    let _ = socket::setsockopt(&chan, socket::sockopt::SendTimeout, &t);
    wire::send(
        chan.as_fd(),
        &Msg::Hello {
            protocol,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
        },
    )?;
    match wire::recv(chan.as_fd())? {
        Msg::Welcome {
            protocol: theirs,
            version,
            kernel,
        } => {
            if theirs != protocol {
                let why = format!("it speaks protocol {theirs}, this agent {protocol}");
                let _ = wire::send(
                    chan.as_fd(),
                    &Msg::Failed {
                        reason: why.clone(),
                    },
                );
                return Err(TakeoverError::Refused(why));
            }
            let kernel_fds = scm::recv_fds(chan.as_fd(), kernel.maps.len() + kernel.links.len())?;
            Ok(Offer {
                chan,
                predecessor_version: version,
                kernel,
                kernel_fds,
            })
        }
        Msg::Refused { reason } => Err(TakeoverError::Refused(reason)),
        Msg::Failed { reason } => Err(TakeoverError::Failed(reason)),
        m => Err(TakeoverError::Unexpected(format!("{m:?}"))),
    }
}

impl Offer {
    /// The successor is ready (its programs are loaded): the running agent
    /// freezes and sends everything.
    pub fn ready(self) -> Result<Received, TakeoverError> {
        wire::send(self.chan.as_fd(), &Msg::Ready)?;
        let descriptors = match wire::recv(self.chan.as_fd()) {
            Ok(Msg::State { descriptors }) if descriptors <= wire::MAX_DESCRIPTORS => descriptors,
            Ok(Msg::State { descriptors }) => {
                return Err(self.failed(TakeoverError::Unexpected(format!(
                    "{descriptors} descriptors announced"
                ))))
            }
            Ok(Msg::Failed { reason }) => return Err(TakeoverError::Failed(reason)),
            Ok(m) => return Err(self.failed(TakeoverError::Unexpected(format!("{m:?}")))),
            Err(e) => return Err(e.into()),
        };
        // The memory file, then the descriptors the state lists.
        let mut fds = match scm::recv_fds(self.chan.as_fd(), descriptors.saturating_add(1)) {
            Ok(f) => f.into_iter(),
            Err(e) => return Err(self.failed(e.into())),
        };
        let Some(memfd) = fds.next() else {
            return Err(self.failed(TakeoverError::Unexpected("no state".into())));
        };
        let state = match read_state(memfd) {
            Ok(s) => s,
            Err(e) => return Err(self.failed(e)),
        };
        if state.descriptors() != descriptors {
            let e = TakeoverError::Unexpected(format!(
                "{descriptors} descriptors for a state that lists {}",
                state.descriptors()
            ));
            return Err(self.failed(e));
        }
        // `descriptors()` counted them, so each `next` has one.
        let mut next = || {
            fds.next()
                .ok_or_else(|| TakeoverError::Unexpected("too few descriptors".into()))
        };
        let lock_file = next()?;
        let lock_listener = if state.lock_listener {
            Some(next()?)
        } else {
            None
        };
        let api = next()?;
        let listeners = (0..state.listeners)
            .map(|_| next())
            .collect::<Result<Vec<_>, _>>()?;
        let mut conns = Vec::with_capacity(state.conns.len());
        for c in &state.conns {
            let client = next()?;
            let backend = if c.backend_fd { Some(next()?) } else { None };
            conns.push((client, backend));
        }
        Ok(Received {
            chan: self.chan,
            state,
            fds: Fds {
                lock_file,
                lock_listener,
                api,
                listeners,
                conns,
            },
        })
    }

    /// Tells the running agent why this successor gives up (it serves on).
    pub fn fail(self, reason: &str) {
        let _ = wire::send(
            self.chan.as_fd(),
            &Msg::Failed {
                reason: reason.into(),
            },
        );
    }

    fn failed(&self, e: TakeoverError) -> TakeoverError {
        let _ = wire::send(
            self.chan.as_fd(),
            &Msg::Failed {
                reason: e.to_string(),
            },
        );
        e
    }
}

/// A hand-over received and not yet decided.
pub struct Pending {
    chan: OwnedFd,
}

impl Received {
    /// The state, the descriptors, and the decision still to make.
    pub fn into_parts(self) -> (State, Fds, Pending) {
        (self.state, self.fds, Pending { chan: self.chan })
    }
}

impl Pending {
    /// The commit point: once the running agent reads this, everything is
    /// this agent's. Its `Done` (or its exit) confirms.
    pub fn commit(self) -> Result<(), TakeoverError> {
        wire::send(self.chan.as_fd(), &Msg::Commit)?;
        match wire::recv(self.chan.as_fd()) {
            Ok(Msg::Done) | Err(WireError::Closed) => Ok(()),
            Ok(m) => Err(TakeoverError::Unexpected(format!("{m:?} after Commit"))),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives up before the commit point: the running agent serves on.
    pub fn fail(self, reason: &str) {
        let _ = wire::send(
            self.chan.as_fd(),
            &Msg::Failed {
                reason: reason.into(),
            },
        );
    }
}

/// Reads and decodes the state from its memory file.
fn read_state(memfd: OwnedFd) -> Result<State, TakeoverError> {
    let f = std::fs::File::from(memfd);
    let len = f
        .metadata()
        .map_err(|e| TakeoverError::Wire(WireError::Io(e)))?
        .len();
    if len > wire::MAX_STATE_BYTES {
        return Err(TakeoverError::Unexpected(format!("a state of {len} bytes")));
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(len as usize)
        .map_err(|_| TakeoverError::Unexpected(format!("no memory for a state of {len} bytes")))?;
    buf.resize(len as usize, 0);
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| TakeoverError::Wire(WireError::Io(e)))?;
    Ok(wire::decode_state(&buf)?)
}
