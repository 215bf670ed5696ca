//! Self-tests of the harness itself, without the agent: the single-node
//! topology forwards client traffic to the pod, the workload and measurement
//! helpers behave, and the guards clean up after themselves.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use shepherd_tests::capture::Capture;
use shepherd_tests::names::unique_prefix;
use shepherd_tests::process::{pid_alive, wait_tcp_ready, Workload};
use shepherd_tests::stream::{bulk_echo, connect_in, request_response, CounterStream};
use shepherd_tests::topology::{SingleNode, CLIENT_IP};
use shepherd_tests::{echo_bin, privileged};

const PORT: u16 = 7000;

/// Starts `shepherd-echo` in the pod on POD_IP:PORT with a peer log, and waits
/// until the client can reach it.
fn start_echo(t: &SingleNode, dir: &std::path::Path) -> Workload {
    let listen = t.pod_addr(PORT).to_string();
    let peer_log = dir.join("peers.log");
    let peer_log = peer_log.to_str().expect("UTF-8 temp path");
    let w = Workload::spawn_in(
        &t.pod,
        &echo_bin!(),
        ["--listen", &listen, "--peer-log", peer_log],
        &dir.join("echo.log"),
    );
    if let Err(e) = wait_tcp_ready(
        &t.client,
        SocketAddr::V4(t.pod_addr(PORT)),
        Duration::from_secs(10),
    ) {
        panic!("{e}; echo log:\n{}", w.log());
    }
    w
}

#[test]
fn single_node_forwards_client_to_pod() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = SingleNode::new(&unique_prefix("tb"));
    let echo = start_echo(&t, dir.path());
    let capture = Capture::start(&t.client, t.client_if());

    let counter = CounterStream::start(&t.client, t.pod_addr(PORT), Duration::from_millis(10));
    let bulk = bulk_echo(&t.client, t.pod_addr(PORT), 16 << 20, 42);
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(bulk.elapsed));
    let (connect, response) =
        request_response(&t.client, t.pod_addr(PORT), b"hello pod").expect("request/response");
    let counter = counter.stop();
    let cap = capture.stop();

    eprintln!(
        "counter: sent {} max_gap {:?}; bulk: {} MiB in {:?} ({:.0} MiB/s); rr: connect {connect:?} \
         response {response:?}; capture: {} frames, {} tcp, {} rst, {} malformed, {} dropped",
        counter.sent,
        counter.max_gap,
        bulk.received >> 20,
        bulk.elapsed,
        bulk.throughput() / f64::from(1 << 20),
        cap.frames,
        cap.tcp_packets,
        cap.rsts,
        cap.malformed,
        cap.kernel_drops
    );
    counter.assert_ok();
    assert!(
        counter.sent >= 50,
        "only {} counters sent in ~1 s",
        counter.sent
    );
    bulk.assert_ok();
    assert_eq!(counter.local_addr.ip(), CLIENT_IP);
    assert!(cap.tcp_packets > 0, "capture saw no TCP: {cap:?}");
    assert_eq!(
        cap.rsts, 0,
        "RSTs on the client's interface: {:#?}",
        cap.rst_lines
    );

    let peers = std::fs::read_to_string(dir.path().join("peers.log")).expect("read peer log");
    let want = format!("peer={} local={}", counter.local_addr, t.pod_addr(PORT));
    assert!(
        peers.lines().any(|l| l == want),
        "no line {want:?} in peer log:\n{peers}"
    );
    assert!(
        peers
            .lines()
            .all(|l| l.starts_with(&format!("peer={CLIENT_IP}:"))),
        "the pod saw a peer other than the client:\n{peers}"
    );
    assert!(echo.is_alive(), "echo died; log:\n{}", echo.log());
}

#[test]
fn sigstop_of_the_workload_shows_as_a_gap() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = SingleNode::new(&unique_prefix("tb"));
    let echo = start_echo(&t, dir.path());

    let counter = CounterStream::start(&t.client, t.pod_addr(PORT), Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(300));
    echo.signal(libc::SIGSTOP).expect("SIGSTOP echo");
    std::thread::sleep(Duration::from_secs(1));
    assert!(counter.since_last_arrival() >= Duration::from_millis(900));
    echo.signal(libc::SIGCONT).expect("SIGCONT echo");
    std::thread::sleep(Duration::from_millis(300));
    let report = counter.stop();

    eprintln!("sent {} max_gap {:?}", report.sent, report.max_gap);
    report.assert_ok();
    assert!(
        report.max_gap >= Duration::from_millis(900),
        "max gap {:?}",
        report.max_gap
    );
    assert!(
        report.max_gap < Duration::from_millis(1500),
        "max gap {:?}",
        report.max_gap
    );
}

#[test]
fn guards_remove_namespaces_and_processes() {
    privileged!();
    let prefix = unique_prefix("tb");
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = {
        let t = SingleNode::new(&prefix);
        let echo = start_echo(&t, dir.path());
        let listed = shepherd_tests::netns::list();
        for role in ["cli", "node", "pod"] {
            let name = format!("{prefix}{role}");
            assert!(listed.contains(&name), "{name} missing: {listed:?}");
        }
        echo.pid()
    };
    let left: Vec<String> = shepherd_tests::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!pid_alive(pid), "workload {pid} still alive");
}

#[test]
fn capture_sees_resets_and_echo_survives_them() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = SingleNode::new(&unique_prefix("tb"));
    let echo = start_echo(&t, dir.path());
    let capture = Capture::start(&t.client, t.client_if());

    // Nobody listens on PORT + 1: the pod answers the SYN with an RST.
    let refused = request_response(&t.client, t.pod_addr(PORT + 1), b"x");
    assert!(refused.is_err(), "connect to a closed port succeeded");

    // A client that aborts its connection (SO_LINGER 0 → RST) mid-stream.
    let (mut s, _) = connect_in(&t.client, t.pod_addr(PORT)).expect("connect");
    s.write_all(&[7u8; 100_000]).expect("write");
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);

    // The echo server keeps serving.
    std::thread::sleep(Duration::from_millis(100));
    request_response(&t.client, t.pod_addr(PORT), b"still there").expect("echo after a reset");
    let cap = capture.stop();
    eprintln!("{:#?}", cap.rst_lines);
    assert!(echo.is_alive(), "echo died; log:\n{}", echo.log());
    let refused_rst = format!("in {}:{} > {CLIENT_IP}:", t.pod_ip, PORT + 1);
    assert!(
        cap.rst_lines.iter().any(|l| l.starts_with(&refused_rst)),
        "no RST from the closed port: {:#?}",
        cap.rst_lines
    );
    let abort_rst = format!("out {CLIENT_IP}:");
    assert!(
        cap.rst_lines
            .iter()
            .any(|l| l.starts_with(&abort_rst) && l.contains(&format!(" > {}:{PORT} ", t.pod_ip))),
        "no RST from the aborting client: {:#?}",
        cap.rst_lines
    );
}

/// What docs/toolchain.md asks of a process CRIU will dump: a session leader in
/// the pod's netns, in our mount namespace, with no pipes as stdio.
#[test]
fn workload_is_started_the_way_criu_needs() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = SingleNode::new(&unique_prefix("tb"));
    let echo = start_echo(&t, dir.path());
    let pid = echo.pid();
    let ns_link = |pid: &str, ns: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
            .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/{ns}: {e}"))
    };
    let pid_s = pid.to_string();
    assert_eq!(
        ns_link(&pid_s, "mnt"),
        ns_link("self", "mnt"),
        "workload got its own mount ns"
    );
    let pod_ns = std::fs::metadata(t.pod.path()).expect("stat pod netns");
    let ours = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("stat workload netns");
    assert_eq!(
        (ours.dev(), ours.ino()),
        (pod_ns.dev(), pod_ns.ino()),
        "workload not in the pod netns"
    );
    // SAFETY: getsid has no memory-safety preconditions.
    let sid = unsafe { libc::getsid(pid as libc::pid_t) };
    assert_eq!(sid, pid as libc::pid_t, "workload is not a session leader");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("readlink exe");
    assert!(
        exe.ends_with("shepherd-echo"),
        "pid {pid} is {}, not the workload",
        exe.display()
    );
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("readlink fd");
        let target = target.to_string_lossy();
        assert!(!target.starts_with("pipe:"), "fd {fd} is a pipe: {target}");
    }
}
