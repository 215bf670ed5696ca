//! What the control plane takes and gives: plain data, with no wire format.
//! The API's request and response bodies (`api::types`) are converted from
//! and to these at the API's edge, so the control plane never depends on
//! the wire, and the wire can change (or version) without touching it.
use crate::endpoint::EndpointAddr;
use crate::migration::{Phase, ReleaseMode};
use crate::relay::Mechanism;
use std::net::{Ipv4Addr, SocketAddrV4};

/// A proxy→pod backend flow as the destination must know it to translate:
/// the proxy's (node) address and port, the pod's port, and the pod address
/// the flow's sockets use when it is not the endpoint's (a connection
/// opened after an earlier move). Ordered by node address and port, pod
/// port, then pod address (the order of the lists).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BackendFlow {
    pub node: SocketAddrV4,
    pub pod_port: u16,
    /// `None`: the endpoint's address.
    pub pod_addr: Option<Ipv4Addr>,
}

/// Who the agent is, for `/healthz` and `shepherd status`.
#[derive(Debug, Clone, Default)]
pub struct AgentInfo {
    pub version: String,
    /// Random, per process: tells this agent from another serving the
    /// same socket (see `shepherd health --ready-file`).
    pub instance: String,
    pub pid: u32,
    pub started: Option<std::time::SystemTime>,
    /// Hand-overs in this agent's line (each successor counts one more).
    pub handovers: u64,
    /// What this agent took over when it started, if it did.
    pub took_over: Option<TakeoverInfo>,
    /// Connections its predecessor held when it died without a hand-over
    /// (see `agent::census`), if one did.
    pub lost_in_crash: Option<u64>,
}

/// What a successor received in its hand-over.
#[derive(Debug, Clone)]
pub struct TakeoverInfo {
    pub from_version: String,
    pub connections: usize,
    pub endpoints: usize,
    pub migrations: usize,
    /// From asking to serving.
    pub took: std::time::Duration,
    /// From asking the running agent to freeze to serving: the data plane
    /// stood still for about this long.
    pub paused: std::time::Duration,
}

/// A hold, as asked for.
#[derive(Debug, Clone, Default)]
pub struct HoldSpec {
    pub endpoints: Vec<EndpointAddr>,
    /// Abort (or release, see `Control::hold`) by itself after this long.
    pub deadline_ms: Option<u64>,
    /// How long `hold` waits for the backends to acknowledge everything.
    pub quiesce_timeout_ms: Option<u64>,
    /// The pod's new address, if already known (as `target`).
    pub to: Option<Ipv4Addr>,
}

/// A destination's shield and translations, as asked for.
#[derive(Debug, Clone, Default)]
pub struct IncomingSpec {
    /// The migrated endpoints, at their old (original) address.
    pub endpoints: Vec<EndpointAddr>,
    /// The pod's new address, if it changes.
    pub to: Option<Ipv4Addr>,
    /// Backend flows to translate (from the origin's `backend_flows`).
    pub flows: Vec<BackendFlow>,
    /// Lift the shield by itself after this long.
    pub deadline_ms: Option<u64>,
}

/// One managed endpoint and its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointView {
    pub endpoint: EndpointAddr,
    /// "active", "held" (by `migration`) or "draining".
    pub state: String,
    pub migration: Option<String>,
    pub connections: usize,
    pub connections_total: u64,
    pub packets_intercepted: u64,
    pub bytes_intercepted: u64,
    pub syns_assigned: u64,
    pub assign_failures: u64,
    pub rsts_shielded: u64,
    pub packets_translated: u64,
    pub strays_dropped: u64,
    pub backend: SocketAddrV4,
    pub relay: Mechanism,
}

/// One relayed connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionView {
    pub id: u64,
    pub client: String,
    pub endpoint: String,
    pub backend_local: Option<String>,
    pub backend_peer: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes_spliced: u64,
    pub queued: usize,
    pub opened_unix_ms: u64,
}

/// A migration as its origin sees it (see `api::types::MigrationStatus`
/// for what each field means).
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationView {
    pub id: String,
    pub state: Phase,
    pub reason: Option<String>,
    pub endpoints: Vec<EndpointAddr>,
    pub mode: Option<ReleaseMode>,
    pub connections: u64,
    pub connections_queued: u64,
    pub connections_closed: u64,
    pub backends_ended: u64,
    pub quiescent: bool,
    pub quiesce_ms: Option<u64>,
    pub bytes_held: u64,
    pub bytes_replayed: u64,
    pub hold_duration_ms: u64,
    pub deadline_ms: u64,
    pub rsts_shielded: u64,
    pub started_unix_ms: u64,
    pub target: Option<Ipv4Addr>,
    pub backend_flows: Vec<BackendFlow>,
    pub packets_translated: u64,
}

/// A migration as its destination sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingView {
    pub id: String,
    /// "shielding" until `complete` (or the deadline), then "completed".
    pub state: String,
    pub reason: Option<String>,
    pub endpoints: Vec<EndpointAddr>,
    pub to: Option<Ipv4Addr>,
    /// The flows still translated.
    pub flows: Vec<BackendFlow>,
    pub rsts_shielded: u64,
    pub packets_translated: u64,
}
