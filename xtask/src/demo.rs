//! `cargo xtask demo`: a real live migration, with and without Shepherd,
//! showing what users feel.
//!
//! Builds a two-node topology (client, node A, node B, a pod behind each
//! node) and migrates the pod from node A to node B with real CRIU, driven
//! by the reference controller: once through Shepherd (default: the pod
//! gets a new IP, resume mode), once with CRIU alone (same IP: CRIU alone
//! cannot change it). By default the pod is redis-server in an OCI
//! container that runc checkpoints and restores, with five checking
//! request/response clients and redis-benchmark as load, and the freeze
//! lasts about a second: a
//! request sent during the freeze is where CRIU alone backs off.
//! `--workload echo` streams a counter through an echo process instead.
//! It prints, side by side, what the clients saw, and with `--plot` draws
//! their progress over time. Everything it creates is removed when it ends,
//! also on error.
use crate::scenario::{migrate_once, Outcome, Scenario, Workload};
use crate::setup;
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::json;
use shepherd_tests::controller::ReleaseMode;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Options {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// The pod and its clients: `redis` (a runc container, request/response
    /// clients) or `echo` (a process under raw CRIU, a streaming client).
    #[arg(long, default_value = "redis")]
    workload: String,
    /// Wait this long between checkpoint and restore (stretches the freeze,
    /// to show the baseline's retransmission back-off). The default makes
    /// a freeze of about a second.
    #[arg(long, default_value_t = 0.6)]
    freeze_extra: f64,
    /// Restore the pod with the same IP instead of a new one.
    #[arg(long)]
    same_ip: bool,
    /// Release mode with Shepherd: resume (CRIU restores the connections) or
    /// reconnect (restored without them).
    #[arg(long, default_value = "resume")]
    mode: String,
    /// Draw each client's progress over time, Shepherd beside CRIU alone,
    /// the freeze shaded, into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Redis: run it as a plain process under raw CRIU instead of in a
    /// runc container.
    #[arg(long)]
    no_runc: bool,
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
    let workload = Workload::parse(&o.workload)?;
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
        "with Shepherd: pod {} ({}) from node A to node B ({}, {} mode)",
        shepherd_tests::topology::POD_IP,
        o.workload,
        if o.same_ip { "same IP" } else { "new IP" },
        o.mode
    ));
    let shepherd = Scenario {
        workload,
        runc: !o.no_runc,
        shepherd: true,
        new_ip: !o.same_ip,
        mode,
        freeze_extra: extra,
        probe: true,
        tick: Duration::from_millis(10),
    };
    let with = migrate_once(&echo, scratch.path(), &shepherd, &say)?;
    say("CRIU alone (same IP; no Shepherd): the same migration");
    let alone = migrate_once(
        &echo,
        scratch.path(),
        &Scenario {
            runc: !o.no_runc,
            ..Scenario::criu_alone(workload, extra)
        },
        &say,
    )?;

    if let Some(path) = &o.plot {
        crate::plot::write_svg(
            path,
            &format!(
                "{} clients across a live migration (freeze {:.1} s)",
                o.workload,
                with.freeze.as_secs_f64()
            ),
            workload.unit(),
            &[vec![
                crate::plot::Panel {
                    label: "with Shepherd".into(),
                    outcome: &with,
                },
                crate::plot::Panel {
                    label: "CRIU alone".into(),
                    outcome: &alone,
                },
            ]],
        )?;
        say(&format!("plot written to {}", path.display()));
    }
    if o.json {
        let out = json!({
            "workload": o.workload,
            "freeze_extra_s": o.freeze_extra,
            "shepherd": to_json(workload, &with),
            "criu_alone": to_json(workload, &alone),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(workload, &with, &alone);
    }
    if !with.clean() {
        bail!("with Shepherd the clients did not get every answer cleanly");
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn to_json(w: Workload, x: &Outcome) -> serde_json::Value {
    let (sent, verified) = match w {
        Workload::Redis => ("commands_sent", "commands_answered"),
        Workload::Echo => ("bytes_sent", "bytes_verified"),
    };
    json!({
        "freeze_ms": ms(x.freeze),
        "longest_wait_ms": ms(x.longest_pause),
        "wait_beyond_freeze_ms": ms(x.longest_pause) - ms(x.freeze),
        "rsts": x.rsts,
        sent: x.sent,
        verified: x.verified,
        "failed": x.errors,
        "load_failure": x.load_failure,
        "bytes_held": x.bytes_held,
        "bytes_replayed": x.bytes_replayed,
        "new_connection_during_freeze_ms": x.probe.map(ms),
        "steps_ms": x.steps.iter().map(|(n, d)| json!({"step": n, "ms": ms(*d)})).collect::<Vec<_>>(),
    })
}

fn print_table(w: Workload, with: &Outcome, alone: &Outcome) {
    println!();
    println!("  {:<44} {:>14} {:>14}", "", "with Shepherd", "CRIU alone");
    println!(
        "  {:<44} {:>14} {:>14}",
        "-".repeat(44),
        "-".repeat(14),
        "-".repeat(14)
    );
    let row = |name: &str, a: String, b: String| println!("  {name:<44} {a:>14} {b:>14}");
    let both = |f: &dyn Fn(&Outcome) -> String| (f(with), f(alone));
    let (a, b) = both(&|x| format!("{:.0} ms", ms(x.freeze)));
    row("freeze (checkpoint start -> restore done)", a, b);
    let longest = match w {
        Workload::Redis => "longest wait for an answer",
        Workload::Echo => "client's longest pause",
    };
    let (a, b) = both(&|x| format!("{:.0} ms", ms(x.longest_pause)));
    row(longest, a, b);
    let (a, b) = both(&|x| format!("{:+.0} ms", ms(x.longest_pause) - ms(x.freeze)));
    row("  of which beyond the freeze", a, b);
    let (a, b) = both(&|x| {
        x.probe
            .map(|p| format!("{:.0} ms", ms(p)))
            .unwrap_or_else(|| "failed".into())
    });
    row("new connection during the freeze: 1st answer", a, b);
    match w {
        Workload::Redis => {
            let (a, b) = both(&|x| format!("{} / {}", x.verified, x.sent));
            row("commands answered right / sent", a, b);
            let (a, b) = both(&|x| x.errors.len().to_string());
            row("commands failed", a, b);
            let (a, b) = both(&|x| match x.load_failure {
                None => "ran throughout".into(),
                Some(_) => "FAILED".into(),
            });
            row("redis-benchmark load (INCR, 2 conns)", a, b);
        }
        Workload::Echo => {
            let (a, b) = both(&|x| format!("{} / {}", x.verified, x.sent));
            row("bytes verified (in order, once) / sent", a, b);
            let (a, b) = both(&|x| x.errors.len().to_string());
            row("client errors", a, b);
        }
    }
    let (a, b) = both(&|x| x.rsts.to_string());
    row("RSTs on the clients' wire", a, b);
    row(
        "bytes held / replayed",
        format!("{} / {}", with.bytes_held, with.bytes_replayed),
        "-".into(),
    );
    println!();
    println!("  With Shepherd the clients wait from the hold, taken before the checkpoint starts");
    println!("  (so the checkpoint misses nothing the pod serves), to the release, right after");
    println!("  the restore. With CRIU alone they are served until the checkpoint actually");
    println!("  freezes the process (some 0.1 s into a runc checkpoint), and a request sent");
    println!("  after that waits for the client's next retransmission after the restore, whose");
    println!("  timer backs off (0.2, 0.4, 0.8, 1.6 s, ...). Only Shepherd keeps the pod's new");
    println!("  IP, resets nobody, and answers a connection opened during the freeze at once.");
    for x in [with, alone] {
        for e in x.errors.iter().chain(&x.load_failure) {
            println!("  error: {e}");
        }
    }
    println!();
}
