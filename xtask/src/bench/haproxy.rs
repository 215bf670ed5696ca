//! HAProxy, the steady-state benchmark's proxy baseline: Debian's package in
//! `mode tcp`, in the node namespace, on two ports (defaults, and
//! `option splice-auto`), both relaying to the pod's unregistered port.
use super::steady::DIRECT_PORT;
use anyhow::{bail, Context, Result};
use shepherd_tests::process::{signal_pid, wait_tcp_ready};
use shepherd_tests::topology::SingleNode;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HAPROXY_BIN: &str = "/usr/sbin/haproxy";
pub const HAPROXY_PORT: u16 = 8000;
pub const HAPROXY_SPLICE_PORT: u16 = 8001;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// HAProxy in the node namespace, `ip netns exec NODE haproxy -f CFG -db`
/// (`ip` execs in place, so the child's pid is HAProxy's). Dropping it stops
/// exactly that process: SIGTERM, then SIGKILL after 5 s.
pub struct Haproxy {
    child: Child,
    log: PathBuf,
    pub version: String,
}

impl Haproxy {
    pub fn start(t: &SingleNode, dir: &Path) -> Result<Haproxy> {
        let version = Command::new(HAPROXY_BIN)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.split_whitespace().nth(2).map(|v| format!("HAProxy {v}"))
            })
            .unwrap_or_else(|| "HAProxy".into());
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(t))?;
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let check = Command::new(HAPROXY_BIN)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()?;
        if !check.status.success() {
            bail!(
                "haproxy rejects its configuration: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let child = Command::new("ip")
            .args(["netns", "exec", t.node.name(), HAPROXY_BIN, "-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("spawn haproxy")?;
        let h = Haproxy {
            child,
            log,
            version,
        };
        let addr = SocketAddr::V4(SocketAddrV4::new(t.node_ip, HAPROXY_PORT));
        if let Err(e) = wait_tcp_ready(&t.client, addr, READY_TIMEOUT) {
            bail!("haproxy: {e}; its log:\n{}", h.log());
        }
        h.check_alive()?;
        Ok(h)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&self) -> Result<()> {
        if shepherd_tests::process::pid_alive(self.child.id()) {
            Ok(())
        } else {
            bail!("haproxy exited; its log:\n{}", self.log())
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Not reaped yet, so the pid is still ours.
            let _ = signal_pid(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn haproxy_config(t: &SingleNode) -> String {
    format!(
        "global\n\
         \x20   nbthread 2\n\
         \x20   maxconn 4096\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         frontend fe\n\
         \x20   bind {node}:{HAPROXY_PORT}\n\
         \x20   maxconn 4096\n\
         \x20   default_backend pod\n\
         backend pod\n\
         \x20   server pod {pod}:{DIRECT_PORT} maxconn 4096\n\
         frontend fe_splice\n\
         \x20   bind {node}:{HAPROXY_SPLICE_PORT}\n\
         \x20   maxconn 4096\n\
         \x20   option splice-auto\n\
         \x20   default_backend pod_splice\n\
         backend pod_splice\n\
         \x20   option splice-auto\n\
         \x20   server pod {pod}:{DIRECT_PORT} maxconn 4096\n",
        node = t.node_ip,
        pod = t.pod_ip,
    )
}
