//! `cargo xtask demo`: a real live migration, with and without Shepherd.
//!
//! Builds a two-node topology (client, node A, node B, a pod behind each
//! node), starts an echo pod behind node A and a client streaming a counter
//! every 10 ms, then migrates the pod to node B with real CRIU (dump, copy,
//! restore) driven by the reference controller — once through Shepherd
//! (default: the pod gets a new IP, resume mode), once with CRIU alone (same
//! IP: CRIU alone cannot change it). It prints, side by side, what the client
//! saw. Everything it creates is removed when it ends, also on error.
use crate::util::{self, workspace_root};
use crate::{build_ebpf, setup};
use anyhow::{bail, Context, Result};
use serde_json::json;
use shepherd_tests::agent::Agent;
use shepherd_tests::capture::Capture;
use shepherd_tests::controller::{self, Cluster, Plan, ReleaseMode};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::stream::CounterStream;
use shepherd_tests::topology::TwoNode;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
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

const PORT: u16 = 7000;

/// What the client saw in one migration.
struct Outcome {
    freeze: Duration,
    longest_pause: Duration,
    rsts: u64,
    bytes_sent: u64,
    bytes_verified: u64,
    errors: Vec<String>,
    steps: Vec<(&'static str, Duration)>,
    bytes_held: u64,
    bytes_replayed: u64,
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
    build_ebpf::build(true)?;
    util::run(
        Command::new("cargo")
            .args([
                "build",
                "--release",
                "-p",
                "shepherd",
                "-p",
                "shepherd-tests",
                "--bins",
            ])
            .current_dir(workspace_root()),
    )?;
    let target = workspace_root().join("target/release");
    // Set before any thread of ours starts (the guards read it).
    std::env::set_var("SHEPHERD_BIN", target.join("shepherd"));
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
    let with = migrate_once(&echo, scratch.path(), true, !o.same_ip, mode, extra, &say)?;
    say("CRIU alone (same IP; no Shepherd): the same migration");
    let alone = migrate_once(
        &echo,
        scratch.path(),
        false,
        false,
        ReleaseMode::Resume,
        extra,
        &say,
    )?;

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

fn migrate_once(
    echo: &Path,
    dir: &Path,
    shepherd: bool,
    new_ip: bool,
    mode: ReleaseMode,
    freeze_extra: Duration,
    say: &dyn Fn(&str),
) -> Result<Outcome> {
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
    let args = [
        "--intercept-iface",
        t.node_fabric_if(),
        "--shield-iface",
        t.node_pod_if(),
    ];
    let origin = Agent::start(&t.node_a, args);
    let dest = Agent::start(&t.node_b, args);
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
    let stream = CounterStream::start(&t.client, ep, Duration::from_millis(10));
    say("  client streaming an 8-byte counter every 10 ms");
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
    let (restored, report) = controller::migrate(
        &cluster,
        &plan,
        pid,
        &mut || {
            pod.wait_exit(Duration::from_secs(10));
        },
        &|line| say(&format!("  {line}")),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
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
        bytes_sent: r.sent * 8,
        bytes_verified: if r.is_ok() { r.received * 8 } else { 0 },
        errors: r.io_errors.clone(),
        steps: report.steps,
        bytes_held: status["bytes_held"].as_u64().unwrap_or(0),
        bytes_replayed: status["bytes_replayed"].as_u64().unwrap_or(0),
    })
}
