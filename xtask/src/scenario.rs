//! One migration scenario on the two-node topology, as the demo and the
//! benchmarks run it: an echo pod behind node A, a client streaming a counter
//! every 10 ms (and, optionally, a probe connection opened during the
//! freeze), the reference controller moving the pod to node B with real CRIU,
//! with or without Shepherd. Returns what the client saw.
use anyhow::{bail, Context, Result};
use shepherd_tests::capture::Capture;
use shepherd_tests::controller::{self, Cluster, Plan, ReleaseMode};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::stream::{request_response, CounterStream};
use shepherd_tests::topology::TwoNode;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

const PORT: u16 = 7000;

/// What the client saw in one migration.
pub struct Outcome {
    pub freeze: Duration,
    pub longest_pause: Duration,
    pub rsts: u64,
    pub rst_lines: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_verified: u64,
    pub errors: Vec<String>,
    pub steps: Vec<(&'static str, Duration)>,
    pub bytes_held: u64,
    pub bytes_replayed: u64,
    /// A connection opened during the freeze: connect → first response.
    pub probe: Option<Duration>,
}

/// How one migration is run.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// Through Shepherd, or CRIU alone.
    pub shepherd: bool,
    /// The pod comes back at a new IP (Shepherd only).
    pub new_ip: bool,
    pub mode: ReleaseMode,
    /// Wait between dump and restore.
    pub freeze_extra: Duration,
    /// Open a connection during the freeze and time its first response.
    pub probe: bool,
    /// How often the client sends its counter (the resolution of the pause).
    pub tick: Duration,
}

impl Scenario {
    pub fn criu_alone(freeze_extra: Duration) -> Scenario {
        Scenario {
            shepherd: false,
            new_ip: false,
            mode: ReleaseMode::Resume,
            freeze_extra,
            probe: true,
            tick: Duration::from_millis(10),
        }
    }
}

pub fn migrate_once(echo: &Path, dir: &Path, sc: &Scenario, say: &dyn Fn(&str)) -> Result<Outcome> {
    let Scenario {
        shepherd,
        new_ip,
        mode,
        freeze_extra,
        probe,
        tick,
    } = *sc;
    let t = if new_ip {
        TwoNode::new_ip(&unique_prefix("demo"))
    } else {
        TwoNode::new(&unique_prefix("demo"))
    };
    let listen = if new_ip {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT)
    } else {
        t.pod_addr(PORT)
    };
    let log = dir.join(if shepherd {
        "pod-shepherd.log"
    } else {
        "pod-alone.log"
    });
    let mut pod = Workload::spawn_in(&t.pod_a, echo, ["--listen", &listen.to_string()], &log);
    let ep = t.pod_addr(PORT);
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))
        .context("the echo pod did not come up")?;
    let (origin, dest) = shepherd_tests::agent::start_pair(&t, &[]);
    if shepherd {
        let out = origin.cli(&["endpoint", "add", &ep.to_string()]);
        if !out.status.success() {
            bail!("endpoint add: {}", String::from_utf8_lossy(&out.stderr));
        }
        say(&format!(
            "  agents on node A and node B; endpoint {ep} registered on node A"
        ));
    }
    let capture = Capture::start(&t.client, t.client_if());
    let stream = CounterStream::start(&t.client, ep, tick);
    say(&format!(
        "  client streaming an 8-byte counter every {} ms",
        tick.as_millis()
    ));
    std::thread::sleep(Duration::from_secs(1));
    let mut plan = Plan::new(
        if shepherd {
            "demo-shepherd"
        } else {
            "demo-alone"
        },
        vec![ep],
    );
    plan.shepherd = shepherd;
    plan.mode = mode;
    plan.freeze_extra = freeze_extra;
    let cluster = Cluster {
        topo: &t,
        origin: &origin,
        dest: &dest,
    };
    let pid = pod.pid();
    // The probe connects once the dump is done (the pod is frozen) and times
    // connect → first response.
    let (dumped_tx, dumped_rx) = std::sync::mpsc::channel::<()>();
    let (result, probe_time) = std::thread::scope(|scope| {
        let client = &t.client;
        let prober = probe.then(|| {
            scope.spawn(move || {
                dumped_rx.recv().ok()?;
                let (connect, response) = request_response(client, ep, b"probe").ok()?;
                Some(connect + response)
            })
        });
        let result = controller::migrate(
            &cluster,
            &plan,
            pid,
            &mut || {
                pod.wait_exit(Duration::from_secs(10));
            },
            &|line| {
                if line.starts_with("dump:") {
                    let _ = dumped_tx.send(());
                }
                say(&format!("  {line}"));
            },
        );
        drop(dumped_tx);
        let probe_time = prober.and_then(|p| p.join().ok().flatten());
        (result, probe_time)
    });
    let (restored, report) = result.map_err(|e| anyhow::anyhow!("{e}"))?;
    std::thread::sleep(Duration::from_millis(1500));
    let r = stream.stop();
    let wire = capture.stop();
    let status = if shepherd {
        let out = origin.cli(&["migrate", "status", "--id", &plan.id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    } else {
        serde_json::Value::Null
    };
    drop(restored);
    drop(dest);
    drop(origin);
    drop(pod);
    drop(t);
    Ok(Outcome {
        freeze: report.freeze,
        longest_pause: r.max_gap,
        rsts: wire.rsts,
        rst_lines: wire.rst_lines.clone(),
        bytes_sent: r.sent * 8,
        bytes_verified: if r.is_ok() { r.received * 8 } else { 0 },
        errors: r.io_errors.clone(),
        steps: report.steps,
        bytes_held: status["bytes_held"].as_u64().unwrap_or(0),
        bytes_replayed: status["bytes_replayed"].as_u64().unwrap_or(0),
        probe: probe_time,
    })
}
