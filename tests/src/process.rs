//! Workload processes inside a pod namespace, started so CRIU can dump them.
//!
//! docs/toolchain.md: a workload must be a session leader in the pod's network
//! namespace, must not get a new mount namespace (`ip netns exec` makes one and
//! CRIU's dump then fails with "unreachable sharing"), and must not have pipes
//! to the test as stdio. [`Workload::spawn_in`] therefore runs
//! `nsenter --net=/run/netns/POD -- PROGRAM ARGS` (nsenter with only `--net`
//! execs in place, so the child's pid is the workload's pid), calls `setsid()`
//! in the child before exec, and sends stdout/stderr to a log file.
//!
//! The guard never reaps the process before it is dropped (unless asked to with
//! [`Workload::wait_exit`]), so its pid cannot be reused and signalling it is
//! always safe. Dropping sends SIGKILL to that exact pid and reaps it.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{in_netns, Netns};

/// A process started in a pod namespace; killed and reaped on drop.
#[derive(Debug)]
pub struct Workload {
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
}

impl Workload {
    /// Starts `program args...` in `ns` as a session leader, stdin from
    /// /dev/null, stdout and stderr appended to `log`. Panics if it can't be
    /// started.
    pub fn spawn_in<I, S>(ns: &Netns, program: &Path, args: I, log: &Path) -> Workload
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open workload log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup workload log {}: {e}", log.display()));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs in the forked child before exec. It only
        // calls setsid(2), which is async-signal-safe, allocates nothing and
        // touches no lock or state shared with the parent's other threads.
        // setsid can't fail here: the fresh child is never a group leader.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn nsenter for {}: {e}", program.display()));
        Workload {
            child,
            exited: None,
            log: log.to_owned(),
        }
    }

    /// The workload's pid (nsenter exec'd it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the workload.
    /// Fails with ESRCH once [`wait_exit`](Self::wait_exit) has reaped it.
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        if self.exited.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        signal_pid(self.pid(), sig)
    }

    /// Whether the process exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        self.exited.is_none() && pid_alive(self.pid())
    }

    /// Waits up to `timeout` for the process to exit (e.g. after a CRIU dump
    /// killed it) and reaps it, so its pid is free again: CRIU restores a
    /// process under its original pid. Returns None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    return self.exited;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => return None,
                Err(e) => panic!("waitpid({}): {e}", self.pid()),
            }
        }
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log file's contents so far (empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        // The child is not reaped yet, so this pid is still ours.
        if let Err(e) = signal_pid(self.pid(), libc::SIGKILL) {
            eprintln!("warning: SIGKILL workload {}: {e}", self.pid());
        }
        if let Err(e) = self.child.wait() {
            eprintln!("warning: reap workload {}: {e}", self.pid());
        }
    }
}

/// `kill(pid, sig)`.
pub fn signal_pid(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `pid` exists and is not a zombie (state from `/proc/PID/stat`).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may contain spaces and parentheses.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// Connects to `addr` from inside `ns` until a connection succeeds (then closes
/// it cleanly) or `timeout` passes; returns the last error on timeout.
pub fn wait_tcp_ready(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = in_netns(ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        });
        match attempt {
            Ok(stream) => {
                close_probe(stream);
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{addr} not accepting connections in netns {} after {timeout:?}: {e}",
                        ns.name()
                    ),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connections the harness opened only to see whether something listens.
/// Their teardown can race a capture that starts right after the probe (a
/// FIN retransmitted under load is answered after the server's socket is
/// gone, with an RST), and they are not what any test is about, so
/// [`Capture`](crate::capture::Capture) does not count RSTs on them.
/// Entries expire after [`PROBE_MEMORY`], so a later test's connection that
/// happens to reuse a probe's address and port (namespaces repeat addresses)
/// is counted again.
static PROBES: std::sync::Mutex<Vec<(Instant, SocketAddr)>> = std::sync::Mutex::new(Vec::new());
const PROBE_MEMORY: Duration = Duration::from_secs(20);

/// Whether `addr` (client side) belongs to a recent readiness probe.
pub fn is_probe(addr: SocketAddr) -> bool {
    PROBES.lock().is_ok_and(|p| {
        p.iter()
            .any(|(t, a)| *a == addr && t.elapsed() < PROBE_MEMORY)
    })
}

/// Closes a probe in order: our FIN, then the server's, so the handshake is
/// over before the caller goes on, and records it (see [`PROBES`]).
fn close_probe(mut stream: TcpStream) {
    use std::io::Read;
    if let Ok(local) = stream.local_addr() {
        if let Ok(mut p) = PROBES.lock() {
            p.retain(|(t, _)| t.elapsed() < PROBE_MEMORY);
            p.push((Instant::now(), local));
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

/// Fields after "(comm)" of `/proc/PID/stat`: index 0 is the state (field 3
/// of stat(5)), so stat(5)'s field N is at index N - 3.
pub fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU time of a process (all its threads) so far, in ms;
/// 0 if it is gone.
pub fn cpu_ms(pid: u32) -> f64 {
    let f = proc_stat_fields(pid).unwrap_or_default();
    // utime and stime are stat(5)'s fields 14 and 15, in clock ticks.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf reads a configuration value; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) * 1e3 / hz.max(1.0)
}

/// All pids of the process tree rooted at `root`, root first (read from
/// `/proc/PID/task/TID/children`).
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Raises this process's soft open-file limit to the hard limit (the agent
/// and pods it starts inherit it); returns the new limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::other(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            io::Error::last_os_error()
        )));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::other(format!(
            "setrlimit(RLIMIT_NOFILE, {}): {}",
            lim.rlim_max,
            io::Error::last_os_error()
        )));
    }
    Ok(lim.rlim_max)
}

/// Open descriptors of process `pid` (entries in `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Reaps `pid` if it is our (sub-reaped) child, waiting up to `timeout`.
pub fn reap(pid: u32, timeout: Duration) {
    let until = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a specific pid with WNOHANG; status is a local.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r != 0 || Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
