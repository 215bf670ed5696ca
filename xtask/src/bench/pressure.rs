//! Hold under pressure: a client pushes far more than the hold buffer's cap
//! while the endpoint is held; the agent's memory must stay bounded by the
//! cap, and after the release everything arrives. Measures peak RSS against
//! the cap and the time from release to the last byte delivered.
use super::report::{Row, Section};
use anyhow::{bail, Result};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::stream::bulk_echo;
use shepherd_tests::topology::SingleNode;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const PORT: u16 = 7000;
const CAP_MIB: u64 = 64;

pub fn run(quick: bool, target_dir: &Path) -> Result<Section> {
    let (total, reps) = if quick {
        (128u64 << 20, 1)
    } else {
        (1u64 << 30, 3)
    };
    let mut section = Section {
        title: format!(
            "Hold under pressure: one client pushes {} MiB during a hold (cap {CAP_MIB} MiB)",
            total >> 20
        ),
        ..Default::default()
    };
    let mut over = Row::new("agent peak RSS above its idle RSS", "MiB", false);
    let mut drain = Row::new("release -> last byte echoed to the client", "ms", false);
    for rep in 0..reps {
        eprintln!("bench: pressure, repetition {}/{reps}", rep + 1);
        let (peak_over, drain_ms) = one(total, target_dir)?;
        over.push("shepherd", peak_over);
        drain.push("shepherd", drain_ms);
    }
    let (_, _, max_over) = super::report::summary(&over.variants[0].1);
    section.notes.push(format!(
        "target: peak RSS <= cap + 20 MiB = {} MiB above idle: max {max_over:.1} MiB: {}",
        CAP_MIB + 20,
        if max_over <= (CAP_MIB + 20) as f64 {
            "met"
        } else {
            "NOT met"
        }
    ));
    section.notes.push("The drain time includes echoing what was held back to the client through the same proxy, with the client still pushing the rest.".into());
    section.rows.extend([over, drain]);
    Ok(section)
}

fn one(total: u64, target_dir: &Path) -> Result<(f64, f64)> {
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-pressure-")
        .tempdir()?;
    let t = SingleNode::new(&unique_prefix("press"));
    let ep = t.pod_addr(PORT);
    let _pod = Workload::spawn_in(
        &t.pod,
        &target_dir.join("shepherd-echo"),
        ["--listen", &ep.to_string()],
        &scratch.path().join("pod.log"),
    );
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))?;
    let cap = format!("{CAP_MIB}MiB");
    let agent = shepherd_tests::agent::start_single(
        &t,
        &["--hold-buffer-per-conn", &cap, "--hold-buffer-total", &cap],
    );
    let out = agent.cli(&["endpoint", "add", &ep.to_string()]);
    if !out.status.success() {
        bail!("endpoint add: {}", String::from_utf8_lossy(&out.stderr));
    }
    let idle = agent.rss_bytes() as f64;
    let out = agent.cli(&["migrate", "hold", "--id", "pressure", &ep.to_string()]);
    if !out.status.success() {
        bail!("hold: {}", String::from_utf8_lossy(&out.stderr));
    }
    let client = &t.client;
    let (peak, drain, report) = std::thread::scope(|scope| {
        let pusher = scope.spawn(move || bulk_echo(client, ep, total, 5));
        let mut peak = idle;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            peak = peak.max(agent.rss_bytes() as f64);
            std::thread::sleep(Duration::from_millis(20));
        }
        let t_release = Instant::now();
        let _ = agent.cli(&["migrate", "release", "--id", "pressure"]);
        while !pusher.is_finished() {
            peak = peak.max(agent.rss_bytes() as f64);
            std::thread::sleep(Duration::from_millis(20));
        }
        let drain = t_release.elapsed();
        (peak, drain, pusher.join())
    });
    let report = report.map_err(|_| anyhow::anyhow!("the pushing client panicked"))?;
    if !report.verified || report.received != total {
        bail!("bytes lost or corrupted under pressure: {report:?}");
    }
    Ok(((peak - idle) / (1024.0 * 1024.0), drain.as_secs_f64() * 1e3))
}
