//! Checkpoint and restore with the real `criu` binary (docs/toolchain.md, "CRIU").
//!
//! [`dump`] and [`restore`] run CRIU synchronously, exactly as docs/toolchain.md
//! says works here, and return how long it took; a failure is a [`CriuError`]
//! carrying the command, the exit status, CRIU's output and the last lines of
//! its log. The binary is `/usr/local/sbin/criu` (what `cargo xtask setup`
//! installs), else `criu` in PATH; anything older than 4.2 is refused (3.17
//! and 4.1 fail on this kernel).
//!
//! - CRIU runs inside the pod's network namespace (`nsenter --net=`), so it
//!   dumps and restores the pod's sockets rather than treating the netns as
//!   something to dump.
//! - [`Images`] owns a temporary directory for the images (removed on drop,
//!   never left behind); CRIU's logs and the restore pidfile sit beside the
//!   image directory, not in it, so they are readable even when the images
//!   filled their disk, and [`Images::copy_to`] (moving the images to node B)
//!   copies images only. [`Images::on_tmpfs`] puts the images on a small tmpfs
//!   of their own, to make a dump fail half-way with ENOSPC.
//!
//! **The pid problem.** CRIU restores every process under its original pid. A
//! dump (without `--leave-running`) kills the workload, but a
//! [`Workload`](crate::process::Workload) is our child, so it stays a zombie,
//! holding its pid, until it is reaped. Call
//! [`Workload::wait_exit`](crate::process::Workload::wait_exit) after the dump
//! and before the restore:
//!
//! ```ignore
//! let images = Images::new();
//! criu::dump(&t.pod_a, echo.pid(), &images, &DumpOpts::default())?;
//! echo.wait_exit(Duration::from_secs(5)).expect("dumped workload exits");
//! let on_b = images.copy_to();
//! let (restored, _) = criu::restore(&t.pod_b, &on_b, true)?;
//! t.switch_routes();
//! ```
//!
//! [`restore`] checks the pids recorded in the images (`core-PID.img`) first,
//! and fails with that advice if one is still taken.
//!
//! **Restored processes.** `criu restore -d` detaches: CRIU exits and its
//! restored tree loses its parent. [`restore`] therefore makes the calling
//! process a child subreaper (`PR_SET_CHILD_SUBREAPER`, process-wide, for the
//! rest of its life), so the restored tree is reparented to us rather than to
//! PID 1. A [`RestoredProcess`] then owns its pid the way a `Child` does: the
//! pid can't be recycled until we reap it, and drop sends SIGKILL and reaps it
//! with `waitpid`. Should the process not be our child after all, the guard
//! falls back to checking the process's start time before signalling and to
//! polling `/proc/PID` until it is gone (PID 1 of this VM reaps orphans only
//! every ~2 s).
//!
//! **Network lock.** The dump locks each TCP connection with iptables rules in
//! the pod's netns (`--network-lock iptables`); after a successful dump they
//! stay there and drop the client's packets, so the dead pod never answers
//! with RST. The restore, in pod B's fresh netns, ends by deleting rules that
//! only exist in pod A's netns: it logs `Error (criu/netfilter.c:…): Iptables
//! configuration failed` and still exits 0 (docs/toolchain.md: ignore it). [`restore`]
//! judges success by CRIU's exit status (or "Restore finished successfully" in
//! its log) and by the pidfile's process being alive, never by error lines.
//!
//! **Failed dumps roll back**: CRIU unlocks the connections, takes the sockets
//! out of repair mode and lets the process run on, whether it failed half-way
//! (e.g. ENOSPC writing pages) or a post-dump action script vetoed a complete
//! dump ([`DumpOpts::action_script`]). A read-only image directory does not
//! make a dump fail here: we are root, and root writes through mode 0500.

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::pid_alive;

mod images;
mod restored;
pub use images::Images;
use restored::proc_state;
pub use restored::{become_subreaper, RestoredProcess};

/// Where `cargo xtask setup` installs CRIU.
pub const CRIU_PATH: &str = "/usr/local/sbin/criu";
/// The oldest CRIU that works on this kernel (docs/toolchain.md): 4.2.
pub const MIN_VERSION: (u32, u32) = (4, 2);
/// How many lines of CRIU's log a [`CriuError`] carries.
pub const LOG_TAIL_LINES: usize = 30;
/// A dump or restore taking longer than this is killed and reported.
const CRIU_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a dropped [`RestoredProcess`] that is not our child may take to
/// disappear from /proc.
pub(crate) const GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRIU binary in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criu {
    /// Its path.
    pub path: PathBuf,
    /// `criu --version`, as (major, minor, patch).
    pub version: (u32, u32, u32),
}

/// Finds CRIU ([`CRIU_PATH`], else `criu` in PATH) and checks that it is at
/// least [`MIN_VERSION`]. The answer is cached for the process.
pub fn criu() -> Result<&'static Criu, CriuError> {
    static FOUND: OnceLock<Result<Criu, String>> = OnceLock::new();
    FOUND
        .get_or_init(find_criu)
        .as_ref()
        .map_err(|why| CriuError::setup("find", why.clone()))
}

fn find_criu() -> Result<Criu, String> {
    let path = if Path::new(CRIU_PATH).is_file() {
        PathBuf::from(CRIU_PATH)
    } else {
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("criu"))
                    .find(|c| c.is_file())
            })
            .ok_or_else(|| {
                format!("no CRIU: neither {CRIU_PATH} nor `criu` in PATH; run `cargo xtask setup`")
            })?
    };
    let out = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("run `{} --version`: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "`{} --version` printed no version ({}): {text}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(format!(
            "{} is CRIU {}.{}.{}, but {}.{} or newer is needed on this kernel (docs/toolchain.md); \
             run `cargo xtask setup`",
            path.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1
        ));
    }
    Ok(Criu { path, version })
}

/// Parses `Version: 4.2.1` (or `Version: 4.2`) out of `criu --version`.
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut parts = v.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
    });
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

// ---------------------------------------------------------------------------
// CriuError

/// A failed CRIU operation, with everything needed to see why: a boxed
/// [`CriuFailure`], whose fields it derefs to (`err.log_tail`, ...).
#[derive(Debug, Clone)]
pub struct CriuError(Box<CriuFailure>);

/// The details of a [`CriuError`].
#[derive(Debug, Clone)]
pub struct CriuFailure {
    /// `"find"`, `"dump"` or `"restore"`.
    pub op: &'static str,
    /// One line: what went wrong.
    pub what: String,
    /// The command run, if one was.
    pub command: Option<String>,
    /// Its exit status, if it exited.
    pub status: Option<ExitStatus>,
    /// CRIU's stdout and stderr.
    pub output: String,
    /// The last [`LOG_TAIL_LINES`] lines of CRIU's log (`dump.log`,
    /// `restore.log`).
    pub log_tail: String,
    /// How long the command ran.
    pub elapsed: Duration,
}

impl std::ops::Deref for CriuError {
    type Target = CriuFailure;
    fn deref(&self) -> &CriuFailure {
        &self.0
    }
}

impl From<CriuFailure> for CriuError {
    fn from(f: CriuFailure) -> CriuError {
        CriuError(Box::new(f))
    }
}

impl CriuError {
    fn setup(op: &'static str, what: String) -> CriuError {
        CriuFailure {
            op,
            what,
            command: None,
            status: None,
            output: String::new(),
            log_tail: String::new(),
            elapsed: Duration::ZERO,
        }
        .into()
    }

    fn with_op(mut self, op: &'static str) -> CriuError {
        self.0.op = op;
        self
    }
}

impl fmt::Display for CriuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "criu {} failed: {}", self.op, self.what)?;
        if let Some(cmd) = &self.command {
            write!(f, "\n  command: {cmd}\n  after {:?}", self.elapsed)?;
        }
        if let Some(status) = self.status {
            write!(f, ", {status}")?;
        }
        if !self.output.trim().is_empty() {
            write!(f, "\n  output:\n{}", self.output.trim_end())?;
        }
        if !self.log_tail.is_empty() {
            write!(f, "\n  log (last lines):\n{}", self.log_tail.trim_end())?;
        }
        Ok(())
    }
}

impl std::error::Error for CriuError {}

// ---------------------------------------------------------------------------
// Running CRIU

struct Run {
    command: String,
    status: ExitStatus,
    output: String,
    elapsed: Duration,
}

/// Runs `nsenter --net=POD -- criu ARGS` with stdout and stderr to `out_file`,
/// killing it after [`CRIU_TIMEOUT`].
fn run_criu(
    op: &'static str,
    pod: &Netns,
    args: &[String],
    out_file: &Path,
) -> Result<Run, CriuError> {
    let criu = criu().map_err(|e| e.with_op(op))?;
    let command = format!(
        "nsenter --net={} -- {} {}",
        pod.path().display(),
        criu.path.display(),
        args.join(" ")
    );
    let fail = |what: String, elapsed: Duration| CriuFailure {
        op,
        what,
        command: Some(command.clone()),
        status: None,
        output: String::new(),
        log_tail: String::new(),
        elapsed,
    };
    let out = File::create(out_file).map_err(|e| {
        fail(
            format!("create {}: {e}", out_file.display()),
            Duration::ZERO,
        )
    })?;
    let err = out
        .try_clone()
        .map_err(|e| fail(format!("dup {}: {e}", out_file.display()), Duration::ZERO))?;
    let t0 = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", pod.path().display()))
        .arg("--")
        .arg(&criu.path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| fail(format!("spawn nsenter: {e}"), Duration::ZERO))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if t0.elapsed() < CRIU_TIMEOUT => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                // Our unreaped child: killing it by pid is safe.
                let _ = child.kill();
                let _ = child.wait();
                let mut e = fail(format!("timed out after {CRIU_TIMEOUT:?}"), t0.elapsed());
                e.output = fs::read_to_string(out_file).unwrap_or_default();
                return Err(e.into());
            }
            Err(e) => return Err(fail(format!("waitpid: {e}"), t0.elapsed()).into()),
        }
    };
    let elapsed = t0.elapsed();
    Ok(Run {
        command,
        status,
        output: fs::read_to_string(out_file).unwrap_or_default(),
        elapsed,
    })
}

/// The last `n` lines of `path` (empty if unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_error(op: &'static str, what: String, run: Run, log: &Path) -> CriuError {
    CriuFailure {
        op,
        what,
        command: Some(run.command),
        status: Some(run.status),
        output: run.output,
        log_tail: log_tail(log, LOG_TAIL_LINES),
        elapsed: run.elapsed,
    }
    .into()
}

// ---------------------------------------------------------------------------
// dump

/// What a restore does with the TCP connections in the images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpRestore {
    /// Restore them (`--tcp-established`): the peers see no break.
    Established,
    /// Restore them closed (`--tcp-close`): the application finds them closed,
    /// as after a pod-level restart.
    Close,
}

/// The network lock CRIU uses: `SHEPHERD_CRIU_LOCK` = `iptables` (default,
/// the one docs/toolchain.md measured), `nftables`, or `skip` (no lock: only safe
/// when every peer of the pod's connections is a Shepherd proxy that holds
/// them, as in the scale benchmark).
fn network_lock() -> &'static str {
    match std::env::var("SHEPHERD_CRIU_LOCK").as_deref() {
        Ok("nftables") => "nftables",
        Ok("skip") => "skip",
        _ => "iptables",
    }
}

/// Options of [`dump`] beyond what every dump here uses.
#[derive(Debug, Clone, Default)]
pub struct DumpOpts {
    /// `--leave-running`: the process runs on after the dump (its connections
    /// are unlocked again).
    pub leave_running: bool,
    /// `--action-script PATH`: CRIU runs it at each stage with
    /// `CRTOOLS_SCRIPT_ACTION` set (`pre-dump`, `post-dump`, ...). A non-zero
    /// exit at `post-dump` vetoes a complete dump: CRIU rolls back and the
    /// process runs on. Made absolute before use.
    pub action_script: Option<PathBuf>,
}

/// Checkpoints the process tree of `pid` in `pod`'s netns into `images`:
///
/// `nsenter --net=POD criu dump -t PID -D IMAGES --tcp-established
/// --network-lock iptables -o ROOT/dump.log -v4` (plus `--leave-running`,
/// `--action-script` from `opts`).
///
/// Returns how long CRIU ran. Without `leave_running` the process is dead
/// afterwards, but see the module docs: a
/// [`Workload`](crate::process::Workload) must still be reaped
/// before its images can be restored. On failure, CRIU has rolled back and the
/// process runs on; the error carries the log's tail.
pub fn dump(
    pod: &Netns,
    pid: u32,
    images: &Images,
    opts: &DumpOpts,
) -> Result<Duration, CriuError> {
    let log = images.dump_log_path();
    let _ = fs::remove_file(&log);
    let mut args: Vec<String> = [
        "dump",
        "-t",
        &pid.to_string(),
        "-D",
        &images.path().to_string_lossy(),
        "--tcp-established",
        "--network-lock",
        network_lock(),
        "-o",
        &log.to_string_lossy(),
        "-v4",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if opts.leave_running {
        args.push("--leave-running".into());
    }
    if let Some(script) = &opts.action_script {
        let abs = fs::canonicalize(script).map_err(|e| {
            CriuError::setup("dump", format!("action script {}: {e}", script.display()))
        })?;
        args.push("--action-script".into());
        args.push(abs.to_string_lossy().into_owned());
    }
    let run = run_criu("dump", pod, &args, &images.root().join("criu-dump.out"))?;
    if run.status.success() {
        Ok(run.elapsed)
    } else {
        let what = format!("dump of pid {pid} in netns {} failed", pod.name());
        Err(run_error("dump", what, run, &log))
    }
}

// ---------------------------------------------------------------------------
// restore

/// Restores `images` into `pod`'s netns:
///
/// `nsenter --net=POD criu restore -D IMAGES [--tcp-established] -d
/// --pidfile ROOT/restore.pid -o ROOT/restore.log -v4`
///
/// Fails early, with advice, if a pid recorded in the images is still taken
/// (see "The pid problem" in the module docs). Makes the calling process a
/// child subreaper (see "Restored processes"). Succeeds when CRIU exited 0 (or
/// logged "Restore finished successfully") and the pidfile names a live
/// process, whatever error lines the log has (the unlock step in a fresh netns
/// always logs some). Returns the guard of the restored root process and how
/// long CRIU ran.
pub fn restore(
    pod: &Netns,
    images: &Images,
    tcp: TcpRestore,
) -> Result<(RestoredProcess, Duration), CriuError> {
    criu().map_err(|e| e.with_op("restore"))?;
    let taken: Vec<String> = images_pids(images)
        .into_iter()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .map(|pid| format!("{pid} ({})", proc_state(pid).unwrap_or('?')))
        .collect();
    if !taken.is_empty() {
        return Err(CriuError::setup(
            "restore",
            format!(
                "pids recorded in {} are still taken: {} (state Z is a zombie: reap the dumped \
                 workload first, e.g. Workload::wait_exit)",
                images.path().display(),
                taken.join(", ")
            ),
        ));
    }
    become_subreaper()
        .map_err(|e| CriuError::setup("restore", format!("PR_SET_CHILD_SUBREAPER: {e}")))?;

    let (log, pidfile) = (images.restore_log_path(), images.pidfile());
    let _ = fs::remove_file(&log);
    let _ = fs::remove_file(&pidfile);
    let mut args: Vec<String> = vec![
        "restore".into(),
        "-D".into(),
        images.path().to_string_lossy().into_owned(),
    ];
    match tcp {
        TcpRestore::Established => args.push("--tcp-established".into()),
        TcpRestore::Close => args.push("--tcp-close".into()),
    }
    for a in ["-d", "--pidfile"] {
        args.push(a.into());
    }
    args.push(pidfile.to_string_lossy().into_owned());
    args.push("-o".into());
    args.push(log.to_string_lossy().into_owned());
    args.push("-v4".into());
    let run = run_criu(
        "restore",
        pod,
        &args,
        &images.root().join("criu-restore.out"),
    )?;

    let pid = fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let finished = run.status.success()
        || fs::read_to_string(&log).is_ok_and(|l| l.contains("Restore finished successfully"));
    if !finished {
        // A failed restore kills the tasks it had forked, and they are
        // reparented to us (a subreaper): reap them, or their pids stay
        // taken (zombies) and a retry, say back where the pod was, fails.
        for pid in images_pids(images) {
            crate::process::reap(pid, Duration::from_secs(2));
        }
    }
    match pid {
        Some(pid) if finished && pid_alive(pid) => {
            let elapsed = run.elapsed;
            Ok((RestoredProcess::adopt(pid), elapsed))
        }
        Some(pid) => {
            // If CRIU left it behind as our (reparented) child, it is ours:
            // kill and reap it. Anything else under that pid is not ours.
            let state = proc_state(pid);
            RestoredProcess::kill_if_ours(pid);
            let what = if finished {
                format!("restored pid {pid} is not running (state {state:?})")
            } else {
                format!(
                    "restore into netns {} failed (pidfile named {pid})",
                    pod.name()
                )
            };
            Err(run_error("restore", what, run, &log))
        }
        None => {
            let what = format!(
                "restore into netns {} failed: no pid in {}",
                pod.name(),
                pidfile.display()
            );
            Err(run_error("restore", what, run, &log))
        }
    }
}

/// The pids and tids recorded in the images: one `core-TID.img` per thread.
fn images_pids(images: &Images) -> Vec<u32> {
    images
        .files()
        .iter()
        .filter_map(|n| n.strip_prefix("core-")?.strip_suffix(".img")?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn parses_criu_versions() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(
            parse_version("Version: 4.2\nGitID: v4.2\n"),
            Some((4, 2, 0))
        );
        assert_eq!(parse_version("Version: 3.17.1-dirty\n"), Some((3, 17, 1)));
        assert_eq!(parse_version("criu: unknown\n"), None);
    }
}
