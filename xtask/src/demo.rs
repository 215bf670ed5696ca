//! `cargo xtask demo`: a hold/release on a real namespace topology.
//!
//! Builds client, node and pod namespaces, starts the agent in the node and an
//! echo server in the pod, streams a counter from the client through Shepherd
//! every 10 ms, then holds the endpoint while the pod is frozen (SIGSTOP/
//! SIGCONT stands in for a CRIU freeze here), releases, and reports what the
//! client saw. Everything it creates is removed when it ends, also on error.
use crate::util::{self, workspace_root};
use crate::{build_ebpf, setup};
use anyhow::{bail, Context, Result};
use serde_json::json;
use shepherd_tests::agent::Agent;
use shepherd_tests::capture::Capture;
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::stream::CounterStream;
use shepherd_tests::topology::SingleNode;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Options {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// How long the pod stays frozen (and the endpoint held), in seconds.
    #[arg(long, default_value_t = 2.0)]
    freeze: f64,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
}

const PORT: u16 = 7000;

pub fn run(o: &Options) -> Result<()> {
    if !(0.05..=60.0).contains(&o.freeze) {
        bail!("--freeze must be between 0.05 and 60 seconds");
    }
    if !shepherd_tests::privilege::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
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
    // SAFETY (edition 2021 API): set before any thread of ours is started.
    std::env::set_var("SHEPHERD_BIN", target.join("shepherd"));

    let scratch = tempfile::Builder::new()
        .prefix("shepherd-demo-")
        .tempdir()?;
    let dir = scratch.path();
    let t = SingleNode::new(&unique_prefix("demo"));
    let ep = t.pod_addr(PORT);
    say(&format!(
        "topology: client {} -> node {} -> pod {ep} (namespaces {}, {}, {})",
        t.client_ip,
        t.node_ip,
        t.client.name(),
        t.node.name(),
        t.pod.name()
    ));
    let echo = Workload::spawn_in(
        &t.pod,
        &target.join("shepherd-echo"),
        ["--listen", &ep.to_string()],
        &dir.join("echo.log"),
    );
    wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))
        .context("echo server did not come up")?;
    let agent = Agent::start(
        &t.node,
        [
            "--intercept-iface",
            t.node_client_if(),
            "--shield-iface",
            t.node_pod_if(),
        ],
    );
    say(&format!(
        "agent running in {} (pid {}), API at {}",
        t.node.name(),
        agent.pid(),
        agent.socket().display()
    ));
    cli_ok(&agent, &["endpoint", "add", &ep.to_string()])?;
    say(&format!("endpoint {ep} registered"));

    let capture = Capture::start(&t.client, t.client_if());
    let stream = CounterStream::start(&t.client, ep, Duration::from_millis(10));
    say("client streaming an 8-byte counter every 10 ms through Shepherd");
    std::thread::sleep(Duration::from_secs(1));

    let freeze = Duration::from_secs_f64(o.freeze);
    let t0 = Instant::now();
    let held = cli_ok(
        &agent,
        &["migrate", "hold", "--id", "demo", &ep.to_string()],
    )?;
    say(&format!(
        "hold: quiescent after {} ms, {} connection(s) held",
        held["quiesce_ms"], held["connections"]
    ));
    echo.signal(libc::SIGSTOP).context("freezing the pod")?;
    say(&format!("pod frozen (SIGSTOP) for {:.1} s", o.freeze));
    std::thread::sleep(freeze.saturating_sub(t0.elapsed()));
    echo.signal(libc::SIGCONT).context("thawing the pod")?;
    let released = cli_ok(&agent, &["migrate", "release", "--id", "demo"])?;
    let hold_len = t0.elapsed();
    say(&format!(
        "pod thawed (SIGCONT); released after {} ms",
        released["hold_duration_ms"]
    ));
    std::thread::sleep(Duration::from_secs(1));

    let report = stream.stop();
    let wire = capture.stop();
    let status = cli_ok(&agent, &["migrate", "status", "--id", "demo"])?;
    drop(agent);
    drop(echo);
    drop(t);

    let verified_bytes = if report.is_ok() {
        report.received * 8
    } else {
        0
    };
    let extra_ms = report.max_gap.as_secs_f64() * 1e3 - hold_len.as_secs_f64() * 1e3;
    let result = json!({
        "hold_ms": hold_len.as_millis() as u64,
        "client_longest_pause_ms": report.max_gap.as_millis() as u64,
        "pause_minus_hold_ms": extra_ms,
        "bytes_sent": report.sent * 8,
        "bytes_verified_in_order_exactly_once": verified_bytes,
        "rsts_on_the_wire": wire.rsts,
        "client_errors": report.io_errors,
        "bytes_held": status["bytes_held"],
        "bytes_replayed": status["bytes_replayed"],
        "ok": report.is_ok() && wire.rsts == 0,
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!();
        println!("  what the client saw                     value");
        println!("  --------------------------------------  ------------");
        println!(
            "  hold (pod frozen)                       {} ms",
            hold_len.as_millis()
        );
        println!(
            "  client's longest pause                  {} ms",
            report.max_gap.as_millis()
        );
        println!("  pause beyond the hold                   {extra_ms:+.0} ms");
        println!(
            "  bytes sent                              {}",
            report.sent * 8
        );
        println!("  bytes verified (in order, exactly once) {verified_bytes}");
        println!(
            "  bytes held / replayed by Shepherd       {} / {}",
            status["bytes_held"], status["bytes_replayed"]
        );
        println!("  RSTs on the client's wire               {}", wire.rsts);
        println!(
            "  client errors                           {}",
            report.io_errors.len()
        );
        println!();
    }
    if !report.is_ok() || wire.rsts != 0 {
        bail!(
            "the client did not get every byte cleanly: {report:?}; RSTs: {:?}",
            wire.rst_lines
        );
    }
    Ok(())
}

fn cli_ok(agent: &Agent, args: &[&str]) -> Result<serde_json::Value> {
    let mut argv = args.to_vec();
    argv.push("--json");
    let out = agent.cli(&argv);
    if !out.status.success() {
        bail!(
            "shepherd {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the CLI's JSON")
}
