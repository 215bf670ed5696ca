//! Migration pause, what clients feel: with Shepherd and with CRIU alone,
//! interleaved, at freezes of about 0.2, 1 and 3 s, for two workloads:
//! - echo: a process under raw CRIU and a client streaming a counter every
//!   2 ms (the pause minus the freeze);
//! - redis: redis-server in a runc container and five request/response
//!   clients (the longest wait for an answer minus the freeze; failed
//!   commands);
//!
//! plus RSTs on the clients' wire, the connect → first answer time of a
//! connection opened during the freeze, and the runc same-IP loop: twenty
//! moves back and forth, without Shepherd (the baseline: a client's
//! retransmission that reaches the new namespace before CRIU's sockets is
//! reset) and with it. `--plot FILE.svg` draws the first repetition at each
//! freeze, Shepherd beside CRIU alone.
use super::report::{Row, Section};
use crate::plot::Panel;
use crate::scenario::{migrate_once, ping_pong, Outcome, Scenario, Workload};
use anyhow::{Context, Result};
use shepherd_tests::controller::ReleaseMode;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Target freezes (s).
const FREEZES: [f64; 3] = [0.2, 1.0, 3.0];
/// Roughly how long a checkpoint plus a restore take here with no wait
/// between them, per workload: the wait added reaches the target freeze.
fn base_freeze(w: Workload) -> f64 {
    match w {
        Workload::Echo => 0.13,
        Workload::Redis => 0.45,
    }
}
/// The echo client's counter interval: the resolution of the measured pause.
const ECHO_TICK: Duration = Duration::from_millis(2);
const REDIS_TICK: Duration = Duration::from_millis(10);
/// Moves in the runc same-IP loop (each way in turn).
const LOOP_MOVES: usize = 20;

pub fn run(quick: bool, target_dir: &Path, plot: Option<&Path>) -> Result<Section> {
    let reps = if quick { 1 } else { 5 };
    let freezes: &[f64] = if quick { &FREEZES[..1] } else { &FREEZES };
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-bench-")
        .tempdir()?;
    let echo = scratch.path().join("shepherd-echo");
    std::fs::copy(target_dir.join("shepherd-echo"), &echo).context("copying shepherd-echo")?;
    let quiet = |_: &str| {};
    let mut section = Section {
        title: "Migration pause (CRIU between two nodes; echo: a counter every 2 ms through a CRIU-dumped process; redis: 5 request/response clients of a runc container)"
            .into(),
        ..Default::default()
    };
    let mut rsts = Row::new("RSTs on the clients' wire (all runs)", "count", false);
    let mut failed = Row::new("redis: failed commands (all runs)", "count", false);
    let mut shepherd_medians = Vec::new();
    let mut unclean: BTreeMap<(String, String), (usize, String)> = BTreeMap::new();
    let mut probe_failures: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut plotted: Vec<(String, Outcome, Outcome)> = Vec::new();
    for &freeze in freezes {
        for workload in [Workload::Echo, Workload::Redis] {
            let (w, tick, alone_name, with_name) = match workload {
                Workload::Echo => ("echo", ECHO_TICK, "criu alone", "shepherd (new IP)"),
                Workload::Redis => (
                    "redis",
                    REDIS_TICK,
                    "runc alone",
                    "shepherd + runc (new IP)",
                ),
            };
            let what = match workload {
                Workload::Echo => "pause",
                Workload::Redis => "longest wait",
            };
            let mut pause = Row::new(
                &format!("{w}: {what} - freeze, freeze ~{freeze} s"),
                "ms",
                false,
            );
            let mut probe = Row::new(
                &format!("{w}: new conn during freeze: connect -> 1st answer, ~{freeze} s"),
                "ms",
                false,
            );
            let mut measured = Row::new(&format!("{w}: freeze measured, ~{freeze} s"), "ms", false);
            let extra = Duration::from_secs_f64((freeze - base_freeze(workload)).max(0.0));
            for rep in 0..reps {
                eprintln!(
                    "bench: migration {w} ~{freeze} s, repetition {}/{reps}",
                    rep + 1
                );
                let variants = [
                    (
                        alone_name,
                        Scenario {
                            tick,
                            ..Scenario::criu_alone(workload, extra)
                        },
                    ),
                    (
                        with_name,
                        Scenario {
                            workload,
                            runc: true,
                            shepherd: true,
                            new_ip: true,
                            mode: ReleaseMode::Resume,
                            freeze_extra: extra,
                            probe: true,
                            tick,
                        },
                    ),
                ];
                let mut pair = Vec::new();
                for (name, sc) in variants {
                    let o = migrate_once(&echo, scratch.path(), &sc, &quiet)?;
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    pause.push(name, ms(o.longest_pause) - ms(o.freeze));
                    measured.push(name, ms(o.freeze));
                    match o.probe {
                        Some(p) => probe.push(name, ms(p)),
                        None => {
                            *probe_failures
                                .entry((name.to_string(), freeze.to_string()))
                                .or_insert(0) += 1
                        }
                    }
                    rsts.push(name, o.rsts as f64);
                    if workload == Workload::Redis {
                        failed.push(name, o.errors.len() as f64);
                    }
                    if !o.clean() {
                        let example = o
                            .rst_lines
                            .first()
                            .cloned()
                            .or_else(|| o.errors.first().cloned())
                            .or_else(|| o.load_failure.clone())
                            .unwrap_or_default();
                        unclean
                            .entry((name.to_string(), freeze.to_string()))
                            .or_insert_with(|| (0, example))
                            .0 += 1;
                    }
                    pair.push(o);
                }
                if rep == 0 {
                    let with = pair.pop();
                    let alone = pair.pop();
                    if let (Some(a), Some(s)) = (alone, with) {
                        plotted.push((format!("{w}, freeze ~{freeze} s"), s, a));
                    }
                }
            }
            if let Some((_, s)) = pause
                .variants
                .iter()
                .find(|(v, _)| v.starts_with("shepherd"))
            {
                let (_, med, max) = super::report::summary(s);
                shepherd_medians.push((w, freeze, med, max));
            }
            section.rows.extend([pause, measured, probe]);
        }
    }
    section.rows.push(rsts);
    section.rows.push(failed);
    same_ip_loop(quick, &mut section)?;
    if let Some(path) = plot {
        let rows: Vec<Vec<Panel<'_>>> = plotted
            .iter()
            .map(|(label, with, alone)| {
                vec![
                    Panel {
                        label: format!("{label}: with Shepherd"),
                        outcome: with,
                    },
                    Panel {
                        label: format!("{label}: CRIU alone"),
                        outcome: alone,
                    },
                ]
            })
            .collect();
        crate::plot::write_svg(
            path,
            "Clients across a live migration",
            "progress (answers / echoed values)",
            &rows,
        )?;
        eprintln!("bench: plot written to {}", path.display());
    }
    for ((name, freeze), (runs, example)) in &unclean {
        section.notes.push(format!(
            "{name} at ~{freeze} s: not clean (RSTs or failed commands) in {runs} of {reps} runs, e.g. {example:?}"
        ));
    }
    for ((name, freeze), n) in &probe_failures {
        section.notes.push(format!("{name} at ~{freeze} s: the connection opened during the freeze failed in {n} of {reps} runs"));
    }
    let redis_least = section
        .rows
        .iter()
        .filter(|r| r.name.starts_with("redis: freeze measured"))
        .flat_map(|r| r.variants.iter().flat_map(|(_, v)| v.iter().copied()))
        .fold(f64::INFINITY, f64::min);
    if redis_least.is_finite() {
        section.notes.push(format!("The redis workload's freeze is at least a runc checkpoint plus a restore: {redis_least:.0} ms at the least in this run, whatever the target."));
    }
    section.notes.push("The runc same-IP loop switches routes before each restore, as a runtime that sets up the new namespace and its address before CRIU recreates the sockets does: without Shepherd, a client's retransmission that arrives in between can be reset (its rows count how often it happened in this run).".into());
    section.notes.push("Freeze = checkpoint start -> restore done, as the controller measured it. Shepherd's clients wait from the hold to the release, so the wait beyond the freeze is what Shepherd adds (hold, flows to the destination, release); CRIU alone's is the client's retransmission back-off after the restore (negative when the restored socket's first segment reaches the client before its own retransmission would have). A request/response client shows the back-off most: its request sent during the freeze waits for a retransmission timer.".into());
    for (w, freeze, med, max) in shepherd_medians {
        section.notes.push(format!(
            "target wait - freeze <= 10 ms median and <= 30 ms max, {w} at ~{freeze} s: median {med:.1} ms, max {max:.1} ms: {}",
            if med <= 10.0 && max <= 30.0 { "met" } else { "NOT met" }
        ));
    }
    Ok(section)
}

/// The runc same-IP loop, without and with Shepherd: RSTs on the wire and
/// request/response clients that failed over the moves.
fn same_ip_loop(quick: bool, section: &mut Section) -> Result<()> {
    let moves = if quick { 2 } else { LOOP_MOVES };
    let mut rsts = Row::new(
        &format!("runc same IP, {moves} moves back and forth: RSTs on the wire"),
        "count",
        false,
    );
    let mut failures = Row::new(
        &format!("runc same IP, {moves} moves: clients that failed (each replaced)"),
        "count",
        false,
    );
    for (name, shepherd) in [("runc alone", false), ("shepherd + runc", true)] {
        eprintln!("bench: runc same-IP loop, {name}, {moves} moves");
        let o = ping_pong(moves, shepherd)?;
        rsts.push(name, o.rsts as f64);
        failures.push(name, o.failed_clients as f64);
        if let Some(e) = o.first_error {
            section
                .notes
                .push(format!("runc same-IP loop, {name}: first failure: {e}"));
        }
    }
    section.rows.extend([rsts, failures]);
    Ok(())
}
