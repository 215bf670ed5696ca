//! Long-running safety: what a hostile or careless user, or plain time,
//! does to the agent. Each test reproduces a failure found by probing the
//! agent and asserts the behaviour that replaced it.

use shepherd_tests::netns::in_netns;
use shepherd_tests::privileged;
use shepherd_tests::process::{open_fds, raise_nofile};
use shepherd_tests::single::World;
use shepherd_tests::echo_bin;
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
        while w.agent.cli_json(&["conn", "ls"])["connections"]
            .as_array()
            .map_or(0, |a| a.len())
            > 0
        {
            assert!(std::time::Instant::now() < deadline, "connections never finished");
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
    assert!(open_fds(pid) <= fds0 + 2, "descriptors leaked: {fds0} -> {}", open_fds(pid));
}
