//! Managed endpoints (a pod's IPv4 address and TCP port) and the live state the
//! relay shares with the control plane for each: the current [`Mode`] and the
//! registry of its connections.
//!
//! The mode is a `watch` channel: the control plane changes it, and every
//! connection of the endpoint observes the change at its next step. Nothing
//! here touches sockets.
pub use crate::flow_translation::FlowTranslation;
use crate::intercept::Interception;
use crate::relay::Mechanism;
use serde::{Deserialize, Serialize};
use shepherd_common::{EndpointKey, FlowKey};
use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// A pod's (IPv4 address, TCP port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointAddr(pub SocketAddrV4);

impl EndpointAddr {
    pub fn key(&self) -> EndpointKey {
        EndpointKey::new(self.0.ip().octets(), self.0.port())
    }
}

impl FromStr for EndpointAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addr: SocketAddrV4 = s.trim().parse().map_err(|_| {
            format!("invalid endpoint {s:?}: expected IPv4:PORT, e.g. 10.0.0.7:6379")
        })?;
        if addr.port() == 0 {
            return Err(format!("invalid endpoint {s:?}: port 0"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_broadcast() || addr.ip().is_multicast() {
            return Err(format!("invalid endpoint {s:?}: not a unicast address"));
        }
        Ok(Self(addr))
    }
}

impl TryFrom<String> for EndpointAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<EndpointAddr> for String {
    fn from(e: EndpointAddr) -> String {
        e.to_string()
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Counters of one hold, shared by the migration and the connections it holds.
#[derive(Debug, Default)]
pub struct HoldStats {
    /// Identifies the hold; connections record it when they are quiescent.
    pub epoch: u64,
    /// Connections that were open when the hold began and observed it.
    pub connections_held: AtomicU64,
    /// Connections accepted during the hold (connected to the pod after it).
    pub connections_queued: AtomicU64,
    /// Client bytes that were queued when the hold began or arrived during it.
    pub bytes_held: AtomicU64,
    /// Of those, bytes written to the pod after the release (or abort).
    pub bytes_replayed: AtomicU64,
    /// Held connections whose backend ended (FIN, reset or error) during
    /// the hold: the original pod stopped or died. They wait for the
    /// release: a reconnect gives them a new backend connection.
    pub backends_ended: AtomicU64,
    /// Connections closed because their backend could not be reached or failed.
    pub connections_closed: AtomicU64,
    /// Why the last of those was closed.
    pub close_reason: Mutex<Option<String>>,
    /// Signalled each time a connection records itself quiescent.
    pub quiesced: tokio::sync::Notify,
}

impl HoldStats {
    pub fn record_close(&self, reason: &str) {
        self.connections_closed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.close_reason.lock() {
            *r = Some(reason.to_string());
        }
    }
}

/// What connections of an endpoint do now.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Relay both ways. `after` is the hold that just ended, if any: bytes it
    /// queued are counted as replayed when they are written. `reconnect`: that
    /// hold ended in `reconnect` mode, so connections drop their old backend
    /// socket and open a new one to the endpoint's current backend address
    /// (they act on [`EndpointState::reconnects`], which `set_mode` counts
    /// from this flag, so a later mode cannot hide it).
    Forwarding {
        after: Option<Arc<HoldStats>>,
        reconnect: bool,
    },
    /// Queue client bytes; write nothing to the pod.
    Holding(Arc<HoldStats>),
}

impl Mode {
    pub fn hold(&self) -> Option<&Arc<HoldStats>> {
        match self {
            Mode::Holding(h) => Some(h),
            Mode::Forwarding { .. } => None,
        }
    }
}

/// What the control plane can see of one relayed connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub client: SocketAddr,
    pub orig_dst: SocketAddrV4,
    pub opened: SystemTime,
    /// Its backend socket, once connected (the latest one, after a reconnect).
    pub backend: Mutex<Option<BackendSocket>>,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Of those, bytes forwarded with splice(2).
    pub bytes_spliced: AtomicU64,
    /// Client bytes queued in this connection's hold buffer.
    pub queued: AtomicUsize,
    /// Epoch of the last hold for which this connection has nothing
    /// unacknowledged towards the pod (0: none yet).
    pub quiesced_epoch: AtomicU64,
    /// The eBPF translation of its backend flow (origin side of a move to a
    /// new address); see [`FlowTranslation`].
    pub translated_flow: Mutex<FlowTranslation>,
}

/// The two ends of a connection's backend socket, as the proxy's kernel
/// sees them: the node's address and port, and the pod address it
/// connected to. After a pod has moved, that address is the pod's address
/// at the time of the connect, not the endpoint's registered one: a pod
/// that moves again must have this flow translated from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSocket {
    pub local: SocketAddr,
    pub peer: SocketAddrV4,
}

impl ConnInfo {
    /// Records a translation `target` installed for this connection's
    /// backend flow. Returns false if the connection's backend socket is
    /// already gone (the caller removes the entry itself).
    pub fn mark_translated(&self, key: FlowKey) -> bool {
        let Ok(mut t) = self.translated_flow.lock() else {
            return false;
        };
        // No backend socket any more (see `forget_backend`): nobody would
        // remove the entry.
        let alive = self.backend.lock().is_ok_and(|b| b.is_some());
        t.install(key, alive)
    }

    /// The backend socket is gone (dropped for a reconnect, or failed):
    /// forgets it, so a `target` no longer sees its flow, and returns its
    /// translation's entry to remove, if any. One step under the
    /// translation's lock, so a `target` that read the flow before cannot
    /// mark it translated after (see `mark_translated`).
    pub fn forget_backend(&self) -> Option<FlowKey> {
        let mut t = self.translated_flow.lock().ok()?;
        if let Ok(mut b) = self.backend.lock() {
            *b = None;
        }
        t.take(false)
    }

    /// The backend socket whose flow was translated is done: returns the
    /// entry to remove, if any. `last`: no later backend socket can need a
    /// translation either (the connection is closing).
    pub fn take_translation(&self, last: bool) -> Option<FlowKey> {
        self.translated_flow.lock().ok()?.take(last)
    }
}

/// An endpoint's state as a hand-over carries it (see
/// [`EndpointState::snapshot`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointSnapshot {
    pub addr: EndpointAddr,
    backend: SocketAddrV4,
    moved: bool,
    relay: Mechanism,
    draining: bool,
    connections_total: u64,
    reconnects: u64,
    mode: ModeSnapshot,
}

/// A [`Mode`], with holds named by epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ModeSnapshot {
    Forwarding { after: Option<u64>, reconnect: bool },
    Holding(u64),
}

/// Live state of one managed endpoint.
pub struct EndpointState {
    pub addr: EndpointAddr,
    /// Where backend connections go: the endpoint itself, until a migration
    /// moves the pod to a new address.
    backend: Mutex<SocketAddrV4>,
    /// Set once the backend address has differed from the endpoint's.
    moved: AtomicBool,
    /// How new connections forward (set when the endpoint is added).
    relay: Mutex<Mechanism>,
    mode: watch::Sender<Mode>,
    conns: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    /// Removed by the user but still carrying connections: new SYNs pass
    /// through; the kernel entry goes when the last connection closes.
    draining: AtomicBool,
    intercept: Arc<dyn Interception>,
    pub connections_total: AtomicU64,
    /// See [`reconnects`](Self::reconnects).
    reconnects: AtomicU64,
    /// Caps the bytes this endpoint's connections hold together.
    hold_budget: Arc<crate::relay::hold_buffer::Budget>,
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EndpointState {
    /// `hold_cap`: the most bytes its connections may hold together.
    pub fn new(addr: EndpointAddr, intercept: Arc<dyn Interception>, hold_cap: usize) -> Arc<Self> {
        let (mode, _) = watch::channel(Mode::Forwarding {
            after: None,
            reconnect: false,
        });
        Arc::new(Self {
            addr,
            backend: Mutex::new(addr.0),
            moved: AtomicBool::new(false),
            relay: Mutex::new(Mechanism::default()),
            mode,
            conns: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            intercept,
            connections_total: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            hold_budget: crate::relay::hold_buffer::Budget::new(hold_cap),
        })
    }

    /// What it is, for a hand-over.
    pub fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            addr: self.addr,
            backend: self.backend(),
            moved: self.moved(),
            relay: self.relay(),
            draining: self.is_draining(),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            reconnects: self.reconnects(),
            mode: match &*self.mode.borrow() {
                Mode::Forwarding { after, reconnect } => ModeSnapshot::Forwarding {
                    after: after.as_ref().map(|h| h.epoch),
                    reconnect: *reconnect,
                },
                Mode::Holding(h) => ModeSnapshot::Holding(h.epoch),
            },
        }
    }

    /// The endpoint a hand-over carried, with no connections yet; `hold`
    /// gives the hold of an epoch.
    pub fn restore(
        s: EndpointSnapshot,
        intercept: Arc<dyn Interception>,
        hold_cap: usize,
        hold: &mut dyn FnMut(u64) -> Arc<HoldStats>,
    ) -> Arc<Self> {
        let e = Self::new(s.addr, intercept, hold_cap);
        if let Ok(mut b) = e.backend.lock() {
            *b = s.backend;
        }
        e.moved.store(s.moved, Ordering::Release);
        e.set_relay(s.relay);
        e.set_draining(s.draining);
        e.connections_total
            .store(s.connections_total, Ordering::Relaxed);
        e.reconnects.store(s.reconnects, Ordering::Release);
        // Not `set_mode`: the reconnect it describes was counted already.
        e.mode.send_replace(match s.mode {
            ModeSnapshot::Forwarding { after, reconnect } => Mode::Forwarding {
                after: after.map(&mut *hold),
                reconnect,
            },
            ModeSnapshot::Holding(epoch) => Mode::Holding(hold(epoch)),
        });
        e
    }

    /// The budget this endpoint's held bytes are charged to.
    pub fn hold_budget(&self) -> Arc<crate::relay::hold_buffer::Budget> {
        self.hold_budget.clone()
    }

    pub fn backend(&self) -> SocketAddrV4 {
        self.backend.lock().map(|b| *b).unwrap_or(self.addr.0)
    }

    pub fn set_backend(&self, to: SocketAddrV4) {
        if let Ok(mut b) = self.backend.lock() {
            *b = to;
        }
        if to != self.addr.0 {
            self.moved.store(true, Ordering::Release);
        }
    }

    pub fn relay(&self) -> Mechanism {
        self.relay.lock().map(|m| *m).unwrap_or_default()
    }

    pub fn set_relay(&self, m: Mechanism) {
        if let Ok(mut r) = self.relay.lock() {
            *r = m;
        }
    }

    /// Removes the translation of `info`'s backend flow, if it has one: the
    /// socket it served is closed. `last` as in [`ConnInfo::take_translation`].
    pub fn untranslate(&self, info: &ConnInfo, last: bool) {
        if let Some(flow) = info.take_translation(last) {
            self.remove_translation(flow);
        }
    }

    pub fn remove_translation(&self, flow: FlowKey) {
        if let Err(e) = self.intercept.remove_translation(flow) {
            tracing::debug!(error = %e, "removing a closed backend flow's translation");
        }
    }

    /// Whether the pod has ever been at an address other than the
    /// endpoint's. From then on, flows to any of its addresses may be
    /// translated onto the one it takes next, even back to the endpoint's
    /// own: new backend sockets take a port of their own (see
    /// [`BackendConnector::connect`](crate::transport::backend::BackendConnector::connect)).
    pub fn moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    pub fn mode(&self) -> Mode {
        self.mode.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Mode> {
        self.mode.subscribe()
    }

    pub fn set_mode(&self, mode: Mode) {
        if let Mode::Forwarding {
            reconnect: true, ..
        } = mode
        {
            // Counted before it is sent: a connection that sees the count
            // change knows it must reconnect, even if the next hold
            // replaced this mode before it looked (see [`reconnects`](Self::reconnects)).
            self.reconnects.fetch_add(1, Ordering::AcqRel);
        }
        self.mode.send_replace(mode);
    }

    /// How many releases in reconnect mode the endpoint has had. A watch
    /// channel shows only its latest value: a connection that looks after a
    /// release and the next hold sees Holding → Holding, and would keep a
    /// backend socket the restored pod no longer has without this count.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Registers a connection; the guard deregisters it when dropped.
    pub fn register(self: &Arc<Self>, info: Arc<ConnInfo>) -> ConnGuard {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.adopt(info)
    }

    /// Registers a connection handed over by the previous agent (counted
    /// there already).
    pub fn adopt(self: &Arc<Self>, info: Arc<ConnInfo>) -> ConnGuard {
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(info.id, info.clone());
        }
        ConnGuard {
            endpoint: self.clone(),
            id: info.id,
            handed_over: false,
        }
    }

    pub fn connections(&self) -> Vec<Arc<ConnInfo>> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Removes the kernel entry of a draining endpoint once it has no
    /// connections left. Returns whether it did.
    pub fn reap_if_drained(&self) -> bool {
        let Ok(conns) = self.conns.lock() else {
            return false;
        };
        if !self.is_draining() || !conns.is_empty() {
            return false;
        }
        if let Err(e) = self.intercept.remove_endpoint(self.addr.key()) {
            tracing::warn!(endpoint = %self.addr, error = %e, "could not remove drained endpoint from the kernel map");
        }
        true
    }
}

/// Deregisters a connection from its endpoint on drop.
pub struct ConnGuard {
    endpoint: Arc<EndpointState>,
    id: u64,
    handed_over: bool,
}

impl ConnGuard {
    /// The connection went to the next agent, with its translation: on
    /// drop it is deregistered here and nothing in the kernel is undone.
    pub fn handed_over(&mut self) {
        self.handed_over = true;
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let info = match self.endpoint.conns.lock() {
            Ok(mut conns) => conns.remove(&self.id),
            Err(_) => None,
        };
        if self.handed_over {
            return;
        }
        if let Some(info) = info {
            self.endpoint.untranslate(&info, true);
        }
        self.endpoint.reap_if_drained();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let e: EndpointAddr = "10.0.0.7:6379".parse().expect("valid");
        assert_eq!(e.to_string(), "10.0.0.7:6379");
        assert_eq!(e.key().port(), 6379);
        for bad in [
            "10.0.0.7",
            "10.0.0.7:0",
            "0.0.0.0:80",
            "[::1]:80",
            "x:1",
            "",
        ] {
            assert!(bad.parse::<EndpointAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn serde_round_trip() {
        let e: EndpointAddr = "10.1.2.3:80".parse().expect("valid");
        let j = serde_json::to_string(&e).expect("ser");
        assert_eq!(j, "\"10.1.2.3:80\"");
        let back: EndpointAddr = serde_json::from_str(&j).expect("de");
        assert_eq!(back, e);
        assert!(serde_json::from_str::<EndpointAddr>("\"nope\"").is_err());
    }
}
