//! One migration scenario on the two-node topology, as the demo and the
//! benchmarks run it, with or without Shepherd. Two workloads:
//! - [`Workload::Redis`] (the demo's default): redis-server in a real OCI
//!   container that runc checkpoints and restores, checking
//!   request/response clients (`INCR` on keys of their own: every command
//!   answered once, none lost, none run twice), and `redis-benchmark`
//!   running throughout as load. Most clients of stateful pods work this
//!   way, and a request sent during the freeze is where CRIU alone backs
//!   off.
//! - [`Workload::Echo`]: an echo process dumped by raw CRIU and a client
//!   streaming a counter.
//!
//! Optionally a probe connection is opened during the freeze. Returns what
//! the clients saw, with each client's progress over time for plots.
use anyhow::{bail, Context, Result};
use shepherd_tests::capture::Capture;
use shepherd_tests::controller::{self, Checkpointer, Cluster, Plan, ReleaseMode, Report};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload as Process};
use shepherd_tests::resp::{self, RedisCounter};
use shepherd_tests::runtime::{
    redis_server_args, ContainerSpec, Rootfs, RuncOpts, RuncPod, REDIS_SERVER,
};
use shepherd_tests::stream::{request_response, CounterStream};
use shepherd_tests::topology::TwoNode;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

const ECHO_PORT: u16 = 7000;
const REDIS_PORT: u16 = 6379;
/// Request/response clients of the redis workload.
const REDIS_CLIENTS: usize = 5;

/// What the pod runs and how its clients use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// redis-server in a runc container; request/response clients.
    Redis,
    /// An echo process under raw CRIU; a client streaming a counter.
    Echo,
}

impl Workload {
    pub fn parse(s: &str) -> Result<Workload> {
        match s {
            "redis" => Ok(Workload::Redis),
            "echo" => Ok(Workload::Echo),
            _ => bail!("unknown workload {s:?}: redis or echo"),
        }
    }

    /// What one unit of a client's progress is.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Redis => "requests answered",
            Workload::Echo => "counter values echoed",
        }
    }
}

/// What the clients saw in one migration.
pub struct Outcome {
    pub freeze: Duration,
    /// The longest any client waited: between two echoed values, or for
    /// one answer.
    pub longest_pause: Duration,
    pub rsts: u64,
    pub rst_lines: Vec<String>,
    /// Echo: counter bytes sent and verified. Redis: commands sent and
    /// answered right.
    pub sent: u64,
    pub verified: u64,
    /// Commands that failed (redis), or stream errors (echo).
    pub errors: Vec<String>,
    pub steps: Vec<(&'static str, Duration)>,
    pub bytes_held: u64,
    pub bytes_replayed: u64,
    /// A connection opened during the freeze: connect → first response.
    pub probe: Option<Duration>,
    /// Each client's progress: when each answer (or echoed value) arrived,
    /// in seconds since the clients started.
    pub progress: Vec<Vec<f64>>,
    /// The freeze (checkpoint start → restore done), in the same seconds.
    pub freeze_window: (f64, f64),
    /// Redis: how the `redis-benchmark` load fared (`None`: it ran
    /// throughout).
    pub load_failure: Option<String>,
}

impl Outcome {
    /// Everything the clients sent came back right, and no RST.
    pub fn clean(&self) -> bool {
        self.rsts == 0
            && self.verified == self.sent
            && self.errors.is_empty()
            && self.load_failure.is_none()
    }
}

/// How one migration is run.
#[derive(Clone, Copy)]
pub struct Scenario {
    pub workload: Workload,
    /// Redis only: in a runc container (else a process under raw CRIU).
    pub runc: bool,
    /// Through Shepherd, or CRIU alone.
    pub shepherd: bool,
    /// The pod comes back at a new IP (Shepherd only).
    pub new_ip: bool,
    pub mode: ReleaseMode,
    /// Wait between checkpoint and restore.
    pub freeze_extra: Duration,
    /// Open a connection during the freeze and time its first response.
    pub probe: bool,
    /// How often a client sends (the resolution of the measured pause).
    pub tick: Duration,
}

impl Scenario {
    /// The baseline: the same migration with CRIU alone (same IP: CRIU
    /// alone cannot change it).
    pub fn criu_alone(workload: Workload, freeze_extra: Duration) -> Scenario {
        Scenario {
            workload,
            runc: true,
            shepherd: false,
            new_ip: false,
            mode: ReleaseMode::Resume,
            freeze_extra,
            probe: true,
            tick: Duration::from_millis(10),
        }
    }
}

/// The pod, however it runs.
enum Pod {
    Process(Process),
    /// The process after CRIU restored it elsewhere (killed on drop).
    Restored {
        _process: shepherd_tests::criu::RestoredProcess,
    },
    Container(RuncPod),
}

/// The clients, whichever the workload.
enum Clients {
    Echo(CounterStream, Instant),
    Redis(Vec<(RedisCounter, Instant)>),
}

pub fn migrate_once(echo: &Path, dir: &Path, sc: &Scenario, say: &dyn Fn(&str)) -> Result<Outcome> {
    let prefix = unique_prefix("demo");
    let t = if sc.new_ip {
        TwoNode::new_ip(&prefix)
    } else {
        TwoNode::new(&prefix)
    };
    let port = match sc.workload {
        Workload::Redis => REDIS_PORT,
        Workload::Echo => ECHO_PORT,
    };
    let ep = t.pod_addr(port);
    let mut pod = start_pod(&t, &prefix, sc, echo, dir)?;
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))
        .context("the pod did not come up")?;
    let (origin, dest) = shepherd_tests::agent::start_pair(&t, &[]);
    if sc.shepherd {
        let out = origin.cli(&["endpoint", "add", &ep.to_string()]);
        if !out.status.success() {
            bail!("endpoint add: {}", String::from_utf8_lossy(&out.stderr));
        }
        say(&format!(
            "  agents on node A and node B; endpoint {ep} registered on node A"
        ));
    }
    let capture = Capture::start(&t.client, t.client_if());
    let t0 = Instant::now();
    let clients = match sc.workload {
        Workload::Echo => {
            say(&format!(
                "  client streaming an 8-byte counter every {} ms",
                sc.tick.as_millis()
            ));
            Clients::Echo(CounterStream::start(&t.client, ep, sc.tick), Instant::now())
        }
        Workload::Redis => {
            say(&format!(
                "  {REDIS_CLIENTS} redis clients, each an INCR every {} ms, every answer checked",
                sc.tick.as_millis()
            ));
            Clients::Redis(
                (0..REDIS_CLIENTS)
                    .map(|i| {
                        let at = Instant::now();
                        let key = format!("client-{i}");
                        (RedisCounter::start(&t.client, ep, &key, sc.tick), at)
                    })
                    .collect(),
            )
        }
    };
    let load = (sc.workload == Workload::Redis)
        .then(|| Load::start(&t, ep, dir))
        .transpose()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut plan = Plan::new(
        if sc.shepherd {
            "demo-shepherd"
        } else {
            "demo-alone"
        },
        vec![ep],
    );
    plan.shepherd = sc.shepherd;
    plan.mode = sc.mode;
    plan.freeze_extra = sc.freeze_extra;
    let cluster = Cluster {
        topo: &t,
        origin: &origin,
        dest: &dest,
    };
    // The probe connects once the checkpoint is done (the pod is frozen)
    // and times connect → first response.
    let (dumped_tx, dumped_rx) = std::sync::mpsc::channel::<()>();
    let (result, probe_time) = std::thread::scope(|scope| {
        let progress = move |line: &str| {
            if line.starts_with("dump:") {
                let _ = dumped_tx.send(());
            }
            say(&format!("  {line}"));
        };
        let client = &t.client;
        let workload = sc.workload;
        let prober = sc.probe.then(|| {
            scope.spawn(move || {
                dumped_rx.recv().ok()?;
                let (connect, response) = match workload {
                    Workload::Echo => request_response(client, ep, b"probe").ok()?,
                    Workload::Redis => resp::ping(client, ep).ok()?,
                };
                Some(connect + response)
            })
        });
        let result = migrate(&cluster, &plan, &mut pod, &progress);
        // No dump, no probe: the channel closes.
        drop(progress);
        let probe_time = prober.and_then(|p| p.join().ok().flatten());
        (result, probe_time)
    });
    let report = result?;
    std::thread::sleep(Duration::from_millis(1500));
    let secs = |at: Instant, d: Duration| (at + d).saturating_duration_since(t0).as_secs_f64();
    let mut outcome = Outcome {
        freeze: report.freeze,
        longest_pause: Duration::ZERO,
        rsts: 0,
        rst_lines: Vec::new(),
        sent: 0,
        verified: 0,
        errors: Vec::new(),
        steps: report.steps.clone(),
        bytes_held: 0,
        bytes_replayed: 0,
        probe: probe_time,
        progress: Vec::new(),
        freeze_window: report
            .freeze_started
            .map(|f| (secs(f, Duration::ZERO), secs(f, report.freeze)))
            .unwrap_or_default(),
        load_failure: None,
    };
    match clients {
        Clients::Echo(stream, at) => {
            let r = stream.stop();
            outcome.longest_pause = r.max_gap;
            outcome.sent = r.sent * 8;
            outcome.verified = if r.is_ok() { r.received * 8 } else { 0 };
            outcome.errors = r.io_errors.clone();
            let at = at + r.connect_time;
            outcome.progress = vec![r.arrivals.iter().map(|d| secs(at, *d)).collect()];
        }
        Clients::Redis(clients) => {
            for (c, at) in clients {
                let r = c.stop();
                outcome.longest_pause = outcome.longest_pause.max(r.slowest);
                outcome.sent += r.ok + r.failed;
                outcome.verified += r.ok;
                outcome.errors.extend(r.first_error.clone());
                outcome
                    .progress
                    .push(r.answered_at.iter().map(|d| secs(at, *d)).collect());
            }
        }
    }
    let wire = capture.stop();
    outcome.rsts = wire.rsts;
    outcome.rst_lines = wire.rst_lines.clone();
    // After the capture: killing redis-benchmark resets its connections
    // (replies in flight), which is no part of the migration.
    outcome.load_failure = load.and_then(Load::stop);
    if sc.shepherd {
        let out = origin.cli(&["migrate", "status", "--id", &plan.id, "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        outcome.bytes_held = status["bytes_held"].as_u64().unwrap_or(0);
        outcome.bytes_replayed = status["bytes_replayed"].as_u64().unwrap_or(0);
    }
    // The pod goes before the agents and the namespaces.
    drop(pod);
    drop(dest);
    drop(origin);
    drop(t);
    Ok(outcome)
}

/// Starts the scenario's pod in pod A.
fn start_pod(t: &TwoNode, prefix: &str, sc: &Scenario, echo: &Path, dir: &Path) -> Result<Pod> {
    match sc.workload {
        Workload::Echo => {
            // A pod that changes address listens on any address, as pods do.
            let listen = if sc.new_ip {
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ECHO_PORT)
            } else {
                t.pod_addr(ECHO_PORT)
            };
            Ok(Pod::Process(Process::spawn_in(
                &t.pod_a,
                echo,
                ["--listen", &listen.to_string()],
                &pod_log(dir, "pod", sc),
            )))
        }
        Workload::Redis if !sc.runc => Ok(Pod::Process(Process::spawn_in(
            &t.pod_a,
            Path::new(REDIS_SERVER),
            redis_server_args(REDIS_PORT, dir),
            &pod_log(dir, "redis", sc),
        ))),
        Workload::Redis => {
            let redis = Path::new(REDIS_SERVER);
            let rootfs = Rootfs::build(&[redis])
                .context("building the redis container's root filesystem")?;
            let opts = RuncOpts {
                // A new IP with TCP kept: the old address goes on the new
                // namespace's lo at restore (the topology has put it there
                // already; the action script makes that the runtime's job).
                lo_on_restore: if sc.new_ip {
                    vec![t.pod_ip]
                } else {
                    Vec::new()
                },
                ..RuncOpts::default()
            };
            let pod = RuncPod::start(
                &t.pod_a,
                prefix,
                rootfs,
                vec![ContainerSpec::redis("redis", REDIS_PORT)],
                opts,
            )
            .map_err(|e| anyhow::anyhow!("starting the redis container: {e}"))?;
            Ok(Pod::Container(pod))
        }
    }
}

/// `{what}-shepherd.log` or `{what}-alone.log` in `dir`.
fn pod_log(dir: &Path, what: &str, sc: &Scenario) -> std::path::PathBuf {
    let side = if sc.shepherd { "shepherd" } else { "alone" };
    dir.join(format!("{what}-{side}.log"))
}

/// Runs the reference controller on the pod, whichever it is.
fn migrate(c: &Cluster<'_>, plan: &Plan, pod: &mut Pod, progress: &dyn Fn(&str)) -> Result<Report> {
    match pod {
        Pod::Process(p) => {
            let pid = p.pid();
            let (restored, report) = controller::migrate(
                c,
                plan,
                pid,
                &mut || {
                    p.wait_exit(Duration::from_secs(10));
                },
                progress,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            // The restored process lives until the scenario ends.
            *pod = Pod::Restored { _process: restored };
            Ok(report)
        }
        Pod::Container(r) => {
            let r: &mut dyn Checkpointer = r;
            controller::migrate_with(c, plan, r, progress).map_err(|e| anyhow::anyhow!("{e}"))
        }
        Pod::Restored { .. } => bail!("the pod was migrated already"),
    }
}

/// What the runc same-IP loop saw.
pub struct LoopOutcome {
    pub rsts: u64,
    /// Request/response clients that failed (each replaced by a new one).
    pub failed_clients: usize,
    pub first_error: Option<String>,
}

/// redis-server in a runc container moved `moves` times between pod A and
/// pod B at the same IP (A → B → A …), with three request/response clients
/// throughout, through Shepherd or not. A client that fails is counted and
/// replaced after the move, so each move can fail clients afresh.
pub fn ping_pong(moves: usize, shepherd: bool) -> Result<LoopOutcome> {
    const CLIENTS: usize = 3;
    let prefix = unique_prefix("loop");
    let t = TwoNode::new(&prefix);
    let rootfs = Rootfs::build(&[Path::new(REDIS_SERVER)])
        .context("building the redis container's root filesystem")?;
    let mut pod = RuncPod::start(
        &t.pod_a,
        &prefix,
        rootfs,
        vec![ContainerSpec::redis("redis", REDIS_PORT)],
        RuncOpts::default(),
    )
    .map_err(|e| anyhow::anyhow!("starting the redis container: {e}"))?;
    let ep = t.pod_addr(REDIS_PORT);
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))
        .context("the redis container did not come up")?;
    let (origin, dest) = shepherd_tests::agent::start_pair(&t, &[]);
    if shepherd {
        let out = origin.cli(&["endpoint", "add", &ep.to_string()]);
        if !out.status.success() {
            bail!("endpoint add: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let capture = Capture::start(&t.client, t.client_if());
    let tick = Duration::from_millis(10);
    let mut next_key = 0;
    let mut client = || {
        next_key += 1;
        RedisCounter::start(&t.client, ep, &format!("loop-{next_key}"), tick)
    };
    let mut clients: Vec<RedisCounter> = (0..CLIENTS).map(|_| client()).collect();
    let mut out = LoopOutcome {
        rsts: 0,
        failed_clients: 0,
        first_error: None,
    };
    let mut settle = |clients: &mut Vec<RedisCounter>, out: &mut LoopOutcome| {
        for c in clients.iter_mut() {
            if c.has_stopped() {
                let old = std::mem::replace(c, client());
                let r = old.stop();
                out.failed_clients += 1;
                out.first_error = out.first_error.take().or(r.first_error);
            }
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..moves {
        let mut plan = Plan::new(&format!("loop-{i}"), vec![ep]);
        plan.shepherd = shepherd;
        // As a runtime does (podman sets up the new namespace and its
        // address before CRIU recreates the sockets): traffic reaches the
        // new namespace before the restore. With Shepherd the controller
        // switches routes early anyway, behind the destination's shield.
        plan.routes_before_restore = true;
        let back = shepherd_tests::topology::Back(&t);
        let (topo, to): (&dyn shepherd_tests::topology::PodMove, _) = if i % 2 == 1 {
            (&back, &origin)
        } else {
            (&t, &dest)
        };
        let cluster = Cluster {
            topo,
            origin: &origin,
            dest: to,
        };
        let r: &mut dyn Checkpointer = &mut pod;
        controller::migrate_with(&cluster, &plan, r, &|_| {})
            .map_err(|e| anyhow::anyhow!("move {i}: {e}"))?;
        std::thread::sleep(Duration::from_millis(300));
        settle(&mut clients, &mut out);
    }
    std::thread::sleep(Duration::from_millis(300));
    for c in clients {
        let r = c.stop();
        if r.failed > 0 {
            out.failed_clients += 1;
            out.first_error = out.first_error.take().or(r.first_error);
        }
    }
    out.rsts = capture.stop().rsts;
    drop(pod);
    Ok(out)
}

/// `redis-benchmark` from the client namespace, `INCR` on two connections
/// in a loop until stopped: load through the migration. It exits by itself
/// only when a connection fails.
struct Load {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Load {
    fn start(t: &TwoNode, ep: SocketAddrV4, dir: &Path) -> Result<Load> {
        let log = dir.join(format!("redis-benchmark-{}.log", t.client.name()));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", t.client.name(), "redis-benchmark"])
            .args(["-h", &ep.ip().to_string(), "-p", &ep.port().to_string()])
            .args(["-c", "2", "-t", "incr", "-l", "-q"])
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting redis-benchmark (cargo xtask setup installs redis-tools)")?;
        Ok(Load { child, log })
    }

    /// Stops it; `Some(why)` if it had stopped by itself.
    fn stop(mut self) -> Option<String> {
        let failed = match self.child.try_wait() {
            Ok(Some(status)) => {
                let out = std::fs::read_to_string(&self.log).unwrap_or_default();
                let last = out
                    .split(['\r', '\n'])
                    .rfind(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .to_string();
                Some(format!("redis-benchmark exited ({status}): {last}"))
            }
            _ => None,
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        failed
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // Our own child, spawned above (a no-op once `stop` reaped it).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
