//! Migration pause: the client's longest pause minus the freeze, with
//! Shepherd and with CRIU alone, interleaved, at freezes of about 0.2, 1 and
//! 3 s; RSTs on the client's wire; and the connect → first response time of
//! a connection opened during the freeze.
use super::report::{Row, Section};
use crate::scenario::{migrate_once, Scenario};
use anyhow::{Context, Result};
use shepherd_tests::controller::ReleaseMode;
use std::path::Path;
use std::time::Duration;

/// Target freezes (s) and the wait added between dump and restore to reach
/// them (a dump + restore here take about 0.13 s on their own).
/// The client's counter interval: the resolution of the measured pause.
const TICK: Duration = Duration::from_millis(2);

const FREEZES: [(f64, f64); 3] = [(0.2, 0.07), (1.0, 0.87), (3.0, 2.87)];

pub fn run(quick: bool, target_dir: &Path) -> Result<Section> {
    let reps = if quick { 1 } else { 5 };
    let freezes: &[(f64, f64)] = if quick { &FREEZES[..1] } else { &FREEZES };
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-bench-")
        .tempdir()?;
    let echo = scratch.path().join("shepherd-echo");
    std::fs::copy(target_dir.join("shepherd-echo"), &echo).context("copying shepherd-echo")?;
    let quiet = |_: &str| {};
    let mut section = Section {
        title: "Migration pause (CRIU dump/restore between two nodes; the client sends a counter every 2 ms)"
            .into(),
        ..Default::default()
    };
    let mut rsts = Row::new("RSTs on the client's wire (all runs)", "count", false);
    let mut shepherd_medians = Vec::new();
    let mut rst_runs: std::collections::BTreeMap<(&str, String), (usize, Vec<String>)> =
        Default::default();
    let mut probe_failures: std::collections::BTreeMap<(&str, String), usize> = Default::default();
    for &(freeze, extra) in freezes {
        let mut pause = Row::new(&format!("pause - freeze, freeze ~{freeze} s"), "ms", false);
        let mut probe = Row::new(
            &format!("new conn during freeze: connect -> 1st response, ~{freeze} s"),
            "ms",
            false,
        );
        let mut measured = Row::new(&format!("freeze measured, ~{freeze} s"), "ms", false);
        for rep in 0..reps {
            eprintln!(
                "bench: migration ~{freeze} s, repetition {}/{reps}",
                rep + 1
            );
            let extra = Duration::from_secs_f64(extra);
            let variants = [
                (
                    "criu alone",
                    Scenario {
                        tick: TICK,
                        ..Scenario::criu_alone(extra)
                    },
                ),
                (
                    "shepherd (new IP)",
                    Scenario {
                        shepherd: true,
                        new_ip: true,
                        mode: ReleaseMode::Resume,
                        freeze_extra: extra,
                        probe: true,
                        tick: TICK,
                    },
                ),
            ];
            for (name, sc) in variants {
                let o = migrate_once(&echo, scratch.path(), &sc, &quiet)?;
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                pause.push(name, ms(o.longest_pause) - ms(o.freeze));
                measured.push(name, ms(o.freeze));
                if let Some(p) = o.probe {
                    probe.push(name, ms(p));
                }
                rsts.push(name, o.rsts as f64);
                if o.rsts > 0 {
                    rst_runs
                        .entry((name, freeze.to_string()))
                        .or_insert_with(|| (0, o.rst_lines.clone()))
                        .0 += 1;
                }
                if sc.probe && o.probe.is_none() {
                    *probe_failures
                        .entry((name, freeze.to_string()))
                        .or_insert(0) += 1;
                }
                if o.bytes_verified != o.bytes_sent || !o.errors.is_empty() {
                    section.notes.push(format!(
                        "{name} at ~{freeze} s: the client's stream was not clean ({} of {} bytes verified, errors {:?})",
                        o.bytes_verified, o.bytes_sent, o.errors
                    ));
                }
            }
        }
        if let Some((_, s)) = pause
            .variants
            .iter()
            .find(|(v, _)| v.starts_with("shepherd"))
        {
            let (_, med, max) = super::report::summary(s);
            shepherd_medians.push((freeze, med, max));
        }
        section.rows.extend([pause, measured, probe]);
    }
    section.rows.push(rsts);
    for ((name, freeze), (runs, example)) in &rst_runs {
        section.notes.push(format!("{name} at ~{freeze} s: RSTs reached the client in {runs} of {reps} runs, e.g. {example:?}"));
    }
    for ((name, freeze), n) in &probe_failures {
        section.notes.push(format!("{name} at ~{freeze} s: the connection opened during the freeze failed in {n} of {reps} runs"));
    }
    section.notes.push("Freeze = dump start -> restore done, as the controller measured it. Shepherd's pause runs from the hold to the release, so pause - freeze is what Shepherd adds (hold, flows to the destination, release); CRIU alone's is the client's retransmission back-off after the restore (negative when the restored socket's first segment reaches the client before its own retransmission would have).".into());
    for (freeze, med, max) in shepherd_medians {
        section.notes.push(format!(
            "target pause - freeze <= 10 ms median and <= 30 ms max at ~{freeze} s: median {med:.1} ms, max {max:.1} ms: {}",
            if med <= 10.0 && max <= 30.0 { "met" } else { "NOT met" }
        ));
    }
    Ok(section)
}
