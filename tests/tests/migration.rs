//! Live migration with Shepherd and real CRIU: a pod is dumped in pod A
//! (behind node A) and restored in pod B (behind node B) by the reference
//! controller while clients stream through the origin's proxy; two
//! scenarios move it a second time, on to pod C (behind node B) or back
//! behind node A as pod D. Every scenario
//! checks every byte, counts RSTs on the client's wire, and bounds the
//! client's longest pause by the freeze.

use serde_json::Value;
use shepherd_tests::agent::Agent;
use shepherd_tests::capture::{Capture, CaptureReport};
use shepherd_tests::controller::{self, Cluster, ControllerError, Plan, ReleaseMode, Report};
use shepherd_tests::criu::RestoredProcess;
use shepherd_tests::names::unique_prefix;
use shepherd_tests::netem::{Impairment, Netem};
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::record::{self, ms};
use shepherd_tests::stream::{request_response, CounterReport, CounterStream};
use shepherd_tests::topology::{ExtraPod, SecondMove, TwoNode, POD_C_IP, POD_D_IP};
use shepherd_tests::{echo_bin, privileged};
use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PORT: u16 = 7000;
const PORT2: u16 = 7002;
const TICK: Duration = Duration::from_millis(10);
/// Generous bound on pause − hold (precise figures belong to the benchmark).
const SLACK: Duration = Duration::from_millis(200);

/// Fields drop in order: capture, agents, processes, then the namespaces.
struct World {
    capture: Option<Capture>,
    origin: Agent,
    dest: Agent,
    restored: Option<RestoredProcess>,
    pod: Option<Workload>,
    /// Where a second move lands (see [`World::with_second_move`]).
    second: Option<ExtraPod>,
    _dir: tempfile::TempDir,
    t: TwoNode,
}

fn copy_bin(from: &Path, dir: &Path) -> PathBuf {
    let to = dir.join(from.file_name().expect("file name"));
    if !to.exists() {
        std::fs::copy(from, &to).expect("copy the workload binary");
    }
    to
}

impl World {
    /// Topology (same or new IP), both agents, and an echo pod on `ports`
    /// (two ports: two processes in one pod, as one process tree).
    fn new(tag: &str, new_ip: bool, ports: &[u16]) -> World {
        Self::build(tag, new_ip, None, ports)
    }

    /// A new-IP world with one more pod namespace for a second move, made
    /// by `second` ([`ExtraPod::pod_c`] or [`ExtraPod::pod_d`]); its node's
    /// agent shields and translates on its interface too.
    fn with_second_move(tag: &str, ports: &[u16], second: fn(&TwoNode, &str) -> ExtraPod) -> World {
        Self::build(tag, true, Some(second), ports)
    }

    fn build(
        tag: &str,
        new_ip: bool,
        second: Option<fn(&TwoNode, &str) -> ExtraPod>,
        ports: &[u16],
    ) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = unique_prefix(tag);
        let t = if new_ip {
            TwoNode::new_ip(&prefix)
        } else {
            TwoNode::new(&prefix)
        };
        let second = second.map(|make| make(&t, &prefix));
        let echo = copy_bin(&echo_bin!(), dir.path());
        let log = dir.path().join("pod.log");
        // A pod that changes address must listen on any address, as pods do:
        // new connections reach it at the new IP; the restored established
        // sockets keep the old one (kept on the new pod's `lo`).
        let listen = |p: u16| {
            if new_ip {
                SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, p)
            } else {
                t.pod_addr(p)
            }
        };
        let pod = match ports {
            [p] => Workload::spawn_in(&t.pod_a, &echo, ["--listen", &listen(*p).to_string()], &log),
            [p, q] => {
                // Two processes, one process tree (so one dump takes both).
                let script = format!(
                    "{e} --listen {a} >>{l} 2>&1 & exec {e} --listen {b}",
                    e = echo.display(),
                    a = listen(*p),
                    b = listen(*q),
                    l = log.display()
                );
                Workload::spawn_in(&t.pod_a, Path::new("/bin/sh"), ["-c", &script], &log)
            }
            _ => panic!("one or two ports"),
        };
        for p in ports {
            wait_tcp_ready(
                &t.client,
                SocketAddr::V4(t.pod_addr(*p)),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("{e}; pod log:\n{}", pod.log()));
        }
        Self::finish(dir, t, pod, second, ports)
    }

    fn finish(
        dir: tempfile::TempDir,
        t: TwoNode,
        pod: Workload,
        second: Option<ExtraPod>,
        ports: &[u16],
    ) -> World {
        // Two data threads whatever the machine's default: holds,
        // quiescence and replays then cross threads in every test.
        let extra = ["--shield-iface", second.as_ref().map_or("", |p| p.host_if)];
        let (on_a, on_b): (&[&str], &[&str]) = match &second {
            Some(p) if p.behind_origin => (&extra, &[]),
            Some(_) => (&[], &extra),
            None => (&[], &[]),
        };
        let (origin, dest) =
            shepherd_tests::agent::start_pair_with(&t, &["--data-threads", "2"], on_a, on_b);
        let eps: Vec<String> = ports.iter().map(|p| t.pod_addr(*p).to_string()).collect();
        let mut add = vec!["endpoint", "add"];
        add.extend(eps.iter().map(String::as_str));
        origin.cli_json(&add);
        let capture = Some(Capture::start(&t.client, t.client_if()));
        World {
            capture,
            origin,
            dest,
            restored: None,
            pod: Some(pod),
            second,
            _dir: dir,
            t,
        }
    }

    /// `n` counter streams to the pod's first port, flowing for 300 ms.
    fn streams(&self, n: usize) -> Vec<CounterStream> {
        let streams = (0..n)
            .map(|_| CounterStream::start(&self.t.client, self.t.pod_addr(PORT), TICK))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        streams
    }

    fn plan(&self, id: &str, ports: &[u16]) -> Plan {
        Plan::new(id, ports.iter().map(|p| self.t.pod_addr(*p)).collect())
    }

    /// Runs the reference controller; panics with the step that failed.
    fn migrate(&mut self, plan: &Plan) -> Report {
        self.try_migrate(plan, &|_| {})
            .unwrap_or_else(|e| panic!("{e}\norigin log:\n{}", self.origin.log()))
    }

    /// [`migrate`](Self::migrate), calling `on_step` after each step (a
    /// fault can be injected there) and returning the controller's error.
    /// The pod stays owned by the world: restored, rolled back, or still
    /// running at A if it was never dumped.
    fn try_migrate(
        &mut self,
        plan: &Plan,
        on_step: &dyn Fn(&str),
    ) -> Result<Report, ControllerError> {
        let mut pod = self.pod.take().expect("pod running at A");
        let pid = pod.pid();
        let c = Cluster {
            topo: &self.t,
            origin: &self.origin,
            dest: &self.dest,
        };
        let result = controller::migrate(
            &c,
            plan,
            pid,
            &mut || {
                pod.wait_exit(Duration::from_secs(10));
            },
            &|line| {
                eprintln!("[{}] {line}", plan.id);
                on_step(line);
            },
        );
        match result {
            Ok((restored, report)) => {
                self.restored = Some(restored);
                Ok(report)
            }
            Err(mut e) => {
                self.restored = e.rolled_back.take();
                if pod.is_alive() {
                    self.pod = Some(pod);
                }
                Err(e)
            }
        }
    }

    /// Moves the pod restored by [`migrate`](Self::migrate) on to the
    /// world's second pod namespace. Back behind node A, the origin's agent
    /// is the destination too.
    fn migrate_again(&mut self, plan: &Plan) -> Report {
        match self.try_migrate_again(plan) {
            Ok(report) => report,
            Err(e) => panic!(
                "{e}\norigin log:\n{}\ndestination log:\n{}",
                self.origin.log(),
                self.dest.log()
            ),
        }
    }

    /// [`migrate_again`](Self::migrate_again), with the controller's error.
    /// The pod stays owned by the world: where it ran, or where the
    /// controller restored it after a failure.
    fn try_migrate_again(&mut self, plan: &Plan) -> Result<Report, ControllerError> {
        let mut first = self.restored.take();
        let pid = first.as_ref().expect("pod restored at B").pid();
        let to = self.second.as_ref().expect("a world with a second pod");
        let dest = if to.behind_origin {
            &self.origin
        } else {
            &self.dest
        };
        let second = SecondMove { t: &self.t, to };
        let c = Cluster {
            topo: &second,
            origin: &self.origin,
            dest,
        };
        // The dump kills the restored root; dropping it reaps it.
        let result = controller::migrate(&c, plan, pid, &mut || drop(first.take()), &|line| {
            eprintln!("[{}] {line}", plan.id)
        });
        match result {
            Ok((restored, report)) => {
                self.restored = Some(restored);
                Ok(report)
            }
            Err(mut e) => {
                self.restored = first.or(e.rolled_back.take());
                Err(e)
            }
        }
    }

    fn assert_no_rst(&mut self) -> CaptureReport {
        let report = self.capture.take().expect("capture running").stop();
        assert!(report.error.is_none(), "capture failed: {:?}", report.error);
        assert_eq!(
            report.rsts, 0,
            "RSTs on the client's wire: {:#?}",
            report.rst_lines
        );
        report
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Every value exactly once, in order, and the pause bounded by the freeze
/// (dump start → restore done) plus a generous slack that also covers the
/// controller's hold/prepare before the dump and release after the restore.
fn assert_stream(r: &CounterReport, report: &Report) {
    r.assert_ok();
    assert!(
        r.max_gap <= report.freeze + SLACK,
        "client paused {:?}; hold {:?} (freeze {:?})",
        r.max_gap,
        report.hold,
        report.freeze
    );
}

/// After the streams ended: everything held was replayed.
fn assert_replayed(w: &World, report: &Report) {
    let id = report.origin_status["id"].as_str().expect("migration id");
    let st = w.origin.cli_json(&["migrate", "status", "--id", id]);
    assert_eq!(st["state"], "released", "{st}");
    assert!(u(&st, "bytes_held") > 0, "nothing was held: {st}");
    assert_eq!(u(&st, "bytes_replayed"), u(&st, "bytes_held"), "{st}");
}

/// Same IP: the pod is restored behind node B with its address; the origin
/// keeps the client sockets and its backend sockets continue with the
/// restored ones.
#[test]
fn same_ip_migration_keeps_every_byte() {
    privileged!();
    let mut w = World::new("mgs", false, &[PORT]);
    let streams: Vec<CounterStream> = (0..3)
        .map(|_| CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let report = w.migrate(&w.plan("mig-same", &[PORT]));
    std::thread::sleep(Duration::from_millis(500));
    for s in streams {
        assert_stream(&s.stop(), &report);
    }
    assert_replayed(&w, &report);
    assert_eq!(u(&report.origin_status, "connections"), 3);
    // A connection opened after the migration reaches the restored pod.
    let (_, rr) = request_response(&w.t.client, w.t.pod_addr(PORT), b"after")
        .expect("new connection after migration");
    assert!(rr < Duration::from_secs(2));
    let restored = w.restored.as_ref().expect("restored");
    assert!(restored.is_alive());
    w.assert_no_rst();
    eprintln!(
        "freeze {:?}, hold {:?}, steps {:?}",
        report.freeze, report.hold, report.steps
    );
}

/// New IP: the pod comes back at a new address (the old one kept on its
/// `lo`); `translate` on both nodes rewrites exactly the migrated flows.
#[test]
fn new_ip_migration_translates_the_migrated_flows() {
    privileged!();
    let mut w = World::new("mgn", true, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let fabric = Capture::start(&w.t.node_b, w.t.node_fabric_if());
    let report = w.migrate(&w.plan("mig-new", &[PORT]));
    std::thread::sleep(Duration::from_millis(500));
    assert_stream(&s.stop(), &report);
    assert_replayed(&w, &report);
    assert_eq!(
        report.origin_status["target"],
        w.t.pod_b_ip.to_string().as_str()
    );
    let st = w.origin.cli_json(&["migrate", "status", "--id", "mig-new"]);
    assert!(
        u(&st, "packets_translated") > 0,
        "origin translated nothing: {st}"
    );
    let dst = w
        .dest
        .http("GET", "/v1/migrations/mig-new/incoming", None)
        .1;
    let dst: Value = serde_json::from_str(&dst).expect("incoming status");
    assert!(
        u(&dst, "packets_translated") > 0,
        "destination translated nothing: {dst}"
    );
    // New connections go to the new address.
    request_response(&w.t.client, w.t.pod_addr(PORT), b"after")
        .expect("new connection after migration");
    let eps = w.origin.cli_json(&["endpoint", "ls"]);
    assert_eq!(
        eps["endpoints"][0]["backend"],
        w.t.pod_b_addr(PORT).to_string().as_str(),
        "{eps}"
    );
    let wire = fabric.stop();
    assert_eq!(wire.rsts, 0, "{:#?}", wire.rst_lines);
    // Between the nodes, the migrated flows carry only the new address.
    let by_addr = &wire.tcp_by_addr;
    assert!(
        by_addr.get(&w.t.pod_b_ip).copied().unwrap_or(0) > 0,
        "no traffic to the new address on node B's fabric link: {by_addr:?}"
    );
    assert_eq!(
        by_addr.get(&w.t.pod_ip).copied().unwrap_or(0),
        0,
        "the old address crossed the fabric: {by_addr:?}"
    );
    w.assert_no_rst();
}

/// A hand-over first (the origin's agent is upgraded: a copy of the
/// binary takes over), then a full new-IP CRIU migration driven through the
/// new agent, carrying a connection opened before the hand-over: every
/// value once and in order, the held bytes replayed, no RST.
#[test]
fn handover_then_new_ip_migration_keeps_every_byte() {
    privileged!();
    let mut w = World::new("mho", true, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(300));
    let bin = copy_bin(&shepherd_tests::agent::shepherd_bin(), w._dir.path());
    let new = w.origin.successor(&bin, &[]);
    let mut old = std::mem::replace(&mut w.origin, new);
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("the old agent exits after the hand-over");
    assert!(status.success(), "{status}\n{}", old.log());
    std::thread::sleep(Duration::from_millis(300));
    let report = w.migrate(&w.plan("mig-ho", &[PORT]));
    std::thread::sleep(Duration::from_millis(500));
    assert_stream(&s.stop(), &report);
    assert_replayed(&w, &report);
    request_response(&w.t.client, w.t.pod_addr(PORT), b"after")
        .expect("new connection after the migration");
    w.assert_no_rst();
}

/// Moves the pod twice (ids `{tag}-1`, `{tag}-2`) while two clients
/// stream: one connected before the first move, one opened between the
/// moves. `after` runs right after the second move (what it returns is
/// handed back). Checks that the second connection's backend is at pod B's
/// address and the second move's flows say so, both streams (every value
/// once, in order; pauses bounded by the freezes) and the second move's
/// replay; returns the second move's report.
fn migrate_twice<T>(w: &mut World, tag: &str, after: impl FnOnce(&World) -> T) -> (Report, T) {
    let before = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let first = w.migrate(&w.plan(&format!("{tag}-1"), &[PORT]));
    let opened_between = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let at_b = w.t.pod_b_addr(PORT).to_string();
    let conns = w.origin.cli_json(&["conn", "ls"]);
    assert!(
        conns["connections"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["backend_peer"] == at_b.as_str())),
        "no backend connection to pod B's address: {conns}"
    );
    let second = w.migrate_again(&w.plan(&format!("{tag}-2"), &[PORT]));
    let seen = after(w);
    let flows = &second.origin_status["backend_flows"];
    let b_ip = w.t.pod_b_ip.to_string();
    assert!(
        flows
            .as_array()
            .is_some_and(|f| f.len() == 2
                && f.iter().filter(|f| f["pod_addr"] == b_ip.as_str()).count() == 1),
        "expected two held flows, the one opened between the moves at pod B's address: {flows}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let longest = if first.freeze > second.freeze {
        &first
    } else {
        &second
    };
    assert_stream(&before.stop(), longest);
    assert_stream(&opened_between.stop(), &second);
    assert_replayed(w, &second);
    (second, seen)
}

/// New connections to the endpoint go to `ip`.
fn assert_backend(w: &World, ip: std::net::Ipv4Addr) {
    let eps = w.origin.cli_json(&["endpoint", "ls"]);
    assert_eq!(
        eps["endpoints"][0]["backend"],
        SocketAddrV4::new(ip, PORT).to_string().as_str(),
        "{eps}"
    );
}

/// A pod that changes address twice: pod A → pod B (a new IP) → pod C (a
/// third, behind node B). A connection opened between the moves reaches the
/// pod at pod B's address, so the second move translates its flow from
/// there, and the one from before the first move from pod A's. Both streams
/// keep every byte, in order, with no RST; after the second move only pod
/// C's address is on the wire between the nodes.
#[test]
fn second_move_keeps_connections_opened_between_the_moves() {
    privileged!();
    let mut w = World::with_second_move("mg2", &[PORT], ExtraPod::pod_c);
    // Before the second move, pod B's address was on the wire; from now on
    // only pod C's.
    let (_, fabric) = migrate_twice(&mut w, "mig-twice", |w| {
        Capture::start(&w.t.node_b, w.t.node_fabric_if())
    });
    let wire = fabric.stop();
    assert!(wire.error.is_none(), "capture failed: {:?}", wire.error);
    assert_eq!(wire.rsts, 0, "{:#?}", wire.rst_lines);
    let by_addr = &wire.tcp_by_addr;
    assert!(
        by_addr.get(&POD_C_IP).copied().unwrap_or(0) > 0,
        "no traffic to pod C's address on node B's fabric link: {by_addr:?}"
    );
    for old in [w.t.pod_ip, w.t.pod_b_ip] {
        assert_eq!(
            by_addr.get(&old).copied().unwrap_or(0),
            0,
            "{old} crossed the fabric after the second move: {by_addr:?}"
        );
    }
    // New connections go to pod C.
    request_response(&w.t.client, w.t.pod_addr(PORT), b"after")
        .expect("new connection after the second move");
    assert_backend(&w, POD_C_IP);
    w.assert_no_rst();
}

/// A pod that comes back, at a new address, to the node it left: pod A →
/// pod B (a new IP) → pod D, behind node A again. Node A's agent is both the
/// origin and the destination of the second move. The proxy's flows need no
/// translation there (the proxy's and the pod's sockets meet on node A's pod
/// side, both at their old addresses), so its `incoming` installs nothing
/// for them. Both streams keep every byte, with no RST; new connections
/// reach pod D.
#[test]
fn pod_back_beside_its_proxy_keeps_every_connection() {
    privileged!();
    let mut w = World::with_second_move("mgh", &[PORT], ExtraPod::pod_d);
    let (back, ()) = migrate_twice(&mut w, "mig-back", |_| ());
    assert!(
        back.dest_status["flows"]
            .as_array()
            .is_some_and(|f| f.is_empty()),
        "node A translated its own proxy's flows: {}",
        back.dest_status
    );
    request_response(&w.t.client, w.t.pod_addr(PORT), b"home")
        .expect("new connection after the pod came back");
    assert_backend(&w, POD_D_IP);
    w.assert_no_rst();
}

/// A second move whose dump fails (its images land on a tiny tmpfs): CRIU
/// rolls the dump back and the pod runs on in pod B. Node B, which the pod
/// was leaving, had already replaced its first-move entries with the second
/// move's (the flows go to the destination during the dump). The
/// controller's abort and failed `complete` put both sides back, so both
/// streams, one from before the first move and one opened between, keep
/// every byte with no RST.
#[test]
fn failed_second_move_leaves_the_pod_serving_where_it_was() {
    privileged!();
    let mut w = World::with_second_move("mgf", &[PORT], ExtraPod::pod_c);
    let before = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    w.migrate(&w.plan("mig-ok", &[PORT]));
    let between = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let mut plan = w.plan("mig-fails", &[PORT]);
    plan.image_limit = Some(64 * 1024);
    let err = w.try_migrate_again(&plan).expect_err("the dump must fail");
    assert_eq!(err.step, "dump", "{err}");
    std::thread::sleep(Duration::from_millis(500));
    for s in [before, between] {
        let r = s.stop();
        r.assert_ok();
        assert!(r.max_gap < Duration::from_secs(2), "{:?}", r.max_gap);
    }
    let dest = w
        .dest
        .http("GET", "/v1/migrations/mig-fails/incoming", None)
        .1;
    let dest: Value = serde_json::from_str(&dest).expect("incoming status");
    assert!(
        dest["reason"].is_string() && dest["flows"].as_array().is_some_and(|f| f.is_empty()),
        "the failed move's translations are not undone: {dest}"
    );
    request_response(&w.t.client, w.t.pod_addr(PORT), b"still here")
        .expect("pod still serving at B");
    assert_backend(&w, w.t.pod_b_ip);
    w.assert_no_rst();
    record::fault(
        "failed_second_move_leaves_the_pod_serving_where_it_was",
        "the pod's second move fails at its dump: it serves on at B, the destination's translations for the failed move are undone, the first move's stay; every byte once, 0 RST",
    );
}

/// A route that races ahead of the restore: node A sends to node B before
/// the restored sockets exist. Nothing may reset a client.
#[test]
fn route_switched_before_restore_resets_nobody() {
    privileged!();
    let mut w = World::new("mgr", false, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(300));
    let mut plan = w.plan("mig-route", &[PORT]);
    plan.routes_before_restore = true;
    plan.freeze_extra = Duration::from_millis(500);
    let report = w.migrate(&plan);
    std::thread::sleep(Duration::from_millis(500));
    assert_stream(&s.stop(), &report);
    assert_eq!(
        report.dest_status["state"], "completed",
        "{}",
        report.dest_status
    );
    w.assert_no_rst();
    record::fault(
        "route_switched_before_restore_resets_nobody",
        format!(
            "the destination's shield dropped {} RST(s) from the new namespace; every byte once and in order, nobody reset (0 RST); freeze {}",
            report.dest_status["rsts_shielded"],
            ms(report.freeze)
        ),
    );
}

/// Reconnect mode: the pod is restored without its TCP connections; the
/// proxy opens new ones and replays what it held. The client's connection
/// survives, every value it sent after the hold began is echoed in order.
#[test]
fn reconnect_mode_survives_a_restore_without_connections() {
    privileged!();
    let mut w = World::new("mgc", false, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let mut plan = w.plan("mig-reconnect", &[PORT]);
    plan.mode = ReleaseMode::Reconnect;
    let report = w.migrate(&plan);
    std::thread::sleep(Duration::from_millis(500));
    assert_stream(&s.stop(), &report);
    assert_replayed(&w, &report);
    assert_eq!(report.origin_status["mode"], "reconnect");
    w.assert_no_rst();
}

/// A pod with two listening ports in two processes, dumped and restored
/// together; one migration holds and releases both endpoints atomically.
#[test]
fn multi_port_pod_migrates_atomically() {
    privileged!();
    let mut w = World::new("mgm", false, &[PORT, PORT2]);
    let a = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    let b = CounterStream::start(&w.t.client, w.t.pod_addr(PORT2), TICK);
    std::thread::sleep(Duration::from_millis(500));
    let report = w.migrate(&w.plan("mig-multi", &[PORT, PORT2]));
    std::thread::sleep(Duration::from_millis(500));
    assert_stream(&a.stop(), &report);
    assert_stream(&b.stop(), &report);
    assert_replayed(&w, &report);
    assert_eq!(
        report.origin_status["endpoints"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(u(&report.origin_status, "connections"), 2);
    let restored = w.restored.take().expect("restored");
    let tree = shepherd_tests::process::process_tree(restored.pid());
    assert_eq!(tree.len(), 2, "both processes restored: {tree:?}");
    drop(restored);
    for pid in tree {
        assert!(
            !shepherd_tests::process::pid_alive(pid),
            "restored process {pid} left behind"
        );
    }
    w.assert_no_rst();
}

/// A failed dump: CRIU rolls back, the controller aborts, the pod keeps
/// serving where it was and no client notices more than the attempt.
#[test]
fn failed_dump_aborts_and_the_pod_keeps_serving() {
    privileged!();
    let mut w = World::new("mgf", false, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(300));
    let mut plan = w.plan("mig-fail", &[PORT]);
    plan.image_limit = Some(64 * 1024);
    let err = w
        .try_migrate(&plan, &|_| {})
        .expect_err("the dump must fail");
    assert_eq!(err.step, "dump", "{err}");
    assert!(
        w.pod.as_ref().is_some_and(Workload::is_alive),
        "the pod must keep running"
    );
    let st = w
        .origin
        .cli_json(&["migrate", "status", "--id", "mig-fail"]);
    assert_eq!(st["state"], "aborted", "{st}");
    std::thread::sleep(Duration::from_millis(500));
    let r = s.stop();
    r.assert_ok();
    assert!(r.max_gap < Duration::from_secs(2), "{:?}", r.max_gap);
    request_response(&w.t.client, w.t.pod_addr(PORT), b"still here")
        .expect("pod still serving at A");
    w.assert_no_rst();
    record::fault(
        "failed_dump_aborts_and_the_pod_keeps_serving",
        format!(
            "CRIU rolls the dump back, the migration is aborted, the pod serves on at A (new connections too); the stream paused {} and lost nothing; 0 RST",
            ms(r.max_gap)
        ),
    );
}

/// Fault: the destination's agent is down when the controller prepares it.
/// The controller stops at that first step, before anything is held or
/// dumped: the pod serves on where it was, its clients see nothing, and the
/// origin has no record of the attempt.
#[test]
fn destination_agent_down_before_incoming_changes_nothing() {
    privileged!();
    let mut w = World::new("mgx", true, &[PORT]);
    let s = CounterStream::start(&w.t.client, w.t.pod_addr(PORT), TICK);
    std::thread::sleep(Duration::from_millis(300));
    shepherd_tests::process::signal_pid(w.dest.pid(), libc::SIGKILL)
        .expect("kill the destination's agent");
    std::thread::sleep(Duration::from_millis(200));
    let plan = w.plan("mig-down", &[PORT]);
    let err = w
        .try_migrate(&plan, &|_| {})
        .expect_err("a migration towards a dead agent");
    assert_eq!(err.step, "shield destination", "{err}");
    assert!(
        w.pod.as_ref().is_some_and(Workload::is_alive),
        "the pod must keep running"
    );
    assert_eq!(
        w.origin.http("GET", "/v1/migrations/mig-down", None).0,
        404,
        "nothing was held"
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = s.stop();
    r.assert_ok();
    assert!(r.max_gap < Duration::from_secs(1), "{:?}", r.max_gap);
    w.assert_no_rst();
    record::fault(
        "destination_agent_down_before_incoming_changes_nothing",
        format!(
            "the controller stops at `incoming`, before any hold or dump; the pod serves on, the origin has no record; the stream's longest pause {}; 0 RST",
            ms(r.max_gap)
        ),
    );
}

/// Fault: the link between the nodes is cut for 2 s right after the
/// restore, before the release (node B's port on the fabric's bridge goes
/// down). TCP retransmits across the cut: every byte arrives once and in
/// order, no RST, and the pause is the freeze plus the cut plus a
/// retransmission back-off.
#[test]
fn a_two_second_cut_between_restore_and_release_loses_nothing() {
    privileged!();
    let mut w = World::new("mgk", true, &[PORT]);
    let streams = w.streams(3);
    let fabric = w.t.fabric.name().to_string();
    let set_link = |state: &str| {
        let ok = std::process::Command::new("ip")
            .args(["-n", &fabric, "link", "set", "nodeb", state])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set nodeb {state} in {fabric}");
    };
    let cut = |line: &str| {
        if line.starts_with("restore") {
            set_link("down");
            std::thread::sleep(Duration::from_secs(2));
            set_link("up");
        }
    };
    let plan = w.plan("mig-cut", &[PORT]);
    let report = w
        .try_migrate(&plan, &cut)
        .unwrap_or_else(|e| panic!("{e}\norigin log:\n{}", w.origin.log()));
    std::thread::sleep(Duration::from_millis(2000));
    let mut longest = Duration::ZERO;
    for s in streams {
        let r = s.stop();
        r.assert_ok();
        longest = longest.max(r.max_gap);
        assert!(
            r.max_gap <= report.freeze + Duration::from_secs(2) + Duration::from_secs(4),
            "client paused {:?} (freeze {:?}, cut 2 s)",
            r.max_gap,
            report.freeze
        );
    }
    assert!(w.restored.as_ref().is_some_and(RestoredProcess::is_alive));
    w.assert_no_rst();
    record::fault(
        "a_two_second_cut_between_restore_and_release_loses_nothing",
        format!(
            "TCP retransmits across the cut: every byte once and in order, 0 RST; longest pause {} (freeze {}, cut 2 s)",
            ms(longest),
            ms(report.freeze)
        ),
    );
}

/// Fault: the restore on B fails (pod B's namespace lacks the old address
/// the restored sockets are bound to), and the controller restores the pod
/// back on A from the same images. The migration is aborted, the pod serves
/// on at A, and the clients lose nothing and see no RST.
#[test]
fn a_restore_that_fails_on_b_is_restored_on_a() {
    privileged!();
    let mut w = World::new("mgb", true, &[PORT]);
    w.t.pod_b
        .ip(&["addr", "del", &format!("{}/32", w.t.pod_ip), "dev", "lo"]);
    let streams = w.streams(3);
    let plan = w.plan("mig-back-home", &[PORT]);
    let mut pod = w.pod.take().expect("pod");
    let pid = pod.pid();
    let c = Cluster {
        topo: &w.t,
        origin: &w.origin,
        dest: &w.dest,
    };
    let mut err = controller::migrate(
        &c,
        &plan,
        pid,
        &mut || {
            pod.wait_exit(Duration::from_secs(10));
        },
        &|l| eprintln!("[mig-back-home] {l}"),
    )
    .expect_err("the restore on B must fail");
    drop(pod);
    assert_eq!(err.step, "restore", "{err}");
    let back = err
        .rolled_back
        .take()
        .unwrap_or_else(|| panic!("not restored back on A: {err}"));
    assert!(back.is_alive(), "{err}");
    let st = w
        .origin
        .cli_json(&["migrate", "status", "--id", "mig-back-home"]);
    assert_eq!(st["state"], "aborted", "{st}");
    std::thread::sleep(Duration::from_millis(500));
    for s in streams {
        s.stop().assert_ok();
    }
    request_response(&w.t.client, w.t.pod_addr(PORT), b"still at A")
        .expect("a new connection after the failed move");
    w.restored = Some(back);
    w.assert_no_rst();
    record::fault(
        "a_restore_that_fails_on_b_is_restored_on_a",
        "the controller restores the pod back on A from the same images and aborts: every byte once and in order, 0 RST; new connections served at A",
    );
}

/// Fault: the fabric between the nodes loses 5% of its packets and delays
/// the rest by 50 ms (netem's figures; see `shepherd_tests::netem`) from
/// the restore on: through the release, the replay and after. The replay
/// completes: every byte once and in order, no RST, and the clients' pause
/// bounded by the freeze and TCP's retransmissions.
#[test]
fn loss_and_delay_on_the_fabric_during_the_replay_lose_nothing() {
    privileged!();
    let mut w = World::new("mgl", true, &[PORT]);
    let streams = w.streams(3);
    let fabric = w.t.fabric.name().to_string();
    let netem: RefCell<Option<Netem>> = RefCell::new(None);
    let impair = |line: &str| {
        if line.starts_with("restore") {
            let imp = Impairment {
                loss: 0.05,
                delay: Duration::from_millis(50),
            };
            *netem.borrow_mut() = Some(Netem::start(&fabric, 0, imp));
        }
    };
    let plan = w.plan("mig-lossy", &[PORT]);
    let report = w
        .try_migrate(&plan, &impair)
        .unwrap_or_else(|e| panic!("{e}\norigin log:\n{}", w.origin.log()));
    // The replayed streams go on over the impaired fabric for a while.
    std::thread::sleep(Duration::from_secs(3));
    let done = netem.take().expect("the fabric was impaired").stop();
    eprintln!("impaired fabric: {done:?}");
    assert!(
        done.packets >= 100 && done.dropped > 0,
        "the impairment saw too little to count: {done:?}"
    );
    let st = w
        .origin
        .cli_json(&["migrate", "status", "--id", "mig-lossy"]);
    assert!(st["bytes_held"].as_u64() > Some(0), "{st}");
    assert_eq!(
        st["bytes_replayed"], st["bytes_held"],
        "the replay completed: {st}"
    );
    let mut longest = Duration::ZERO;
    for s in streams {
        let r = s.stop();
        r.assert_ok();
        longest = longest.max(r.max_gap);
        assert!(
            r.max_gap <= report.freeze + Duration::from_secs(5),
            "client paused {:?} (freeze {:?})",
            r.max_gap,
            report.freeze
        );
    }
    assert!(w.restored.as_ref().is_some_and(RestoredProcess::is_alive));
    w.assert_no_rst();
    record::fault(
        "loss_and_delay_on_the_fabric_during_the_replay_lose_nothing",
        format!(
            "the replay completes ({} bytes held, all replayed): every byte once and in order, 0 RST; {} of {} packets dropped on the fabric; longest pause {} (freeze {})",
            st["bytes_held"],
            done.dropped,
            done.packets,
            ms(longest),
            ms(report.freeze)
        ),
    );
}

/// Fault: the controller vanishes right after the restore: no release and
/// no `complete`. When the hold's deadline comes, the origin sees the pod's
/// restored connections answering from its new address and releases there
/// (resume) instead of aborting, which would send the replay to the address
/// the pod has left; the status says so. Every byte once, in order, no RST.
#[test]
fn a_controller_that_vanishes_after_the_restore_is_rolled_forward() {
    privileged!();
    let mut w = World::new("mgv", true, &[PORT]);
    let streams = w.streams(3);
    let mut plan = w.plan("mig-vanish", &[PORT]);
    let deadline = Duration::from_secs(4);
    plan.hold_deadline = Some(deadline);
    plan.vanish_after_restore = true;
    let report = w
        .try_migrate(&plan, &|_| {})
        .unwrap_or_else(|e| panic!("{e}\norigin log:\n{}", w.origin.log()));
    let status = || {
        w.origin
            .cli_json(&["migrate", "status", "--id", "mig-vanish"])
    };
    let until = Instant::now() + deadline + Duration::from_secs(10);
    while status()["state"] == "holding" {
        assert!(Instant::now() < until, "the deadline never ended the hold");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status();
    assert_eq!(st["state"], "released", "{st}");
    assert_eq!(st["mode"], "resume", "{st}");
    let reason = st["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("deadline") && reason.contains("answer at its target"),
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let mut longest = Duration::ZERO;
    for s in streams {
        let r = s.stop();
        r.assert_ok();
        longest = longest.max(r.max_gap);
        assert!(
            r.max_gap <= deadline + report.freeze + Duration::from_secs(2),
            "client paused {:?} (deadline {deadline:?})",
            r.max_gap
        );
    }
    assert!(w.restored.as_ref().is_some_and(RestoredProcess::is_alive));
    w.assert_no_rst();
    record::fault(
        "a_controller_that_vanishes_after_the_restore_is_rolled_forward",
        format!(
            "the deadline ({}) finds the restored connections answering from the new address and releases there (resume): every byte once and in order, 0 RST; longest pause {}",
            ms(deadline),
            ms(longest)
        ),
    );
}

/// Fault: the destination's agent dies when `complete` is due, after the
/// release (with it go its programs: the new address is no longer
/// translated back for the restored sockets). That is a loss: the pod
/// resets the flows it no longer recognises, and the proxy closes each
/// client cleanly (a FIN after every byte the pod sent, never a reset or a
/// hang) and says why in the migration's status.
#[test]
fn destination_agent_dead_at_complete_ends_clients_cleanly() {
    privileged!();
    let mut w = World::new("mgc", true, &[PORT]);
    let streams = w.streams(2);
    let plan = w.plan("mig-dead-dest", &[PORT]);
    let dest_pid = w.dest.pid();
    let kill_at_complete = |line: &str| {
        if line.starts_with("release") {
            let _ = shepherd_tests::process::signal_pid(dest_pid, libc::SIGKILL);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let err = w
        .try_migrate(&plan, &kill_at_complete)
        .expect_err("complete cannot reach a dead agent");
    assert_eq!(err.step, "complete", "{err}");
    // Every client ends, cleanly, within seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    while streams.iter().any(|s| !s.has_failed()) {
        assert!(
            Instant::now() < deadline,
            "a client hangs after the destination died"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in streams {
        let r = s.stop();
        assert!(r.eof, "the client did not get a FIN: {:?}", r.first_error);
        assert!(r.in_order, "bytes out of order before the end");
    }
    let st = w
        .origin
        .cli_json(&["migrate", "status", "--id", "mig-dead-dest"]);
    assert!(u(&st, "connections_closed") >= 1, "{st}");
    assert!(st["reason"].as_str().is_some_and(|r| !r.is_empty()), "{st}");
    w.assert_no_rst();
    record::fault(
        "destination_agent_dead_at_complete_ends_clients_cleanly",
        format!(
            "a loss, ended cleanly: {} client(s) closed with a FIN after every byte in order (no RST, no hang); the status says: \"{}\"; the controller reports the failed step",
            u(&st, "connections_closed"),
            st["reason"].as_str().unwrap_or_default()
        ),
    );
}

/// redis-server as the pod, a real client doing SET/GET every 10 ms through
/// Shepherd across the migration: zero failed commands, and data written
/// before the migration is readable after it.
#[test]
fn redis_survives_migration_with_zero_failed_commands() {
    privileged!();
    const REDIS: u16 = 6379;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new(&unique_prefix("mgd"));
    let bin = Path::new("/usr/bin/redis-server");
    assert!(
        bin.exists(),
        "redis-server missing: run `cargo xtask setup`"
    );
    let redis = Workload::spawn_in(
        &t.pod_a,
        bin,
        [
            "--bind",
            &t.pod_ip.to_string(),
            "--port",
            &REDIS.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ],
        &dir.path().join("redis.log"),
    );
    wait_tcp_ready(
        &t.client,
        SocketAddr::V4(t.pod_addr(REDIS)),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}; redis log:\n{}", redis.log()));
    let mut w = World::finish(dir, t, redis, None, &[REDIS]);
    let server = w.t.pod_addr(REDIS);
    redis_cli(&w.t, server, &["SET", "before-migration", "kept"]);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (conn, _) =
        shepherd_tests::stream::connect_in(&w.t.client, server).expect("connect to redis");
    let (report, (ok, failed, slowest)) = std::thread::scope(|scope| {
        let stop = &stop;
        let load = scope.spawn(move || redis_load(conn, stop));
        std::thread::sleep(Duration::from_millis(500));
        let plan = w.plan("mig-redis", &[REDIS]);
        let report = w.migrate(&plan);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (report, load.join().expect("load thread"))
    });
    eprintln!(
        "redis: {ok} ok, {failed} failed, slowest {slowest:?}, hold {:?}",
        report.hold
    );
    assert_eq!(failed, 0, "failed commands");
    assert!(ok > 50, "too few commands: {ok}");
    assert!(
        slowest <= report.hold + SLACK,
        "a command took {slowest:?}, hold {:?}",
        report.hold
    );
    assert_eq!(
        redis_cli(&w.t, server, &["GET", "before-migration"]).trim(),
        "kept"
    );
    assert_replayed(&w, &report);
    w.assert_no_rst();
}

/// `redis-cli` from the client namespace; returns its stdout.
fn redis_cli(t: &TwoNode, server: SocketAddrV4, args: &[&str]) -> String {
    let out = t.client.exec(
        &[
            &[
                "redis-cli",
                "-h",
                &server.ip().to_string(),
                "-p",
                &server.port().to_string(),
            ][..],
            args,
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SET k v then GET k every 10 ms on one connection (RESP by hand) until
/// `stop`; returns (ok, failed, slowest command).
fn redis_load(
    stream: std::net::TcpStream,
    stop: &std::sync::atomic::AtomicBool,
) -> (u64, u64, Duration) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let (mut ok, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
    let mut i = 0u64;
    let mut line = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("k{}", i % 100);
        let val = i.to_string();
        let set = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{val}\r\n",
            key.len(),
            val.len()
        );
        let get = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        let t0 = Instant::now();
        let good = (|| -> std::io::Result<bool> {
            writer.write_all(set.as_bytes())?;
            line.clear();
            reader.read_line(&mut line)?;
            if line != "+OK\r\n" {
                return Ok(false);
            }
            writer.write_all(get.as_bytes())?;
            line.clear();
            reader.read_line(&mut line)?;
            if line != format!("${}\r\n", val.len()) {
                return Ok(false);
            }
            line.clear();
            reader.read_line(&mut line)?;
            Ok(line == format!("{val}\r\n"))
        })();
        slowest = slowest.max(t0.elapsed());
        match good {
            Ok(true) => ok += 1,
            _ => {
                failed += 1;
                break;
            }
        }
        i += 1;
        std::thread::sleep(TICK);
    }
    (ok, failed, slowest)
}
