//! Long-running safety: what a hostile or careless user, or plain time,
//! does to the agent. Each test reproduces a failure found by probing the
//! agent and asserts the behaviour that replaced it.

use shepherd_tests::echo_bin;
use shepherd_tests::netns::in_netns;
use shepherd_tests::privileged;
use shepherd_tests::process::{open_fds, raise_nofile};
use shepherd_tests::record::{self, ms};
use shepherd_tests::single::World;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn world(tag: &str, agent_args: &[&str]) -> World {
    World::new(&echo_bin!(), tag, agent_args)
}

const MIB: f64 = 1024.0 * 1024.0;
/// Bursts of 4,000 short connections in the churn test.
const BURSTS: usize = 8;
/// How far above its start the agent's RSS may end after the bursts.
const SLACK_MIB: f64 = 6.0;

/// Bursts of short connections (connect, close, no data) must not leave
/// memory behind: the agent's RSS comes back to within a few MiB of where
/// it was after the first burst, and its descriptors to their start.
#[test]
fn connection_churn_gives_memory_back() {
    privileged!();
    raise_nofile().expect("raise the open-file limit");
    let w = world("ch", &[]);
    w.register();
    // 36,000 TIME_WAITs on the client's side and as many on the node's
    // (its backend connections close first): let ports be reused, or
    // connects fail with EADDRNOTAVAIL.
    for ns in [&w.t.client, &w.t.node] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    }
    let ep = w.ep();
    let pid = w.agent.pid();
    let burst = |n: usize| {
        in_netns(&w.t.client, || {
            let mut socks = Vec::with_capacity(n);
            for _ in 0..n {
                match TcpStream::connect_timeout(&ep.into(), Duration::from_secs(5)) {
                    Ok(s) => socks.push(s),
                    Err(e) => panic!("connect {ep}: {e}"),
                }
            }
            drop(socks);
        });
        // Let the agent see every FIN and finish its connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while connection_count(&w) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "connections never finished"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let fds0 = open_fds(pid);
    let rss0 = w.agent.rss_bytes() as f64;
    let mut peaks = Vec::new();
    for _ in 0..BURSTS {
        burst(4000);
        peaks.push(w.agent.rss_bytes() as f64);
    }
    // The agent gives freed memory back within its trim interval (5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut rss = w.agent.rss_bytes() as f64;
    while rss - rss0 > SLACK_MIB * MIB && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        rss = w.agent.rss_bytes() as f64;
    }
    eprintln!(
        "RSS at the start {:.1} MiB; after each burst {:?} MiB; at the end {:.1} MiB; fds {fds0} -> {}",
        rss0 / MIB,
        peaks.iter().map(|r| (r / MIB * 10.0).round() / 10.0).collect::<Vec<_>>(),
        rss / MIB,
        open_fds(pid)
    );
    assert!(
        rss - rss0 <= SLACK_MIB * MIB,
        "RSS grew by {:.1} MiB over {BURSTS} bursts of 4000 connections and was not given back",
        (rss - rss0) / MIB
    );
    assert!(
        open_fds(pid) <= fds0 + 2,
        "descriptors leaked: {fds0} -> {}",
        open_fds(pid)
    );
}

/// The agent's transparent listener in the node's namespace (from `ss`).
fn own_listener(w: &World) -> String {
    let out = w.t.node.run(&["ss", "-ltnH", "src", "127.0.0.1"]);
    out.split_whitespace()
        .find(|f| f.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no loopback listener in the node:\n{out}"))
        .to_string()
}

fn add(w: &World, args: &[&str]) -> (bool, String) {
    let mut argv = vec!["endpoint", "add"];
    argv.extend_from_slice(args);
    let out = w.agent.cli(&argv);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn endpoint_count(w: &World) -> usize {
    w.agent.cli_json(&["endpoint", "ls"])["endpoints"]
        .as_array()
        .map_or(0, |a| a.len())
}

/// An endpoint that can only loop back into the agent is refused: its own
/// listener always (this used to wedge the agent: it connected to itself
/// until its descriptors ran out), loopback and the node's addresses unless
/// asked for explicitly.
#[test]
fn endpoints_that_loop_are_refused() {
    privileged!();
    let w = world("lp", &[]);
    let own = own_listener(&w);
    let (ok, out) = add(&w, &[&own]);
    assert!(
        !ok && out.contains("own transparent listener"),
        "{own}: {out}"
    );
    let (ok, out) = add(&w, &[&own, "--allow-local"]);
    assert!(
        !ok && out.contains("own transparent listener"),
        "{own}: {out}"
    );
    let (ok, out) = add(&w, &["127.0.0.1:6379"]);
    assert!(!ok && out.contains("--allow-local"), "{out}");
    let node_ip = w.t.node_ip;
    let (ok, out) = add(&w, &[&format!("{node_ip}:80")]);
    assert!(!ok && out.contains("address of this node"), "{out}");
    assert_eq!(
        endpoint_count(&w),
        0,
        "a refused batch registered something"
    );
    let (ok, out) = add(&w, &["127.0.0.1:6379", "--allow-local"]);
    assert!(ok, "{out}");
    // The agent is still fine.
    assert_eq!(w.agent.http("GET", "/healthz", None).0, 200);
}

/// Past `--max-connections`, new connections are closed at once (a FIN,
/// not a hang and not a reset) and counted; established ones keep relaying
/// and the API keeps answering.
#[test]
fn the_connection_limit_refuses_cleanly_and_keeps_the_api() {
    privileged!();
    const LIMIT: usize = 50;
    let mut w = world("ml", &["--max-connections", "50"]);
    w.register();
    let ep = w.ep();
    let mut socks: Vec<TcpStream> = in_netns(&w.t.client, || {
        (0..LIMIT + 30)
            .map(|_| {
                TcpStream::connect_timeout(&ep.into(), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {ep}: {e}"))
            })
            .collect()
    });
    // A refused connection has its FIN waiting; an accepted one is quiet.
    let (mut open, mut closed) = (Vec::new(), 0);
    for mut s in socks.drain(..) {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Ok(_) => panic!("the pod spoke first"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open.push(s),
            Err(e) => panic!("a connection neither relayed nor closed cleanly: {e}"),
        }
    }
    let mut echoed = 0;
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo");
        echoed += 1;
    }
    socks = open;
    assert_eq!((echoed, closed), (LIMIT, 30), "echoed, closed at accept");
    assert_eq!(w.agent.http("GET", "/healthz", None).0, 200);
    let metrics = w.agent.http("GET", "/metrics", None).1;
    assert!(
        metrics.contains("shepherd_connections_refused_total 30"),
        "{metrics}"
    );
    // The established ones are unharmed.
    for s in socks.iter_mut().take(LIMIT) {
        s.write_all(b"y").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo after the refusals");
        assert_eq!(&b, b"y");
    }
    drop(socks);
    w.assert_no_rst();
    record::fault(
        "the_connection_limit_refuses_cleanly_and_keeps_the_api",
        "connections past `--max-connections` closed at accept with a FIN and counted; the established ones echo on; the API answers throughout; 0 RST",
    );
}

/// `--max-endpoints` bounds registration with a 409 that names it, and a
/// batch that does not fit registers nothing (it used to fail with a 500
/// half-way, leaving the rest registered). The kernel's table also holds
/// removed endpoints still draining: a batch that finds it full half-way
/// is undone, answers 409 too, and the draining connections are unharmed.
#[test]
fn the_endpoint_limit_is_named_and_batches_are_atomic() {
    privileged!();
    let w = world("el", &["--max-endpoints", "8"]);
    let ep = |i: u16| format!("{}:{}", w.t.pod_addr(7000).ip(), 7000 + i);
    let batch = |r: std::ops::Range<u16>| r.map(ep).collect::<Vec<_>>();
    let five = batch(0..5);
    let five: Vec<&str> = five.iter().map(String::as_str).collect();
    assert!(add(&w, &five).0);
    let more = batch(5..10);
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let (status, body) = w.agent.http(
        "POST",
        "/v1/endpoints",
        Some(&serde_json::json!({ "endpoints": more }).to_string()),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("limit_reached") && body.contains("--max-endpoints"),
        "{body}"
    );
    assert_eq!(
        endpoint_count(&w),
        5,
        "a refused batch registered part of itself"
    );

    // The kernel's table has room for draining endpoints too (8 + 2 + 16
    // entries here), but not for ever: let three batches of 8 drain, each
    // with a connection open, and the fourth batch finds it full half-way.
    let ports: Vec<String> = (100..132).map(ep).collect();
    let mut listen = Vec::new();
    for p in &ports {
        listen.extend(["--listen".to_string(), p.clone()]);
    }
    let _more_echo = shepherd_tests::process::Workload::spawn_in(
        &w.t.pod,
        &echo_bin!(),
        listen,
        &w.dir.path().join("ports.log"),
    );
    for p in &ports {
        let addr: std::net::SocketAddrV4 = p.parse().expect("addr");
        shepherd_tests::process::wait_tcp_ready(&w.t.client, addr.into(), Duration::from_secs(10))
            .expect("echo ready");
    }
    let rm_all = |eps: &[&str]| {
        let mut argv = vec!["endpoint", "rm"];
        argv.extend_from_slice(eps);
        let out = w.agent.cli(&argv);
        assert!(out.status.success(), "{out:?}");
    };
    rm_all(&five);
    let mut draining = Vec::new();
    for round in 0..3 {
        let b: Vec<&str> = ports[round * 8..round * 8 + 8]
            .iter()
            .map(String::as_str)
            .collect();
        let (ok, out) = add(&w, &b);
        assert!(ok, "round {round}: {out}");
        for p in &b {
            let addr: std::net::SocketAddrV4 = p.parse().expect("addr");
            let (mut c, _) =
                shepherd_tests::stream::connect_in(&w.t.client, addr).expect("connect");
            echo_once(&mut c, b'd');
            draining.push(c);
        }
        rm_all(&b);
    }
    assert_eq!(endpoint_count(&w), 0);
    let last: Vec<&str> = ports[24..32].iter().map(String::as_str).collect();
    let (ok, out) = add(&w, &last);
    assert!(
        !ok && out.contains("full") && out.contains("limit_reached"),
        "{out}"
    );
    assert_eq!(endpoint_count(&w), 0, "the batch was not undone");
    // The draining connections still relay.
    for c in &mut draining {
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        echo_once(c, b'e');
    }
    drop(draining);
    // Once the draining ones have closed, there is room again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !add(&w, &last).0 {
        assert!(std::time::Instant::now() < deadline, "room never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json_error(raw: &[u8]) -> (u16, serde_json::Value) {
    let (status, body) = shepherd_tests::agent::parse_response(raw).expect("an HTTP response");
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
    assert!(
        v["error"].is_string() && v["detail"].is_string(),
        "not {{error, detail}}: {v}"
    );
    (status, v)
}

/// Errors raised before a handler runs are the API's JSON too; durations
/// are bounded; a second release cannot change the first one's mode.
#[test]
fn api_errors_are_json_and_requests_bounded() {
    privileged!();
    let w = world("ae", &[]);
    w.register();
    let ep = w.ep().to_string();
    // Invalid UTF-8 in a path parameter (used to be a plain-text 400).
    let raw = w
        .agent
        .raw(b"DELETE /v1/endpoints/%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let (status, v) = json_error(&raw);
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_path")),
        "{v}"
    );
    // Malformed chunked framing is a malformed body, not "body too large".
    let raw = w
        .agent
        .raw(
            b"POST /v1/endpoints HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
              Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        )
        .expect("request");
    let (status, v) = json_error(&raw);
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("malformed_body")),
        "{v}"
    );
    // Durations beyond their bounds.
    for field in ["deadline_ms", "quiesce_timeout_ms"] {
        let body = serde_json::json!({ "endpoints": [ep], field: u64::MAX }).to_string();
        let (status, body) = w.agent.http("PUT", "/v1/migrations/big/hold", Some(&body));
        assert_eq!(status, 422, "{field}: {body}");
        assert!(body.contains(field), "{body}");
    }
    // A second release with another mode is a conflict.
    let hold = serde_json::json!({ "endpoints": [ep] }).to_string();
    assert_eq!(
        w.agent.http("PUT", "/v1/migrations/m1/hold", Some(&hold)).0,
        200
    );
    let resume = r#"{"mode":"resume"}"#;
    assert_eq!(
        w.agent
            .http("POST", "/v1/migrations/m1/release", Some(resume))
            .0,
        200
    );
    assert_eq!(
        w.agent
            .http("POST", "/v1/migrations/m1/release", Some(resume))
            .0,
        200
    );
    let (status, body) = w.agent.http(
        "POST",
        "/v1/migrations/m1/release",
        Some(r#"{"mode":"reconnect"}"#),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("resume mode"), "{body}");
}

/// 100 callers that connect and send half a request, or nothing, do not
/// stop the API from answering others, and each is disconnected after
/// the header timeout (they used to stay connected for good).
#[test]
fn slow_api_callers_are_cut_off_and_others_served() {
    privileged!();
    let mut w = world("sa", &[]);
    w.register();
    let echo = shepherd_tests::stream::CounterStream::start(
        &w.t.client,
        w.ep(),
        Duration::from_millis(10),
    );
    let mut slow = Vec::new();
    for i in 0..100 {
        let mut s = std::os::unix::net::UnixStream::connect(w.agent.socket()).expect("connect");
        if i % 2 == 0 {
            s.write_all(b"PUT /v1/migrations/x/hold HTTP/1.1\r\nHost: x\r\n")
                .expect("half a request");
        }
        slow.push(s);
    }
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(w.agent.http("GET", "/healthz", None).0, 200);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the API was slow: {:?}",
        t0.elapsed()
    );
    // Each slow caller is disconnected by the agent (EOF), well before 30 s.
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(25),
        "slow callers kept for {waited:?}"
    );
    assert!(
        waited >= Duration::from_secs(5),
        "cut off too early: {waited:?}"
    );
    // The data plane relayed throughout.
    let report = echo.stop();
    report.assert_ok();
    assert!(report.received > 100, "{report:?}");
    w.assert_no_rst();
    record::fault(
        "slow_api_callers_are_cut_off_and_others_served",
        format!(
            "100 half-sent requests cut off after {}; other callers answered throughout; the data plane relayed {} values meanwhile; 0 RST",
            ms(waited),
            report.received
        ),
    );
}

/// An unprivileged user who binds the agent's abstract lock name first (and
/// does not even listen on it, so no connect can ask who it is) no longer
/// keeps the agent from starting (it used to refuse, blaming the
/// squatter's pid). A second agent on the same socket is still refused by
/// the lock file. (One with another socket path is caught by the abstract
/// name, which the squatter holds here: `data_path` tests that case.)
#[test]
fn an_unprivileged_squatter_cannot_stop_the_agent() {
    privileged!();
    let dir = tempfile::tempdir().expect("tempdir");
    let t = shepherd_tests::topology::SingleNode::new(&shepherd_tests::names::unique_prefix("sq"));
    let squatter = shepherd_tests::process::Workload::spawn_in(
        &t.node,
        std::path::Path::new("/usr/bin/setpriv"),
        [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            "import socket, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind('\\0shepherd-agent.lock')\n\
             print('squatting', flush=True)\n\
             time.sleep(120)\n",
        ],
        &dir.path().join("squatter.log"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !squatter.log().contains("squatting") {
        assert!(
            std::time::Instant::now() < deadline,
            "squatter: {}",
            squatter.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = shepherd_tests::agent::start_single(&t, &[]);
    assert!(
        agent.log().contains("not an agent"),
        "the squatter was not named: {}",
        agent.log()
    );
    let out = std::process::Command::new("timeout")
        .args(["10", "ip", "netns", "exec", t.node.name()])
        .arg(shepherd_tests::agent::shepherd_bin())
        .arg("--api-socket")
        .arg(agent.socket())
        .args([
            "run",
            "--no-takeover",
            "--intercept-iface",
            t.node_client_if(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("start a second agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second agent started: {err}");
    assert!(err.contains("already"), "unclear second-agent error: {err}");
    assert_eq!(agent.http("GET", "/healthz", None).0, 200);
}

/// Short keepalive and user timeouts, so the liveness tests take seconds.
const FAST_TIMERS: &[&str] = &[
    "--keepalive-idle",
    "1s",
    "--keepalive-interval",
    "1s",
    "--keepalive-probes",
    "2",
    "--user-timeout",
    "3s",
];

fn connection_count(w: &World) -> usize {
    w.agent.cli_json(&["conn", "ls"])["connections"]
        .as_array()
        .map_or(0, |a| a.len())
}

fn echo_once(s: &mut TcpStream, b: u8) {
    s.write_all(&[b]).expect("write");
    let mut got = [0u8; 1];
    s.read_exact(&mut got).expect("echo");
    assert_eq!(got[0], b);
}

/// Clients that vanish without a word (no FIN, no RST, nothing answers)
/// are given up by keepalive; their connections used to stay ESTABLISHED
/// with no timer at all.
#[test]
fn clients_that_vanish_silently_are_given_up() {
    privileged!();
    let w = world("vc", FAST_TIMERS);
    w.register();
    let ep = w.ep();
    let mut socks: Vec<TcpStream> = (0..20)
        .map(|_| {
            shepherd_tests::stream::connect_in(&w.t.client, ep)
                .expect("connect")
                .0
        })
        .collect();
    for s in &mut socks {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        echo_once(s, b'a');
    }
    assert_eq!(connection_count(&w), 20);
    let _gone = shepherd_tests::link::blackhole(&w.t.client);
    let t0 = std::time::Instant::now();
    while connection_count(&w) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{} connections of vanished clients still open after {:?}",
            connection_count(&w),
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("vanished clients given up after {:?}", t0.elapsed());
}

/// A pod that vanishes without a word while its client is talking: the
/// proxy gives the backend up (user timeout) and closes the client cleanly
/// with a FIN. The client used to stall for the kernel's ~15 minutes.
#[test]
fn a_pod_that_vanishes_silently_ends_its_clients_cleanly() {
    privileged!();
    let mut w = world("vp", FAST_TIMERS);
    w.register();
    let (mut s, _) = shepherd_tests::stream::connect_in(&w.t.client, w.ep()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    echo_once(&mut s, b'a');
    let _gone = shepherd_tests::link::blackhole(&w.t.pod);
    let t0 = std::time::Instant::now();
    s.write_all(b"unanswered").expect("write");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        other => panic!(
            "expected a clean EOF from the proxy, got {other:?} after {:?}",
            t0.elapsed()
        ),
    }
    eprintln!(
        "client closed cleanly {:?} after its pod vanished",
        t0.elapsed()
    );
    drop(s);
    drop(_gone);
    w.assert_no_rst();
}

/// A pod frozen for longer than every timer, during a hold, is not given
/// up: the backend's timers are off while it is held. Every byte arrives
/// once the hold is released.
#[test]
fn a_pod_frozen_during_a_hold_outlives_the_timers() {
    privileged!();
    let mut w = world("fz", FAST_TIMERS);
    w.register();
    let ep = w.ep().to_string();
    let (mut s, _) = shepherd_tests::stream::connect_in(&w.t.client, w.ep()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    echo_once(&mut s, b'a');
    w.agent
        .cli_json(&["migrate", "hold", "--id", "fz", &ep, "--deadline", "60s"]);
    {
        // Frozen as CRIU freezes a pod: stopped, and its network locked.
        w.echo.signal(libc::SIGSTOP).expect("SIGSTOP");
        let _locked = shepherd_tests::link::blackhole(&w.t.pod);
        s.write_all(b"held").expect("write during the hold");
        std::thread::sleep(Duration::from_secs(8));
    }
    w.echo.signal(libc::SIGCONT).expect("SIGCONT");
    let st = w.agent.cli_json(&["migrate", "release", "--id", "fz"]);
    assert_eq!(st["backends_ended"], 0, "{st}");
    let mut got = [0u8; 4];
    s.read_exact(&mut got)
        .expect("the held bytes, echoed after the release");
    assert_eq!(&got, b"held");
    echo_once(&mut s, b'z');
    drop(s);
    w.assert_no_rst();
}

/// Clients that push at `dst` without reading, until `stop`: the load a
/// stuck or held pod's clients put on the proxy.
fn pushers(
    ns: &shepherd_tests::netns::Netns,
    dst: std::net::SocketAddrV4,
    n: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..n)
        .map(|_| {
            let (mut s, _) = shepherd_tests::stream::connect_in(ns, dst).expect("connect a pusher");
            s.set_write_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let chunk = [0x5au8; 64 * 1024];
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = s.write(&chunk) {
                        sent += n as u64;
                    }
                }
                sent
            })
        })
        .collect()
}

/// One stuck endpoint (a SIGSTOPped pod whose clients push at it) must not
/// starve the others: forwarding read-ahead is charged to its endpoint's
/// budget only. (It was charged to the node-wide one: with a 4 MiB total,
/// a stuck pod's clients filled it and new streams to healthy endpoints
/// echoed nothing for 15 s.) Then the stuck endpoint is held too, and its
/// held bytes fill its own per-endpoint budget only: another endpoint can
/// still hold.
#[test]
fn one_stuck_endpoint_cannot_starve_the_others() {
    privileged!();
    let mut w = world(
        "st",
        &[
            "--hold-buffer-total",
            "4MiB",
            "--hold-buffer-per-conn",
            "1MiB",
            "--quiesce-timeout",
            "1s",
        ],
    );
    let healthy = std::net::SocketAddrV4::new(*w.ep().ip(), 7002);
    let _healthy_echo = shepherd_tests::process::Workload::spawn_in(
        &w.t.pod,
        &echo_bin!(),
        ["--listen", &healthy.to_string()],
        &w.dir.path().join("healthy.log"),
    );
    shepherd_tests::process::wait_tcp_ready(&w.t.client, healthy.into(), Duration::from_secs(10))
        .expect("healthy echo ready");
    w.register();
    assert!(add(&w, &[&healthy.to_string()]).0);
    let stuck = w.ep();

    w.echo.signal(libc::SIGSTOP).expect("SIGSTOP");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // More than the total can hold at 256 KiB of read-ahead each.
    let load = pushers(&w.t.client, stuck, 24, &stop);
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    let r = shepherd_tests::stream::bulk_echo(&w.t.client, healthy, 1 << 20, 1);
    r.assert_ok();
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "the healthy endpoint took {:?}",
        t0.elapsed()
    );

    // Hold the stuck endpoint: its clients' bytes fill its 1 MiB share
    // (the read-ahead it had is held now), and no more.
    let held = w.agent.cli(&[
        "migrate",
        "hold",
        "--id",
        "st1",
        &stuck.to_string(),
        "--json",
    ]);
    assert!(matches!(held.status.code(), Some(0 | 3)), "{held:?}");
    std::thread::sleep(Duration::from_secs(1));
    let st1 = w.agent.cli_json(&["migrate", "status", "--id", "st1"]);
    let held = st1["bytes_held"].as_u64().unwrap_or(0);
    assert!(
        (512 << 10..=(1 << 20) + (256 << 10)).contains(&held),
        "{st1}"
    );
    // The healthy endpoint still flows, and can still hold bytes of its own.
    shepherd_tests::stream::bulk_echo(&w.t.client, healthy, 1 << 20, 2).assert_ok();
    let (mut c, _) = shepherd_tests::stream::connect_in(&w.t.client, healthy).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    w.agent
        .cli_json(&["migrate", "hold", "--id", "st2", &healthy.to_string()]);
    let msg = vec![7u8; 256 * 1024];
    c.write_all(&msg).expect("written during the hold");
    std::thread::sleep(Duration::from_millis(500));
    let st2 = w.agent.cli_json(&["migrate", "status", "--id", "st2"]);
    assert_eq!(st2["bytes_held"], 256 * 1024, "{st2}");
    w.agent.cli_json(&["migrate", "release", "--id", "st2"]);
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).expect("the held bytes, echoed");
    assert_eq!(back, msg);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    w.agent.cli_json(&["migrate", "abort", "--id", "st1"]);
    w.echo.signal(libc::SIGCONT).expect("SIGCONT");
    drop(c);
    w.capture.take();
}

/// Fault: the controller vanishes after `target` (the hold was given the
/// pod's new address, so the held flows are translated). The deadline
/// aborts the migration: the translations go (nothing is left in the map),
/// forwarding resumes to the pod where it still is, and the client's stream
/// loses nothing and sees no RST.
#[test]
fn a_controller_that_vanishes_after_target_is_undone_by_the_deadline() {
    privileged!();
    let mut w = world("vt", &[]);
    w.register();
    let ep = w.ep().to_string();
    let s = shepherd_tests::stream::CounterStream::start(
        &w.t.client,
        w.ep(),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    let hold = serde_json::json!({ "endpoints": [ep], "deadline_ms": 1500, "to": "10.77.2.99" })
        .to_string();
    let (status, body) = w.agent.http("PUT", "/v1/migrations/vt/hold", Some(&hold));
    assert_eq!(status, 200, "{body}");
    let translated = |w: &World| -> u64 {
        w.agent
            .http("GET", "/metrics", None)
            .1
            .lines()
            .find_map(|l| l.strip_prefix("shepherd_translated_flows "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    assert!(translated(&w) > 0, "the held flow is translated");
    // The controller is gone: nothing more is called.
    std::thread::sleep(Duration::from_millis(2500));
    let st = w.agent.cli_json(&["migrate", "status", "--id", "vt"]);
    assert_eq!(st["state"], "aborted", "{st}");
    assert_eq!(st["reason"], "deadline", "{st}");
    assert_eq!(translated(&w), 0, "translations left after the abort");
    std::thread::sleep(Duration::from_millis(300));
    let r = s.stop();
    r.assert_ok();
    w.assert_no_rst();
    record::fault(
        "a_controller_that_vanishes_after_target_is_undone_by_the_deadline",
        "the deadline aborts and the translations go (0 left); the stream loses nothing; 0 RST",
    );
}

/// Fault: the translation map is full when a hold asks for the pod's new
/// address. The hold is aborted (not left in place), the answer is a 409
/// naming the limit, nothing stays in the map, and the clients go on with
/// the pod where it is, losing nothing.
#[test]
fn a_full_translation_map_aborts_the_hold_cleanly() {
    privileged!();
    // Room for two flows (two entries each); three are held.
    let mut w = world("tf", &["--max-translations", "4"]);
    w.register();
    let ep = w.ep().to_string();
    let streams: Vec<_> = (0..3)
        .map(|_| {
            shepherd_tests::stream::CounterStream::start(
                &w.t.client,
                w.ep(),
                Duration::from_millis(10),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let hold = serde_json::json!({ "endpoints": [ep], "to": "10.77.2.99" }).to_string();
    let (status, body) = w.agent.http("PUT", "/v1/migrations/tf/hold", Some(&hold));
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("limit_reached") && body.contains("aborted"),
        "{body}"
    );
    let st = w.agent.cli_json(&["migrate", "status", "--id", "tf"]);
    assert_eq!(st["state"], "aborted", "{st}");
    let metrics = w.agent.http("GET", "/metrics", None).1;
    assert!(metrics.contains("shepherd_translated_flows 0"), "{metrics}");
    std::thread::sleep(Duration::from_millis(300));
    for s in streams {
        s.stop().assert_ok();
    }
    w.assert_no_rst();
    record::fault(
        "a_full_translation_map_aborts_the_hold_cleanly",
        "the hold is aborted with 409 `limit_reached`, nothing left in the map; the clients go on with the pod where it is, every byte once, 0 RST",
    );
}

/// Fault: the proxied-flow map is full. It is an LRU map
/// (`--max-proxied-flows`, 16 here): with four times as many connections
/// open at once, the oldest entries make room, and nothing is refused or
/// reset: every connection is intercepted and echoes, before and after the
/// others close, and new connections keep coming in.
#[test]
fn a_full_proxied_flow_map_refuses_and_resets_nothing() {
    privileged!();
    const FLOWS: usize = 16;
    let mut w = world("pf", &["--max-proxied-flows", "16"]);
    w.register();
    let ep = w.ep();
    let mut socks: Vec<TcpStream> = (0..4 * FLOWS)
        .map(|i| {
            let (s, _) = shepherd_tests::stream::connect_in(&w.t.client, ep)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s
        })
        .collect();
    for round in 0..2u8 {
        for (i, s) in socks.iter_mut().enumerate() {
            s.write_all(&[round, i as u8]).expect("write");
            let mut b = [0u8; 2];
            s.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("connection {i}, round {round}: {e}"));
            assert_eq!(b, [round, i as u8]);
        }
    }
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    let assigned = eps["endpoints"][0]["syns_assigned"].as_u64().unwrap_or(0);
    assert!(assigned >= (4 * FLOWS) as u64, "{eps}");
    // Closed in order, oldest first; then new connections, each served.
    for s in socks.drain(..) {
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let mut s = s;
        s.read_to_end(&mut rest).expect("a clean end");
    }
    for i in 0..FLOWS {
        shepherd_tests::stream::request_response(&w.t.client, ep, b"again")
            .unwrap_or_else(|e| panic!("new connection {i}: {e}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    w.assert_no_rst();
    record::fault(
        "a_full_proxied_flow_map_refuses_and_resets_nothing",
        format!(
            "an LRU map: with {} connections through a {FLOWS}-entry map the oldest entries make room; every connection intercepted ({assigned} SYNs assigned) and echoing, closed cleanly, new ones served; 0 RST",
            4 * FLOWS
        ),
    );
}
