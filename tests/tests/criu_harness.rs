//! Self-tests of the two-node topology and the CRIU wrappers, with real CRIU
//! and no Shepherd agent: the topology forwards (and switches routes), a pod
//! migrates from node A to node B with its TCP connection (the CRIU-alone
//! baseline of docs/toolchain.md), a failed dump rolls back, and the guards clean up.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shepherd_tests::capture::Capture;
use shepherd_tests::criu::{self, DumpOpts, Images};
use shepherd_tests::names::unique_prefix;
use shepherd_tests::netns::Netns;
use shepherd_tests::process::{wait_tcp_ready, Workload};
use shepherd_tests::stream::{request_response, CounterStream};
use shepherd_tests::topology::{TwoNode, CLIENT_IP, POD_B_NEW_IP, POD_IP};
use shepherd_tests::{echo_bin, privileged};

const PORT: u16 = 7000;
const TICK: Duration = Duration::from_millis(10);
/// How long a dumped workload may take to exit and be reaped.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies `shepherd-echo` into `dir`, so a rebuild of `target/` between a
/// dump and its restore can't swap the binary CRIU restores from under it.
fn echo_copy(dir: &Path) -> PathBuf {
    let to = dir.join("shepherd-echo");
    if !to.exists() {
        std::fs::copy(echo_bin!(), &to).expect("copy shepherd-echo");
    }
    to
}

/// Starts `shepherd-echo` in `ns` listening on `listen`, logging to
/// `dir/{name}.log` and its peers to `dir/{name}-peers.log`, and waits until
/// the client reaches `reach` (the same address, seen from the client).
fn start_echo(
    t: &TwoNode,
    ns: &Netns,
    listen: &[SocketAddrV4],
    reach: SocketAddrV4,
    dir: &Path,
    name: &str,
) -> Workload {
    let peer_log = dir.join(format!("{name}-peers.log"));
    let mut args: Vec<String> = Vec::new();
    for l in listen {
        args.push("--listen".into());
        args.push(l.to_string());
    }
    args.push("--peer-log".into());
    args.push(peer_log.to_str().expect("UTF-8 temp path").into());
    let w = Workload::spawn_in(ns, &echo_copy(dir), &args, &dir.join(format!("{name}.log")));
    if let Err(e) = wait_tcp_ready(&t.client, SocketAddr::V4(reach), Duration::from_secs(10)) {
        panic!("{e}; {name} log:\n{}", w.log());
    }
    w
}

fn peers(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}-peers.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `ip route get DST` in the client: which gateway it actually uses (a learned
/// ICMP redirect would show here).
fn client_route(t: &TwoNode, dst: std::net::Ipv4Addr) -> String {
    t.client.ip(&["route", "get", &dst.to_string()])
}

/// The pod netns's iptables rules that drop packets (CRIU's connection locks).
fn lock_rules(pod: &Netns) -> Vec<String> {
    pod.run(&["iptables", "-S"])
        .lines()
        .filter(|l| l.contains("-j DROP"))
        .map(str::to_owned)
        .collect()
}

/// Waits until the stream has got `more` values back beyond `from`, or panics
/// after `timeout`.
fn wait_received(counter: &CounterStream, from: u64, more: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while counter.received() < from + more {
        assert!(
            Instant::now() < deadline,
            "counter stream stuck at {} (sent {}) {timeout:?} after {from}",
            counter.received(),
            counter.sent()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// TwoNode

#[test]
fn two_node_forwards_to_pod_a_then_through_node_a_to_pod_b() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new(&unique_prefix("tn"));
    assert!(t.same_ip());
    let addr = t.pod_addr(PORT);
    let _echo_a = start_echo(&t, &t.pod_a, &[addr], addr, dir.path(), "a");
    request_response(&t.client, addr, b"to pod A").expect("echo from pod A");
    let seen_by_a = peers(dir.path(), "a");
    assert!(
        seen_by_a
            .iter()
            .all(|l| l.starts_with(&format!("peer={CLIENT_IP}:"))),
        "pod A saw a peer other than the client: {seen_by_a:?}"
    );
    assert!(
        client_route(&t, POD_IP).contains(&format!("via {}", t.node_a_ip)),
        "{}",
        client_route(&t, POD_IP)
    );

    // Node B has no route to pod B until the routes switch.
    let node_b_routes = t.node_b.ip(&["route", "show"]);
    assert!(
        !node_b_routes.contains(&POD_IP.to_string()),
        "node B routes the pod IP before the switch:\n{node_b_routes}"
    );

    t.switch_routes();
    let via_a = Capture::start(&t.node_a, t.node_fabric_if());
    let _echo_b = start_echo(&t, &t.pod_b, &[addr], addr, dir.path(), "b");
    request_response(&t.client, addr, b"to pod B").expect("echo from pod B");
    let cap = via_a.stop();
    assert!(
        cap.tcp_packets > 0,
        "nothing crossed node A's fabric interface: {cap:?}"
    );
    let seen_by_b = peers(dir.path(), "b");
    assert!(
        !seen_by_b.is_empty()
            && seen_by_b
                .iter()
                .all(|l| l.starts_with(&format!("peer={CLIENT_IP}:"))),
        "pod B's peers: {seen_by_b:?}"
    );
    assert_eq!(
        peers(dir.path(), "a"),
        seen_by_a,
        "pod A got connections after the switch"
    );
    // Node A forwards out of the interface the packets came in on, yet the
    // client must not have learned a redirect past its anchor.
    let route = client_route(&t, POD_IP);
    assert!(
        route.contains(&format!("via {}", t.node_a_ip)),
        "client bypasses node A: {route}"
    );

    // Abort path: back to pod A.
    t.restore_routes();
    t.restore_routes(); // idempotent
    let before = peers(dir.path(), "a").len();
    request_response(&t.client, addr, b"back to A").expect("echo from pod A again");
    assert_eq!(peers(dir.path(), "a").len(), before + 1);
    assert!(
        !t.node_b
            .ip(&["route", "show"])
            .contains(&POD_IP.to_string()),
        "node B kept its pod route"
    );
}

#[test]
fn two_node_new_ip_routes_the_new_ip_to_pod_b() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new_ip(&unique_prefix("tn"));
    assert!(!t.same_ip());
    assert_eq!(t.pod_b_ip, POD_B_NEW_IP);
    let old = t.pod_addr(PORT);
    let new = t.pod_b_addr(PORT);
    let _echo_a = start_echo(&t, &t.pod_a, &[old], old, dir.path(), "a");

    // The old IP is local on pod B's lo: a process there can bind it.
    t.switch_routes();
    let _echo_b = start_echo(&t, &t.pod_b, &[new, old], new, dir.path(), "b");
    request_response(&t.client, new, b"to pod B").expect("echo from pod B's new IP");
    // Node A routes the old IP to node B too (Shepherd's origin-side
    // translation rewrites it on the way out); node B has no route for the
    // old IP, so nothing but translated traffic can reach pod B with it.
    let route_a = t.node_a.ip(&["route", "show"]);
    assert!(
        route_a.contains(&format!("{POD_IP} via {}", t.node_b_ip))
            && route_a.contains(&format!("{POD_B_NEW_IP} via {}", t.node_b_ip)),
        "node A routes:\n{route_a}"
    );
    let route_b = t.node_b.ip(&["route", "show"]);
    assert!(
        !route_b.contains(&format!("{POD_IP} ")),
        "node B routes the old IP:\n{route_b}"
    );

    t.restore_routes();
    assert!(
        request_response(&t.client, new, b"x").is_err(),
        "the new IP is still reachable after restore_routes"
    );
    request_response(&t.client, old, b"to pod A")
        .expect("after restore_routes the old IP leads to pod A");
    for ns in [&t.node_a, &t.node_b] {
        let routes = ns.ip(&["route", "show"]);
        assert!(
            !routes.contains(&POD_B_NEW_IP.to_string()),
            "{} kept a route to the new IP:\n{routes}",
            ns.name()
        );
    }
}

// ---------------------------------------------------------------------------
// CRIU alone

/// What a CRIU-alone migration looked like.
struct Migration {
    dump: Duration,
    restore: Duration,
    /// From the dump's start to the restore's end.
    freeze: Duration,
    /// The client's longest pause.
    max_gap: Duration,
}

/// Migrates a same-IP pod running `shepherd-echo` from node A to node B with
/// CRIU alone, while a client streams a counter every 10 ms; `stretch` is
/// waited between copying the images and restoring them (a longer freeze).
/// Asserts the stream survives whole, with no RST, and reports.
fn migrate_same_ip(tag: &str, stretch: Duration) -> Migration {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new(&unique_prefix(tag));
    let addr = t.pod_addr(PORT);
    let mut echo = start_echo(&t, &t.pod_a, &[addr], addr, dir.path(), "echo");
    let capture = Capture::start(&t.client, t.client_if());
    let counter = CounterStream::start(&t.client, addr, TICK);
    wait_received(&counter, 0, 30, Duration::from_secs(5));

    let images = Images::new();
    let freeze_start = Instant::now();
    let dump = criu::dump(&t.pod_a, echo.pid(), &images, &DumpOpts::default())
        .unwrap_or_else(|e| panic!("{e}"));
    echo.wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("the dumped workload {} did not exit", echo.pid()));
    let on_b = images.copy_to();
    assert_eq!(on_b.files(), images.files());
    std::thread::sleep(stretch);
    let (restored, restore) = criu::restore(&t.pod_b, &on_b, criu::TcpRestore::Established)
        .unwrap_or_else(|e| panic!("{e}"));
    let freeze = freeze_start.elapsed();
    t.switch_routes();
    let received_at_restore = counter.received();

    assert_eq!(restored.pid(), echo.pid(), "CRIU restores the original pid");
    assert!(restored.is_alive());
    assert!(
        restored.is_our_child(),
        "the restored tree was not reparented to the test"
    );
    let pod_b_ns = std::fs::metadata(t.pod_b.path()).expect("stat pod B netns");
    let its_ns = std::fs::metadata(format!("/proc/{}/ns/net", restored.pid())).expect("stat");
    assert_eq!(
        (its_ns.dev(), its_ns.ino()),
        (pod_b_ns.dev(), pod_b_ns.ino()),
        "the restored process is not in pod B's netns"
    );

    // The stream resumes (at the client's next retransmission at the latest),
    // and a new connection reaches the restored listener via node A → node B.
    wait_received(&counter, received_at_restore, 50, Duration::from_secs(15));
    request_response(&t.client, addr, b"new connection after the migration")
        .expect("new connection to the restored pod");
    let report = counter.stop();
    let cap = capture.stop();
    eprintln!(
        "criu alone, same IP, stretch {} ms: dump {} ms, restore {} ms, freeze (dump start → \
         restore done) {} ms, client max gap {} ms; images {} KiB in {} files; sent {} received \
         {}; {} TCP packets, {} RST",
        stretch.as_millis(),
        dump.as_millis(),
        restore.as_millis(),
        freeze.as_millis(),
        report.max_gap.as_millis(),
        images.total_bytes() / 1024,
        images.files().len(),
        report.sent,
        report.received,
        cap.tcp_packets,
        cap.rsts
    );
    report.assert_ok();
    assert_eq!(
        cap.rsts, 0,
        "RSTs on the client's wire: {:#?}",
        cap.rst_lines
    );
    assert!(cap.error.is_none(), "capture failed: {:?}", cap.error);
    assert!(
        report.max_gap < freeze + Duration::from_secs(7),
        "client max gap {:?} vs freeze {freeze:?}",
        report.max_gap
    );
    assert!(
        report.max_gap >= freeze.saturating_sub(Duration::from_millis(100)) / 2,
        "a {freeze:?} freeze left only a {:?} gap: did the dump freeze anything?",
        report.max_gap
    );
    let seen = peers(dir.path(), "echo");
    assert!(seen.len() >= 3, "peer log (probe, stream, new): {seen:?}");
    Migration {
        dump,
        restore,
        freeze,
        max_gap: report.max_gap,
    }
}

/// The baseline: CRIU alone, as fast as it goes here.
#[test]
fn criu_alone_migrates_a_same_ip_pod_with_its_connection() {
    privileged!();
    let m = migrate_same_ip("cr", Duration::ZERO);
    eprintln!(
        "baseline: dump {:?} restore {:?} freeze {:?} gap {:?}",
        m.dump, m.restore, m.freeze, m.max_gap
    );
}

/// The baseline with a freeze stretched by 1 s: the client's retransmission
/// back-off shows (docs/toolchain.md: up to about twice the freeze).
#[test]
fn criu_alone_with_a_stretched_freeze_shows_back_off() {
    privileged!();
    let m = migrate_same_ip("crs", Duration::from_secs(1));
    eprintln!(
        "stretched: dump {:?} restore {:?} freeze {:?} gap {:?} (gap − freeze {} ms)",
        m.dump,
        m.restore,
        m.freeze,
        m.max_gap,
        m.max_gap.as_millis() as i128 - m.freeze.as_millis() as i128
    );
}

/// A dump that fails half-way (its images fill a small tmpfs: ENOSPC while
/// writing memory pages, after the connection was locked) rolls back: the
/// workload keeps running and echoing on the same connection, no RST.
#[test]
fn failed_dump_rolls_back_enospc() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new(&unique_prefix("crf"));
    let addr = t.pod_addr(PORT);
    let echo = start_echo(&t, &t.pod_a, &[addr], addr, dir.path(), "echo");
    let capture = Capture::start(&t.client, t.client_if());
    let counter = CounterStream::start(&t.client, addr, TICK);
    wait_received(&counter, 0, 30, Duration::from_secs(5));

    let images = Images::on_tmpfs(64 * 1024);
    let err = criu::dump(&t.pod_a, echo.pid(), &images, &DumpOpts::default())
        .expect_err("a dump into a 64 KiB tmpfs succeeded");
    eprintln!("expected dump failure after {:?}:\n{err}", err.elapsed);
    let log = images.dump_log();
    assert!(
        log.contains("No space left on device"),
        "the dump did not fail for lack of space:\n{err}"
    );
    assert!(
        log.contains("Locked ") && log.contains("Unlocked "),
        "the dump failed before locking the connection (not mid-dump):\n{err}"
    );
    assert!(echo.is_alive(), "the workload died: {}", echo.log());
    assert!(
        lock_rules(&t.pod_a).is_empty(),
        "CRIU left lock rules: {:?}",
        lock_rules(&t.pod_a)
    );

    let at_failure = counter.received();
    wait_received(&counter, at_failure, 50, Duration::from_secs(5));
    request_response(&t.client, addr, b"still here").expect("new connection after the failure");
    let report = counter.stop();
    let cap = capture.stop();
    eprintln!(
        "after the failed dump: sent {} received {} max gap {} ms, {} RST",
        report.sent,
        report.received,
        report.max_gap.as_millis(),
        cap.rsts
    );
    report.assert_ok();
    assert_eq!(cap.rsts, 0, "RSTs: {:#?}", cap.rst_lines);
    assert!(
        report.max_gap < Duration::from_secs(1),
        "rollback left a {:?} gap",
        report.max_gap
    );
}

/// A post-dump action script vetoes a complete dump (all images written): CRIU
/// rolls back and the workload runs on; then a real dump and restore of that
/// same workload to node B still works, the stream whole throughout.
#[test]
fn vetoed_dump_rolls_back_and_a_later_migration_works() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = TwoNode::new(&unique_prefix("crv"));
    let addr = t.pod_addr(PORT);
    let mut echo = start_echo(&t, &t.pod_a, &[addr], addr, dir.path(), "echo");
    let capture = Capture::start(&t.client, t.client_if());
    let counter = CounterStream::start(&t.client, addr, TICK);
    wait_received(&counter, 0, 30, Duration::from_secs(5));

    let script = dir.path().join("veto.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] && exit 1\nexit 0\n",
    )
    .expect("write action script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let vetoed = Images::new();
    let opts = DumpOpts {
        action_script: Some(script),
        ..DumpOpts::default()
    };
    let err =
        criu::dump(&t.pod_a, echo.pid(), &vetoed, &opts).expect_err("the vetoed dump succeeded");
    eprintln!("expected dump failure after {:?}:\n{err}", err.elapsed);
    let files = vetoed.files();
    assert!(
        files.iter().any(|f| f.starts_with("pages-"))
            && files.iter().any(|f| f.starts_with("tcp-stream-")),
        "the dump was not complete before the veto: {files:?}"
    );
    assert!(echo.is_alive(), "the workload died: {}", echo.log());
    assert!(
        lock_rules(&t.pod_a).is_empty(),
        "{:?}",
        lock_rules(&t.pod_a)
    );
    let at_failure = counter.received();
    wait_received(&counter, at_failure, 30, Duration::from_secs(5));
    let veto_gap = counter.max_gap_so_far();

    // Now for real.
    let images = Images::new();
    let t0 = Instant::now();
    criu::dump(&t.pod_a, echo.pid(), &images, &DumpOpts::default())
        .unwrap_or_else(|e| panic!("{e}"));
    echo.wait_exit(EXIT_TIMEOUT)
        .expect("the dumped workload exits");
    let (restored, _) = criu::restore(&t.pod_b, &images.copy_to(), criu::TcpRestore::Established)
        .unwrap_or_else(|e| panic!("{e}"));
    let freeze = t0.elapsed();
    t.switch_routes();
    wait_received(&counter, counter.received(), 50, Duration::from_secs(15));
    let report = counter.stop();
    let cap = capture.stop();
    eprintln!(
        "vetoed dump: gap {} ms; then migration: freeze {} ms, max gap {} ms, {} RST",
        veto_gap.as_millis(),
        freeze.as_millis(),
        report.max_gap.as_millis(),
        cap.rsts
    );
    report.assert_ok();
    assert_eq!(cap.rsts, 0, "RSTs: {:#?}", cap.rst_lines);
    assert!(veto_gap < Duration::from_secs(1), "veto gap {veto_gap:?}");
    assert!(restored.is_alive());
    shepherd_tests::record::fault(
        "vetoed_dump_rolls_back_and_a_later_migration_works",
        format!(
            "CRIU rolls the vetoed dump back: the pod serves on (the stream paused {} ms), and a later migration works (freeze {} ms, 0 RST)",
            veto_gap.as_millis(),
            freeze.as_millis()
        ),
    );
}

/// The guards leave nothing: namespaces, the restored process (gone from
/// /proc, not a zombie), image directories and the tmpfs mount.
#[test]
fn criu_guards_clean_up() {
    privileged!();
    let prefix = unique_prefix("crg");
    let dir = tempfile::tempdir().expect("tempdir");
    let (pid, roots, tmpfs_dir) = {
        let t = TwoNode::new(&prefix);
        let addr = t.pod_addr(PORT);
        let mut echo = start_echo(&t, &t.pod_a, &[addr], addr, dir.path(), "echo");
        let images = Images::new();
        criu::dump(&t.pod_a, echo.pid(), &images, &DumpOpts::default())
            .unwrap_or_else(|e| panic!("{e}"));
        echo.wait_exit(EXIT_TIMEOUT)
            .expect("the dumped workload exits");
        let on_b = images.copy_to();
        let (restored, _) = criu::restore(&t.pod_b, &on_b, criu::TcpRestore::Established)
            .unwrap_or_else(|e| panic!("{e}"));
        t.switch_routes();
        request_response(&t.client, addr, b"restored").expect("echo from the restored pod");
        let small = Images::on_tmpfs(4096);
        assert!(mounted(small.path()), "tmpfs not mounted");

        let listed = shepherd_tests::netns::list();
        for role in ["fab", "cli", "nodea", "nodeb", "poda", "podb"] {
            let name = format!("{prefix}{role}");
            assert!(listed.contains(&name), "{name} missing: {listed:?}");
        }
        assert!(restored.is_alive());
        let roots = [
            images.root().to_owned(),
            on_b.root().to_owned(),
            small.root().to_owned(),
        ];
        for r in &roots {
            assert!(r.exists(), "{} missing", r.display());
        }
        (restored.pid(), roots, small.path().to_owned())
    };
    let left: Vec<String> = shepherd_tests::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "restored process {pid} still in /proc"
    );
    for r in &roots {
        assert!(!r.exists(), "image directory {} left behind", r.display());
    }
    assert!(
        !mounted(&tmpfs_dir),
        "tmpfs {} still mounted",
        tmpfs_dir.display()
    );
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_ref()))
}
