//! Request and response bodies of the control API: its wire form. The CLI
//! and the server share these types, so the contract has one definition.
//! The control plane works on `control::model`; the conversions between the
//! two are here, at the edge.
use crate::control::model;
use crate::endpoint::EndpointAddr;
use crate::migration::{Phase, ReleaseMode};
use crate::relay::Mechanism;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsRequest {
    pub endpoints: Vec<EndpointAddr>,
    /// How their new connections forward; the agent's `--relay` if absent.
    #[serde(default)]
    pub relay: Option<Mechanism>,
    /// Accept loopback and this node's own addresses (refused by default:
    /// connections to them would be steered back into the agent).
    #[serde(default)]
    pub allow_local: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointInfo {
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
    /// Late segments of closed proxied flows dropped instead of reaching
    /// the pod (which would reset the client).
    pub strays_dropped: u64,
    /// Where backend connections go (differs from `endpoint` after a
    /// migration to a new address).
    pub backend: SocketAddrV4,
    /// How new connections forward: "splice" or "copy".
    pub relay: Mechanism,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointList {
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    pub endpoints: Vec<EndpointAddr>,
    /// Abort automatically when no release arrives within this time.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// How long `hold` waits for the backends to acknowledge everything.
    #[serde(default)]
    pub quiesce_timeout_ms: Option<u64>,
    /// The pod's new address, if already known: the same as a `target` call
    /// right after the hold, saved a round trip.
    #[serde(default)]
    pub to: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    #[serde(default)]
    pub mode: Option<ReleaseMode>,
    /// The pod's new address: new backend connections go there, and in
    /// resume mode the held flows are translated to it (as `target`).
    /// Default: the migration's target, if one was set.
    #[serde(default)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// A proxy→pod backend flow as the destination must know it to translate:
/// the proxy's (node) address and port, the pod's port, and the pod address
/// the flow's sockets use (the endpoint's, or for a connection opened after
/// an earlier move, the address the pod had then). Ordered by node address
/// and port, pod port, then pod address (the order of the lists).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct BackendFlow {
    pub node: SocketAddrV4,
    pub pod_port: u16,
    /// Absent (from an older controller): the endpoint's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_addr: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    /// The pod's new address.
    pub to: Ipv4Addr,
}

/// Sent to the destination agent before the restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The migrated endpoints, at their old (original) address.
    pub endpoints: Vec<EndpointAddr>,
    /// The pod's new address, if it changes.
    #[serde(default)]
    pub to: Option<Ipv4Addr>,
    /// Backend flows to translate (from the origin's `backend_flows`).
    #[serde(default)]
    pub flows: Vec<BackendFlow>,
    /// Lift the shield by itself after this long.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IncomingStatus {
    pub id: String,
    /// "shielding" until `complete` (or the deadline), then "completed".
    pub state: String,
    pub reason: Option<String>,
    pub endpoints: Vec<EndpointAddr>,
    pub to: Option<Ipv4Addr>,
    /// The flows still translated. A flow's entry goes once the flow has
    /// ended on the wire and its TIME_WAIT is over.
    pub flows: Vec<BackendFlow>,
    pub rsts_shielded: u64,
    pub packets_translated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrationStatus {
    pub id: String,
    pub state: Phase,
    /// Why it was aborted ("deadline", "requested", ...), and what happened to
    /// connections whose backend was unreachable.
    pub reason: Option<String>,
    pub endpoints: Vec<EndpointAddr>,
    pub mode: Option<ReleaseMode>,
    /// Connections open when the hold began, plus those accepted during it.
    pub connections: u64,
    pub connections_queued: u64,
    pub connections_closed: u64,
    /// Held connections whose pod end closed or failed during the hold (the
    /// original was stopped, as Kubernetes does after a leave-running
    /// checkpoint, or died). Their clients are not told: a `reconnect`
    /// release gives them a new backend connection; `resume` or an abort
    /// closes them cleanly (counted in `connections_closed`, with why).
    #[serde(default)]
    pub backends_ended: u64,
    /// Whether every held connection's backend acknowledged all bytes before
    /// `hold` returned.
    pub quiescent: bool,
    pub quiesce_ms: Option<u64>,
    pub bytes_held: u64,
    pub bytes_replayed: u64,
    pub hold_duration_ms: u64,
    pub deadline_ms: u64,
    pub rsts_shielded: u64,
    /// Unix time (ms) the hold began.
    pub started_unix_ms: u64,
    /// The pod's new address, if the controller gave one.
    pub target: Option<Ipv4Addr>,
    /// The held connections' backend flows: what the destination agent must
    /// translate when the pod's address changes.
    pub backend_flows: Vec<BackendFlow>,
    /// Packets of this migration's flows rewritten by this node.
    pub packets_translated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationList {
    pub migrations: Vec<MigrationStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionInfo {
    pub id: u64,
    pub client: String,
    pub endpoint: String,
    pub backend_local: Option<String>,
    /// The pod address its backend socket connected to (the endpoint's, or
    /// where the pod was when the connection opened).
    #[serde(default)]
    pub backend_peer: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of `bytes_up` + `bytes_down`, those forwarded with splice(2).
    pub bytes_spliced: u64,
    pub queued: usize,
    pub opened_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionInfo>,
}

impl From<model::BackendFlow> for BackendFlow {
    fn from(f: model::BackendFlow) -> Self {
        Self {
            node: f.node,
            pod_port: f.pod_port,
            pod_addr: f.pod_addr,
        }
    }
}

impl From<BackendFlow> for model::BackendFlow {
    fn from(f: BackendFlow) -> Self {
        Self {
            node: f.node,
            pod_port: f.pod_port,
            pod_addr: f.pod_addr,
        }
    }
}

impl From<HoldRequest> for model::HoldSpec {
    fn from(r: HoldRequest) -> Self {
        Self {
            endpoints: r.endpoints,
            deadline_ms: r.deadline_ms,
            quiesce_timeout_ms: r.quiesce_timeout_ms,
            to: r.to,
        }
    }
}

impl From<IncomingRequest> for model::IncomingSpec {
    fn from(r: IncomingRequest) -> Self {
        Self {
            endpoints: r.endpoints,
            to: r.to,
            flows: r.flows.into_iter().map(Into::into).collect(),
            deadline_ms: r.deadline_ms,
        }
    }
}

impl From<model::EndpointView> for EndpointInfo {
    fn from(e: model::EndpointView) -> Self {
        Self {
            endpoint: e.endpoint,
            state: e.state,
            migration: e.migration,
            connections: e.connections,
            connections_total: e.connections_total,
            packets_intercepted: e.packets_intercepted,
            bytes_intercepted: e.bytes_intercepted,
            syns_assigned: e.syns_assigned,
            assign_failures: e.assign_failures,
            rsts_shielded: e.rsts_shielded,
            packets_translated: e.packets_translated,
            strays_dropped: e.strays_dropped,
            backend: e.backend,
            relay: e.relay,
        }
    }
}

impl From<model::ConnectionView> for ConnectionInfo {
    fn from(c: model::ConnectionView) -> Self {
        Self {
            id: c.id,
            client: c.client,
            endpoint: c.endpoint,
            backend_local: c.backend_local,
            backend_peer: c.backend_peer,
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            bytes_spliced: c.bytes_spliced,
            queued: c.queued,
            opened_unix_ms: c.opened_unix_ms,
        }
    }
}

impl From<model::MigrationView> for MigrationStatus {
    fn from(m: model::MigrationView) -> Self {
        Self {
            id: m.id,
            state: m.state,
            reason: m.reason,
            endpoints: m.endpoints,
            mode: m.mode,
            connections: m.connections,
            connections_queued: m.connections_queued,
            connections_closed: m.connections_closed,
            backends_ended: m.backends_ended,
            quiescent: m.quiescent,
            quiesce_ms: m.quiesce_ms,
            bytes_held: m.bytes_held,
            bytes_replayed: m.bytes_replayed,
            hold_duration_ms: m.hold_duration_ms,
            deadline_ms: m.deadline_ms,
            rsts_shielded: m.rsts_shielded,
            started_unix_ms: m.started_unix_ms,
            target: m.target,
            backend_flows: m.backend_flows.into_iter().map(Into::into).collect(),
            packets_translated: m.packets_translated,
        }
    }
}

impl From<model::IncomingView> for IncomingStatus {
    fn from(i: model::IncomingView) -> Self {
        Self {
            id: i.id,
            state: i.state,
            reason: i.reason,
            endpoints: i.endpoints,
            to: i.to,
            flows: i.flows.into_iter().map(Into::into).collect(),
            rsts_shielded: i.rsts_shielded,
            packets_translated: i.packets_translated,
        }
    }
}

/// Every error response: `{error, detail}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
}

/// The `backend_flows` of an origin's migration status (`migrate status
/// --json`), as `migrate incoming --flows-from` reads it; `src` names the
/// file in errors. The flows themselves are checked by the agent.
pub fn flows_from_status(text: &str, src: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "{src} is not JSON ({e}): pass the origin's `shepherd migrate status --id ID --json`"
        )
    })?;
    match v.get("backend_flows") {
        Some(f @ serde_json::Value::Array(_)) => Ok(f.clone()),
        _ => Err(format!(
            "{src} has no backend_flows: pass the origin's `shepherd migrate status --id ID --json`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::BackendFlow;

    /// A flow at the endpoint's own address is written as before, so a
    /// destination that predates `pod_addr` (which refuses unknown fields)
    /// still takes it; one without the field still parses.
    #[test]
    fn backend_flow_pod_addr_is_optional_both_ways() {
        let old = r#"{"node":"10.0.1.11:41582","pod_port":6379}"#;
        let f: BackendFlow = serde_json::from_str(old).expect("parse");
        assert_eq!(f.pod_addr, None);
        assert_eq!(serde_json::to_string(&f).expect("json"), old);
        let moved = r#"{"node":"10.0.1.11:41582","pod_port":6379,"pod_addr":"10.0.2.7"}"#;
        let f: BackendFlow = serde_json::from_str(moved).expect("parse");
        assert_eq!(f.pod_addr, Some([10, 0, 2, 7].into()));
        assert_eq!(serde_json::to_string(&f).expect("json"), moved);
    }
}
