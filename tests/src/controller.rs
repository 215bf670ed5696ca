//! The reference migration controller: how an operator drives Shepherd and
//! CRIU for one live migration, through Shepherd's public HTTP API only.
//!
//! Sequence (docs/controller-guide.md explains each call), arranged so that
//! as little as possible happens while clients wait:
//! shield on the destination (`incoming`, before anything is held) → hold on
//! the origin (with the new address, if any) → the origin's backend flows to
//! the destination (`incoming` again, new IP only) → `criu dump
//! --tcp-established` → copy the images → [extra freeze] → switch routes (safe
//! before the restore: the destination's shield drops RSTs from the pod's
//! address) → `criu restore` into the destination pod namespace → `release`
//! on the origin → `complete` on the destination. Every step is timed. On
//! any failure the controller aborts and leaves the pod running where it
//! was: a failed dump is rolled back by CRIU; a failed restore is followed
//! by a restore of the same images in the source namespace. Where the pod
//! goes is a [`PodMove`]: a [`TwoNode`](crate::topology::TwoNode) for its
//! first move, a [`SecondMove`](crate::topology::SecondMove) for a second.
//!
//! How the pod is checkpointed and restored is a [`Checkpointer`]: raw CRIU
//! on a process tree ([`CriuProcess`], what [`migrate`] uses), or a
//! container runtime ([`RuncPod`](crate::runtime::RuncPod): runc, the OCI
//! runtime under CRI-O and containerd), through [`migrate_with`].
use crate::agent::Agent;
use crate::criu::{self, DumpOpts, Images, RestoredProcess, TcpRestore};
use crate::netns::Netns;
pub use crate::process::reap;
use crate::topology::PodMove;
use serde_json::{json, Value};
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
    /// The hold's deadline (the agent's default without it).
    pub hold_deadline: Option<Duration>,
    /// Failure injection for tests: the controller vanishes right after the
    /// restore, calling neither `release` nor `complete` (the agents'
    /// deadlines must end the migration).
    pub vanish_after_restore: bool,
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
            hold_deadline: None,
            vanish_after_restore: false,
        }
    }
}

/// The two agents, and where the migration takes the pod (a
/// [`TwoNode`](crate::topology::TwoNode) for its first move).
pub struct Cluster<'a> {
    pub topo: &'a dyn PodMove,
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
    /// When the checkpoint started (the freeze's start, for timelines).
    pub freeze_started: Option<Instant>,
    /// When the hold started (Shepherd only).
    pub hold_started: Option<Instant>,
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

/// One API call; a 2xx answer's JSON, or the agent's error as text.
fn api(agent: &Agent, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let body = body.map(|b| b.to_string());
    let (code, text) = agent
        .try_http(method, path, body.as_deref())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if !(200..300).contains(&code) {
        return Err(format!("{method} {path}: HTTP {code}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{method} {path}: bad JSON ({e}): {text}"))
}

/// How the controller checkpoints the pod and restores it elsewhere.
pub trait Checkpointer {
    /// Checkpoints the pod running in `from` into `images`. On failure the
    /// pod runs on where it was (CRIU rolls a failed dump back).
    fn checkpoint(&mut self, from: &Netns, images: &Images) -> Result<(), String>;
    /// After a good checkpoint, before the restore: the original must be
    /// gone. A dump killed it (reap it); a checkpoint that left it running
    /// (the kubelet's way) stops it now, and its sockets close.
    fn retire_original(&mut self);
    /// Restores `images` into `into`, with or without the TCP connections.
    /// On failure nothing of the pod runs in `into`.
    fn restore(&mut self, into: &Netns, images: &Images, tcp: TcpRestore) -> Result<(), String>;
}

/// Raw CRIU on the process tree rooted at `pid`: `criu dump` in its
/// namespace, `criu restore` in the destination's.
pub struct CriuProcess<'a> {
    pid: u32,
    tree: Vec<u32>,
    reap_root: &'a mut dyn FnMut(),
    /// The restored root, once restored (where it lands, or back where it
    /// was after a failed restore).
    pub restored: Option<RestoredProcess>,
}

impl<'a> CriuProcess<'a> {
    /// The pod rooted at `pid`, started by the caller, who reaps the root
    /// with `reap_root` once the dump has killed it.
    pub fn new(pid: u32, reap_root: &'a mut dyn FnMut()) -> Result<Self, ControllerError> {
        // Orphans of the dumped tree must be reaped by us, or their pids
        // stay taken and the restore fails.
        criu::become_subreaper()
            .map_err(|e| fail("setup", format!("PR_SET_CHILD_SUBREAPER: {e}")))?;
        Ok(CriuProcess {
            pid,
            tree: crate::process::process_tree(pid),
            reap_root,
            restored: None,
        })
    }
}

impl Checkpointer for CriuProcess<'_> {
    fn checkpoint(&mut self, from: &Netns, images: &Images) -> Result<(), String> {
        criu::dump(from, self.pid, images, &DumpOpts::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn retire_original(&mut self) {
        (self.reap_root)();
        for pid in self.tree.iter().skip(1) {
            reap(*pid, Duration::from_secs(2));
        }
    }

    fn restore(&mut self, into: &Netns, images: &Images, tcp: TcpRestore) -> Result<(), String> {
        let (p, _) = criu::restore(into, images, tcp).map_err(|e| e.to_string())?;
        self.restored = Some(p);
        Ok(())
    }
}

/// Migrates the pod whose process tree is rooted at `pod_pid` (started by the
/// caller, who reaps the root with `reap_root` once the dump has killed it)
/// as `c.topo` says (pod A to pod B, for a first move). `progress` receives
/// one line per step.
pub fn migrate(
    c: &Cluster<'_>,
    plan: &Plan,
    pod_pid: u32,
    reap_root: &mut dyn FnMut(),
    progress: &dyn Fn(&str),
) -> Result<(RestoredProcess, Report), ControllerError> {
    let mut pod = CriuProcess::new(pod_pid, reap_root)?;
    match migrate_with(c, plan, &mut pod, progress) {
        Ok(report) => match pod.restored.take() {
            Some(p) => Ok((p, report)),
            None => Err(fail("restore", "CRIU reported no restored process")),
        },
        Err(mut e) => {
            if e.step == "restore" {
                e.rolled_back = pod.restored.take();
            }
            Err(e)
        }
    }
}

/// Migrates the pod that `pod` checkpoints, as `c.topo` says. On a failed
/// restore the pod is restored back where it was (the error's step is
/// `"restore"`).
pub fn migrate_with(
    c: &Cluster<'_>,
    plan: &Plan,
    pod: &mut dyn Checkpointer,
    progress: &dyn Fn(&str),
) -> Result<Report, ControllerError> {
    let mut report = Report::default();
    let t = c.topo;
    let eps: Vec<String> = plan.endpoints.iter().map(|e| e.to_string()).collect();
    let new_ip = t.new_ip();
    let mode = match plan.mode {
        ReleaseMode::Resume => TcpRestore::Established,
        ReleaseMode::Reconnect => TcpRestore::Close,
    };
    let step = |name: &'static str, start: Instant, report: &mut Report| {
        let d = start.elapsed();
        progress(&format!("{name}: {} ms", d.as_millis()));
        report.steps.push((name, d));
    };
    let id = &plan.id;
    let abort = |why: &str| {
        if plan.shepherd {
            let _ = api(
                c.origin,
                "POST",
                &format!("/v1/migrations/{id}/abort"),
                Some(json!({ "reason": why })),
            );
            // With the reason: the destination undoes this migration's
            // translations at once (a pod failing to move on from that node
            // gets its earlier ones back).
            let _ = api(
                c.dest,
                "POST",
                &format!("/v1/migrations/{id}/incoming/complete"),
                Some(json!({ "reason": why })),
            );
        }
    };
    let incoming_path = format!("/v1/migrations/{id}/incoming");
    let mut t_hold = Instant::now();
    // New IP: the destination's translations, sent while the dump runs (they
    // only matter once the restored sockets exist).
    let mut flows: Option<Value> = None;
    if plan.shepherd {
        let s = Instant::now();
        api(
            c.dest,
            "PUT",
            &incoming_path,
            Some(json!({ "endpoints": eps, "to": new_ip, "deadline_ms": 60_000 })),
        )
        .map_err(|e| fail("shield destination", e))?;
        step("shield destination", s, &mut report);
        t_hold = Instant::now();
        let mut hold = json!({ "endpoints": eps, "to": new_ip });
        if let Some(d) = plan.hold_deadline {
            hold["deadline_ms"] = json!(d.as_millis() as u64);
        }
        let held = api(
            c.origin,
            "PUT",
            &format!("/v1/migrations/{id}/hold"),
            Some(hold),
        )
        .map_err(|e| {
            abort("hold failed");
            fail("hold", e)
        })?;
        if held["quiescent"] != true {
            abort("not quiescent");
            return Err(fail("hold", format!("backends did not quiesce: {held}")));
        }
        report.hold_started = Some(t_hold);
        step("hold", t_hold, &mut report);
        if new_ip.is_some() {
            flows = Some(
                json!({ "endpoints": eps, "to": new_ip, "flows": held["backend_flows"], "deadline_ms": 60_000 }),
            );
        }
    }

    let images = match plan.image_limit {
        Some(bytes) => Images::on_tmpfs(bytes),
        None => Images::new(),
    };
    let t_freeze = Instant::now();
    report.freeze_started = Some(t_freeze);
    let (dumped, flows_sent) = std::thread::scope(|scope| {
        let sender = flows.take().map(|body| {
            let path = &incoming_path;
            scope.spawn(move || {
                let s = Instant::now();
                api(c.dest, "PUT", path, Some(body)).map(|_| s.elapsed())
            })
        });
        let dumped = pod.checkpoint(t.source_ns(), &images);
        let sent = sender.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err("flows thread panicked".into()))
        });
        (dumped, sent)
    });
    if let Err(e) = dumped {
        // CRIU rolled the dump back: the pod runs on where it was.
        abort("dump failed");
        return Err(fail("dump", e));
    }
    step("dump", t_freeze, &mut report);
    let flows_error = match flows_sent {
        Some(Ok(took)) => {
            progress(&format!(
                "flows to destination (during the dump): {} ms",
                took.as_millis()
            ));
            report.steps.push(("flows to destination", took));
            None
        }
        Some(Err(e)) => Some(e),
        None => None,
    };
    pod.retire_original();
    let s = Instant::now();
    let on_b = images.copy_to();
    report.image_bytes = on_b.total_bytes();
    step("copy images", s, &mut report);
    if !plan.freeze_extra.is_zero() {
        std::thread::sleep(plan.freeze_extra);
    }
    // With Shepherd the destination's shield makes an early route safe, and it
    // takes the route change out of the window between restore and release.
    let routes_early = plan.routes_before_restore || plan.shepherd;
    if routes_early {
        let s = Instant::now();
        t.switch_routes();
        step("switch routes (before restore)", s, &mut report);
    }
    let s = Instant::now();
    let on_dest = match flows_error {
        Some(e) => Err(format!(
            "the destination did not take the flows to translate: {e}"
        )),
        None => pod.restore(t.dest_ns(), &on_b, mode),
    };
    if let Err(e) = on_dest {
        // Put the pod back where it was.
        t.restore_routes();
        let back = pod.restore(t.source_ns(), &images, mode);
        abort("restore failed");
        let detail = match back {
            Ok(()) => e,
            Err(b) => format!("{e}; restoring it where it was failed too: {b}"),
        };
        return Err(fail("restore", detail));
    }
    report.freeze = t_freeze.elapsed();
    step("restore", s, &mut report);
    if plan.vanish_after_restore {
        return Ok(report);
    }
    if !routes_early {
        let s = Instant::now();
        t.switch_routes();
        step("switch routes", s, &mut report);
    }
    if plan.shepherd {
        let s = Instant::now();
        report.origin_status = api(
            c.origin,
            "POST",
            &format!("/v1/migrations/{id}/release"),
            Some(json!({ "mode": plan.mode.as_str(), "to": new_ip })),
        )
        .map_err(|e| fail("release", e))?;
        report.hold = t_hold.elapsed();
        step("release", s, &mut report);
        let s = Instant::now();
        report.dest_status = api(
            c.dest,
            "POST",
            &format!("/v1/migrations/{id}/incoming/complete"),
            None,
        )
        .map_err(|e| fail("complete", e))?;
        step("complete", s, &mut report);
    }
    Ok(report)
}
