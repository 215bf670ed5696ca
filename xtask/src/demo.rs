//! `cargo xtask demo`: a real live migration, with and without Shepherd.
//!
//! Builds a two-node topology (client, node A, node B, a pod behind each
//! node), starts an echo pod behind node A and a client streaming a counter
//! every 10 ms, then migrates the pod to node B with real CRIU (dump, copy,
//! restore) driven by the reference controller — once through Shepherd
//! (default: the pod gets a new IP, resume mode), once with CRIU alone (same
//! IP: CRIU alone cannot change it). It prints, side by side, what the client
//! saw. Everything it creates is removed when it ends, also on error.
use crate::scenario::{migrate_once, Outcome, Scenario};
use crate::setup;
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::json;
use shepherd_tests::controller::ReleaseMode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Options {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Wait this long between dump and restore (stretches the freeze, to show
    /// the baseline's retransmission back-off).
    #[arg(long, default_value_t = 0.0)]
    freeze_extra: f64,
    /// Restore the pod with the same IP instead of a new one.
    #[arg(long)]
    same_ip: bool,
    /// Release mode with Shepherd: resume (CRIU restores the connections) or
    /// reconnect (restored without them).
    #[arg(long, default_value = "resume")]
    mode: String,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

pub fn run(o: &Options) -> Result<()> {
    if !(0.0..=30.0).contains(&o.freeze_extra) {
        bail!("--freeze-extra must be between 0 and 30 seconds");
    }
    let mode = match o.mode.as_str() {
        "resume" => ReleaseMode::Resume,
        "reconnect" => ReleaseMode::Reconnect,
        m => bail!("unknown --mode {m:?}: resume or reconnect"),
    };
    if !shepherd_tests::privilege::is_root() {
        bail!("the demo creates network namespaces, loads eBPF and runs CRIU: run it as root");
    }
    let say = |msg: &str| eprintln!("[demo] {msg}");
    if !o.no_setup {
        say("setup (fast when already done)");
        setup::run(&setup::Options::default())?;
    }
    say("building the eBPF object, the agent and the echo workload");
    let target = util::build_release_binaries()?;
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-demo-")
        .tempdir()?;
    // CRIU restores the binary from its path: use a copy a rebuild can't touch.
    let echo = scratch.path().join("shepherd-echo");
    std::fs::copy(target.join("shepherd-echo"), &echo).context("copying shepherd-echo")?;
    let extra = Duration::from_secs_f64(o.freeze_extra);

    say(&format!(
        "with Shepherd: pod {} from node A to node B ({}, {} mode)",
        shepherd_tests::topology::POD_IP,
        if o.same_ip { "same IP" } else { "new IP" },
        o.mode
    ));
    let shepherd = Scenario {
        shepherd: true,
        new_ip: !o.same_ip,
        mode,
        freeze_extra: extra,
        probe: true,
        tick: Duration::from_millis(10),
    };
    let with = migrate_once(&echo, scratch.path(), &shepherd, &say)?;
    say("CRIU alone (same IP; no Shepherd): the same migration");
    let alone = migrate_once(&echo, scratch.path(), &Scenario::criu_alone(extra), &say)?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if o.json {
        let side = |x: &Outcome| {
            json!({
                "freeze_ms": ms(x.freeze),
                "client_longest_pause_ms": ms(x.longest_pause),
                "pause_minus_freeze_ms": ms(x.longest_pause) - ms(x.freeze),
                "rsts": x.rsts,
                "bytes_sent": x.bytes_sent,
                "bytes_verified": x.bytes_verified,
                "client_errors": x.errors,
                "bytes_held": x.bytes_held,
                "bytes_replayed": x.bytes_replayed,
                "probe_connect_to_first_response_ms": x.probe.map(ms),
                "steps_ms": x.steps.iter().map(|(n, d)| json!({"step": n, "ms": ms(*d)})).collect::<Vec<_>>(),
            })
        };
        let out = json!({
            "freeze_extra_s": o.freeze_extra,
            "shepherd": side(&with),
            "criu_alone": side(&alone),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        println!("  {:<38} {:>14} {:>14}", "", "with Shepherd", "CRIU alone");
        println!(
            "  {:<38} {:>14} {:>14}",
            "-".repeat(38),
            "-".repeat(14),
            "-".repeat(14)
        );
        let row = |name: &str, a: String, b: String| println!("  {name:<38} {a:>14} {b:>14}");
        row(
            "freeze (dump start -> restore done)",
            format!("{:.0} ms", ms(with.freeze)),
            format!("{:.0} ms", ms(alone.freeze)),
        );
        row(
            "client's longest pause",
            format!("{:.0} ms", ms(with.longest_pause)),
            format!("{:.0} ms", ms(alone.longest_pause)),
        );
        row(
            "pause beyond the freeze",
            format!("{:+.0} ms", ms(with.longest_pause) - ms(with.freeze)),
            format!("{:+.0} ms", ms(alone.longest_pause) - ms(alone.freeze)),
        );
        row(
            "RSTs on the client's wire",
            with.rsts.to_string(),
            alone.rsts.to_string(),
        );
        row(
            "bytes sent",
            with.bytes_sent.to_string(),
            alone.bytes_sent.to_string(),
        );
        row(
            "bytes verified (in order, once)",
            with.bytes_verified.to_string(),
            alone.bytes_verified.to_string(),
        );
        row(
            "client errors",
            with.errors.len().to_string(),
            alone.errors.len().to_string(),
        );
        row(
            "bytes held / replayed",
            format!("{} / {}", with.bytes_held, with.bytes_replayed),
            "-".into(),
        );
        println!();
        println!("  Shepherd's pause includes the hold around the freeze (hold -> release);");
        println!("  CRIU alone resumes at the client's next retransmission after the restore.");
        println!();
    }
    if with.rsts != 0 || with.bytes_verified != with.bytes_sent || !with.errors.is_empty() {
        bail!("with Shepherd the client did not get every byte cleanly");
    }
    Ok(())
}
