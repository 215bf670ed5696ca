//! Steady-state overhead: direct vs through Shepherd vs through HAProxy.
//!
//! One [`SingleNode`] topology (client → node → pod). The echo pod listens on
//! three ports; four paths lead to it from the client:
//! - **direct**: pod port 7001, not registered: the node's kernel forwards it;
//! - **shepherd**: pod port 7000, registered: eBPF steers it into the agent's
//!   proxy in the node namespace, which relays it to the pod with splice(2);
//! - **shepherd-copy**: pod port 7002, registered with `--relay copy`: the
//!   same agent relays it through a userspace buffer;
//! - **haproxy**: HAProxy (Debian package, `mode tcp`, 2 threads) in the same
//!   node namespace, listening on the node's address, relaying to port 7001.
//!
//! Each repetition measures every figure for the four variants back to back
//! (direct, shepherd, shepherd-copy, haproxy), so slow drifts of a noisy machine hit all of
//! them alike: bulk echo throughput (1 and 8 connections), request/response
//! latency (1 B and 4 KiB, p50/p99/p99.9), and new connections per second.
//! The load generators are in `shepherd_tests::bench`; each verifies the echo.
use super::haproxy::{Haproxy, HAPROXY_BIN, HAPROXY_PORT, HAPROXY_SPLICE_PORT};
use super::report::{percentile, summary, Row, Section};
use crate::util::workspace_root;
use anyhow::{anyhow, bail, Context, Result};
use shepherd_tests::agent::Agent;
use shepherd_tests::bench;
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{cpu_ms, wait_tcp_ready, Workload};
use shepherd_tests::stream::connect_in;
use shepherd_tests::topology::SingleNode;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SHEPHERD_PORT: u16 = 7000;
pub const DIRECT_PORT: u16 = 7001;
const SHEPHERD_COPY_PORT: u16 = 7002;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Client threads of the connection-rate test.
const CONN_CLIENTS: usize = 2;
/// Allowed p99 latency above direct (the target).
const P99_BUDGET_US: f64 = 50.0;

const MIB: u64 = 1 << 20;

struct Sizes {
    reps: usize,
    bulk1_bytes: u64,
    bulk8_bytes_per_conn: u64,
    rr_warmup: usize,
    rr_trips: usize,
    conn_time: Duration,
}

const FULL: Sizes = Sizes {
    reps: 3,
    bulk1_bytes: 1024 * MIB,
    bulk8_bytes_per_conn: 256 * MIB,
    rr_warmup: 2_000,
    rr_trips: 100_000,
    conn_time: Duration::from_secs(3),
};

const QUICK: Sizes = Sizes {
    reps: 1,
    bulk1_bytes: 32 * MIB,
    bulk8_bytes_per_conn: 8 * MIB,
    rr_warmup: 500,
    rr_trips: 5_000,
    conn_time: Duration::from_millis(500),
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Direct,
    /// Shepherd's default relay: splice(2).
    Shepherd,
    /// Shepherd with the buffered-copy relay (`endpoint add --relay copy`).
    ShepherdCopy,
    Haproxy,
    /// HAProxy with `option splice-auto` (bulk rows only): a mature proxy's
    /// own splice path, as the ceiling to compare Shepherd's with.
    HaproxySplice,
}

/// In row order: the first is the baseline.
const VARIANTS: [Variant; 4] = [
    Variant::Direct,
    Variant::Shepherd,
    Variant::ShepherdCopy,
    Variant::Haproxy,
];

/// The bulk rows add HAProxy's splice path.
const BULK_VARIANTS: [Variant; 5] = [
    Variant::Direct,
    Variant::Shepherd,
    Variant::ShepherdCopy,
    Variant::Haproxy,
    Variant::HaproxySplice,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Shepherd => "shepherd",
            Variant::ShepherdCopy => "shepherd-copy",
            Variant::Haproxy => "haproxy",
            Variant::HaproxySplice => "haproxy-splice",
        }
    }

    fn is_shepherd(self) -> bool {
        matches!(self, Variant::Shepherd | Variant::ShepherdCopy)
    }

    /// Where the client connects.
    fn dst(self, t: &SingleNode) -> SocketAddrV4 {
        match self {
            Variant::Direct => t.pod_addr(DIRECT_PORT),
            Variant::Shepherd => t.pod_addr(SHEPHERD_PORT),
            Variant::ShepherdCopy => t.pod_addr(SHEPHERD_COPY_PORT),
            Variant::Haproxy => SocketAddrV4::new(t.node_ip, HAPROXY_PORT),
            Variant::HaproxySplice => SocketAddrV4::new(t.node_ip, HAPROXY_SPLICE_PORT),
        }
    }
}

/// Row names, also used to find rows when checking targets.
const BULK1: &str = "bulk echo, 1 conn (each way)";
const BULK8: &str = "bulk echo, 8 conns (each way, total)";
const CONN: &str = "new connections (connect, 1 B echo, close)";
const CONN_CPU: &str = "proxy CPU per new connection (user + system)";
const RR_SIZES: [(usize, &str); 2] = [(1, "1 B"), (4096, "4 KiB")];
const PCTS: [(f64, &str); 3] = [(50.0, "p50"), (99.0, "p99"), (99.9, "p99.9")];

/// Request/response placements: as the scheduler likes; every process on
/// the path (client thread, agent, HAProxy, echo pod) on one CPU; or the
/// client thread on one CPU and the rest on the other.
const PLACEMENTS: [Placement; 3] = [Placement::Free, Placement::OneCpu, Placement::ClientApart];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Free,
    OneCpu,
    /// Like a client on another host: every round trip crosses CPUs twice,
    /// on every path alike, whatever the scheduler would have chosen.
    ClientApart,
}

impl Placement {
    fn suffix(self) -> &'static str {
        match self {
            Placement::Free => "",
            Placement::OneCpu => ", all on 1 CPU",
            Placement::ClientApart => ", client on its own CPU",
        }
    }
}

fn rr_row(size: &str, pct: &str, placement: Placement) -> String {
    format!("rr {size} {pct}{}", placement.suffix())
}

/// The variants in turn, starting at a different one in each repetition: a
/// run's after-effects (TIME_WAIT sockets, warm caches, a CPU's frequency)
/// then favour no variant in particular.
fn rotated(variants: &[Variant], rep: usize) -> impl Iterator<Item = Variant> + '_ {
    let start = rep.saturating_sub(1) % variants.len().max(1);
    variants[start..].iter().chain(&variants[..start]).copied()
}

/// Round trips per turn when the variants take turns on their connections.
const RR_BLOCK: usize = 1_000;

/// Which parts of the steady-state section run (all by default).
#[derive(Clone, Copy)]
pub struct Parts {
    pub bulk: bool,
    pub rr: bool,
    pub conn: bool,
}

impl Parts {
    /// From `--only`: `steady` (or nothing) is every part; `steady:bulk`,
    /// `steady:rr` and `steady:conn` pick parts, e.g. to profile one.
    pub fn from_only(only: &[String]) -> Result<Self> {
        let picked: Vec<&str> = only
            .iter()
            .filter_map(|x| x.strip_prefix("steady:"))
            .collect();
        if picked.is_empty() {
            return Ok(Self {
                bulk: true,
                rr: true,
                conn: true,
            });
        }
        if let Some(bad) = picked.iter().find(|p| !["bulk", "rr", "conn"].contains(p)) {
            bail!("unknown steady part {bad:?}: use steady:bulk, steady:rr or steady:conn");
        }
        Ok(Self {
            bulk: picked.contains(&"bulk"),
            rr: picked.contains(&"rr"),
            conn: picked.contains(&"conn"),
        })
    }
}

pub fn run(quick: bool, parts: Parts) -> Result<Section> {
    let t0 = Instant::now();
    // The harness guards panic on failure; their drops clean up while the
    // panic unwinds, and we turn it into an error here.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(quick, parts)));
    let section = match r {
        Ok(r) => r?,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            bail!("steady-state benchmark failed: {msg}");
        }
    };
    eprintln!("[bench steady] done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(section)
}

fn measure(quick: bool, parts: Parts) -> Result<Section> {
    let sz = if quick { &QUICK } else { &FULL };
    let say = |m: &str| eprintln!("[bench steady] {m}");
    if !Path::new(HAPROXY_BIN).is_file() {
        bail!("{HAPROXY_BIN} not found: run `cargo xtask setup` (installs Debian's haproxy)");
    }
    let echo_bin = workspace_root().join("target/release/shepherd-echo");
    if !echo_bin.is_file() {
        bail!(
            "{} not found (built by `cargo xtask bench`)",
            echo_bin.display()
        );
    }

    // Declaration order = reverse drop order: HAProxy and the agent stop
    // first, then the echo pod, then the namespaces, then the scratch dir.
    let scratch = tempfile::Builder::new()
        .prefix("shepherd-bench-steady-")
        .tempdir()?;
    say("topology: client → node → pod (network namespaces)");
    let t = SingleNode::new(&unique_prefix("bst"));
    // Connection-rate runs make many short connections; the client closes
    // first (TIME_WAIT on the client), and the proxies close first towards
    // the pod (TIME_WAIT on the node). Wide port ranges and TIME_WAIT reuse
    // on both sides, as any busy proxy host would have.
    for ns in [&t.client, &t.node] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    }
    let echo = start_echo(&t, &echo_bin, scratch.path())?;
    say("agent: intercepting on cli0, endpoint 10.77.2.10:7000");
    let agent = shepherd_tests::agent::start_single(&t, &[]);
    let ep = t.pod_addr(SHEPHERD_PORT).to_string();
    agent.cli_json(&["endpoint", "add", &ep, "--relay", "splice"]);
    let ep = t.pod_addr(SHEPHERD_COPY_PORT).to_string();
    agent.cli_json(&["endpoint", "add", &ep, "--relay", "copy"]);
    let haproxy = Haproxy::start(&t, scratch.path())?;
    check_paths(&t, &agent)?;

    let mut rows = vec![
        Row::new(BULK1, "MiB/s", true),
        Row::new(BULK8, "MiB/s", true),
    ];
    for placement in PLACEMENTS {
        for (_, size) in RR_SIZES {
            for (_, pct) in PCTS {
                rows.push(Row::new(&rr_row(size, pct, placement), "µs", false));
            }
        }
    }
    rows.push(Row::new(CONN, "conn/s", true));
    rows.push(Row::new(CONN_CPU, "µs", false));
    let row = |rows: &[Row], name: &str| -> usize {
        rows.iter()
            .position(|r| r.name == name)
            .unwrap_or_else(|| unreachable!("row {name} exists"))
    };

    // Baseline samples that failed (see `sample`).
    let mut lost = Vec::new();
    say("warm-up");
    for v in BULK_VARIANTS {
        let dst = v.dst(&t);
        let r = bench::bulk(&t.client, dst, 2, 4 * MIB).map_err(Into::into);
        sample(v, "warm-up bulk", r, &mut lost)?;
        let r = bench::request_response(&t.client, dst, 1, 200, 0).map_err(Into::into);
        sample(v, "warm-up rr", r, &mut lost)?;
    }

    for rep in 1..=sz.reps {
        let tag = format!("rep {rep}/{}", sz.reps);
        for v in rotated(&BULK_VARIANTS, rep).filter(|_| parts.bulk) {
            let dst = v.dst(&t);
            let r = bench::bulk(&t.client, dst, 1, sz.bulk1_bytes).map_err(Into::into);
            let Some(b) = sample(v, "bulk 1 conn", r, &mut lost)? else {
                continue;
            };
            say(&format!(
                "{tag}: {BULK1}: {:<8} {:.0} MiB/s",
                v.name(),
                b.mib_per_s()
            ));
            let i = row(&rows, BULK1);
            rows[i].push(v.name(), b.mib_per_s());
        }
        for v in rotated(&BULK_VARIANTS, rep).filter(|_| parts.bulk) {
            let dst = v.dst(&t);
            let r = bench::bulk(&t.client, dst, 8, sz.bulk8_bytes_per_conn).map_err(Into::into);
            let Some(b) = sample(v, "bulk 8 conns", r, &mut lost)? else {
                continue;
            };
            say(&format!(
                "{tag}: {BULK8}: {:<8} {:.0} MiB/s",
                v.name(),
                b.mib_per_s()
            ));
            let i = row(&rows, BULK8);
            rows[i].push(v.name(), b.mib_per_s());
        }
        for placement in PLACEMENTS.into_iter().filter(|_| parts.rr) {
            for (len, size) in RR_SIZES {
                let samples = match placement {
                    Placement::Free => rr_interleaved(&t, len, sz),
                    Placement::OneCpu => {
                        let pids = [echo.pid(), agent.pid(), haproxy.pid()];
                        pinned(&pids, last_cpu(), last_cpu(), || {
                            rr_interleaved(&t, len, sz)
                        })
                    }
                    Placement::ClientApart => {
                        let pids = [echo.pid(), agent.pid(), haproxy.pid()];
                        pinned(&pids, last_cpu(), 0, || rr_interleaved(&t, len, sz))
                    }
                }
                .with_context(|| format!("rr {size}"))?;
                for (v, mut s) in VARIANTS.into_iter().zip(samples) {
                    let place = placement.suffix();
                    let mut line = format!("{tag}: rr {size}{place}: {:<8}", v.name());
                    for (p, pct) in PCTS {
                        let x = percentile(&mut s, p);
                        line.push_str(&format!(" {pct} {x:.1} µs"));
                        let i = row(&rows, &rr_row(size, pct, placement));
                        rows[i].push(v.name(), x);
                    }
                    say(&line);
                }
            }
        }
        for v in rotated(&VARIANTS, rep).filter(|_| parts.conn) {
            let dst = v.dst(&t);
            // The proxy's own CPU time over the run: the rate depends on the
            // whole box (client and pod share the 2 CPUs); this does not.
            let proxy = match v {
                Variant::Direct => None,
                Variant::Haproxy | Variant::HaproxySplice => Some(haproxy.pid()),
                Variant::Shepherd | Variant::ShepherdCopy => Some(agent.pid()),
            };
            let cpu0 = proxy.map(cpu_ms);
            let r =
                bench::conn_rate(&t.client, dst, CONN_CLIENTS, sz.conn_time).map_err(Into::into);
            let cpu = proxy.zip(cpu0).map(|(p, c0)| cpu_ms(p) - c0);
            let Some(c) = sample(v, "connection rate", r, &mut lost)? else {
                continue;
            };
            say(&format!(
                "{tag}: new connections: {:<8} {:.0}/s",
                v.name(),
                c.per_s()
            ));
            let i = row(&rows, CONN);
            rows[i].push(v.name(), c.per_s());
            if let (Some(cpu), true) = (cpu, c.connections > 0) {
                let i = row(&rows, CONN_CPU);
                rows[i].push(v.name(), cpu * 1e3 / c.connections as f64);
            }
        }
    }
    if !agent.is_alive() {
        bail!("the agent died during the run; log:\n{}", agent.log());
    }
    if !echo.is_alive() {
        bail!("the echo pod died during the run; log:\n{}", echo.log());
    }
    haproxy.check_alive()?;
    // Rotation changes which variant a row first saw; report them in the
    // usual order, the baseline first.
    for r in &mut rows {
        r.variants.sort_by_key(|(name, _)| {
            BULK_VARIANTS
                .iter()
                .position(|v| v.name() == name)
                .unwrap_or(usize::MAX)
        });
    }

    let mut notes = vec![
        "relays measured: shepherd = splice(2) socket → pipe → socket (the agent's default; \
         pipes of 256 KiB from a node-wide pool of ≤ 256, taken only while bytes are in \
         flight); shepherd-copy = read into a userspace buffer, write it out; both one tokio \
         task per connection on the agent's data-plane threads (its default: one per two CPUs), two \
         endpoints of one agent"
            .to_string(),
        format!(
            "paths: direct = pod port {DIRECT_PORT} forwarded by the node's kernel; shepherd = pod \
             port {SHEPHERD_PORT}, registered, intercepted by eBPF and relayed by the agent in the \
             node namespace; haproxy = {} `mode tcp`, nbthread 2, HAProxy's defaults otherwise \
             (no splicing), in the node namespace at {}:{HAPROXY_PORT} → pod port {DIRECT_PORT}; \
             haproxy-splice (bulk rows only) = the same HAProxy with `option splice-auto` on \
             port {HAPROXY_SPLICE_PORT}",
            haproxy.version, t.node_ip
        ),
        format!(
            "sizes: bulk 1 conn {} MiB each way; bulk 8 conns {} MiB each way per connection \
             (not 1 GiB: 8 GiB of echo per sample would take minutes on 2 cores); rr {} timed \
             round trips per variant after {} untimed, one message in flight on one \
             TCP_NODELAY connection per variant, the four connections taking turns in blocks \
             of {RR_BLOCK}; new connections from {CONN_CLIENTS} client threads for {:.1} s, \
             with ip_local_port_range 1024-65000 and tcp_tw_reuse=1 in the client and node \
             namespaces; every echoed byte verified",
            sz.bulk1_bytes / MIB,
            sz.bulk8_bytes_per_conn / MIB,
            sz.rr_trips,
            sz.rr_warmup,
            sz.conn_time.as_secs_f64()
        ),
        "rr placement: the plain rr rows let the scheduler place the client, the proxy and the \
         pod, so they include cross-CPU wake-ups (3 processes on the proxied paths, 2 direct), \
         which on a VM whose idle vCPUs halt cost ~12 µs more than a local one (perf sched: \
         median 16 vs 4 µs from waking to running); where the scheduler puts a proxy's thread \
         decides how many round trips cross CPUs (a thread beside the pod with the client \
         alone: twice, every time; a thread that follows its waker: sometimes not at all), a \
         woken thread returns to its idle previous CPU so a placement tends to last, and these \
         rows measure the scheduler more than the relay (see BENCHMARKS.md); the \"all on 1 CPU\" rows pin the client thread, the echo pod, \
         the agent and HAProxy to one CPU (taskset), so they measure the path's own CPU cost per \
         round trip; the \"client on its own CPU\" rows pin the client thread to CPU 0 and the \
         rest to CPU 1, so every path crosses CPUs exactly twice per round trip, as with a \
         client on another host"
            .to_string(),
        format!(
            "{} repetition(s), the variants (four; five in the bulk rows) interleaved within each; min/median/max are \
             over repetitions (for rr: of each repetition's percentile)",
            sz.reps
        ),
    ];
    if quick {
        notes.push("--quick: small sizes, one repetition; indicative only".into());
    }
    notes.extend(lost);
    notes.extend(targets(&rows, parts));
    Ok(Section {
        title: "Steady-state overhead: direct vs Shepherd vs HAProxy".into(),
        rows,
        notes,
    })
}

/// The echo pod on both ports, ready for the client.
fn start_echo(t: &SingleNode, echo_bin: &Path, dir: &Path) -> Result<Workload> {
    const PORTS: [u16; 3] = [SHEPHERD_PORT, SHEPHERD_COPY_PORT, DIRECT_PORT];
    let mut args = Vec::new();
    for port in PORTS {
        args.push("--listen".to_string());
        args.push(t.pod_addr(port).to_string());
    }
    let w = Workload::spawn_in(&t.pod, echo_bin, &args, &dir.join("echo.log"));
    for port in PORTS {
        wait_tcp_ready(&t.client, SocketAddr::V4(t.pod_addr(port)), READY_TIMEOUT)
            .map_err(|e| anyhow!("echo pod: {e}; its log:\n{}", w.log()))?;
    }
    Ok(w)
}

/// Request/response through the four variants at once: one connection
/// each, warmed up, then taking turns in blocks of [`RR_BLOCK`] round trips
/// until each has done `sz.rr_trips`, so that slow changes of the machine
/// (vCPU placement, wake-up latency) hit all of them alike. Returns each
/// variant's round-trip times (µs), in [`VARIANTS`] order.
fn rr_interleaved(t: &SingleNode, len: usize, sz: &Sizes) -> Result<Vec<Vec<f64>>> {
    let mut clients = Vec::new();
    for v in VARIANTS {
        let mut c = bench::RrClient::connect(&t.client, v.dst(t), len)
            .with_context(|| format!("connect via {}", v.name()))?;
        c.round_trips(sz.rr_warmup, None)
            .with_context(|| format!("warm-up via {}", v.name()))?;
        clients.push(c);
    }
    let mut samples: Vec<Vec<f64>> = VARIANTS
        .iter()
        .map(|_| Vec::with_capacity(sz.rr_trips))
        .collect();
    let mut left = sz.rr_trips;
    while left > 0 {
        let n = left.min(RR_BLOCK);
        for ((v, c), s) in VARIANTS.iter().zip(&mut clients).zip(&mut samples) {
            c.round_trips(n, Some(s))
                .with_context(|| format!("via {}", v.name()))?;
        }
        left -= n;
    }
    for (v, c) in VARIANTS.iter().zip(clients) {
        c.close()
            .with_context(|| format!("close via {}", v.name()))?;
    }
    Ok(samples)
}

/// One sample's outcome. A baseline's failure (the kernel's direct path,
/// HAProxy) says nothing about Shepherd: it is reported in the section's
/// notes and the sample is left out, so one reset from HAProxy does not sink
/// the run (CI runs `--quick` once). Shepherd's failures end the run: they
/// are what the bench is there to catch.
fn sample<T>(v: Variant, what: &str, r: Result<T>, lost: &mut Vec<String>) -> Result<Option<T>> {
    match r {
        Ok(x) => Ok(Some(x)),
        Err(e) if !v.is_shepherd() => {
            let line = format!("{what} via {}: sample left out: {e:#}", v.name());
            eprintln!("[bench steady] {line}");
            lost.push(line);
            Ok(None)
        }
        Err(e) => Err(e.context(format!("{what} via {}", v.name()))),
    }
}

fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Runs `f` on a thread of ours pinned to CPU `client_cpu`, with every thread
/// of the processes `pids` pinned to CPU `cpu` (`taskset -a`); puts those
/// back on all CPUs afterwards, also if `f` fails or panics.
fn pinned<T: Send>(
    pids: &[u32],
    cpu: usize,
    client_cpu: usize,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    struct Unpin<'a> {
        pids: &'a [u32],
        all: String,
    }
    impl Drop for Unpin<'_> {
        fn drop(&mut self) {
            for pid in self.pids {
                if let Err(e) = taskset(&self.all, *pid) {
                    eprintln!("warning: {e}");
                }
            }
        }
    }
    let _unpin = Unpin {
        pids,
        all: format!("0-{}", last_cpu()),
    };
    for pid in pids {
        taskset(&cpu.to_string(), *pid)?;
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pin_this_thread(client_cpu)?;
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `taskset -a -p -c CPUS PID`: every thread of `pid`; new threads inherit.
fn taskset(cpus: &str, pid: u32) -> Result<()> {
    crate::util::output(Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]))
        .map(|_| ())
}

fn pin_this_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data, for which all-zero is the empty set;
    // CPU_SET writes inside it (cpu < CPU_SETSIZE on any machine this runs
    // on), and sched_setaffinity only reads size_of::<cpu_set_t>() bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Makes sure each variant takes the path it is named after: a connection to
/// the shepherd port shows in the agent's connection list, the others don't;
/// and each path echoes.
fn check_paths(t: &SingleNode, agent: &Agent) -> Result<()> {
    for v in BULK_VARIANTS {
        let dst = v.dst(t);
        let (mut s, _) = connect_in(&t.client, dst)
            .with_context(|| format!("{}: connect to {dst}", v.name()))?;
        s.set_read_timeout(Some(READY_TIMEOUT))?;
        s.write_all(b"ping")?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back)
            .with_context(|| format!("{}: echo from {dst}", v.name()))?;
        if &back != b"ping" {
            bail!("{}: wrong echo from {dst}", v.name());
        }
        let local = s.local_addr()?.to_string();
        let conns = agent.cli_json(&["conn", "ls"]);
        let relayed = conns["connections"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["client"] == local.as_str()));
        if relayed != v.is_shepherd() {
            bail!(
                "{}: the connection from {local} to {dst} {} through Shepherd: {conns}",
                v.name(),
                if relayed { "went" } else { "did not go" }
            );
        }
        s.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
    }
    Ok(())
}

/// Targets of the issue, checked on the medians.
/// Verdicts against the targets, for the parts that ran.
fn targets(rows: &[Row], parts: Parts) -> Vec<String> {
    let med = |name: &str, variant: &str| -> f64 {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.variants.iter().find(|(v, _)| v == variant))
            .map_or(f64::NAN, |(_, s)| summary(s).1)
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut notes = Vec::new();

    if parts.bulk {
        let bulk: Vec<(String, bool)> = [(BULK1, "1 conn"), (BULK8, "8 conns")]
            .iter()
            .map(|(name, short)| {
                let r = med(name, "shepherd") / med(name, "direct");
                (format!("{short} {r:.2}x"), r >= 0.9)
            })
            .collect();
        notes.push(format!(
            "target bulk ≥ 0.9x direct: {} — {}",
            bulk.iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            verdict(bulk.iter().all(|(_, ok)| *ok))
        ));
    }

    for placement in PLACEMENTS.into_iter().filter(|_| parts.rr) {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for (_, size) in RR_SIZES {
            let name = rr_row(size, "p50", placement);
            let direct = med(&name, "direct");
            let (sh, ha) = (
                med(&name, "shepherd") - direct,
                med(&name, "haproxy") - direct,
            );
            p50.push((
                format!("{size} shepherd {sh:+.1} µs vs haproxy {ha:+.1} µs"),
                sh <= ha,
            ));
            let name = rr_row(size, "p99", placement);
            let over = med(&name, "shepherd") - med(&name, "direct");
            p99.push((format!("{size} {over:+.1} µs"), over <= P99_BUDGET_US));
        }
        let place = placement.suffix();
        for (what, list) in [
            (format!("target rr p50 overhead ≤ HAProxy's{place}"), p50),
            (
                format!("target rr p99 ≤ direct + 50 µs{place} (shepherd − direct)"),
                p99,
            ),
        ] {
            notes.push(format!(
                "{what}: {} — {}",
                list.iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                verdict(list.iter().all(|(_, ok)| *ok))
            ));
        }
    }

    if parts.bulk && parts.rr && parts.conn {
        let ratio = |name: &str| med(name, "shepherd") / med(name, "shepherd-copy");
        notes.push(format!(
            "relay mechanism, splice vs copy (medians): bulk 1 conn {:.2}x, bulk 8 conns {:.2}x, \
             rr 1 B p50 on 1 CPU {:+.1} µs, new connections {:.2}x",
            ratio(BULK1),
            ratio(BULK8),
            med(&rr_row("1 B", "p50", Placement::OneCpu), "shepherd")
                - med(&rr_row("1 B", "p50", Placement::OneCpu), "shepherd-copy"),
            ratio(CONN),
        ));
    }

    if parts.conn {
        let (sh, ha) = (med(CONN, "shepherd"), med(CONN, "haproxy"));
        notes.push(format!(
            "target connection rate ≥ HAProxy's: shepherd {sh:.0}/s vs haproxy {ha:.0}/s — {}",
            verdict(sh >= ha)
        ));
        notes.push(format!(
            "proxy CPU per new connection (medians): shepherd {:.1} µs, haproxy {:.1} µs; \
             the rate is set by the whole box (client, proxy and pod share 2 CPUs), this by the proxy alone",
            med(CONN_CPU, "shepherd"),
            med(CONN_CPU, "haproxy")
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_baseline_sample_is_noted_and_a_failed_shepherd_sample_ends_the_run() {
        let mut lost = Vec::new();
        let reset = || Err::<u32, _>(anyhow!("Connection reset by peer"));
        assert!(matches!(
            sample(Variant::Haproxy, "bulk 8 conns", reset(), &mut lost),
            Ok(None)
        ));
        assert_eq!(lost.len(), 1);
        assert!(
            lost[0].contains("haproxy") && lost[0].contains("reset"),
            "{lost:?}"
        );
        let err = sample(Variant::Shepherd, "bulk 8 conns", reset(), &mut lost)
            .expect_err("Shepherd's failure is fatal");
        assert!(format!("{err:#}").contains("via shepherd"), "{err:#}");
        assert_eq!(lost.len(), 1);
        assert!(matches!(
            sample(Variant::Shepherd, "bulk", Ok(7), &mut lost),
            Ok(Some(7))
        ));
    }
}
