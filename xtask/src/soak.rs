//! `cargo xtask soak`: back-to-back live migrations under load, checked
//! after every one, and the agents' resources compared at the end.
//!
//! One pod runs redis-server and an echo server (two processes, one CRIU
//! process tree) and moves between pod A (behind node A) and pod B (behind
//! node B) with real CRIU, at a new address every time. Throughout: 50
//! clients stream a checked counter through the echo server, 5 Redis
//! clients send checked `INCR`s, and a stream of short-lived connections
//! opens, echoes a line and closes. After each migration every client must
//! still be served; at the end every byte must have come back once and in
//! order, no RST may have crossed the clients' wire, and the agents'
//! memory, descriptors, kernel map entries, migration records, routes and
//! rules must be back within stated bounds of where they started.
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use shepherd_tests::agent::Agent;
use shepherd_tests::capture::Capture;
use shepherd_tests::controller::{self, Cluster, Plan};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{open_fds, wait_tcp_ready, Workload};
use shepherd_tests::resp::RedisCounter;
use shepherd_tests::runtime::{redis_server_args, REDIS_SERVER};
use shepherd_tests::stream::CounterStream;
use shepherd_tests::topology::{fresh_pod, Hop, Place, TwoNode};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ECHO_PORT: u16 = 7000;
const REDIS_PORT: u16 = 6379;
const REDIS_CLIENTS: usize = 5;
/// How far above its start an agent's RSS may end.
const RSS_SLACK_MIB: f64 = 16.0;
/// How many more descriptors an agent may hold at the end.
const FD_SLACK: usize = 16;
/// Translations that may remain beyond those of the flows still open (the
/// sweep removes ended flows' entries within about half a minute).
const TRANSLATION_SLACK: usize = 16;
/// Finished migrations an agent keeps (its `FINISHED_KEPT`).
const FINISHED_KEPT: usize = 64;
/// The agent's own routing table (`shepherd_common::ROUTE_TABLE`).
const AGENT_TABLE: &str = "21320";

#[derive(clap::Args)]
pub struct Options {
    /// Live migrations to run back to back.
    #[arg(long, default_value_t = 100)]
    pub migrations: usize,
    /// Counter-streaming clients throughout.
    #[arg(long, default_value_t = 50)]
    pub streams: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the result into RELIABILITY.md.
    #[arg(long)]
    pub write: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
}

/// What one agent holds, at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Footprint {
    rss_mib: f64,
    fds: usize,
    translations: usize,
    migrations: usize,
    routes: usize,
    rules: usize,
}

impl Footprint {
    fn of(agent: &Agent, node: &shepherd_tests::netns::Netns) -> Footprint {
        let metrics = agent.http("GET", "/metrics", None).1;
        let gauge = |name: &str| -> usize {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as usize
        };
        let records = agent.http("GET", "/v1/migrations", None).1;
        let migrations = serde_json::from_str::<Value>(&records)
            .ok()
            .and_then(|v| v["migrations"].as_array().map(Vec::len))
            .unwrap_or(0);
        let count = |args: &[&str]| {
            node.ip(args)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
        };
        Footprint {
            rss_mib: agent.rss_bytes() as f64 / (1024.0 * 1024.0),
            fds: open_fds(agent.pid()),
            translations: gauge("shepherd_translated_flows"),
            migrations,
            routes: count(&["route", "show", "table", AGENT_TABLE]),
            rules: count(&["rule", "show"]),
        }
    }

    fn json(&self) -> Value {
        json!({
            "rss_mib": (self.rss_mib * 10.0).round() / 10.0,
            "fds": self.fds,
            "translations": self.translations,
            "migration_records": self.migrations,
            "routes": self.routes,
            "rules": self.rules,
        })
    }
}

/// Short-lived connections to the echo server, one after another, until
/// stopped: each connects, echoes a line, and closes.
struct Churn {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start(t: &TwoNode, ep: SocketAddrV4) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(std::sync::Mutex::new(None));
        let ns = t.client.name().to_string();
        let (s, o, f, e) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        let thread = std::thread::spawn(move || {
            let _in = shepherd_tests::netns::enter(&ns);
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                match one_short_connection(ep, i) {
                    Ok(()) => o.fetch_add(1, Ordering::Relaxed),
                    Err(err) => {
                        if let Ok(mut first) = e.lock() {
                            first.get_or_insert(err);
                        }
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Churn {
            stop,
            ok,
            failed,
            first_error,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let first = self.first_error.lock().ok().and_then(|e| e.clone());
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        )
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One short-lived connection (from the current namespace): a line out,
/// the same line back, closed. Waits through a hold (up to 30 s).
fn one_short_connection(ep: SocketAddrV4, i: u64) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect_timeout(&ep.into(), Duration::from_secs(30))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let line = format!("short {i}\n");
    s.write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; line.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != line.as_bytes() {
        return Err(format!(
            "echo differs: {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    Ok(())
}

/// The pod's address after move `k` (0: where it starts).
fn address(k: usize) -> Ipv4Addr {
    if k == 0 {
        shepherd_tests::topology::POD_IP
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 78, 0, 0)) + k as u32)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(o: &Options) -> Result<()> {
    if o.migrations == 0 || o.migrations > 5000 {
        bail!("--migrations must be between 1 and 5000");
    }
    if !shepherd_tests::privilege::is_root() {
        bail!("the soak creates network namespaces, loads eBPF and runs CRIU: run it as root");
    }
    let say = |msg: &str| {
        if !o.json {
            eprintln!("[soak] {msg}");
        }
    };
    if !o.no_setup {
        say("setup (fast when already done)");
        crate::setup::run(&crate::setup::Options::default())?;
    }
    say("building the eBPF object, the agent and the echo workload");
    let target = util::build_release_binaries()?;
    shepherd_tests::process::raise_nofile().context("raising the open-file limit")?;
    let namespaces_before = shepherd_tests::netns::list().len();
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-soak-")
        .tempdir()?;
    // CRIU restores binaries from their paths: copies a rebuild can't touch.
    let echo = scratch.path().join("shepherd-echo");
    std::fs::copy(target.join("shepherd-echo"), &echo).context("copying shepherd-echo")?;
    let result = soak(o, &echo, scratch.path(), &say);
    let leftover = shepherd_tests::netns::list().len() as i64 - namespaces_before as i64;
    let mut result = result?;
    result["end"]["leftover_namespaces"] = json!(leftover);
    let mut failures: Vec<String> = result["failures"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if leftover != 0 {
        failures.push(format!("{leftover} network namespaces left behind"));
    }
    result["failures"] = json!(failures);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_table(&result);
    }
    if o.write {
        crate::reliability::write_soak(&result)?;
        say("RELIABILITY.md updated");
    }
    if !failures.is_empty() {
        bail!("the soak failed:\n- {}", failures.join("\n- "));
    }
    Ok(())
}

fn soak(o: &Options, echo: &Path, dir: &Path, say: &dyn Fn(&str)) -> Result<Value> {
    let prefix = unique_prefix("soak");
    let t = TwoNode::new_ip(&prefix);
    // A fresh namespace for every move, as a runtime restores into a new
    // sandbox: odd moves land behind node B, even ones behind node A. They
    // exist before the agents start, which shield and translate on their
    // veths.
    let host_ifs: Vec<String> = (1..=o.migrations).map(|k| format!("s{k}")).collect();
    let mut places: Vec<Option<shepherd_tests::netns::Netns>> = (1..=o.migrations)
        .map(|k| {
            Some(fresh_pod(
                &t,
                k % 2 == 0,
                &host_ifs[k - 1],
                &format!("{prefix}p{k}"),
                address(k),
            ))
        })
        .collect();
    let redis_args = redis_server_args(REDIS_PORT, dir).join(" ");
    let script = format!(
        "{REDIS_SERVER} {redis_args} & exec {} --listen 0.0.0.0:{ECHO_PORT}",
        echo.display()
    );
    let pod = Workload::spawn_in(
        &t.pod_a,
        Path::new("/bin/sh"),
        ["-c", &script],
        &dir.join("pod.log"),
    );
    let ep_echo = t.pod_addr(ECHO_PORT);
    let ep_redis = t.pod_addr(REDIS_PORT);
    for ep in [ep_echo, ep_redis] {
        wait_tcp_ready(&t.client, SocketAddr::V4(ep), Duration::from_secs(10))
            .with_context(|| format!("the pod does not serve {ep}: {}", pod.log()))?;
    }
    let shield = |behind_a: bool| -> Vec<&str> {
        host_ifs
            .iter()
            .enumerate()
            .filter(|(i, _)| ((i + 1) % 2 == 0) == behind_a)
            .flat_map(|(_, h)| ["--shield-iface", h.as_str()])
            .collect()
    };
    let (on_a, on_b) = (shield(true), shield(false));
    let (origin, dest) = shepherd_tests::agent::start_pair_with(&t, &[], &on_a, &on_b);
    origin.cli_json(&[
        "endpoint",
        "add",
        &ep_echo.to_string(),
        &ep_redis.to_string(),
    ]);
    let capture = Capture::start(&t.client, t.client_if());

    say(&format!(
        "load: {} counter streams, {REDIS_CLIENTS} redis clients, short-lived connections",
        o.streams
    ));
    let streams: Vec<CounterStream> = (0..o.streams)
        .map(|_| CounterStream::start(&t.client, ep_echo, Duration::from_millis(20)))
        .collect();
    let redis: Vec<RedisCounter> = (0..REDIS_CLIENTS)
        .map(|i| {
            RedisCounter::start(
                &t.client,
                ep_redis,
                &format!("soak-{i}"),
                Duration::from_millis(10),
            )
        })
        .collect();
    let churn = Churn::start(&t, ep_echo);
    std::thread::sleep(Duration::from_secs(2));
    let start = [
        Footprint::of(&origin, &t.node_a),
        Footprint::of(&dest, &t.node_b),
    ];

    let mut failures = Vec::new();
    let mut excess_ms = Vec::new();
    let mut per_migration_ms = Vec::new();
    let mut history = vec![address(0)];
    let mut restored: Option<shepherd_tests::criu::RestoredProcess> = None;
    let mut original = Some(pod);
    let soak_t0 = Instant::now();
    for k in 1..=o.migrations {
        let ip = address(k);
        let to_b = k % 2 == 1;
        let from = if k == 1 {
            t.place_a()
        } else {
            Place {
                ns: places[k - 2].as_ref().context("the pod's namespace")?,
                host_if: &host_ifs[k - 2],
                behind_a: k % 2 == 1,
            }
        };
        let to = Place {
            ns: places[k - 1]
                .as_ref()
                .context("the destination namespace")?,
            host_if: &host_ifs[k - 1],
            behind_a: !to_b,
        };
        let hop = Hop {
            t: &t,
            from,
            to,
            ip,
            history: &history,
        };
        hop.prepare();
        let dest_agent = if to_b { &dest } else { &origin };
        let c = Cluster {
            topo: &hop,
            origin: &origin,
            dest: dest_agent,
        };
        let plan = Plan::new(&format!("soak-{k}"), vec![ep_echo, ep_redis]);
        let debug_caps: Vec<(String, Capture)> = if std::env::var_os("SOAK_DEBUG").is_some() {
            vec![
                (
                    format!("A:{}", to.host_if),
                    Capture::start(if to.behind_a { &t.node_a } else { &t.node_b }, to.host_if),
                ),
                ("A:fab0".into(), Capture::start(&t.node_a, "fab0")),
                (
                    format!("A/B:{}", from.host_if),
                    Capture::start(
                        if from.behind_a { &t.node_a } else { &t.node_b },
                        from.host_if,
                    ),
                ),
            ]
        } else {
            Vec::new()
        };
        let t0 = Instant::now();
        let pid = match (&restored, &original) {
            (Some(r), _) => r.pid(),
            (None, Some(p)) => p.pid(),
            (None, None) => bail!("lost track of the pod"),
        };
        let mut reap = || {
            if let Some(mut p) = original.take() {
                p.wait_exit(Duration::from_secs(10));
            }
            restored.take();
        };
        let debug = std::env::var_os("SOAK_DEBUG").is_some();
        let progress = |line: &str| {
            if debug {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| (d.as_millis() % 100_000) as f64 / 1000.0);
                eprintln!("[{k}] t={at:.3} {line}");
            }
        };
        let (r, report) =
            controller::migrate(&c, &plan, pid, &mut reap, &progress).map_err(|e| {
                anyhow::anyhow!("migration {k}: {e}\norigin log tail:\n{}", tail(&origin))
            })?;
        restored = Some(r);
        let took = t0.elapsed();
        if !debug_caps.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
            for (name, c) in debug_caps {
                let r = c.stop();
                eprintln!(
                    "capture {name} move {k}: {} tcp, {} RST, by addr {:?}",
                    r.tcp_packets, r.rsts, r.tcp_by_addr
                );
                for l in r.rst_lines.iter().take(8) {
                    eprintln!("  {l}");
                }
            }
        }
        // The sandbox the pod left goes, as a runtime removes it.
        if k > 1 {
            places[k - 2] = None;
        }
        // The pod has left the node the last move brought it to: that
        // node's agent forgets the move's flows (see `migrate retire`).
        if k > 1 {
            let left = if to_b { &origin } else { &dest };
            let (code, body) = left.http(
                "DELETE",
                &format!("/v1/migrations/soak-{}/incoming", k - 1),
                None,
            );
            if code != 204 {
                failures.push(format!(
                    "migration {k}: retiring soak-{}: {code} {body}",
                    k - 1
                ));
                break;
            }
        }
        history.push(ip);
        // Every client is served again.
        std::thread::sleep(Duration::from_millis(300));
        let hold_start = report.hold_started.unwrap_or(t0);
        let pause = streams
            .iter()
            .map(|s| s.max_gap_since(hold_start))
            .max()
            .unwrap_or_default();
        excess_ms.push(pause.as_secs_f64() * 1000.0 - report.freeze.as_secs_f64() * 1000.0);
        per_migration_ms.push(took.as_secs_f64() * 1000.0);
        let failed: Vec<usize> = (0..streams.len())
            .filter(|i| streams[*i].has_failed())
            .collect();
        if !failed.is_empty() {
            failures.push(format!("migration {k}: counter streams {failed:?} failed"));
            break;
        }
        if let Some(i) = redis.iter().position(|r| r.has_stopped()) {
            failures.push(format!("migration {k}: redis client {i} stopped"));
            break;
        }
        if churn.failed.load(Ordering::Relaxed) > 0 {
            failures.push(format!(
                "migration {k}: short-lived connection failed: {:?}",
                churn.first_error.lock().ok().and_then(|e| e.clone())
            ));
            break;
        }
        if k % 10 == 0 || k == o.migrations {
            say(&format!(
                "{k}/{} migrations, last {} ms (freeze {} ms, longest client wait {} ms)",
                o.migrations,
                took.as_millis(),
                report.freeze.as_millis(),
                pause.as_millis()
            ));
        }
    }
    let elapsed = soak_t0.elapsed();

    let (short_ok, short_failed, short_error) = churn.stop();
    let mut sent = 0;
    let mut bad_streams = 0;
    for s in streams {
        let r = s.stop();
        sent += r.sent;
        if !r.is_ok() {
            bad_streams += 1;
            if bad_streams == 1 {
                failures.push(format!(
                    "counter stream {}: {} of {} values back, in order: {}, EOF: {}, first error: {:?}, I/O errors: {:?}",
                    r.local_addr, r.received, r.sent, r.in_order, r.eof, r.first_error, r.io_errors
                ));
            }
        }
    }
    let mut commands = 0;
    for c in redis {
        let r = c.stop();
        commands += r.ok;
        if r.failed > 0 {
            failures.push(format!(
                "redis client: {} failed ({:?})",
                r.failed, r.first_error
            ));
        }
    }
    if short_failed > 0 {
        failures.push(format!(
            "{short_failed} short-lived connections failed: {short_error:?}"
        ));
    }
    if bad_streams > 1 {
        failures.push(format!("{bad_streams} counter streams not clean in all"));
    }
    let rsts = capture.stop().rsts;
    if rsts > 0 {
        failures.push(format!("{rsts} RSTs on the clients' wire"));
    }
    // Ended flows' translations go after the sweep's linger (65 s, checked
    // every 10 s), and freed memory within the trim interval.
    let settle = Instant::now() + Duration::from_secs(90);
    let mut end = [
        Footprint::of(&origin, &t.node_a),
        Footprint::of(&dest, &t.node_b),
    ];
    while end.iter().any(|e| e.translations > 0) && Instant::now() < settle {
        std::thread::sleep(Duration::from_secs(2));
        end = [
            Footprint::of(&origin, &t.node_a),
            Footprint::of(&dest, &t.node_b),
        ];
    }
    for (name, (a, b)) in ["origin", "destination"].iter().zip(start.iter().zip(&end)) {
        if b.rss_mib - a.rss_mib > RSS_SLACK_MIB {
            failures.push(format!("{name}: RSS grew {:.1} MiB", b.rss_mib - a.rss_mib));
        }
        if b.fds > a.fds + FD_SLACK {
            failures.push(format!("{name}: descriptors {} -> {}", a.fds, b.fds));
        }
        if b.translations > TRANSLATION_SLACK {
            failures.push(format!(
                "{name}: {} translations left with every client gone",
                b.translations
            ));
        }
        if b.migrations > FINISHED_KEPT {
            failures.push(format!("{name}: {} migration records", b.migrations));
        }
        if b.routes != a.routes || b.rules != a.rules {
            failures.push(format!(
                "{name}: routes {} -> {}, rules {} -> {}",
                a.routes, b.routes, a.rules, b.rules
            ));
        }
    }
    if !failures.is_empty() {
        for (name, agent) in [("origin", &origin), ("destination", &dest)] {
            let log = agent.log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("WARN") || l.contains("ERROR") || l.contains("connection ended")
                })
                .collect();
            eprintln!(
                "--- {name}: {} notable log lines, the first 15 ---\n{}",
                notable.len(),
                notable
                    .iter()
                    .take(15)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    let mut sorted = excess_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mut per = per_migration_ms.clone();
    per.sort_by(f64::total_cmp);
    Ok(json!({
        "migrations": per_migration_ms.len(),
        "asked": o.migrations,
        "elapsed_s": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "pause_minus_freeze_ms": {
            "median": percentile(&sorted, 0.5),
            "p99": percentile(&sorted, 0.99),
            "max": sorted.last().copied().unwrap_or(0.0),
        },
        "per_migration_ms": {
            "median": percentile(&per, 0.5),
            "p99": percentile(&per, 0.99),
            "max": per.last().copied().unwrap_or(0.0),
        },
        "load": {
            "counter_streams": o.streams,
            "counter_values_sent": sent,
            "streams_not_clean": bad_streams,
            "redis_clients": REDIS_CLIENTS,
            "redis_commands_answered": commands,
            "short_connections": short_ok,
            "short_connections_failed": short_failed,
            "rsts": rsts,
        },
        "start": { "origin": start[0].json(), "destination": start[1].json() },
        "end": { "origin": end[0].json(), "destination": end[1].json() },
        "bounds": {
            "rss_mib": RSS_SLACK_MIB,
            "fds": FD_SLACK,
            "translations_after": TRANSLATION_SLACK,
            "migration_records": FINISHED_KEPT,
        },
        "failures": failures,
    }))
}

fn tail(agent: &Agent) -> String {
    let log = agent.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn print_table(r: &Value) {
    println!(
        "\nsoak: {} of {} live migrations in {} s (new address every move, real CRIU)",
        r["migrations"], r["asked"], r["elapsed_s"]
    );
    println!(
        "pause - freeze (ms): median {:.0}  p99 {:.0}  max {:.0}",
        r["pause_minus_freeze_ms"]["median"].as_f64().unwrap_or(0.0),
        r["pause_minus_freeze_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["pause_minus_freeze_ms"]["max"].as_f64().unwrap_or(0.0)
    );
    println!(
        "per migration (ms):   median {:.0}  p99 {:.0}  max {:.0}",
        r["per_migration_ms"]["median"].as_f64().unwrap_or(0.0),
        r["per_migration_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["per_migration_ms"]["max"].as_f64().unwrap_or(0.0)
    );
    println!("load: {}", r["load"]);
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12}",
        "", "origin start", "origin end", "dest start", "dest end"
    );
    for key in [
        "rss_mib",
        "fds",
        "translations",
        "migration_records",
        "routes",
        "rules",
    ] {
        println!(
            "{key:<22} {:>12} {:>12} {:>12} {:>12}",
            r["start"]["origin"][key],
            r["end"]["origin"][key],
            r["start"]["destination"][key],
            r["end"]["destination"][key]
        );
    }
    println!("leftover namespaces: {}", r["end"]["leftover_namespaces"]);
    let failures = r["failures"].as_array().map_or(0, Vec::len);
    println!(
        "{}",
        if failures == 0 {
            "all clean".to_string()
        } else {
            format!("{failures} failures")
        }
    );
}
