//! The data path end to end on a real topology (client, node, pod network
//! namespaces; the agent inside the node namespace; real eBPF on real veths):
//! intercept → relay → hold → replay. Every scenario counts RSTs on the wire at
//! the client's interface and checks every byte.

use serde_json::Value;
use shepherd_tests::record::{self, ms};
use shepherd_tests::single::{start_echo, u, World, UNMANAGED_PORT};
use shepherd_tests::stream::{bulk_echo, connect_in, request_response, CounterStream};
use shepherd_tests::{echo_bin, privileged};
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(10);

fn world(tag: &str, agent_args: &[&str]) -> World {
    World::new(&echo_bin!(), tag, agent_args)
}

/// 1. Steady state: 8 concurrent clients × 32 MiB each way, every byte
///    checked; the proxy reports the right client and original destination;
///    the pod sees the node as its peer (so the path really was proxied); and
///    a stopped agent leaves no policy rule behind.
#[test]
fn steady_state_relays_every_byte() {
    privileged!();
    let mut w = world("ss", &[]);
    w.register();
    // The readiness probes connected directly before registration.
    let probes = w.peers().len();
    let watcher = CounterStream::start(&w.t.client, w.ep(), Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(200));
    let conns = w.agent.cli_json(&["conn", "ls"]);
    let c = &conns["connections"][0];
    assert_eq!(
        c["client"],
        watcher.local_addr().to_string().as_str(),
        "{conns}"
    );
    assert_eq!(c["endpoint"], w.ep().to_string().as_str(), "{conns}");
    assert!(
        c["backend_local"]
            .as_str()
            .is_some_and(|b| b.starts_with(&format!("{}:", w.t.node_ip))),
        "backend must leave from the node's address: {conns}"
    );

    let (client, ep) = (&w.t.client, w.ep());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u64)
            .map(|i| scope.spawn(move || bulk_echo(client, ep, 32 << 20, i)))
            .collect();
        for h in handles {
            let r = h.join().expect("bulk thread");
            r.assert_ok();
            assert_eq!(r.received, 32 << 20);
        }
    });
    watcher.stop().assert_ok();
    let peers = w.peers().split_off(probes);
    assert!(
        peers.contains(&format!("peer={}:", w.t.node_ip)),
        "pod should see the node as peer:\n{peers}"
    );
    assert!(
        !peers.contains(&format!("peer={}:", w.t.client_ip)),
        "a managed connection bypassed the proxy:\n{peers}"
    );
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert!(u(&eps["endpoints"][0], "syns_assigned") >= 9, "{eps}");
    w.assert_no_rst();

    // Shutdown removes the policy rule and route the agent installed.
    let node = w.t.node.name().to_string();
    let World { agent, .. } = w;
    drop(agent);
    shepherd_tests::single::assert_no_policy_rule(&node);
}

/// With several data threads, `intercept` spreads SYNs over their listeners
/// by flow hash. A thread whose listener was not registered, or that did not
/// accept, would leave its share of connections in a backlog nobody reads:
/// their handshakes complete but nothing is ever echoed. 60 connections over
/// 3 threads leave each thread some (all missing one: p ≈ 3e-11).
#[test]
fn every_data_thread_serves_its_share_of_connections() {
    privileged!();
    let mut w = world("dt", &["--data-threads", "3"]);
    w.register();
    for i in 0..60u8 {
        w.one_echo(b'a' + i % 26)
            .unwrap_or_else(|e| panic!("connection {i} was never served: {e}"));
    }
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert!(u(&eps["endpoints"][0], "syns_assigned") >= 60, "{eps}");
    // Each thread's share, as an operator sees it.
    let (code, metrics) = w.agent.http("GET", "/metrics", None);
    assert_eq!(code, 200, "{metrics}");
    let shares: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("shepherd_data_thread_accepted_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(shares.len(), 3, "one counter per thread:\n{metrics}");
    assert_eq!(shares.iter().sum::<u64>(), 60, "{shares:?}");
    assert!(
        shares.iter().all(|&n| n > 0),
        "a thread got nothing: {shares:?}"
    );
    w.assert_no_rst();
}

/// Under a SYN flood the kernel answers from a full SYN queue with SYN
/// cookies and keeps no request socket, so the handshake's last ACK finds
/// no socket. `intercept` must hand it to the listener (which checks the
/// cookie and creates the connection), not drop it as a stray of a closed
/// flow. `tcp_syncookies=2` makes every handshake a cookie handshake.
#[test]
fn syn_cookie_handshakes_complete() {
    privileged!();
    let mut w = world("sc", &[]);
    w.t.node.sysctl("net.ipv4.tcp_syncookies", "2");
    w.register();
    for i in 0..10u8 {
        w.one_echo(b'a' + i)
            .unwrap_or_else(|e| panic!("cookie connection {i} never completed: {e}"));
    }
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert_eq!(u(&eps["endpoints"][0], "strays_dropped"), 0, "{eps}");
    w.assert_no_rst();
}

/// 2. Hold 2 s (the pod frozen with SIGSTOP meanwhile) while clients stream a
///    counter every 10 ms; release: every value exactly once and in order, no
///    RST, longest pause ≤ hold + 200 ms.
#[test]
fn hold_and_release_delivers_exactly_once() {
    privileged!();
    let mut w = world("hr", &[]);
    w.register();
    let streams: Vec<CounterStream> = (0..4)
        .map(|_| CounterStream::start(&w.t.client, w.ep(), TICK))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let ep = w.ep().to_string();
    let t_hold = Instant::now();
    let held = w.agent.cli_json(&["migrate", "hold", "--id", "m-hr", &ep]);
    assert_eq!(held["state"], "holding", "{held}");
    assert_eq!(held["quiescent"], true, "{held}");
    assert_eq!(u(&held, "connections"), 4, "{held}");
    w.echo.signal(libc::SIGSTOP).expect("freeze the pod");
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t_hold.elapsed()));
    w.echo.signal(libc::SIGCONT).expect("thaw the pod");
    let released = w.agent.cli_json(&["migrate", "release", "--id", "m-hr"]);
    let hold_len = t_hold.elapsed();
    assert_eq!(released["state"], "released", "{released}");
    std::thread::sleep(Duration::from_millis(500));

    for s in streams {
        let r = s.stop();
        r.assert_ok();
        assert!(r.sent > 200, "stream too short: {}", r.sent);
        assert!(
            r.max_gap <= hold_len + Duration::from_millis(200),
            "max gap {:?} > hold {hold_len:?} + 200 ms",
            r.max_gap
        );
        assert!(
            r.max_gap >= Duration::from_millis(1500),
            "max gap {:?}: the hold did not hold",
            r.max_gap
        );
    }
    let st = w.status("m-hr");
    assert!(u(&st, "bytes_held") > 0, "{st}");
    assert_eq!(u(&st, "bytes_replayed"), u(&st, "bytes_held"), "{st}");
    w.assert_no_rst();
}

/// 3. A connection opened during a hold connects at once and its first request
///    is answered right after the release.
#[test]
fn connection_opened_during_hold_is_served_after_release() {
    privileged!();
    let mut w = world("nc", &[]);
    w.register();
    let ep = w.ep().to_string();
    let held = w.agent.cli_json(&["migrate", "hold", "--id", "m-nc", &ep]);
    assert_eq!(held["state"], "holding", "{held}");
    let (client, dst) = (&w.t.client, w.ep());
    let t0 = Instant::now();
    let (t_release, (connect, response)) = std::thread::scope(|scope| {
        let rr =
            scope.spawn(move || request_response(client, dst, b"first request during the hold"));
        std::thread::sleep(Duration::from_millis(1500));
        let t_release = t0.elapsed();
        let released = w.agent.cli_json(&["migrate", "release", "--id", "m-nc"]);
        assert_eq!(released["state"], "released");
        (
            t_release,
            rr.join()
                .expect("thread")
                .expect("request/response through the hold"),
        )
    });
    assert!(
        connect < Duration::from_millis(500),
        "connect took {connect:?} during a hold"
    );
    let answered = connect + response;
    assert!(
        answered + Duration::from_millis(50) >= t_release,
        "answered at {answered:?}, before the release at {t_release:?}"
    );
    assert!(
        answered <= t_release + Duration::from_millis(500),
        "answered at {answered:?}, long after the release at {t_release:?}"
    );
    assert_eq!(u(&w.status("m-nc"), "connections_queued"), 1);
    w.assert_no_rst();
}

/// 4. Back-pressure: one client pushes 512 MiB during a hold with a 16 MiB cap;
///    the agent's RSS stays below cap + 64 MiB; after the release every byte
///    arrives.
#[test]
fn hold_buffer_cap_applies_back_pressure() {
    privileged!();
    const CAP: u64 = 16 << 20;
    let mut w = world(
        "bp",
        &[
            "--hold-buffer-per-conn",
            "16MiB",
            "--hold-buffer-total",
            "16MiB",
        ],
    );
    w.register();
    let baseline = w.agent.rss_bytes();
    let ep = w.ep().to_string();
    w.agent.cli_json(&["migrate", "hold", "--id", "m-bp", &ep]);
    let (client, dst) = (&w.t.client, w.ep());
    let mut peak = 0;
    let r = std::thread::scope(|scope| {
        let pusher = scope.spawn(move || bulk_echo(client, dst, 512 << 20, 7));
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            peak = peak.max(w.agent.rss_bytes());
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = w.status("m-bp");
        assert!(
            u(&st, "bytes_held") >= CAP / 2,
            "the hold buffer never filled: {st}"
        );
        assert!(u(&st, "bytes_held") <= CAP, "held more than the cap: {st}");
        assert!(
            !pusher.is_finished(),
            "the client should be blocked by its closed window"
        );
        w.agent.cli_json(&["migrate", "release", "--id", "m-bp"]);
        while !pusher.is_finished() {
            peak = peak.max(w.agent.rss_bytes());
            std::thread::sleep(Duration::from_millis(50));
        }
        pusher.join().expect("pusher")
    });
    r.assert_ok();
    assert_eq!(r.received, 512 << 20);
    eprintln!(
        "agent RSS: baseline {} MiB, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak < CAP + (64 << 20),
        "agent RSS peaked at {} MiB",
        peak >> 20
    );
    w.assert_no_rst();
    record::fault(
        "hold_buffer_cap_applies_back_pressure",
        format!(
            "one client pushing 512 MiB into a 16 MiB hold: the window closes at the cap (agent RSS peaked at {} MiB, from {} MiB); after the release all 512 MiB arrive once and in order; 0 RST",
            peak >> 20,
            baseline >> 20
        ),
    );
}

/// Fault: 100 clients push during a hold until the node's total hold budget
/// is spent (a quarter of what they push). Held bytes stay within the caps,
/// the clients' windows close, and after the release every byte of every
/// client comes back once and in order, with no RST.
#[test]
fn a_hundred_clients_exhaust_the_total_hold_budget_and_lose_nothing() {
    privileged!();
    const TOTAL: u64 = 8 << 20;
    const CLIENTS: u64 = 100;
    const EACH: u64 = 1 << 20;
    let mut w = world(
        "hx",
        &[
            "--hold-buffer-per-conn",
            "1MiB",
            "--hold-buffer-per-endpoint",
            "8MiB",
            "--hold-buffer-total",
            "8MiB",
        ],
    );
    w.register();
    let ep = w.ep().to_string();
    w.agent.cli_json(&["migrate", "hold", "--id", "m-hx", &ep]);
    let (client, dst) = (&w.t.client, w.ep());
    let (reports, held) = std::thread::scope(|scope| {
        let pushers: Vec<_> = (0..CLIENTS)
            .map(|i| scope.spawn(move || bulk_echo(client, dst, EACH, 100 + i)))
            .collect();
        // Until the budget is spent (or long enough to say it never is).
        let until = Instant::now() + Duration::from_secs(10);
        let mut st = w.status("m-hx");
        while u(&st, "bytes_held") < TOTAL - (1 << 20) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            st = w.status("m-hx");
        }
        std::thread::sleep(Duration::from_millis(300));
        let st = w.status("m-hx");
        let held = u(&st, "bytes_held");
        assert!(held <= TOTAL, "held more than the total cap: {st}");
        assert!(held >= TOTAL / 2, "the budget was never spent: {st}");
        assert_eq!(u(&st, "connections"), CLIENTS, "{st}");
        w.agent.cli_json(&["migrate", "release", "--id", "m-hx"]);
        let reports: Vec<_> = pushers
            .into_iter()
            .map(|p| p.join().expect("pusher"))
            .collect();
        (reports, held)
    });
    for r in &reports {
        r.assert_ok();
        assert_eq!(r.received, EACH);
    }
    let st = w.status("m-hx");
    assert_eq!(u(&st, "connections_closed"), 0, "{st}");
    w.assert_no_rst();
    record::fault(
        "a_hundred_clients_exhaust_the_total_hold_budget_and_lose_nothing",
        format!(
            "{CLIENTS} clients pushing {} MiB each against an {} MiB total: {} bytes held at the cap, the rest waits in the clients' closed windows; after the release every byte of every client once and in order; 0 closed; 0 RST",
            EACH >> 20,
            TOTAL >> 20,
            held
        ),
    );
}

/// 5. A hold whose release never comes aborts at its deadline; the stream
///    resumes towards the original pod and the status says why.
#[test]
fn hold_without_release_aborts_at_deadline() {
    privileged!();
    let mut w = world("dl", &[]);
    w.register();
    let s = CounterStream::start(&w.t.client, w.ep(), TICK);
    std::thread::sleep(Duration::from_millis(300));
    let ep = w.ep().to_string();
    let held = w
        .agent
        .cli_json(&["migrate", "hold", "--id", "m-dl", "--deadline", "1s", &ep]);
    assert_eq!(u(&held, "deadline_ms"), 1000);
    std::thread::sleep(Duration::from_millis(2000));
    let st = w.status("m-dl");
    assert_eq!(st["state"], "aborted", "{st}");
    assert_eq!(st["reason"], "deadline", "{st}");
    let human = w.agent.cli(&["migrate", "status", "--id", "m-dl"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("aborted: deadline"));
    std::thread::sleep(Duration::from_millis(300));
    let r = s.stop();
    r.assert_ok();
    assert!(
        r.max_gap >= Duration::from_millis(800),
        "gap {:?}: the hold did not hold",
        r.max_gap
    );
    assert!(
        r.max_gap <= Duration::from_millis(1500),
        "gap {:?}: the abort was late",
        r.max_gap
    );
    // Releasing an aborted migration is a conflict that says so.
    let out = w.agent.cli(&["migrate", "release", "--id", "m-dl"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("aborted (deadline)"));
    w.assert_no_rst();
    record::fault(
        "hold_without_release_aborts_at_deadline",
        format!(
            "the deadline aborts, forwarding resumes to the pod: the stream paused {} and lost nothing; a late release is a 409 naming the abort; 0 RST",
            ms(r.max_gap)
        ),
    );
}

/// 6. Bad input gets a clear error and the agent keeps serving.
#[test]
fn bad_input_is_rejected_clearly() {
    privileged!();
    let mut w = world("bi", &[]);
    w.register();
    let s = CounterStream::start(&w.t.client, w.ep(), TICK);

    let fails = |args: &[&str], needle: &str| {
        let out = w.agent.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: stderr {err:?} lacks {needle:?}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: error should be one line: {err}"
        );
    };
    fails(
        &["migrate", "status", "--id", "never-made"],
        "no migration with id",
    );
    fails(
        &["migrate", "release", "--id", "never-held"],
        "no migration with id",
    );
    fails(
        &["migrate", "abort", "--id", "never-held"],
        "no migration with id",
    );
    fails(
        &["migrate", "hold", "--id", "m-bi", "10.77.2.99:80"],
        "shepherd endpoint add",
    );
    fails(
        &["migrate", "release", "--id", "x", "--mode", "teleport"],
        "unknown",
    );
    fails(&["endpoint", "rm", "10.77.2.99:80"], "not registered");

    let (code, body) = w
        .agent
        .http("PUT", "/v1/migrations/m-bi/hold", Some("{not json"));
    assert_eq!(code, 400, "{body}");
    let v: Value = serde_json::from_str(&body).expect("error body is JSON");
    assert_eq!(v["error"], "malformed_body");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));

    let (code, body) = w.agent.http(
        "PUT",
        "/v1/migrations/m-bi/hold",
        Some(r#"{"endpoints":["nope"]}"#),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = w.agent.http(
        "PUT",
        "/v1/migrations/bad%20id/hold",
        Some(&format!(r#"{{"endpoints":["{}"]}}"#, w.ep())),
    );
    assert_eq!(code, 422, "{body}");
    let (code, body) = w.agent.http("GET", "/v1/nothing-here", None);
    assert_eq!(code, 404, "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).is_ok(),
        "404 body must be JSON: {body}"
    );

    let huge = format!(
        r#"{{"endpoints":["{}"], "pad":"{}"}}"#,
        w.ep(),
        "x".repeat(1 << 20)
    );
    match w
        .agent
        .try_http("PUT", "/v1/migrations/m-huge/hold", Some(&huge))
    {
        Ok((code, body)) => assert_eq!(code, 413, "{body}"),
        // The agent may answer and close before reading the whole body.
        Err(e) => eprintln!("huge body: connection closed early ({e}), as allowed"),
    }
    assert_eq!(
        w.agent.http("GET", "/v1/migrations/m-huge", None).0,
        404,
        "the huge request must not have created a migration"
    );

    // A second agent in the same node (same socket, or another one) refuses
    // to start when told not to take over (by default, one on the same
    // socket takes over: tests/tests/handover.rs).
    for sock in [
        w.agent.socket().to_path_buf(),
        w.dir.path().join("other.sock"),
    ] {
        let out = Command::new("timeout")
            .args(["10", "ip", "netns", "exec", w.t.node.name()])
            .arg(shepherd_tests::agent::shepherd_bin())
            .arg("--api-socket")
            .arg(&sock)
            .args([
                "run",
                "--no-takeover",
                "--intercept-iface",
                w.t.node_client_if(),
            ])
            .stdin(Stdio::null())
            .output()
            .expect("start a second agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second agent started: {err}");
        assert!(err.contains("already"), "unclear second-agent error: {err}");
    }

    // Still serving: health, the API and the data path.
    assert_eq!(w.agent.http("GET", "/healthz", None).0, 200);
    assert!(w.agent.is_alive());
    let ep = w.ep().to_string();
    let held = w.agent.cli_json(&["migrate", "hold", "--id", "m-bi2", &ep]);
    assert_eq!(held["state"], "holding");
    fails(
        &["migrate", "hold", "--id", "m-bi3", &ep],
        "already held by migration m-bi2",
    );
    fails(&["endpoint", "rm", &ep], "held by migration m-bi2");
    w.agent.cli_json(&["migrate", "release", "--id", "m-bi2"]);
    std::thread::sleep(Duration::from_millis(300));
    s.stop().assert_ok();
    let metrics = w.agent.http("GET", "/metrics", None).1;
    assert!(
        metrics.contains("shepherd_connections_total{endpoint="),
        "{metrics}"
    );
    w.assert_no_rst();
}

/// 7. Traffic to unregistered addresses crosses the node untouched, and a
///    connection that existed before its endpoint was registered keeps working.
#[test]
fn unregistered_traffic_is_not_intercepted() {
    privileged!();
    let mut w = world("un", &[]);
    let early = CounterStream::start(&w.t.client, w.ep(), TICK);
    std::thread::sleep(Duration::from_millis(200));
    w.register();
    let unmanaged = w.t.pod_addr(UNMANAGED_PORT);
    let r = bulk_echo(&w.t.client, unmanaged, 4 << 20, 3);
    r.assert_ok();
    std::thread::sleep(Duration::from_millis(300));
    let early = early.stop();
    early.assert_ok();
    let peers = w.peers();
    let direct = format!("peer={} local={unmanaged}", r.local_addr);
    assert!(
        peers.contains(&direct),
        "unmanaged connection should reach the pod directly ({direct}):\n{peers}"
    );
    assert!(
        peers.contains(&format!("peer={} ", early.local_addr)),
        "the pre-existing connection should stay direct:\n{peers}"
    );
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert_eq!(u(&eps["endpoints"][0], "syns_assigned"), 0, "{eps}");
    assert_eq!(u(&eps["endpoints"][0], "connections"), 0, "{eps}");
    assert_eq!(
        w.agent.cli_json(&["conn", "ls"])["connections"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    w.assert_no_rst();
}

/// A watched interface that disappears (a pod's veth after a migration) does
/// not stop the agent; it keeps serving the API and the remaining interfaces.
#[test]
fn agent_survives_a_vanishing_interface() {
    privileged!();
    let mut w = world("vi", &[]);
    w.register();
    // Delete the pod's veth (both ends go): the shield's tcx link goes with it.
    w.t.node.ip(&["link", "del", w.t.node_pod_if()]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.agent.is_alive(),
        "agent died when its interface vanished:\n{}",
        w.agent.log()
    );
    assert_eq!(w.agent.http("GET", "/healthz", None).0, 200);
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert_eq!(eps["endpoints"][0]["state"], "active", "{eps}");
    let ep = w.ep().to_string();
    w.agent.cli_json(&["migrate", "hold", "--id", "m-vi", &ep]);
    w.agent.cli_json(&["migrate", "abort", "--id", "m-vi"]);
    // No client traffic crossed the (now gone) pod link; the capture only saw probes.
    let report = w.capture.take().expect("capture").stop();
    assert_eq!(report.rsts, 0, "{:#?}", report.rst_lines);
}

/// `hold` reports, rather than hides, a backend that does not acknowledge
/// what was written to it (here: a pod frozen with full buffers); the release
/// still delivers every byte.
#[test]
fn hold_reports_a_backend_that_does_not_quiesce() {
    privileged!();
    let mut w = world("nq", &[]);
    w.register();
    let ep = w.ep().to_string();
    let (client, dst) = (&w.t.client, w.ep());
    let r = std::thread::scope(|scope| {
        // Freeze the pod first, then push more than its and our socket
        // buffers hold: the proxy's backend socket keeps unacknowledged bytes.
        w.echo.signal(libc::SIGSTOP).expect("freeze");
        let pusher = scope.spawn(move || bulk_echo(client, dst, 96 << 20, 11));
        std::thread::sleep(Duration::from_millis(1500));
        let out = w.agent.cli(&[
            "migrate",
            "hold",
            "--id",
            "m-nq",
            "--quiesce-timeout",
            "500ms",
            "--json",
            &ep,
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "expected exit 3 (not quiescent): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("unacknowledged"));
        let st: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        assert_eq!(st["state"], "holding", "{st}");
        assert_eq!(st["quiescent"], false, "{st}");
        w.echo.signal(libc::SIGCONT).expect("thaw");
        w.agent.cli_json(&["migrate", "release", "--id", "m-nq"]);
        pusher.join().expect("pusher")
    });
    r.assert_ok();
    w.assert_no_rst();
}

/// A registered endpoint nobody listens on: the client's connection is closed
/// cleanly (FIN, no RST) and the agent says why in its log.
#[test]
fn unreachable_backend_closes_the_client_cleanly() {
    privileged!();
    let mut w = world("ub", &[]);
    let dead = w.t.pod_addr(7009).to_string();
    w.agent.cli_json(&["endpoint", "add", &dead]);
    let out = request_response(&w.t.client, w.t.pod_addr(7009), b"anyone there?");
    let err = out.expect_err("nobody listens, so no echo");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::UnexpectedEof,
        "expected a clean close, got {err}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        w.agent.log().contains("unreachable"),
        "agent log should say why:\n{}",
        w.agent.log()
    );
    // The pod's kernel refuses the proxy's backend socket, on the node's
    // side; nothing of that may reach the client's wire.
    w.assert_no_rst();
    record::fault(
        "unreachable_backend_closes_the_client_cleanly",
        "the client gets a clean FIN (EOF) and the log says the backend is unreachable; 0 RST",
    );
}

/// A late segment of a proxied flow, arriving after the proxy's socket has
/// fully closed (here a duplicate ACK, as a client sends when the proxy's
/// FIN was retransmitted under load), is dropped by the intercept program.
/// Forwarded, it would reach the pod, which never knew the flow and would
/// reset the client.
#[test]
fn late_segment_of_a_closed_proxied_flow_is_dropped_not_reset() {
    privileged!();
    let mut w = world("ls", &[]);
    w.register();
    let (mut s, _) = connect_in(&w.t.client, w.ep()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"ping").expect("write");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).expect("echo");
    let SocketAddr::V4(client) = s.local_addr().expect("local addr") else {
        panic!("v4 client");
    };
    // The client closes first, so the proxy's socket ends CLOSED (not in
    // TIME_WAIT) once it has the client's last ACK.
    s.shutdown(std::net::Shutdown::Write).expect("fin");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("eof");
    drop(s);
    let t0 = Instant::now();
    while w.agent.cli_json(&["conn", "ls"])["connections"]
        .as_array()
        .is_some_and(|c| !c.is_empty())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "connection never closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3 {
        shepherd_tests::inject::send_ack(&w.t.client, client, w.ep(), 1000 + i, 2000)
            .expect("send ACK");
    }
    std::thread::sleep(Duration::from_millis(300));
    w.assert_no_rst();
    // The operator can see the drops.
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert_eq!(u(&eps["endpoints"][0], "strays_dropped"), 3, "{eps}");
}

/// The pod dies during a hold and no release comes: the deadline aborts, the
/// backend is found gone, and the client is closed cleanly with the reason in
/// the status.
#[test]
fn deadline_abort_with_the_pod_gone_closes_cleanly_and_says_why() {
    privileged!();
    let mut w = world("pg", &[]);
    w.register();
    let s = CounterStream::start(&w.t.client, w.ep(), TICK);
    std::thread::sleep(Duration::from_millis(300));
    let ep = w.ep().to_string();
    w.agent
        .cli_json(&["migrate", "hold", "--id", "m-pg", "--deadline", "1s", &ep]);
    w.echo.signal(libc::SIGKILL).expect("kill the pod");
    std::thread::sleep(Duration::from_millis(2500));
    let st = w.status("m-pg");
    assert_eq!(st["state"], "aborted", "{st}");
    let reason = st["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("deadline"), "{st}");
    assert!(reason.contains("closed cleanly"), "{st}");
    assert_eq!(u(&st, "connections_closed"), 1, "{st}");
    let r = s.stop();
    assert!(r.eof, "the client should see a clean end of stream: {r:?}");
    assert!(
        r.io_errors.is_empty(),
        "the client saw errors (a reset?): {:?}",
        r.io_errors
    );
    assert!(r.in_order, "{r:?}");
    // The pod's kernel refuses the proxy's backend socket, on the node's
    // side; nothing of that may reach the client's wire.
    w.assert_no_rst();
    record::fault(
        "deadline_abort_with_the_pod_gone_closes_cleanly_and_says_why",
        format!(
            "the client gets a FIN after every byte the pod sent (in order, no I/O error); the status says: \"{}\"; 0 RST",
            st["reason"].as_str().unwrap_or_default()
        ),
    );
}

/// Kubernetes' sequence on one node: hold, the pod's process is killed
/// (its sockets close and a FIN reaches the proxy), a fresh pod process
/// starts, `release --mode reconnect`. The clients must not see the first
/// pod's end: every stream goes on, in order, with no RST on their wire.
#[test]
fn a_pod_killed_during_a_hold_and_restarted_keeps_its_clients() {
    privileged!();
    let mut w = world("kr", &[]);
    w.register();
    let streams: Vec<CounterStream> = (0..3)
        .map(|_| CounterStream::start(&w.t.client, w.ep(), TICK))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ep = w.ep().to_string();
    let held = w.agent.cli_json(&["migrate", "hold", "--id", "m-kr", &ep]);
    assert_eq!(held["quiescent"], true, "{held}");
    w.echo.signal(libc::SIGKILL).expect("kill the pod");
    let t0 = Instant::now();
    while u(&w.status("m-kr"), "backends_ended") < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the proxy never saw the pod's sockets close: {}",
            w.status("m-kr")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The old pod is gone; its replacement listens on the same address.
    w.echo = start_echo(&echo_bin!(), &w.t, w.dir.path());
    std::thread::sleep(Duration::from_millis(300));
    let released = w
        .agent
        .cli_json(&["migrate", "release", "--id", "m-kr", "--mode", "reconnect"]);
    assert_eq!(released["state"], "released", "{released}");
    std::thread::sleep(Duration::from_millis(500));
    for s in streams {
        let r = s.stop();
        // Every value sent, echoed once and in order, up to the stream's
        // own close: a connection ended by the first pod's FIN fails here.
        r.assert_ok();
        assert!(r.sent > 50, "stream too short: {r:?}");
    }
    let st = w.status("m-kr");
    assert_eq!(u(&st, "connections_closed"), 0, "{st}");
    assert_eq!(u(&st, "bytes_replayed"), u(&st, "bytes_held"), "{st}");
    w.assert_no_rst();
    record::fault(
        "a_pod_killed_during_a_hold_and_restarted_keeps_its_clients",
        format!(
            "every client kept: {} held bytes replayed into the restarted pod's new connections, each value once and in order; 0 connections closed; 0 RST",
            u(&st, "bytes_held")
        ),
    );
}

/// While an endpoint is held, RSTs from the pod's address are dropped by
/// `rst_shield` and counted; outside a hold they pass (and a stray,
/// out-of-window one is harmless to the connection anyway).
#[test]
fn rst_shield_drops_pod_resets_during_a_hold() {
    privileged!();
    let mut w = world("rs", &[]);
    w.register();
    let s = CounterStream::start(&w.t.client, w.ep(), TICK);
    std::thread::sleep(Duration::from_millis(200));
    let conns = w.agent.cli_json(&["conn", "ls"]);
    let backend: SocketAddrV4 = conns["connections"][0]["backend_local"]
        .as_str()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no backend socket: {conns}"));
    let ep = w.ep().to_string();
    w.agent.cli_json(&["migrate", "hold", "--id", "m-rs", &ep]);
    for seq in [1, 2, 3] {
        shepherd_tests::inject::send_rst(&w.t.pod, w.ep(), backend, seq).expect("send RST");
    }
    std::thread::sleep(Duration::from_millis(100));
    let st = w.status("m-rs");
    assert_eq!(u(&st, "rsts_shielded"), 3, "{st}");
    w.agent.cli_json(&["migrate", "release", "--id", "m-rs"]);
    shepherd_tests::inject::send_rst(&w.t.pod, w.ep(), backend, 4).expect("send RST");
    std::thread::sleep(Duration::from_millis(300));
    let eps = w.agent.cli_json(&["endpoint", "ls"]);
    assert_eq!(
        u(&eps["endpoints"][0], "rsts_shielded"),
        3,
        "not held: not shielded: {eps}"
    );
    s.stop().assert_ok();
    w.assert_no_rst();
}

/// `SHEPHERD_SOCKET` selects the agent like `--api-socket` does, and
/// `--api-socket` is accepted after the subcommand too.
#[test]
fn socket_can_be_given_by_env_or_after_the_subcommand() {
    privileged!();
    let w = world("so", &[]);
    let bin = shepherd_tests::agent::shepherd_bin();
    let by_env = Command::new(&bin)
        .args(["endpoint", "ls", "--json"])
        .env("SHEPHERD_SOCKET", w.agent.socket())
        .output()
        .expect("run cli");
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
    let after = Command::new(&bin)
        .args(["endpoint", "ls", "--api-socket"])
        .arg(w.agent.socket())
        .output()
        .expect("run cli");
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    let nowhere = Command::new(&bin)
        .args([
            "endpoint",
            "ls",
            "--api-socket",
            "/nonexistent/shepherd.sock",
        ])
        .output()
        .expect("run cli");
    assert!(!nowhere.status.success());
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("cannot reach the shepherd agent"));
}
