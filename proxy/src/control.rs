//! The control plane: managed endpoints and migrations. Every operation the
//! API (and so the CLI) offers is implemented once, here.
//!
//! Locking: `endpoints` then `migrations`, never the other way round; no lock
//! is held across an await.
use crate::api::types::{ConnectionInfo, EndpointInfo, HoldRequest, MigrationStatus};
use crate::endpoint::{EndpointAddr, EndpointState, HoldStats, Mode};
use crate::error::ControlError;
use crate::intercept::Interception;
use crate::migration::{self, Phase, ReleaseMode, Request, Step};
use crate::relay::connection::RelayContext;
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
}

struct Migration {
    id: String,
    endpoints: Vec<EndpointAddr>,
    phase: Phase,
    reason: Option<String>,
    mode: Option<ReleaseMode>,
    stats: Arc<HoldStats>,
    started: Instant,
    started_wall: SystemTime,
    ended: Option<Instant>,
    deadline: Duration,
    quiesce: Option<Result<Duration, Duration>>,
    /// RSTs shielded per endpoint when the hold began.
    rsts_at_start: u64,
}

pub struct Control {
    config: ControlConfig,
    intercept: Arc<dyn Interception>,
    relay: RelayContext,
    endpoints: Mutex<BTreeMap<EndpointAddr, Arc<EndpointState>>>,
    migrations: Mutex<HashMap<String, Migration>>,
    next_epoch: AtomicU64,
    pub aborts_total: AtomicU64,
    hold_seconds_total: Mutex<f64>,
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
            next_epoch: AtomicU64::new(1),
            aborts_total: AtomicU64::new(0),
            hold_seconds_total: Mutex::new(0.0),
        })
    }

    pub fn relay_context(&self) -> RelayContext {
        self.relay.clone()
    }

    /// The live state of the endpoint a connection was addressed to.
    pub fn endpoint_for(&self, dst: SocketAddrV4) -> Option<Arc<EndpointState>> {
        lock(&self.endpoints).get(&EndpointAddr(dst)).cloned()
    }

    // ---- endpoints -------------------------------------------------------

    /// Registers endpoints (idempotent; re-adding a draining one revives it).
    pub fn add_endpoints(&self, addrs: &[EndpointAddr]) -> Result<Vec<EndpointInfo>, ControlError> {
        if addrs.is_empty() {
            return Err(ControlError::Invalid("no endpoints given".into()));
        }
        let mut eps = lock(&self.endpoints);
        for addr in addrs {
            let state = eps
                .entry(*addr)
                .or_insert_with(|| EndpointState::new(*addr, self.intercept.clone()))
                .clone();
            state.set_draining(false);
            let flags = match state.mode() {
                Mode::Holding(_) => EP_INTERCEPT | EP_SHIELD,
                Mode::Forwarding { .. } => EP_INTERCEPT,
            };
            if let Err(e) = self.intercept.set_endpoint(addr.key(), flags) {
                eps.remove(addr);
                return Err(e.into());
            }
            tracing::info!(endpoint = %addr, "endpoint registered");
        }
        drop(eps);
        Ok(addrs.iter().filter_map(|a| self.endpoint_info(a)).collect())
    }

    /// Unregisters an endpoint. Its existing connections keep flowing (the
    /// kernel entry stays, marked draining, until the last one closes); new
    /// connections go to the pod directly.
    pub fn remove_endpoint(&self, addr: &EndpointAddr) -> Result<(), ControlError> {
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

    pub fn list_endpoints(&self) -> Vec<EndpointInfo> {
        let addrs: Vec<EndpointAddr> = lock(&self.endpoints).keys().copied().collect();
        addrs.iter().filter_map(|a| self.endpoint_info(a)).collect()
    }

    fn endpoint_info(&self, addr: &EndpointAddr) -> Option<EndpointInfo> {
        let state = lock(&self.endpoints).get(addr).cloned()?;
        let k = self.intercept.stats(addr.key());
        let migration = self.migration_holding(addr);
        let held = matches!(state.mode(), Mode::Holding(_));
        Some(EndpointInfo {
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
        })
    }

    fn migration_holding(&self, addr: &EndpointAddr) -> Option<String> {
        lock(&self.migrations)
            .values()
            .find(|m| m.phase == Phase::Holding && m.endpoints.contains(addr))
            .map(|m| m.id.clone())
    }

    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let states: Vec<Arc<EndpointState>> = lock(&self.endpoints).values().cloned().collect();
        let mut out: Vec<ConnectionInfo> = states
            .iter()
            .flat_map(|s| s.connections())
            .map(|c| ConnectionInfo {
                id: c.id,
                client: c.client.to_string(),
                endpoint: c.orig_dst.to_string(),
                backend_local: c
                    .backend_local
                    .lock()
                    .ok()
                    .and_then(|l| l.map(|a| a.to_string())),
                bytes_up: c.bytes_up.load(Ordering::Relaxed),
                bytes_down: c.bytes_down.load(Ordering::Relaxed),
                queued: c.queued.load(Ordering::Relaxed),
                opened_unix_ms: unix_ms(c.opened),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    // ---- migrations ------------------------------------------------------

    /// Holds the endpoints and waits until every held connection's backend
    /// has acknowledged all bytes written to it (or the quiesce timeout).
    pub async fn hold(
        self: &Arc<Self>,
        id: &str,
        req: &HoldRequest,
    ) -> Result<MigrationStatus, ControlError> {
        migration::validate_id(id).map_err(ControlError::Invalid)?;
        if req.endpoints.is_empty() {
            return Err(ControlError::Invalid(
                "a hold needs at least one endpoint".into(),
            ));
        }
        let mut wanted = req.endpoints.clone();
        wanted.sort();
        wanted.dedup();
        let deadline = req
            .deadline_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.default_deadline);
        if deadline.is_zero() {
            return Err(ControlError::Invalid("deadline_ms must be > 0".into()));
        }
        let quiesce_timeout = req
            .quiesce_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.quiesce_timeout);

        let (states, stats, started) = {
            let eps = lock(&self.endpoints);
            let mut migs = lock(&self.migrations);
            if let Some(m) = migs.get(id) {
                migration::decide_repeat_hold(id, m.phase, m.endpoints == wanted)
                    .map_err(ControlError::Conflict)?;
                if m.quiesce.is_some() {
                    return Ok(self.status_of(m));
                }
            }
            let mut states = Vec::new();
            for addr in &wanted {
                let state = eps
                    .get(addr)
                    .filter(|s| !s.is_draining())
                    .ok_or(ControlError::UnknownEndpoint(*addr))?;
                if let Some(other) = migs
                    .values()
                    .find(|m| m.phase == Phase::Holding && m.id != id && m.endpoints.contains(addr))
                {
                    return Err(ControlError::Conflict(format!(
                        "endpoint {addr} is already held by migration {}",
                        other.id
                    )));
                }
                states.push(state.clone());
            }
            if let Some(m) = migs.get(id) {
                (states, m.stats.clone(), m.started)
            } else {
                let stats = Arc::new(HoldStats {
                    epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed),
                    ..Default::default()
                });
                for s in &states {
                    self.intercept
                        .set_endpoint(s.addr.key(), EP_INTERCEPT | EP_SHIELD)?;
                }
                let rsts_at_start = wanted
                    .iter()
                    .map(|a| self.intercept.stats(a.key()).rsts_shielded)
                    .sum();
                for s in &states {
                    s.set_mode(Mode::Holding(stats.clone()));
                }
                let started = Instant::now();
                migs.insert(
                    id.to_string(),
                    Migration {
                        id: id.to_string(),
                        endpoints: wanted.clone(),
                        phase: Phase::Holding,
                        reason: None,
                        mode: None,
                        stats: stats.clone(),
                        started,
                        started_wall: SystemTime::now(),
                        ended: None,
                        deadline,
                        quiesce: None,
                        rsts_at_start,
                    },
                );
                tracing::info!(migration = id, endpoints = ?wanted, ?deadline, "hold");
                self.spawn_deadline(id.to_string(), stats.epoch, deadline);
                (states, stats, started)
            }
        };

        // Wait for quiescence, outside every lock.
        let wait_start = Instant::now();
        let quiesced = loop {
            let pending = states
                .iter()
                .flat_map(|s| s.connections())
                .filter(|c| c.quiesced_epoch.load(Ordering::Acquire) < stats.epoch)
                .count();
            if pending == 0 {
                break true;
            }
            if wait_start.elapsed() >= quiesce_timeout {
                tracing::warn!(
                    migration = id,
                    pending,
                    "hold: backends still have unacknowledged bytes"
                );
                break false;
            }
            let still_holding =
                lock(&self.migrations).get(id).map(|m| m.phase) == Some(Phase::Holding);
            if !still_holding {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let mut migs = lock(&self.migrations);
        let m = migs
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        if m.quiesce.is_none() && m.phase == Phase::Holding {
            let took = started.elapsed();
            m.quiesce = Some(if quiesced { Ok(took) } else { Err(took) });
        }
        Ok(self.status_of(m))
    }

    fn spawn_deadline(self: &Arc<Self>, id: String, epoch: u64, deadline: Duration) {
        let control = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let Some(control) = control.upgrade() else {
                return;
            };
            let due = lock(&control.migrations)
                .get(&id)
                .is_some_and(|m| m.phase == Phase::Holding && m.stats.epoch == epoch);
            if due {
                tracing::warn!(migration = %id, ?deadline, "hold deadline passed without a release; aborting");
                let _ = control.finish(&id, Request::Abort, Some("deadline".into()), None, None);
            }
        });
    }

    /// Ends a hold: held bytes are replayed to the pod, in order.
    /// `resume`: into the same backend sockets (the pod's connections were
    /// restored). `reconnect`: into new backend connections, to `to` if the
    /// pod came back at a new address.
    pub fn release(
        &self,
        id: &str,
        mode: ReleaseMode,
        to: Option<&str>,
    ) -> Result<MigrationStatus, ControlError> {
        let to: Option<Ipv4Addr> = to
            .map(|t| {
                t.parse().map_err(|_| {
                    ControlError::Invalid(format!(
                        "invalid address {t:?} for --to: expected an IPv4 address"
                    ))
                })
            })
            .transpose()?;
        if to.is_some() && mode == ReleaseMode::Resume {
            return Err(ControlError::Unsupported(
                "resuming restored connections at a new address needs address translation, which is not available in this version; use --mode reconnect --to NEW_IP".into(),
            ));
        }
        self.finish(id, Request::Release, None, Some(mode), to)
    }

    pub fn abort(&self, id: &str, reason: Option<String>) -> Result<MigrationStatus, ControlError> {
        self.finish(
            id,
            Request::Abort,
            Some(reason.unwrap_or_else(|| "requested".into())),
            None,
            None,
        )
    }

    /// Ends a hold: the endpoints forward again (towards the same backends,
    /// which is also what an abort means), and held bytes are replayed.
    fn finish(
        &self,
        id: &str,
        request: Request,
        reason: Option<String>,
        mode: Option<ReleaseMode>,
        to: Option<Ipv4Addr>,
    ) -> Result<MigrationStatus, ControlError> {
        let eps = lock(&self.endpoints);
        let mut migs = lock(&self.migrations);
        let m = migs
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        match migration::decide(id, m.phase, &request, m.reason.as_deref())
            .map_err(ControlError::Conflict)?
        {
            Step::AlreadyThere => return Ok(self.status_of(m)),
            Step::Go(phase) => {
                for addr in &m.endpoints {
                    if let Some(state) = eps.get(addr) {
                        if let Some(ip) = to {
                            state.set_backend(SocketAddrV4::new(ip, addr.0.port()));
                        }
                        state.set_mode(Mode::Forwarding {
                            after: Some(m.stats.clone()),
                            reconnect: mode == Some(ReleaseMode::Reconnect),
                        });
                        if let Err(e) = self.intercept.set_endpoint(addr.key(), EP_INTERCEPT) {
                            tracing::warn!(endpoint = %addr, error = %e, "could not lift the RST shield");
                        }
                    }
                }
                m.phase = phase;
                m.reason = reason;
                m.mode = mode;
                m.ended = Some(Instant::now());
                *lock(&self.hold_seconds_total) += m.started.elapsed().as_secs_f64();
                if phase == Phase::Aborted {
                    self.aborts_total.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(migration = id, state = %phase, reason = ?m.reason, held_for = ?m.started.elapsed(), "hold ended");
            }
        }
        Ok(self.status_of(m))
    }

    pub fn status(&self, id: &str) -> Result<MigrationStatus, ControlError> {
        let migs = lock(&self.migrations);
        let m = migs
            .get(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        Ok(self.status_of(m))
    }

    pub fn list_migrations(&self) -> Vec<MigrationStatus> {
        let migs = lock(&self.migrations);
        let mut v: Vec<MigrationStatus> = migs.values().map(|m| self.status_of(m)).collect();
        v.sort_by_key(|s| s.started_unix_ms);
        v
    }

    fn status_of(&self, m: &Migration) -> MigrationStatus {
        let s = &m.stats;
        let closed = s.connections_closed.load(Ordering::Relaxed);
        let mut reason = m.reason.clone();
        if closed > 0 {
            let why = s
                .close_reason
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_default();
            let note = format!("{closed} connection(s) closed cleanly: {why}");
            reason = Some(match reason {
                Some(r) => format!("{r}; {note}"),
                None => note,
            });
        }
        let rsts_now: u64 = m
            .endpoints
            .iter()
            .map(|a| self.intercept.stats(a.key()).rsts_shielded)
            .sum();
        let held = s.connections_held.load(Ordering::Relaxed);
        let queued = s.connections_queued.load(Ordering::Relaxed);
        MigrationStatus {
            id: m.id.clone(),
            state: m.phase,
            reason,
            endpoints: m.endpoints.clone(),
            mode: m.mode,
            connections: held + queued,
            connections_queued: queued,
            connections_closed: closed,
            quiescent: matches!(m.quiesce, Some(Ok(_))),
            quiesce_ms: m.quiesce.map(|q| match q {
                Ok(d) | Err(d) => d.as_millis() as u64,
            }),
            bytes_held: s.bytes_held.load(Ordering::Relaxed),
            bytes_replayed: s.bytes_replayed.load(Ordering::Relaxed),
            hold_duration_ms: m
                .ended
                .unwrap_or_else(Instant::now)
                .duration_since(m.started)
                .as_millis() as u64,
            deadline_ms: m.deadline.as_millis() as u64,
            rsts_shielded: rsts_now.saturating_sub(m.rsts_at_start),
            started_unix_ms: unix_ms(m.started_wall),
        }
    }

    // ---- metrics ---------------------------------------------------------

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let eps = self.list_endpoints();
        let migs = self.list_migrations();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per_ep = |f: &dyn Fn(&EndpointInfo) -> f64| -> Vec<(String, f64)> {
            eps.iter()
                .map(|e| (format!("{{endpoint=\"{}\"}}", e.endpoint), f(e)))
                .collect()
        };
        metric(
            "shepherd_endpoints",
            "gauge",
            "Managed endpoints.",
            vec![(String::new(), eps.len() as f64)],
        );
        metric(
            "shepherd_connections",
            "gauge",
            "Open relayed connections.",
            per_ep(&|e| e.connections as f64),
        );
        metric(
            "shepherd_connections_total",
            "counter",
            "Relayed connections accepted.",
            per_ep(&|e| e.connections_total as f64),
        );
        metric(
            "shepherd_intercepted_packets_total",
            "counter",
            "Packets steered to the proxy by eBPF.",
            per_ep(&|e| e.packets_intercepted as f64),
        );
        metric(
            "shepherd_intercepted_bytes_total",
            "counter",
            "Bytes steered to the proxy by eBPF.",
            per_ep(&|e| e.bytes_intercepted as f64),
        );
        metric(
            "shepherd_rsts_shielded_total",
            "counter",
            "RSTs from held endpoints dropped by eBPF.",
            per_ep(&|e| e.rsts_shielded as f64),
        );
        metric(
            "shepherd_hold_buffer_bytes",
            "gauge",
            "Client bytes queued in hold buffers.",
            vec![(String::new(), self.relay.budget.used() as f64)],
        );
        metric(
            "shepherd_hold_buffer_capacity_bytes",
            "gauge",
            "Node-wide hold buffer cap.",
            vec![(String::new(), self.relay.budget.capacity() as f64)],
        );
        let count = |p: Phase| migs.iter().filter(|m| m.state == p).count() as f64;
        metric(
            "shepherd_migrations",
            "gauge",
            "Migrations known to this agent, by state.",
            [Phase::Holding, Phase::Released, Phase::Aborted]
                .into_iter()
                .map(|p| (format!("{{state=\"{p}\"}}"), count(p)))
                .collect(),
        );
        metric(
            "shepherd_aborts_total",
            "counter",
            "Migrations aborted (requested or deadline).",
            vec![(
                String::new(),
                self.aborts_total.load(Ordering::Relaxed) as f64,
            )],
        );
        metric(
            "shepherd_bytes_held_total",
            "counter",
            "Client bytes held across all migrations.",
            vec![(
                String::new(),
                migs.iter().map(|m| m.bytes_held as f64).sum(),
            )],
        );
        metric(
            "shepherd_bytes_replayed_total",
            "counter",
            "Held bytes replayed to pods.",
            vec![(
                String::new(),
                migs.iter().map(|m| m.bytes_replayed as f64).sum(),
            )],
        );
        metric(
            "shepherd_hold_seconds_total",
            "counter",
            "Total time endpoints spent held (ended holds).",
            vec![(String::new(), *lock(&self.hold_seconds_total))],
        );
        out
    }
}
