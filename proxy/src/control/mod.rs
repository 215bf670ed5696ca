//! The control plane: managed endpoints and migrations. Every operation the
//! API (and so the CLI) offers is implemented once, here.
//!
//! Submodules: [`origin`] (hold, release, abort on the node holding the
//! clients), [`destination`] (shield and translate on the node where the pod
//! lands), [`metrics`]; [`model`] holds what it takes and gives, which the
//! API converts from and to its wire form.
//!
//! Locking: `endpoints`, then `migrations`, then `incoming`, never the other
//! way round, and the `forgotten` id sets after any of them; no lock is held
//! across an await.
mod destination;
pub use destination::{ENDED_FLOW_LINGER, UNSEEN_FLOW_LIMIT};
mod metrics;
pub mod model;
mod origin;
pub mod snapshot;

use crate::endpoint::{EndpointAddr, EndpointState, HoldStats, Mode};
use crate::error::ControlError;
use crate::intercept::Interception;
use crate::migration::{Phase, ReleaseMode};
use crate::relay::connection::RelayContext;
use crate::relay::Mechanism;
use model::{ConnectionView, EndpointView};
use shepherd_common::{EP_INTERCEPT, EP_SHIELD};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Tunables of the control plane.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub default_deadline: Duration,
    pub quiesce_timeout: Duration,
    /// How new connections forward unless their endpoint says otherwise.
    pub default_relay: Mechanism,
    /// Endpoints that can be registered at once (`--max-endpoints`).
    pub max_endpoints: usize,
    /// The data plane's own listeners: an endpoint there could only loop.
    pub own_listeners: Vec<SocketAddrV4>,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Migration {
    id: String,
    endpoints: Vec<EndpointAddr>,
    phase: Phase,
    reason: Option<String>,
    mode: Option<ReleaseMode>,
    #[serde(with = "snapshot::hold")]
    stats: Arc<HoldStats>,
    #[serde(with = "snapshot::instant")]
    started: Instant,
    started_wall: SystemTime,
    #[serde(with = "snapshot::instant::option")]
    ended: Option<Instant>,
    deadline: Duration,
    quiesce: Option<Result<Duration, Duration>>,
    /// RSTs shielded per endpoint when the hold began.
    rsts_at_start: u64,
    /// The pod's new address, once the controller has said where it lands.
    target: Option<Ipv4Addr>,
    /// Translations `target` overwrote (flows an earlier migration had
    /// moved): an abort puts them back.
    replaced: std::collections::HashMap<shepherd_common::FlowKey, shepherd_common::Translation>,
    /// Pod→node entries of those earlier translations, kept until the hold
    /// ends (see `target`): (the entry's key, its flow's key).
    lingering: Vec<(shepherd_common::FlowKey, shepherd_common::FlowKey)>,
    /// The held endpoints' live state (so status never needs the endpoints lock).
    #[serde(skip)]
    states: Vec<Arc<EndpointState>>,
}

pub struct Control {
    config: ControlConfig,
    intercept: Arc<dyn Interception>,
    relay: RelayContext,
    endpoints: Mutex<BTreeMap<EndpointAddr, Arc<EndpointState>>>,
    migrations: Mutex<HashMap<String, Migration>>,
    incoming: Mutex<HashMap<String, destination::Incoming>>,
    next_epoch: AtomicU64,
    /// Ids of pruned migrations and retired incoming records (taken last,
    /// after any other lock).
    forgotten: Mutex<crate::migration::Forgotten>,
    forgotten_incoming: Mutex<crate::migration::Forgotten>,
    pub aborts_total: AtomicU64,
    hold_seconds_total: Mutex<f64>,
    /// Closed while a hand-over freezes the control plane.
    gate: Gate,
    agent: Mutex<model::AgentInfo>,
}

/// Lets calls that change state through, or not while a hand-over has
/// frozen the control plane. A call counts itself in first and then looks
/// (both sequentially consistent), and a freeze closes first and then
/// waits for the count to drain: a call either sees the gate closed, or is
/// counted before the freeze looks and is waited for.
#[derive(Default)]
struct Gate {
    closed: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    opened: tokio::sync::Notify,
    /// Handed over: never opens again.
    retired: std::sync::atomic::AtomicBool,
}

/// A call that changes state, counted until it returns.
pub(crate) struct Op<'a>(&'a Gate);

impl Drop for Op<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Control {
    /// Lets a call that changes state in, or refuses it while a hand-over
    /// is in progress.
    pub(crate) fn op(&self) -> Result<Op<'_>, ControlError> {
        let g = &self.gate;
        g.in_flight.fetch_add(1, Ordering::SeqCst);
        let op = Op(g);
        if g.closed.load(Ordering::SeqCst) {
            return Err(ControlError::Unavailable(
                "the agent is handing over to its successor; retry in a moment".into(),
            ));
        }
        Ok(op)
    }

    /// [`op`](Self::op), waiting for the gate to open (the agent's own
    /// timers, which must not be lost).
    /// `None` once the agent has handed over (the gate never opens again).
    pub(crate) async fn op_when_open(&self) -> Option<Op<'_>> {
        loop {
            let opened = self.gate.opened.notified();
            if self.gate.retired.load(Ordering::SeqCst) {
                return None;
            }
            if let Ok(op) = self.op() {
                return Some(op);
            }
            opened.await;
        }
    }

    /// Handed over: the gate stays closed, and the agent's own timers
    /// waiting for it give up (they hold the control plane, and with it
    /// the kernel objects, which the old agent must let go of).
    pub fn retire(&self) {
        self.gate.retired.store(true, Ordering::SeqCst);
        self.gate.opened.notify_waiters();
    }

    /// Stops every call that changes state, waiting (up to `timeout`) for
    /// those in progress; a hold waiting for quiescence counts. On a
    /// timeout the gate opens again.
    pub async fn freeze(&self, timeout: Duration) -> Result<(), ControlError> {
        let g = &self.gate;
        g.closed.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while g.in_flight.load(Ordering::SeqCst) > 0 {
            if start.elapsed() > timeout {
                self.thaw();
                return Err(ControlError::Unavailable(format!(
                    "calls still in progress after {timeout:?} (a hold waiting for its pod to                      quiesce?); try the hand-over again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    pub fn set_agent(&self, info: model::AgentInfo) {
        *lock(&self.agent) = info;
    }

    /// Who this agent is.
    pub fn agent(&self) -> model::AgentInfo {
        lock(&self.agent).clone()
    }

    /// Migrations it knows (finished ones included).
    pub fn migration_count(&self) -> usize {
        lock(&self.migrations).len()
    }

    /// Opens the gate again (a hand-over that failed before its commit).
    pub fn thaw(&self) {
        self.gate.closed.store(false, Ordering::SeqCst);
        self.gate.opened.notify_waiters();
    }
}

impl crate::relay::Endpoints for Control {
    fn relay_context(&self) -> RelayContext {
        self.relay.clone()
    }

    /// The live state of the endpoint a connection was addressed to.
    fn endpoint_for(&self, dst: SocketAddrV4) -> Option<Arc<EndpointState>> {
        lock(&self.endpoints).get(&EndpointAddr(dst)).cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // carry on with it rather than take the whole agent down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Control {
    pub fn new(
        config: ControlConfig,
        intercept: Arc<dyn Interception>,
        relay: RelayContext,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            intercept,
            relay,
            endpoints: Mutex::new(BTreeMap::new()),
            migrations: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
            forgotten: Mutex::default(),
            forgotten_incoming: Mutex::default(),
            aborts_total: AtomicU64::new(0),
            hold_seconds_total: Mutex::new(0.0),
            gate: Gate::default(),
            agent: Mutex::default(),
        })
    }

    // ---- endpoints -------------------------------------------------------

    /// Registers endpoints (idempotent; re-adding a draining one revives it).
    /// `relay`: how their new connections forward (`None`: keep an existing
    /// endpoint's choice, or the agent's default for a new one).
    /// `allow_local`: accept loopback and this node's own addresses, which
    /// are refused by default (connections to them would be steered back
    /// into the agent). All or nothing: on any error, none of `addrs` is
    /// newly registered.
    pub fn add_endpoints(
        &self,
        addrs: &[EndpointAddr],
        relay: Option<Mechanism>,
        allow_local: bool,
    ) -> Result<Vec<EndpointView>, ControlError> {
        let _op = self.op()?;
        if addrs.is_empty() {
            return Err(ControlError::Invalid("no endpoints given".into()));
        }
        self.refuse_loops(addrs, allow_local)?;
        let mut eps = lock(&self.endpoints);
        let new: std::collections::BTreeSet<EndpointAddr> = addrs
            .iter()
            .filter(|a| !eps.contains_key(a))
            .copied()
            .collect();
        if eps.len() + new.len() > self.config.max_endpoints {
            return Err(ControlError::Limit(format!(
                "endpoint limit reached: {} registered, {} more asked, --max-endpoints is {}; \
                 remove endpoints or restart the agent with a higher --max-endpoints",
                eps.len(),
                new.len(),
                self.config.max_endpoints
            )));
        }
        // What the kernel had for each new one (a draining endpoint keeps
        // its entry, flags 0, for its connections): a failure puts it back.
        let before: HashMap<EndpointAddr, Option<u32>> = new
            .iter()
            .map(|a| (*a, self.intercept.endpoint_flags(a.key())))
            .collect();
        let mut done: Vec<EndpointAddr> = Vec::new();
        for addr in addrs {
            let state = eps
                .entry(*addr)
                .or_insert_with(|| {
                    let s = EndpointState::new(
                        *addr,
                        self.intercept.clone(),
                        self.relay.hold_cap_per_endpoint,
                    );
                    s.set_relay(self.config.default_relay);
                    s
                })
                .clone();
            if let Some(m) = relay {
                state.set_relay(m);
            }
            state.set_draining(false);
            let flags = match state.mode() {
                Mode::Holding(_) => EP_INTERCEPT | EP_SHIELD,
                Mode::Forwarding { .. } => EP_INTERCEPT,
            };
            if let Err(e) = self.intercept.set_endpoint(addr.key(), flags) {
                // Undo this batch's new endpoints, this one included.
                for a in done.iter().chain(std::iter::once(addr)) {
                    if new.contains(a) {
                        eps.remove(a);
                        let _ = match before.get(a).copied().flatten() {
                            Some(flags) => self.intercept.set_endpoint(a.key(), flags),
                            None => self.intercept.remove_endpoint(a.key()),
                        };
                    }
                }
                return Err(e.into());
            }
            done.push(*addr);
            tracing::info!(endpoint = %addr, "endpoint registered");
        }
        drop(eps);
        Ok(addrs.iter().filter_map(|a| self.endpoint_info(a)).collect())
    }

    /// Refuses endpoints whose connections could only come back to the
    /// agent: its own listeners always; loopback and this node's addresses
    /// unless `allow_local`.
    fn refuse_loops(&self, addrs: &[EndpointAddr], allow_local: bool) -> Result<(), ControlError> {
        if let Some(a) = addrs
            .iter()
            .find(|a| self.config.own_listeners.contains(&a.0))
        {
            return Err(ControlError::Invalid(format!(
                "{a} is the agent's own transparent listener: its connections would be relayed \
                 back into the agent, forever"
            )));
        }
        if allow_local {
            return Ok(());
        }
        let node = crate::transport::local::node_addresses().map_err(|e| {
            ControlError::Invalid(format!(
                "cannot list this node's addresses to check the endpoints ({e}); \
                 pass allow_local to skip the check"
            ))
        })?;
        if let Some(a) = addrs
            .iter()
            .find(|a| a.0.ip().is_loopback() || node.contains(a.0.ip()))
        {
            return Err(ControlError::Invalid(format!(
                "{a} is an address of this node (loopback or a local interface), not a pod's: \
                 connections to it would be steered back into the agent. If it really is a \
                 local service, add it with --allow-local (API: \"allow_local\": true)"
            )));
        }
        Ok(())
    }

    /// Unregisters an endpoint. Its existing connections keep flowing (the
    /// kernel entry stays, marked draining, until the last one closes); new
    /// connections go to the pod directly.
    pub fn remove_endpoint(&self, addr: &EndpointAddr) -> Result<(), ControlError> {
        let _op = self.op()?;
        let mut eps = lock(&self.endpoints);
        let Some(state) = eps.get(addr).cloned() else {
            return Err(ControlError::UnknownEndpoint(*addr));
        };
        if let Mode::Holding(_) = state.mode() {
            let id = self.migration_holding(addr).unwrap_or_default();
            return Err(ControlError::Conflict(format!(
                "endpoint {addr} is held by migration {id}; release or abort it first"
            )));
        }
        eps.remove(addr);
        drop(eps);
        state.set_draining(true);
        self.intercept.set_endpoint(addr.key(), 0)?;
        if !state.reap_if_drained() {
            tracing::info!(endpoint = %addr, connections = state.connection_count(), "endpoint draining");
        }
        tracing::info!(endpoint = %addr, "endpoint unregistered");
        Ok(())
    }

    pub fn list_endpoints(&self) -> Vec<EndpointView> {
        let addrs: Vec<EndpointAddr> = lock(&self.endpoints).keys().copied().collect();
        addrs.iter().filter_map(|a| self.endpoint_info(a)).collect()
    }

    fn endpoint_info(&self, addr: &EndpointAddr) -> Option<EndpointView> {
        let state = lock(&self.endpoints).get(addr).cloned()?;
        let k = self.intercept.stats(addr.key());
        let migration = self.migration_holding(addr);
        let held = matches!(state.mode(), Mode::Holding(_));
        Some(EndpointView {
            endpoint: *addr,
            state: if state.is_draining() {
                "draining"
            } else if held {
                "held"
            } else {
                "active"
            }
            .into(),
            migration,
            connections: state.connection_count(),
            connections_total: state.connections_total.load(Ordering::Relaxed),
            packets_intercepted: k.packets,
            bytes_intercepted: k.bytes,
            syns_assigned: k.syns_assigned,
            assign_failures: k.assign_failures,
            rsts_shielded: k.rsts_shielded,
            packets_translated: k.translated,
            strays_dropped: k.strays_dropped,
            backend: state.backend(),
            relay: state.relay(),
        })
    }

    fn migration_holding(&self, addr: &EndpointAddr) -> Option<String> {
        lock(&self.migrations)
            .values()
            .find(|m| m.phase == Phase::Holding && m.endpoints.contains(addr))
            .map(|m| m.id.clone())
    }

    pub fn connections(&self) -> Vec<ConnectionView> {
        let states: Vec<Arc<EndpointState>> = lock(&self.endpoints).values().cloned().collect();
        let mut out: Vec<ConnectionView> = states
            .iter()
            .flat_map(|s| s.connections())
            .map(|c| {
                let backend = c.backend.lock().ok().and_then(|b| *b);
                ConnectionView {
                    id: c.id,
                    client: c.client.to_string(),
                    endpoint: c.orig_dst.to_string(),
                    backend_local: backend.map(|b| b.local.to_string()),
                    backend_peer: backend.map(|b| b.peer.to_string()),
                    bytes_up: c.bytes_up.load(Ordering::Relaxed),
                    bytes_down: c.bytes_down.load(Ordering::Relaxed),
                    bytes_spliced: c.bytes_spliced.load(Ordering::Relaxed),
                    queued: c.queued.load(Ordering::Relaxed),
                    opened_unix_ms: unix_ms(c.opened),
                }
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

impl Control {
    /// Starts translating `flows` between the address each one's sockets use
    /// (old: its `pod_addr`, or its endpoint's) and `to` (new), for this node's `role` (origin or destination). Flows
    /// whose pod port matches no endpoint, or whose address does not change,
    /// are skipped. Returns the flows installed; on an error, none stay.
    fn translate_flows(
        &self,
        endpoints: &[EndpointAddr],
        to: Ipv4Addr,
        flows: &[model::BackendFlow],
        role: u32,
    ) -> Result<Vec<shepherd_common::FlowKey>, ControlError> {
        let mut installed = Vec::new();
        for f in flows {
            let Some((key, old)) = translated_key(endpoints, to, f) else {
                continue;
            };
            let set = self.intercept.set_translation(
                key,
                shepherd_common::Translation {
                    old_addr: u32::from_ne_bytes(old.octets()),
                    new_addr: u32::from_ne_bytes(to.octets()),
                    role,
                    marks: [0; 8],
                },
            );
            if let Err(e) = set {
                // All or nothing: entries nobody tracks would never go.
                for k in &installed {
                    let _ = self.intercept.remove_translation(*k);
                }
                return Err(e.into());
            }
            installed.push(key);
        }
        Ok(installed)
    }
}

/// The translation key of backend flow `f` of a pod at `endpoints` that
/// moves to `to`, with the pod's old address: the one the flow's sockets
/// use (the endpoint's unless the flow says otherwise). `None` if the
/// flow's port matches no endpoint or the address does not change (nothing
/// to translate).
fn translated_key(
    endpoints: &[EndpointAddr],
    to: Ipv4Addr,
    f: &model::BackendFlow,
) -> Option<(shepherd_common::FlowKey, Ipv4Addr)> {
    let old = endpoints
        .iter()
        .find(|e| e.0.port() == f.pod_port)
        .map(|e| f.pod_addr.unwrap_or(*e.0.ip()))
        .filter(|o| *o != to)?;
    let key = shepherd_common::FlowKey::new(
        f.node.ip().octets(),
        f.node.port(),
        old.octets(),
        f.pod_port,
    );
    Some((key, old))
}

/// A migration that changes the pod's address moves one pod: its endpoints
/// must share one address (flows are matched to endpoints by port).
fn one_pod_address(endpoints: &[EndpointAddr]) -> Result<(), ControlError> {
    let mut ips = endpoints.iter().map(|e| e.0.ip());
    let first = ips.next();
    if ips.any(|ip| Some(ip) != first) {
        return Err(ControlError::Invalid(format!(
            "the endpoints {} are at different addresses; a migration that changes the pod's address covers one pod: give each pod its own migration",
            endpoints
                .iter()
                .map(|e| e.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}
