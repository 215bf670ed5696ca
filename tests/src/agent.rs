//! The shepherd agent under test: the [`Agent`] guard, its CLI and its API.
//!
//! [`Agent::start`] runs `ip netns exec NODE shepherd --api-socket SOCK run
//! ARGS...` (ip execs in place, so the child's pid is the agent's) with its output in a log file in a fresh
//! temporary directory, and waits for `GET /healthz` on the Unix socket to
//! answer 200. Dropping the guard sends SIGTERM, then SIGKILL after 5 s, and
//! prints the log's tail if the test is panicking. [`Agent::cli`] runs the same
//! binary as the CLI against the socket; [`Agent::http`] speaks raw HTTP/1.1 to
//! the socket, so tests can also send malformed requests. Declare the agent
//! after the topology, so it drops (stops) before its namespace goes.
//!
//! `ip netns exec` is what the issue asks the agent to survive: it gives the
//! process a private mount namespace with a fresh /sys, so an agent that pins
//! anything must mount bpffs itself. This agent pins nothing yet.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::{pid_alive, signal_pid};

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const TERM_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `shepherd` binary: `$SHEPHERD_BIN` (set by `cargo xtask ci` and
/// `bench`), else the most recently built of `target/{release,debug}/shepherd`
/// (looked for in `$CARGO_TARGET_DIR`, next to the running test executable,
/// and in the workspace's `target/`). Panics if none exists.
pub fn shepherd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SHEPHERD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "SHEPHERD_BIN={} does not exist", p.display());
        return p;
    }
    let mut target_dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(d.into());
    }
    // target/<profile>/deps/<test-exe> → target
    if let Ok(exe) = std::env::current_exe() {
        if let Some(d) = exe.ancestors().nth(3) {
            target_dirs.push(d.to_owned());
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace");
    target_dirs.push(workspace.join("target"));
    // The most recently built of them: a stale release build must not
    // shadow the debug build a developer just made (or the reverse).
    let newest = target_dirs
        .iter()
        .flat_map(|d| ["release", "debug"].map(|profile| d.join(profile).join("shepherd")))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(built, _)| *built);
    if let Some((_, p)) = newest {
        return p;
    }
    panic!(
        "shepherd binary not found (looked in {target_dirs:?}); run `cargo build --release -p shepherd` \
         or set SHEPHERD_BIN"
    );
}

/// A running agent; see the module docs.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    bin: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// Its namespace and `run` arguments (a successor takes the same).
    netns: String,
    args: Vec<std::ffi::OsString>,
    // Last: removed after the agent is gone (and its successors: they
    // share it).
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl Agent {
    /// Starts the agent in `node`'s network namespace (`ip netns exec`) with
    /// `run ARGS...`, and waits (≤ 15 s) until it
    /// answers `GET /healthz` with 200. Panics with the agent's log if it exits
    /// or doesn't become healthy.
    pub fn start<I, S>(node: &Netns, args: I) -> Agent
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let bin = shepherd_bin();
        let dir = tempfile::Builder::new()
            .prefix("shepherd-agent-")
            .tempdir()
            .expect("create the agent's temporary directory");
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut agent = Self::spawn(
            node.name(),
            bin,
            std::sync::Arc::new(dir),
            args,
            "agent.log",
        );
        agent.wait_healthy();
        agent
    }

    /// Starts a successor at `bin` (a copy of the binary elsewhere, or
    /// another build) with this agent's socket, namespace and arguments
    /// plus `extra`, and waits until it answers `/healthz` as itself: it
    /// took over. Its log is `agent-N.log` in the same directory.
    pub fn successor(&self, bin: &Path, extra: &[&str]) -> Agent {
        let mut agent = self.spawn_successor(bin, extra);
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid = agent.pid();
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the successor exited ({status}); its log:\n{}\nthe running agent's log:\n{}",
                    agent.log(),
                    self.log()
                );
            }
            if let Ok((200, body)) = agent.try_http("GET", "/healthz", None) {
                if body.contains(&format!("\"pid\":{pid}")) {
                    return agent;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the successor did not take over within {READY_TIMEOUT:?}; its log:\n{}\nthe running agent's log:\n{}",
                    agent.log(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts a successor (as [`successor`](Self::successor)) without
    /// waiting for anything.
    pub fn spawn_successor(&self, bin: &Path, extra: &[&str]) -> Agent {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        Self::spawn(
            &self.netns,
            bin.to_path_buf(),
            self.dir.clone(),
            args,
            &format!("agent-{n}.log"),
        )
    }

    /// Waits up to `timeout` for the agent to exit; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(
        netns: &str,
        bin: PathBuf,
        dir: std::sync::Arc<tempfile::TempDir>,
        args: Vec<std::ffi::OsString>,
        log_name: &str,
    ) -> Agent {
        let socket = dir.path().join("shepherd.sock");
        let log = dir.path().join(log_name);
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup the agent log fd");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(&bin)
            .arg("--api-socket")
            .arg(&socket)
            .arg("run")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `ip netns exec {netns}` for {}: {e}", bin.display()));
        Agent {
            child,
            bin,
            socket,
            log,
            netns: netns.to_string(),
            args,
            dir,
        }
    }

    /// Waits (≤ 15 s) until the agent answers `/healthz`; panics with its
    /// log if it exits or does not.
    pub fn wait_until_healthy(&mut self) {
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("socket not there yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited during start-up ({status}); log:\n{}",
                    self.log()
                );
            }
            if self.socket.exists() {
                match self.try_http("GET", "/healthz", None) {
                    Ok((200, _)) => return,
                    Ok((code, body)) => last = format!("/healthz answered {code}: {body}"),
                    Err(e) => last = format!("/healthz: {e}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent not healthy after {READY_TIMEOUT:?} ({last}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The API's Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's temporary directory (socket and log live there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's resident memory (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("read /proc/{}/status: {e}", self.pid()));
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid()));
        kb * 1024
    }

    /// The agent's log (stdout and stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the agent process exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        pid_alive(self.pid())
    }

    /// Runs `shepherd --api-socket SOCK ARGS...` (in the caller's namespace)
    /// and returns its output, whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", self.bin.display()))
    }

    /// Runs the CLI with `--json` appended to `args` and parses its stdout.
    /// Panics with stderr if it fails or prints something other than JSON.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut argv = args.to_vec();
        argv.push("--json");
        let out = self.cli(&argv);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!(
                "`shepherd {}` failed ({}): {}{stdout}",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "`shepherd {}` printed non-JSON ({e}): {stdout}",
                argv.join(" ")
            )
        })
    }

    /// One HTTP/1.1 request on the API socket; returns (status, body). A JSON
    /// `body` is sent with `Content-Type: application/json`. Panics on I/O or
    /// protocol errors.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.try_http(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.socket.display()))
    }

    /// Like [`http`](Self::http), returning errors.
    pub fn try_http(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<(u16, String)> {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        let raw = self.raw(req.as_bytes())?;
        parse_response(&raw)
    }

    /// Sends `request` as is on a new connection to the API socket, and returns
    /// everything the agent sent back before closing (≤ 10 s).
    pub fn raw(&self, request: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.set_write_timeout(Some(HTTP_TIMEOUT))?;
        s.write_all(request)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = self.pid();
        if let Ok(None) = self.child.try_wait() {
            if let Err(e) = signal_pid(pid, libc::SIGTERM) {
                eprintln!("warning: SIGTERM agent {pid}: {e}");
            }
            let deadline = Instant::now() + TERM_TIMEOUT;
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    eprintln!("warning: agent {pid} ignored SIGTERM for {TERM_TIMEOUT:?}; SIGKILL");
                    let _ = signal_pid(pid, libc::SIGKILL);
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!(
                "--- last {} lines of the agent log ({}) ---\n{}\n--- end of agent log ---",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Parses an HTTP/1.x response: status code and body (de-chunked if needed).
pub fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what} in response: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("non-UTF-8 headers"))?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| bad("bad status line"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The agent of a [`SingleNode`](crate::topology::SingleNode): intercepting on
/// the client-facing interface, shielding on the pod-facing one, plus `extra`
/// flags.
pub fn start_single(t: &crate::topology::SingleNode, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--intercept-iface",
        t.node_client_if(),
        "--shield-iface",
        t.node_pod_if(),
    ];
    args.extend_from_slice(extra);
    Agent::start(&t.node, args)
}

/// The two agents of a [`TwoNode`](crate::topology::TwoNode) migration: the
/// origin on node A and the destination on node B, each intercepting on its
/// fabric interface and shielding (and translating) on its pod interface,
/// plus `extra` arguments for both.
pub fn start_pair(t: &crate::topology::TwoNode, extra: &[&str]) -> (Agent, Agent) {
    start_pair_with(t, extra, &[], &[])
}

/// [`start_pair`], with `origin_extra` and `dest_extra` for one agent only
/// (say, a second pod interface to shield on).
pub fn start_pair_with(
    t: &crate::topology::TwoNode,
    extra: &[&str],
    origin_extra: &[&str],
    dest_extra: &[&str],
) -> (Agent, Agent) {
    let mut args = vec![
        "--intercept-iface",
        t.node_fabric_if(),
        "--shield-iface",
        t.node_pod_if(),
    ];
    args.extend_from_slice(extra);
    let mut origin_args = args.clone();
    origin_args.extend_from_slice(origin_extra);
    args.extend_from_slice(dest_extra);
    (
        Agent::start(&t.node_a, origin_args),
        Agent::start(&t.node_b, args),
    )
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain).expect("plain"), (200, "ok".into()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"e\r\n2\r\n\"}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).expect("chunked"),
            (404, "{\"e\"}".into())
        );
        assert!(parse_response(b"garbage").is_err());
    }
}
