//! The running agent's side of a hand-over: it listens on the hand-over
//! socket (next to the API socket, root only), and hands everything to a
//! successor that asks, then lets go. Until the successor's `Commit`
//! arrives, any failure (a refusal, a timeout, a malformed message, the
//! successor dying) leaves this agent serving as before.
//!
//! The sequence (LIFECYCLE.md tells it with the successor's side):
//! 1. `Hello` → the protocol is checked; `Refused` if it differs.
//! 2. `Welcome`, then the maps' and links' descriptors. The successor
//!    loads its programs with those maps now, while this agent still
//!    serves: the pause does not include the verifier.
//! 3. `Ready` → the control plane and the data plane freeze; the state goes
//!    in a memory file, and it and every descriptor are sent.
//! 4. `Commit` (the commit point) → `Done`; the frozen connections close
//!    their descriptors without a FIN, and the agent exits.
use super::scm;
use super::wire::{self, Msg, State, WireError};
use crate::control::Control;
use crate::intercept::ebpf::EbpfInterception;
use crate::relay::freeze::Freezer;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a successor may take at each step before this agent gives up
/// on it and serves on.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the freeze may take: calls in progress (a hold waiting for its
/// pod to quiesce) and every connection reaching a stop.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a successor may take at each step once the data plane is
/// frozen: every client waits meanwhile, so a successor that hangs there
/// is given up on sooner.
pub const FROZEN_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The hand-over socket of an agent serving `api_socket`.
pub fn socket_path(api_socket: &Path) -> PathBuf {
    let mut p = api_socket.as_os_str().to_owned();
    p.push(".handover");
    PathBuf::from(p)
}

/// The descriptors an agent hands over besides its connections'.
#[derive(Clone, Debug)]
pub struct AgentFds {
    pub lock_file: RawFd,
    pub lock_listener: Option<RawFd>,
    pub api: RawFd,
    pub listeners: Vec<RawFd>,
}

/// What the server needs of the running agent.
pub struct Serving {
    pub control: Arc<Control>,
    pub freezer: Arc<Freezer>,
    pub intercept: Arc<EbpfInterception>,
    pub fds: AgentFds,
    /// Data-plane accept loops (one per listener).
    pub loops: usize,
    pub started: SystemTime,
    pub handovers: u64,
    /// The protocol it speaks (tests make it speak another).
    pub protocol: u32,
    pub runtime: tokio::runtime::Handle,
}

/// Binds the hand-over socket (replacing a stale file: the caller holds
/// the node's agent lock).
pub fn bind(path: &Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = socket::bind(fd.as_raw_fd(), &addr);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    bound?;
    socket::listen(&fd, socket::Backlog::new(4)?)?;
    Ok(fd)
}

/// Serves successors on `listener` until one takes over; then `committed`
/// fires and the thread ends. Runs on its own thread (the protocol is
/// blocking; it enters the agent's runtime for the freeze).
pub fn spawn(
    listener: OwnedFd,
    serving: Serving,
    committed: tokio::sync::oneshot::Sender<HandedOver>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("shepherd-handover".into())
        .spawn(move || {
            loop {
                let conn = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 just returned this descriptor to us.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(e) => {
                        tracing::warn!(error = %e, "hand-over socket accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match serve_one(conn.as_fd(), &serving) {
                    Ok(done) => {
                        let _ = committed.send(done);
                        return;
                    }
                    Err(why) => {
                        tracing::warn!(reason = %why, "hand-over not done; this agent serves on");
                    }
                }
            }
        })
}

/// Thaws an agent whose hand-over did not finish (dropped in a panic).
struct Unfinished<'a>(&'a Serving);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.0.freezer.thaw();
        self.0.control.thaw();
        self.0.freezer.set_handing_over(false);
    }
}

/// What the agent handed over, for its last log line.
#[derive(Debug)]
pub struct HandedOver {
    pub connections: usize,
    pub successor_pid: u32,
    pub frozen_for: Duration,
}

fn timeouts(chan: BorrowedFd<'_>, step: Duration) {
    let t = nix::sys::time::TimeVal::new(step.as_secs() as i64, 0);
    let _ = socket::setsockopt(&chan, socket::sockopt::ReceiveTimeout, &t);
    let _ = socket::setsockopt(&chan, socket::sockopt::SendTimeout, &t);
}

/// One successor, from its `Hello` to the commit or a failure. `Err`: this
/// agent serves on (everything was undone), with why.
fn serve_one(chan: BorrowedFd<'_>, s: &Serving) -> Result<HandedOver, String> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match crate::single_instance::peer_cred(chan) {
        Some(c) if c.uid == 0 || c.uid == me => {}
        c => {
            return Err(format!(
                "a process of uid {:?} (pid {:?}) asked for a hand-over; only root or the agent's own user may",
                c.map(|c| c.uid),
                c.map(|c| c.pid)
            ))
        }
    }
    timeouts(chan, STEP_TIMEOUT);
    let (protocol, version, pid) = match wire::recv(chan) {
        Ok(Msg::Hello {
            protocol,
            version,
            pid,
        }) => (protocol, version, pid),
        Ok(m) => return Err(format!("expected Hello, got {m:?}")),
        Err(e) => return Err(e.to_string()),
    };
    tracing::info!(successor_pid = pid, successor_version = %version, protocol, "a successor asks for a hand-over");
    if protocol != s.protocol {
        let reason = format!(
            "the successor speaks hand-over protocol {protocol} (shepherd {version}); this agent \
             (shepherd {}) speaks {}: it keeps serving. Upgrade through a version that speaks \
             both, or stop this agent (its connections end) and start the new one",
            env!("CARGO_PKG_VERSION"),
            s.protocol
        );
        let _ = wire::send(
            chan,
            &Msg::Refused {
                reason: reason.clone(),
            },
        );
        return Err(reason);
    }
    if !s.freezer.begin_handover() {
        let reason = "the agent is stopping".to_string();
        let _ = wire::send(
            chan,
            &Msg::Refused {
                reason: reason.clone(),
            },
        );
        return Err(reason);
    }
    // Whatever happens below (a panic included), an unfinished hand-over
    // thaws everything.
    let guard = Unfinished(s);
    let result = hand_over(chan, s, pid);
    std::mem::forget(guard);
    if let Err(why) = &result {
        let _ = wire::send(
            chan,
            &Msg::Failed {
                reason: why.clone(),
            },
        );
        s.freezer.thaw();
        s.control.thaw();
        s.freezer.set_handing_over(false);
    }
    result
}

fn hand_over(chan: BorrowedFd<'_>, s: &Serving, successor_pid: u32) -> Result<HandedOver, String> {
    let (kernel, kernel_fds) = s.intercept.handover_fds().map_err(|e| e.to_string())?;
    wire::send(
        chan,
        &Msg::Welcome {
            protocol: s.protocol,
            version: env!("CARGO_PKG_VERSION").into(),
            kernel,
        },
    )
    .map_err(|e| e.to_string())?;
    let borrowed: Vec<BorrowedFd<'_>> = kernel_fds.iter().map(AsFd::as_fd).collect();
    scm::send_fds(chan, &borrowed).map_err(|e| e.to_string())?;
    drop(borrowed);
    drop(kernel_fds);
    expect(chan, "Ready", |m| matches!(m, Msg::Ready))?;

    // The pause starts here.
    let frozen = Instant::now();
    timeouts(chan, FROZEN_STEP_TIMEOUT);
    let mut steps = Steps::new(frozen);
    s.runtime
        .block_on(s.control.freeze(FREEZE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    steps.mark("control frozen");
    let conns = s
        .runtime
        .block_on(s.freezer.freeze(s.loops, FREEZE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    steps.mark("connections frozen");
    let mut draining = BTreeMap::new();
    let mut fds: Vec<RawFd> = vec![s.fds.lock_file];
    fds.extend(s.fds.lock_listener);
    fds.push(s.fds.api);
    fds.extend(&s.fds.listeners);
    let mut states = Vec::with_capacity(conns.len());
    for c in conns {
        if c.endpoint.is_draining() {
            draining
                .entry(c.endpoint.addr)
                .or_insert_with(|| c.endpoint.snapshot());
        }
        fds.push(c.client);
        fds.extend(c.backend);
        states.push(wire::Conn {
            backend_fd: c.backend.is_some(),
            draining: c.endpoint.is_draining(),
            state: c.state,
        });
    }
    let count = states.len();
    let state = State {
        version: env!("CARGO_PKG_VERSION").into(),
        started: s.started,
        handovers: s.handovers,
        control: s.control.snapshot(),
        draining: draining.into_values().collect(),
        conns: states,
        listeners: s.fds.listeners.len(),
        lock_listener: s.fds.lock_listener.is_some(),
    };
    debug_assert_eq!(state.descriptors(), fds.len());
    let encoded = wire::encode_state(&state).map_err(|e| e.to_string())?;
    let memfd = memfd_with(&encoded).map_err(|e| format!("a memory file for the state: {e}"))?;
    steps.mark("state encoded");
    wire::send(
        chan,
        &Msg::State {
            descriptors: fds.len(),
        },
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: every descriptor here is open and stays open while this
    // thread runs: the frozen connections keep theirs until the verdict,
    // and the agent keeps its listeners and locks.
    let borrowed: Vec<BorrowedFd<'_>> = std::iter::once(memfd.as_fd())
        .chain(fds.iter().map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) }))
        .collect();
    scm::send_fds(chan, &borrowed).map_err(|e| e.to_string())?;
    steps.mark("descriptors sent");
    expect(chan, "Commit", |m| matches!(m, Msg::Commit))?;
    steps.mark("commit received");
    // The commit point: the successor owns everything now, the kernel's
    // maps included: nothing this agent still does may change them (a
    // connection that was only closing here must not remove a draining
    // endpoint's entry the successor relays through).
    s.intercept.detach();
    s.control.retire();
    s.freezer.commit();
    let _ = wire::send(chan, &Msg::Done);
    let frozen_for = frozen.elapsed();
    tracing::info!(
        connections = count,
        successor_pid,
        ?frozen_for,
        bytes = encoded.len(),
        steps = %steps,
        "handed over; this agent lets go"
    );
    Ok(HandedOver {
        connections: count,
        successor_pid,
        frozen_for,
    })
}

/// When each step of a hand-over ended, from its start (for the log).
pub struct Steps {
    start: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Steps {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Vec::new(),
        }
    }

    pub fn mark(&mut self, step: &'static str) {
        self.marks.push((step, self.start.elapsed()));
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, at)) in self.marks.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{step} {:.1} ms", at.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Waits for the message `what`; a `Failed` or anything else is an error.
fn expect(chan: BorrowedFd<'_>, what: &str, ok: impl Fn(&Msg) -> bool) -> Result<(), String> {
    match wire::recv(chan) {
        Ok(m) if ok(&m) => Ok(()),
        Ok(Msg::Failed { reason }) => Err(format!("the successor failed: {reason}")),
        Ok(m) => Err(format!("expected {what}, got {m:?}")),
        Err(WireError::Closed) => Err(format!(
            "the successor closed the channel (it died?) before {what}"
        )),
        Err(e) => Err(format!("waiting for {what}: {e}")),
    }
}

/// An anonymous memory file holding `bytes` (client payload never goes to
/// a disk).
fn memfd_with(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::Write;
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"shepherd-handover".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned it to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    Ok(OwnedFd::from(f))
}
