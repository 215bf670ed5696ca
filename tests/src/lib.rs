//! Privileged test harness for Shepherd.
//!
//! The integration tests under `tests/tests/` run as root on a real topology of
//! network namespaces joined by veths (docs/testing.md describes it and the
//! pod wiring). This library holds the pieces they share; every resource it makes
//! (namespace, process, capture thread, agent) is owned by an RAII guard that
//! removes exactly that resource when dropped, also when a test panics.
//!
//! - [`privilege`]: skip or fail clearly when not root ([`privileged!`]).
//! - [`names`]: unique, short per-test prefixes for namespace names.
//! - [`netns`]: the [`netns::Netns`] guard, and entering a namespace from the
//!   current thread to create sockets there.
//! - [`link`]: veth, address, route and sysctl builders (thin `ip` wrappers).
//! - [`topology`]: ready-made topologies built from those:
//!   [`topology::SingleNode`] (client, node, pod) and [`topology::TwoNode`]
//!   (client and two nodes on a bridge, a pod behind each; same or new pod IP).
//! - [`process`]: the [`process::Workload`] guard for pod processes started so
//!   that CRIU can dump them, and [`process::wait_tcp_ready`].
//! - [`criu`]: checkpoint and restore with the real CRIU ≥ 4.2
//!   ([`criu::dump`], [`criu::restore`]), the [`criu::Images`] guard for image
//!   directories and the [`criu::RestoredProcess`] guard for restored pods.
//! - [`runtime`]: pods as real OCI containers run, checkpointed and restored
//!   by runc ([`runtime::RuncPod`], a [`controller::Checkpointer`]), on a
//!   root filesystem built from this machine's files.
//! - [`resp`]: a checking Redis client ([`resp::RedisCounter`]): every
//!   command answered once, none lost, none run twice.
//! - [`capture`]: an AF_PACKET capture that counts TCP segments and RSTs.
//! - [`inject`]: crafted packets (a RST with a chosen source).
//! - [`stream`]: client-side measurements (ordered counter stream, bulk echo,
//!   request/response timing).
//! - [`bench`]: load generators for `cargo xtask bench` (bulk echo, request/
//!   response latency, connection rate), each verifying what comes back.
//! - [`single`]: a ready single-node world (client, node with agent, echo
//!   pod) for data-path tests.
//! - [`agent`]: the [`agent::Agent`] guard for the `shepherd` binary, its CLI
//!   and its HTTP API over the Unix socket.
//!
//! The echo workload is the binary `shepherd-echo` of this crate; integration
//! tests get its path with [`echo_bin!`].

pub mod agent;
pub mod bench;
pub mod capture;
pub mod controller;
pub mod criu;
pub mod frames;
pub mod inject;
pub mod link;
pub mod names;
pub mod netem;
pub mod netns;
pub mod privilege;
pub mod process;
pub mod record;
pub mod resp;
pub mod runtime;
pub mod single;
pub mod stream;
pub mod ticker;
pub mod topology;

/// Path of this crate's `shepherd-echo` binary, as a `PathBuf`.
///
/// Only usable from this crate's integration tests (`tests/tests/*.rs`), where
/// Cargo sets `CARGO_BIN_EXE_shepherd-echo` and builds the binary first.
#[macro_export]
macro_rules! echo_bin {
    () => {
        ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_shepherd-echo"))
    };
}
