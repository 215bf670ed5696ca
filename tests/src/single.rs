//! A single-node world for data-path tests: a client, a node running the
//! agent, and a pod running `shepherd-echo` on a managed and an unmanaged
//! port, with a capture on the client's interface counting RSTs.
//!
//! Integration tests pass the echo binary's path (`echo_bin!()`).

use crate::agent::Agent;
use crate::capture::{Capture, CaptureReport};
use crate::names::unique_prefix;
use crate::process::{wait_tcp_ready, Workload};
use crate::stream::connect_in;
use crate::topology::SingleNode;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

/// The managed port of the pod's echo server.
pub const PORT: u16 = 7000;
/// A port the pod serves that is never registered.
pub const UNMANAGED_PORT: u16 = 7001;

/// One scenario's world. Fields drop in declaration order: capture and agent
/// first, then the workload, then the namespaces.
pub struct World {
    pub capture: Option<Capture>,
    pub agent: Agent,
    pub echo: Workload,
    pub dir: tempfile::TempDir,
    pub t: SingleNode,
}

impl World {
    pub fn new(echo_bin: &Path, tag: &str, agent_args: &[&str]) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = SingleNode::new(&unique_prefix(tag));
        let echo = start_echo(echo_bin, &t, dir.path());
        let capture = Some(Capture::start(&t.client, t.client_if()));
        let agent = crate::agent::start_single(&t, agent_args);
        World {
            capture,
            agent,
            echo,
            dir,
            t,
        }
    }

    pub fn ep(&self) -> SocketAddrV4 {
        self.t.pod_addr(PORT)
    }

    pub fn register(&self) {
        let ep = self.ep().to_string();
        let v = self.agent.cli_json(&["endpoint", "add", &ep]);
        assert_eq!(v["endpoints"][0]["endpoint"], ep.as_str(), "{v}");
    }

    /// Stops the capture and asserts that no RST crossed the client's interface.
    pub fn assert_no_rst(&mut self) -> CaptureReport {
        let report = self.capture.take().expect("capture running").stop();
        assert!(report.error.is_none(), "capture failed: {:?}", report.error);
        assert!(report.tcp_packets > 0, "the capture saw no TCP at all");
        assert_eq!(report.rsts, 0, "RSTs on the wire: {:#?}", report.rst_lines);
        report
    }

    pub fn peers(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("peers.log")).unwrap_or_default()
    }

    /// A new connection to the endpoint: 64 bytes of `fill` out, the same
    /// 64 back (5 s at most), then closed.
    pub fn one_echo(&self, fill: u8) -> std::io::Result<()> {
        let (mut s, _) = connect_in(&self.t.client, self.ep())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let msg = [fill; 64];
        s.write_all(&msg)?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back)?;
        if back != msg {
            return Err(std::io::Error::other(format!(
                "echo differs: sent {fill:#x}s, got {:?}",
                &back[..8]
            )));
        }
        Ok(())
    }

    pub fn status(&self, id: &str) -> Value {
        self.agent.cli_json(&["migrate", "status", "--id", id])
    }
}

pub fn start_echo(echo_bin: &Path, t: &SingleNode, dir: &Path) -> Workload {
    let managed = t.pod_addr(PORT).to_string();
    let unmanaged = t.pod_addr(UNMANAGED_PORT).to_string();
    let peer_log = dir.join("peers.log");
    let w = Workload::spawn_in(
        &t.pod,
        echo_bin,
        [
            "--listen",
            &managed,
            "--listen",
            &unmanaged,
            "--peer-log",
            peer_log.to_str().expect("utf-8 path"),
        ],
        &dir.join("echo.log"),
    );
    for port in [PORT, UNMANAGED_PORT] {
        if let Err(e) = wait_tcp_ready(
            &t.client,
            SocketAddr::V4(t.pod_addr(port)),
            Duration::from_secs(10),
        ) {
            panic!("{e}; echo log:\n{}", w.log());
        }
    }
    w
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Panics if the agent's fwmark rule is still in `node`'s namespace (a
/// stopped agent removes the policy rule and route it installed).
pub fn assert_no_policy_rule(node: &str) {
    let rules = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["-n", node, "rule"])
            .output()
            .expect("ip rule")
            .stdout,
    )
    .into_owned();
    assert!(
        !rules.contains("0x53480001"),
        "fwmark rule left behind:\n{rules}"
    );
}
