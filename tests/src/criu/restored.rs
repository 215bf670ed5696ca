//! [`RestoredProcess`]: the root of a restored process tree, owned like a
//! child (see the parent module's docs on the pid problem).
use std::io;
use std::time::{Duration, Instant};

use super::GONE_TIMEOUT;
use crate::process::{pid_alive, proc_stat_fields, signal_pid};

pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn proc_state(pid: u32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// (parent pid, start time in clock ticks since boot) of `pid`.
fn proc_parent_and_start(pid: u32) -> Option<(u32, u64)> {
    let f = proc_stat_fields(pid)?;
    // stat(5): field 4 is ppid, field 22 starttime; `f` starts at field 3.
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// The root process of a restored tree, killed on drop; see the module docs.
#[derive(Debug)]
pub struct RestoredProcess {
    pid: u32,
    /// Start time when adopted: tells this process from a later one that got
    /// the same pid (only needed when it is not our child).
    start_time: Option<u64>,
    /// Reparented to us (we are a subreaper): reaped with waitpid on drop.
    child: bool,
    reaped: bool,
}

impl RestoredProcess {
    /// A restore that failed left `pid` behind: if it is our (reparented)
    /// child, kill and reap it; anything else under that pid is not ours.
    pub(super) fn kill_if_ours(pid: u32) {
        let mut leftover = RestoredProcess::adopt(pid);
        if !leftover.child {
            leftover.reaped = true;
        }
    }

    pub(super) fn adopt(pid: u32) -> RestoredProcess {
        let found = proc_parent_and_start(pid);
        RestoredProcess {
            pid,
            start_time: found.map(|(_, start)| start),
            child: found.is_some_and(|(ppid, _)| ppid == std::process::id()),
            reaped: false,
        }
    }

    /// The restored process's pid (the original one).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether CRIU's restored tree was reparented to this process (see the
    /// module docs); if not, drop falls back to polling /proc.
    pub fn is_our_child(&self) -> bool {
        self.child
    }

    /// Whether `pid` is still this process (not reaped, not reused).
    fn is_same_process(&self) -> bool {
        if self.reaped {
            return false;
        }
        if self.child {
            return true; // unreaped: the pid can't have been reused
        }
        self.start_time.is_some()
            && proc_parent_and_start(self.pid).map(|(_, s)| s) == self.start_time
    }

    /// Sends `sig` to the process. Fails with ESRCH once it is gone.
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        if !self.is_same_process() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        signal_pid(self.pid, sig)
    }

    /// Whether the process runs (exists and is not a zombie).
    pub fn is_alive(&self) -> bool {
        self.is_same_process() && pid_alive(self.pid)
    }
}

/// Reaps the listed pids (children of a restored root, reparented to us once
/// the root is gone) when dropped.
struct ReapLater(Vec<u32>);

impl Drop for ReapLater {
    fn drop(&mut self) {
        for pid in &self.0 {
            crate::process::reap(*pid, Duration::from_secs(2));
        }
    }
}

impl Drop for RestoredProcess {
    fn drop(&mut self) {
        if !self.is_same_process() {
            return;
        }
        // The restored tree may have more processes (a pod of two): they are
        // ours too. Kill them first; as the subreaper we reap them below.
        let descendants: Vec<u32> = crate::process::process_tree(self.pid)
            .into_iter()
            .skip(1)
            .collect();
        for pid in &descendants {
            let _ = signal_pid(*pid, libc::SIGKILL);
        }
        // Reaped after the root: its dead children are reparented to us then.
        let _reap_descendants = ReapLater(descendants);
        if let Err(e) = signal_pid(self.pid, libc::SIGKILL) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                eprintln!("warning: SIGKILL restored process {}: {e}", self.pid);
            }
        }
        if self.child {
            let pid = self.pid as libc::pid_t;
            loop {
                let mut status = 0;
                // SAFETY: waitpid on our own child with a valid status pointer.
                let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
                if rc == pid {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                eprintln!("warning: reap restored process {pid}: {e}");
                break;
            }
        } else {
            let deadline = Instant::now() + GONE_TIMEOUT;
            while self.is_same_process_on_proc() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.is_same_process_on_proc() {
                eprintln!(
                    "warning: restored process {} still in /proc {GONE_TIMEOUT:?} after SIGKILL",
                    self.pid
                );
            }
        }
        self.reaped = true;
    }
}

impl RestoredProcess {
    /// For the not-our-child case: `/proc/PID` still shows this process (alive
    /// or a zombie nobody reaped yet).
    fn is_same_process_on_proc(&self) -> bool {
        proc_parent_and_start(self.pid).map(|(_, s)| s) == self.start_time
    }
}
