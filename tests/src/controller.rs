//! The reference migration controller: how an operator drives Shepherd and
//! CRIU for one live migration, through the public `shepherd` CLI only.
//!
//! Sequence (docs/controller-guide.md explains each call):
//! hold on the origin → (new IP: `target` on the origin) → `incoming` on the
//! destination → `criu dump --tcp-established` → copy the images → [extra
//! freeze] → `criu restore` into the pod namespace on node B → switch routes →
//! `complete` on the destination → `release` on the origin. Every step is
//! timed. On any failure the controller aborts and leaves the pod running
//! where it was: a failed dump is rolled back by CRIU; a failed restore on B
//! is followed by a restore of the same images on A.
use crate::agent::Agent;
use crate::criu::{self, DumpOpts, Images, RestoredProcess, TcpRestore};
use crate::topology::TwoNode;
use serde_json::Value;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// How held bytes go back to the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseMode {
    /// CRIU restores the pod's TCP connections; the proxy keeps its sockets.
    Resume,
    /// The pod comes back without its connections (`--tcp-close`); the proxy
    /// reconnects and replays what it held.
    Reconnect,
}

impl ReleaseMode {
    fn as_str(self) -> &'static str {
        match self {
            ReleaseMode::Resume => "resume",
            ReleaseMode::Reconnect => "reconnect",
        }
    }
}

/// What to migrate and how.
#[derive(Clone, Debug)]
pub struct Plan {
    pub id: String,
    /// The pod's endpoints at their current address (held atomically).
    pub endpoints: Vec<SocketAddrV4>,
    pub mode: ReleaseMode,
    /// Wait this long between dump and restore (stretches the freeze).
    pub freeze_extra: Duration,
    /// Switch routes before the restore (a route racing ahead of it).
    pub routes_before_restore: bool,
    /// Use Shepherd (hold/release). Without it this is the CRIU-alone baseline.
    pub shepherd: bool,
    /// Failure injection for tests: put the images on a tmpfs this small, so
    /// the dump fails part-way (ENOSPC) and CRIU must roll back.
    pub image_limit: Option<u64>,
}

impl Plan {
    pub fn new(id: &str, endpoints: Vec<SocketAddrV4>) -> Plan {
        Plan {
            id: id.to_string(),
            endpoints,
            mode: ReleaseMode::Resume,
            freeze_extra: Duration::ZERO,
            routes_before_restore: false,
            shepherd: true,
            image_limit: None,
        }
    }
}

/// The two agents and the topology they run in.
pub struct Cluster<'a> {
    pub topo: &'a TwoNode,
    pub origin: &'a Agent,
    pub dest: &'a Agent,
}

/// What happened, step by step.
#[derive(Debug, Default)]
pub struct Report {
    pub steps: Vec<(&'static str, Duration)>,
    /// Dump start → restore done: how long the pod was frozen.
    pub freeze: Duration,
    /// Hold → release (Shepherd only).
    pub hold: Duration,
    /// The origin's final migration status (Shepherd only).
    pub origin_status: Value,
    /// The destination's final incoming status (Shepherd only).
    pub dest_status: Value,
    pub image_bytes: u64,
}

#[derive(Debug)]
pub struct ControllerError {
    pub step: &'static str,
    pub detail: String,
    /// Where the pod runs after the rollback, if the controller restored it.
    pub rolled_back: Option<RestoredProcess>,
}

impl std::fmt::Display for ControllerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "migration step {:?} failed: {}", self.step, self.detail)
    }
}

fn fail(step: &'static str, detail: impl Into<String>) -> ControllerError {
    ControllerError {
        step,
        detail: detail.into(),
        rolled_back: None,
    }
}

/// Runs the CLI and parses its JSON; `ok_codes` are the exit codes that count
/// as success.
fn call(agent: &Agent, args: &[&str], ok_codes: &[i32]) -> Result<Value, String> {
    let mut argv = args.to_vec();
    argv.push("--json");
    let out = agent.cli(&argv);
    let code = out.status.code().unwrap_or(-1);
    if !ok_codes.contains(&code) {
        return Err(format!(
            "`shepherd {}` exited {code}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`shepherd {}`: bad JSON: {e}", args.join(" ")))
}

/// All pids of the process tree rooted at `root` (root first).
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

/// Reaps `pid` if it is our (sub-reaped) child, waiting up to `timeout`.
fn reap(pid: u32, timeout: Duration) {
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

/// Migrates the pod whose process tree is rooted at `pod_pid` (started by the
/// caller, who reaps the root with `reap_root` once the dump has killed it)
/// from pod A to pod B. `progress` receives one line per step.
pub fn migrate(
    c: &Cluster<'_>,
    plan: &Plan,
    pod_pid: u32,
    reap_root: &mut dyn FnMut(),
    progress: &dyn Fn(&str),
) -> Result<(RestoredProcess, Report), ControllerError> {
    let mut report = Report::default();
    let t = c.topo;
    let eps: Vec<String> = plan.endpoints.iter().map(|e| e.to_string()).collect();
    let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
    let new_ip = (!t.same_ip()).then_some(t.pod_b_ip);
    let mode = match plan.mode {
        ReleaseMode::Resume => TcpRestore::Established,
        ReleaseMode::Reconnect => TcpRestore::Close,
    };
    // Orphans of the dumped tree must be reaped by us, or their pids stay
    // taken and the restore fails.
    criu::become_subreaper().map_err(|e| fail("setup", format!("PR_SET_CHILD_SUBREAPER: {e}")))?;
    let tree = process_tree(pod_pid);
    let step = |name: &'static str, start: Instant, report: &mut Report| {
        let d = start.elapsed();
        progress(&format!("{name}: {} ms", d.as_millis()));
        report.steps.push((name, d));
    };
    let t_hold = Instant::now();
    let abort = |why: &str| {
        if plan.shepherd {
            let _ = call(
                c.origin,
                &["migrate", "abort", "--id", &plan.id, "--reason", why],
                &[0],
            );
            let _ = call(c.dest, &["migrate", "complete", "--id", &plan.id], &[0]);
        }
    };

    if plan.shepherd {
        let s = Instant::now();
        let mut args = vec!["migrate", "hold", "--id", &plan.id];
        args.extend(&eps);
        let held = call(c.origin, &args, &[0, 3]).map_err(|e| fail("hold", e))?;
        if held["quiescent"] != true {
            abort("not quiescent");
            return Err(fail("hold", format!("backends did not quiesce: {held}")));
        }
        step("hold", s, &mut report);
        let s = Instant::now();
        let mut incoming = vec!["migrate", "incoming", "--id", &plan.id, "--deadline", "60s"];
        incoming.extend(&eps);
        let to = new_ip.map(|ip| ip.to_string());
        let flows_file =
            tempfile::NamedTempFile::new().map_err(|e| fail("prepare", e.to_string()))?;
        let flows_path = flows_file.path().to_string_lossy().into_owned();
        if let Some(to) = &to {
            let st = call(
                c.origin,
                &["migrate", "target", "--id", &plan.id, "--to", to],
                &[0],
            )
            .map_err(|e| {
                abort("target failed");
                fail("target", e)
            })?;
            std::fs::write(flows_file.path(), st.to_string())
                .map_err(|e| fail("prepare", e.to_string()))?;
            incoming.extend(["--to", to, "--flows-from", &flows_path]);
        }
        call(c.dest, &incoming, &[0]).map_err(|e| {
            abort("destination not prepared");
            fail("prepare destination", e)
        })?;
        step("prepare destination", s, &mut report);
    }

    let images = match plan.image_limit {
        Some(bytes) => Images::on_tmpfs(bytes),
        None => Images::new(),
    };
    let t_freeze = Instant::now();
    if let Err(e) = criu::dump(&t.pod_a, pod_pid, &images, &DumpOpts::default()) {
        // CRIU rolled the dump back: the pod runs on where it was.
        abort("dump failed");
        return Err(fail("dump", e.to_string()));
    }
    step("dump", t_freeze, &mut report);
    reap_root();
    for pid in tree.iter().skip(1) {
        reap(*pid, Duration::from_secs(2));
    }
    let s = Instant::now();
    let on_b = images.copy_to();
    report.image_bytes = on_b.total_bytes();
    step("copy images", s, &mut report);
    if !plan.freeze_extra.is_zero() {
        std::thread::sleep(plan.freeze_extra);
    }
    if plan.routes_before_restore {
        let s = Instant::now();
        t.switch_routes();
        step("switch routes (before restore)", s, &mut report);
    }
    let s = Instant::now();
    let restored = match criu::restore(&t.pod_b, &on_b, mode) {
        Ok((p, _)) => p,
        Err(e) => {
            // Put the pod back where it was.
            t.restore_routes();
            let back = criu::restore(&t.pod_a, &images, mode).ok().map(|(p, _)| p);
            abort("restore failed");
            return Err(ControllerError {
                step: "restore",
                detail: e.to_string(),
                rolled_back: back,
            });
        }
    };
    report.freeze = t_freeze.elapsed();
    step("restore", s, &mut report);
    if !plan.routes_before_restore {
        let s = Instant::now();
        t.switch_routes();
        step("switch routes", s, &mut report);
    }
    if plan.shepherd {
        let s = Instant::now();
        report.dest_status = call(c.dest, &["migrate", "complete", "--id", &plan.id], &[0])
            .map_err(|e| fail("complete", e))?;
        let to = new_ip.map(|ip| ip.to_string());
        let mut release = vec![
            "migrate",
            "release",
            "--id",
            &plan.id,
            "--mode",
            plan.mode.as_str(),
        ];
        if let Some(to) = &to {
            release.extend(["--to", to]);
        }
        report.origin_status = call(c.origin, &release, &[0]).map_err(|e| fail("release", e))?;
        report.hold = t_hold.elapsed();
        step("complete + release", s, &mut report);
    }
    Ok((restored, report))
}
