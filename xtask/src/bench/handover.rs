//! Hand-over: the agent replaced by a successor (a copy of its binary at
//! another path, as an upgrade starts a new image) while N client
//! connections tick through it. What the clients feel (the longest gap
//! between two echoes on any connection, less the tick), how long the
//! data plane stood still (the successor's own measure, from asking the
//! running agent to freeze to serving), and how long the whole hand-over
//! took from starting the successor to its answering the API.
use super::report::{Row, Section};
use anyhow::{bail, Context, Result};
use shepherd_tests::agent::Agent;
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::ticker::Tickers;
use shepherd_tests::topology::SingleNode;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const PORT: u16 = 7000;
/// Hand-overs per size (each successor hands over to the next).
const ROUNDS: usize = 3;

pub fn run(quick: bool, target_dir: &Path) -> Result<Section> {
    let nofile = shepherd_tests::process::raise_nofile()?;
    let most = ((nofile.saturating_sub(1000)) / 2) as usize;
    let sizes: Vec<usize> = if quick {
        vec![200]
    } else {
        vec![1_000, 9_000.min(most)]
    };
    let mut section = Section {
        title: "Hand-over: the agent replaced under N ticking connections".into(),
        ..Default::default()
    };
    let mut pause = Row::new(
        "longest echo gap - tick: no hand-over (baseline), one hand-over",
        "ms",
        false,
    );
    let mut frozen = Row::new(
        "  data plane still (successor: freeze asked -> serving)",
        "ms",
        false,
    );
    let mut took = Row::new(
        "hand-over, successor started -> answering the API",
        "ms",
        false,
    );
    let mut lost = Row::new("connections lost", "count", false);
    for &n in &sizes {
        eprintln!("bench: hand-over with {n} connections");
        let r =
            one(n, target_dir, quick).with_context(|| format!("hand-over with {n} connections"))?;
        let v = format!("{n} conns");
        for s in &r.baseline_ms {
            pause.push(&format!("{n} conns, baseline"), *s);
        }
        for s in &r.pause_ms {
            pause.push(&format!("{n} conns, hand-over"), *s);
        }
        for s in &r.frozen_ms {
            frozen.push(&v, *s);
        }
        for s in &r.took_ms {
            took.push(&v, *s);
        }
        lost.push(&v, r.lost as f64);
        section.notes.push(format!(
            "{n} conns: each sends an 8-byte counter every {} ms and checks its echo (one client thread polls them all); {} hand-overs in a row.",
            r.tick.as_millis(),
            r.pause_ms.len()
        ));
    }
    section.rows.extend([lost, pause, frozen, took]);
    section.notes.push("Targets: a pause of <= 20 ms at 1,000 connections and <= 100 ms at 9,000. The successor loads its eBPF programs (the verifier: a few hundred ms of CPU) before the freeze, on a SCHED_IDLE thread; that time is in the hand-over's duration, not in the pause.".into());
    Ok(section)
}

struct Result1 {
    /// The same measure over a window as long as a hand-over, with none:
    /// what the load itself costs the clients on this machine.
    baseline_ms: Vec<f64>,
    pause_ms: Vec<f64>,
    frozen_ms: Vec<f64>,
    took_ms: Vec<f64>,
    lost: usize,
    tick: Duration,
}

fn one(n: usize, target_dir: &Path, quick: bool) -> Result<Result1> {
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-handover-")
        .tempdir()?;
    let echo = scratch.path().join("shepherd-echo");
    std::fs::copy(target_dir.join("shepherd-echo"), &echo)?;
    // The successors: copies of the binary at other paths.
    let copies: Vec<std::path::PathBuf> = (0..2)
        .map(|i| {
            let p = scratch.path().join(format!("shepherd-{i}"));
            std::fs::copy(target_dir.join("shepherd"), &p).map(|_| p)
        })
        .collect::<std::io::Result<_>>()?;
    let t = SingleNode::new(&unique_prefix("hobench"));
    for ns in [&t.client, &t.node] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    }
    let ep = t.pod_addr(PORT);
    let _pod = Workload::spawn_in(
        &t.pod,
        &echo,
        ["--listen", &ep.to_string(), "--single-thread"],
        &scratch.path().join("pod.log"),
    );
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))?;
    let mut agent = shepherd_tests::agent::start_single(&t, &[]);
    let out = agent.cli(&["endpoint", "add", &ep.to_string()]);
    if !out.status.success() {
        bail!("endpoint add: {}", String::from_utf8_lossy(&out.stderr));
    }
    // One poll loop drives every connection: the tick it can keep.
    let tick = if n <= 1_000 {
        Duration::from_millis(10)
    } else {
        Duration::from_millis(50)
    };
    let streams = Tickers::start(&t.client, ep, n, tick)?;
    std::thread::sleep(Duration::from_millis(1000));
    let mut r = Result1 {
        baseline_ms: Vec::new(),
        pause_ms: Vec::new(),
        frozen_ms: Vec::new(),
        took_ms: Vec::new(),
        lost: 0,
        tick,
    };
    let rounds = if quick { 1 } else { ROUNDS };
    for round in 0..rounds {
        // The baseline: a window about as long as a hand-over's (a few
        // seconds here, plus the 600 ms after it), with no hand-over.
        let b0 = Instant::now();
        std::thread::sleep(if quick {
            Duration::from_millis(600)
        } else {
            Duration::from_millis(3600)
        });
        r.baseline_ms
            .push((streams.max_gap_since(b0).saturating_sub(tick)).as_secs_f64() * 1e3);
        let t0 = Instant::now();
        let new = agent.successor(&copies[round % copies.len()], &[]);
        r.took_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut old: Agent = std::mem::replace(&mut agent, new);
        if old.wait_exit(Duration::from_secs(15)).is_none() {
            bail!("the old agent still runs after the hand-over");
        }
        std::thread::sleep(Duration::from_millis(600));
        let gap = streams.max_gap_since(t0);
        r.pause_ms
            .push((gap.saturating_sub(tick)).as_secs_f64() * 1e3);
        let (_, health) = agent.http("GET", "/healthz", None);
        let health: serde_json::Value = serde_json::from_str(&health)?;
        let handed = health["took_over"]["connections"].as_u64().unwrap_or(0) as usize;
        if handed < n {
            bail!("the successor received {handed} connections of {n}: {health}");
        }
        r.frozen_ms.push(
            health["took_over"]["paused_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    let report = streams.stop();
    r.lost = report.failed;
    if report.failed > 0 {
        eprintln!("bench: hand-over lost connections: {:?}", report.failures);
    }
    Ok(r)
}
