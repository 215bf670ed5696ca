//! The origin side of a migration: hold, release (resume or reconnect, at the
//! same or a new address), abort, and their status. The origin is the node
//! whose proxy holds the clients' connections.
use super::model::{BackendFlow, HoldSpec, MigrationView};
use super::{lock, unix_ms, Control, Migration};
use crate::endpoint::{ConnInfo, EndpointState, HoldStats, Mode};
use crate::error::ControlError;
use crate::migration::{self, Phase, ReleaseMode, Request, Step};
use shepherd_common::{
    FlowKey, EP_INTERCEPT, EP_SHIELD, MARK_POD_FIN, MARK_RST, MARK_SEEN, ROLE_ORIGIN,
};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

impl Control {
    // ---- migrations ------------------------------------------------------

    /// Holds the endpoints and waits until every held connection's backend
    /// has acknowledged all bytes written to it (or the quiesce timeout).
    pub async fn hold(
        self: &Arc<Self>,
        id: &str,
        req: &HoldSpec,
    ) -> Result<MigrationView, ControlError> {
        let _op = self.op()?;
        migration::validate_id(id).map_err(ControlError::Invalid)?;
        if req.endpoints.is_empty() {
            return Err(ControlError::Invalid(
                "a hold needs at least one endpoint".into(),
            ));
        }
        let mut wanted = req.endpoints.clone();
        wanted.sort();
        wanted.dedup();
        if req.to.is_some() {
            // Refused before anything is held (see `target`).
            super::one_pod_address(&wanted)?;
        }
        let deadline = migration::bounded_ms(
            "deadline_ms",
            req.deadline_ms,
            migration::MAX_DEADLINE,
            false,
        )
        .map_err(ControlError::Invalid)?
        .unwrap_or(self.config.default_deadline);
        let quiesce_timeout = migration::bounded_ms(
            "quiesce_timeout_ms",
            req.quiesce_timeout_ms,
            migration::MAX_QUIESCE_TIMEOUT,
            true,
        )
        .map_err(ControlError::Invalid)?
        .unwrap_or(self.config.quiesce_timeout);

        let (states, stats, started) = {
            let eps = lock(&self.endpoints);
            let mut migs = lock(&self.migrations);
            if lock(&self.forgotten).contains(id) {
                return Err(ControlError::Conflict(format!(
                    "migration {id} finished and its record is no longer kept; use a new id \
                     for a new migration"
                )));
            }
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
                for gone in prune_finished(&mut migs) {
                    lock(&self.forgotten).insert(gone);
                }
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
                        target: None,
                        replaced: Default::default(),
                        lingering: Vec::new(),
                        states: states.clone(),
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
            // Registered before counting, so a connection that quiesces in
            // between still wakes us.
            let notified = stats.quiesced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
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
            // Connections notify as they quiesce; the timer covers one that
            // closed instead (it leaves the registry without notifying).
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        };
        let mut migs = lock(&self.migrations);
        let m = migs
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        if m.quiesce.is_none() && m.phase == Phase::Holding {
            let took = started.elapsed();
            m.quiesce = Some(if quiesced { Ok(took) } else { Err(took) });
        }
        if let Some(to) = req.to {
            drop(migs);
            // All or nothing: a hold whose flows cannot be translated (the
            // kernel's table is full) is not left in place.
            return self.target(id, to).map_err(|e| {
                let why = format!("target failed: {e}");
                let _ = self.abort(id, Some(why.clone()));
                match e {
                    ControlError::Limit(m) => ControlError::Limit(format!(
                        "{m}; the hold was aborted: clients go on with the pod where it is"
                    )),
                    other => other,
                }
            });
        }
        Ok(self.status_of(m))
    }

    pub(super) fn spawn_deadline(self: &Arc<Self>, id: String, epoch: u64, deadline: Duration) {
        let control = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let Some(control) = control.upgrade() else {
                return;
            };
            // Not while a hand-over is in progress: the hold is the next
            // agent's if it commits, this one's again if not.
            let Some(_op) = control.op_when_open().await else {
                return;
            };
            let due = lock(&control.migrations)
                .get(&id)
                .is_some_and(|m| m.phase == Phase::Holding && m.stats.epoch == epoch);
            if !due {
                return;
            }
            // Past the restore, an abort would lose what a release keeps:
            // the pod's restored sockets already speak from its target.
            let decision = match control.restored_at_target(&id) {
                Some(seen) => Some((seen.answers().await, seen)),
                None => None,
            };
            match decision {
                Some((true, seen)) => {
                    let to = seen.target;
                    tracing::warn!(migration = %id, ?deadline, %to, seen = seen.flows, held = seen.held, "hold deadline passed without a release, but the pod answers at its target; releasing there (resume)");
                    let why = format!(
                        "deadline: no release came, but the pod's restored connections answer at \
                         its target {to} ({} of {} held flows) and it accepts connections there; \
                         released there in resume mode",
                        seen.flows, seen.held
                    );
                    let mode = ReleaseMode::Resume;
                    let _ = control.finish(
                        &id,
                        Request::Release(mode),
                        Some(why),
                        Some(mode),
                        Some(to),
                    );
                }
                Some((false, seen)) => {
                    tracing::warn!(migration = %id, ?deadline, to = %seen.target, "hold deadline passed without a release; the pod spoke from its target but does not answer there; aborting");
                    let why = format!(
                        "deadline (the pod's connections spoke from its target {}, but it accepts \
                         no connection there: a restore that failed late?)",
                        seen.target
                    );
                    let _ = control.finish(&id, Request::Abort, Some(why), None, None);
                }
                None => {
                    tracing::warn!(migration = %id, ?deadline, "hold deadline passed without a release; aborting");
                    let _ =
                        control.finish(&id, Request::Abort, Some("deadline".into()), None, None);
                }
            }
        });
    }

    /// Whether the pod of a hold with a target was restored there with its
    /// connections: a segment from the target address crossed this node on
    /// one of the held flows (a restored socket sends a window probe as it
    /// leaves repair mode), and the pod's side of it has not closed since
    /// (a restore that fails late kills the sockets it had restored). The deadline
    /// then also asks the pod itself ([`RestoredAt::answers`]) and, if it
    /// answers, releases the hold instead of aborting it: the restore is the
    /// migration's point of no return, and aborting after it would send the
    /// replay to an address the pod has left.
    fn restored_at_target(&self, id: &str) -> Option<RestoredAt> {
        // The flows' keys under the lock; the kernel is asked without it.
        let (target, port, keys) = {
            let migs = lock(&self.migrations);
            let m = migs.get(id)?;
            let keys: Vec<FlowKey> = m
                .states
                .iter()
                .flat_map(|s| s.connections())
                .filter_map(|c| conn_flow_key(&c))
                .collect();
            (m.target?, m.endpoints.first()?.0.port(), keys)
        };
        let new_addr = u32::from_ne_bytes(target.octets());
        let flows = keys
            .iter()
            .filter(|key| {
                let ours = matches!(
                    self.intercept.translation(**key),
                    Ok(Some(t)) if t.role == ROLE_ORIGIN && t.new_addr == new_addr
                );
                ours && matches!(
                    self.intercept.translation_marks(**key),
                    Ok(Some(marks)) if marks[MARK_SEEN] != 0
                        && marks[MARK_POD_FIN] == 0
                        && marks[MARK_RST] == 0
                )
            })
            .count();
        (flows > 0).then_some(RestoredAt {
            target,
            port,
            flows,
            held: keys.len(),
        })
    }

    /// Ends a hold: held bytes are replayed to the pod, in order.
    /// `resume`: into the same backend sockets (the pod's connections were
    /// restored). `reconnect`: into new backend connections, to `to` if the
    /// pod came back at a new address. `to` defaults to the migration's
    /// target, if `target` set one.
    pub fn release(
        &self,
        id: &str,
        mode: ReleaseMode,
        to: Option<&str>,
    ) -> Result<MigrationView, ControlError> {
        let _op = self.op()?;
        let to: Option<Ipv4Addr> = to
            .map(|t| {
                t.parse().map_err(|_| {
                    ControlError::Invalid(format!(
                        "invalid address {t:?} for --to: expected an IPv4 address"
                    ))
                })
            })
            .transpose()?;
        if let (Some(ip), ReleaseMode::Resume) = (to, mode) {
            // The restored sockets keep their old address: translate.
            self.set_target(id, ip)?;
        }
        // Without `to`, new connections go where `target` said the pod is:
        // its old address may no longer reach it.
        let to = to.or_else(|| lock(&self.migrations).get(id).and_then(|m| m.target));
        self.finish(id, Request::Release(mode), None, Some(mode), to)
    }

    pub fn abort(&self, id: &str, reason: Option<String>) -> Result<MigrationView, ControlError> {
        let _op = self.op()?;
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
    ) -> Result<MigrationView, ControlError> {
        let eps = lock(&self.endpoints);
        let mut migs = lock(&self.migrations);
        let m = migs
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        match migration::decide(id, m.phase, &request, m.reason.as_deref(), m.mode)
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
                if phase == Phase::Aborted && m.target.is_some() {
                    // The pod stays where it was: its held connections'
                    // backend flows go back to what they were before
                    // `target`: untranslated, or an earlier migration's.
                    for state in &m.states {
                        for c in state.connections() {
                            let prev =
                                conn_flow_key(&c).and_then(|k| Some((k, *m.replaced.get(&k)?)));
                            let Some((key, prev)) = prev else {
                                state.untranslate(&c, false);
                                continue;
                            };
                            match self.intercept.set_translation(key, prev) {
                                // Marked after it is set: a connection that
                                // closed meanwhile refuses, and the entry goes.
                                Ok(()) if !c.mark_translated(key) => state.remove_translation(key),
                                Ok(()) => {}
                                Err(e) => {
                                    tracing::warn!(migration = id, error = %e, "could not restore a flow's earlier translation")
                                }
                            }
                        }
                    }
                    m.replaced.clear();
                }
                // The pod has left its previous address (or, aborted, is
                // back on it, whose entry the abort has just put back):
                // entries kept for it go unless they are live again.
                for (rev, key) in std::mem::take(&mut m.lingering) {
                    let live = matches!(
                        self.intercept.translation(key),
                        Ok(Some(t)) if key.with_pod_addr(t.new_addr) == rev
                    );
                    if !live {
                        if let Err(e) = self.intercept.remove_translation(rev) {
                            tracing::warn!(migration = id, error = %e, "could not remove a kept translation");
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

    pub fn status(&self, id: &str) -> Result<MigrationView, ControlError> {
        self.status_with(id, true)
    }

    /// `flows: false` leaves `backend_flows` empty: one entry per held
    /// connection is the costly part of a status at thousands of connections,
    /// and a controller polling for progress does not need it.
    pub fn status_with(&self, id: &str, flows: bool) -> Result<MigrationView, ControlError> {
        let migs = lock(&self.migrations);
        let m = migs
            .get(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        Ok(self.status_flows(m, flows))
    }

    pub fn list_migrations(&self) -> Vec<MigrationView> {
        self.list_migrations_with(true)
    }

    pub fn list_migrations_with(&self, flows: bool) -> Vec<MigrationView> {
        let migs = lock(&self.migrations);
        let mut v: Vec<MigrationView> =
            migs.values().map(|m| self.status_flows(m, flows)).collect();
        v.sort_by_key(|s| s.started_unix_ms);
        v
    }

    fn status_of(&self, m: &Migration) -> MigrationView {
        self.status_flows(m, true)
    }

    fn status_flows(&self, m: &Migration, flows: bool) -> MigrationView {
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
        MigrationView {
            id: m.id.clone(),
            state: m.phase,
            reason,
            endpoints: m.endpoints.clone(),
            mode: m.mode,
            connections: held + queued,
            connections_queued: queued,
            connections_closed: closed,
            backends_ended: s.backends_ended.load(Ordering::Relaxed),
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
            target: m.target,
            backend_flows: if flows {
                backend_flows(&m.states)
            } else {
                Vec::new()
            },
            packets_translated: m
                .endpoints
                .iter()
                .map(|a| self.intercept.stats(a.key()).translated)
                .sum(),
        }
    }

    /// Records where the pod lands and, if its address changes, starts
    /// translating the held connections' backend flows (origin side), so the
    /// restored sockets, still bound to the old address, keep reaching us.
    /// Call it before the restore; `release --to` calls it too.
    pub fn target(&self, id: &str, to: Ipv4Addr) -> Result<MigrationView, ControlError> {
        let _op = self.op()?;
        self.set_target(id, to)
    }

    fn set_target(&self, id: &str, to: Ipv4Addr) -> Result<MigrationView, ControlError> {
        let mut migs = lock(&self.migrations);
        let m = migs
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        match m.target {
            Some(t) if t == to => return Ok(self.status_of(m)),
            Some(t) => {
                return Err(ControlError::Conflict(format!(
                    "migration {id} already targets {t}; it cannot be changed to {to}"
                )))
            }
            None => {}
        }
        if m.phase != Phase::Holding {
            return Err(ControlError::Conflict(format!(
                "migration {id} is already {}; a target can only be set while holding",
                m.phase
            )));
        }
        super::one_pod_address(&m.endpoints)?;
        // One snapshot of the held connections serves every step below.
        let conns: Vec<(&Arc<EndpointState>, Arc<ConnInfo>)> = m
            .states
            .iter()
            .flat_map(|s| s.connections().into_iter().map(move |c| (s, c)))
            .collect();
        let flows: Vec<BackendFlow> = conns.iter().filter_map(|(_, c)| backend_flow(c)).collect();
        // Flows an earlier migration moved are translated already: keep
        // what they had, for an abort.
        let mut replaced = std::collections::HashMap::new();
        for (_, c) in &conns {
            if let Some(key) = conn_flow_key(c) {
                // Only this side's: a destination entry for the same flow
                // (the pod was restored beside this proxy) is not ours to
                // put back.
                if let Ok(Some(prev)) = self.intercept.translation(key) {
                    if prev.role == ROLE_ORIGIN {
                        replaced.insert(key, prev);
                    }
                }
            }
        }
        let installed = match self.translate_flows(&m.endpoints, to, &flows, ROLE_ORIGIN) {
            Ok(i) => i,
            Err(e) => {
                // All or nothing: the rollback removed what it overwrote.
                for (key, prev) in replaced {
                    let _ = self.intercept.set_translation(key, prev);
                }
                return Err(e);
            }
        };
        m.replaced = replaced;
        // Only now that nothing can fail: flows back at the address their
        // sockets use need no translation, and what earlier migrations
        // installed for them goes (an abort puts it back from `replaced`).
        for (state, c) in &conns {
            if backend_flow(c).map(|f| flow_pod_addr(c, &f)) == Some(to) {
                state.untranslate(c, false);
            }
        }
        // The pod is still at its previous address until it is frozen:
        // what it sends from there (a reply already on its way when the
        // hold began) must still be translated back, or this node resets
        // it and the checkpoint captures a connection the proxy no longer
        // has. Retargeting dropped that entry; it comes back until the
        // hold ends. After the untranslation above, which removes a flow's
        // entries under both of its addresses.
        let mut lingering = Vec::new();
        for (key, prev) in &m.replaced {
            let rev = key.with_pod_addr(prev.new_addr);
            let prev_new = Ipv4Addr::from(prev.new_addr.to_ne_bytes());
            if rev == *key || prev_new == to {
                continue;
            }
            match self.intercept.keep_entry(rev, *prev) {
                Ok(()) => lingering.push((rev, *key)),
                Err(e) => {
                    tracing::warn!(migration = id, error = %e, "could not keep a flow's previous translation back")
                }
            }
        }
        m.lingering = lingering;
        // Each connection removes its entry when its backend socket is done,
        // so the map does not fill up across migrations.
        let mut unclaimed: std::collections::HashSet<FlowKey> = installed.iter().copied().collect();
        for (state, c) in &conns {
            let Some(key) = conn_flow_key(c) else {
                continue;
            };
            if unclaimed.remove(&key) && !c.mark_translated(key) {
                state.remove_translation(key);
            }
        }
        // A connection that closed between the two lists: nobody will
        // remove its entry, so it goes now.
        for key in unclaimed {
            if let Err(e) = self.intercept.remove_translation(key) {
                tracing::warn!(migration = id, error = %e, "could not remove a closed flow's translation");
            }
        }
        m.target = Some(to);
        tracing::info!(migration = id, %to, flows = installed.len(), "target set; translating backend flows");
        Ok(self.status_of(m))
    }
}

/// What a deadline found of a pod restored at its target.
struct RestoredAt {
    target: Ipv4Addr,
    /// One of the held endpoints' ports.
    port: u16,
    /// Held flows whose pod side spoke from the target.
    flows: usize,
    held: usize,
}

impl RestoredAt {
    /// How long the pod has to accept the deadline's connection.
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

    /// Whether the pod accepts a connection at its target: a restore that
    /// failed after its sockets left repair mode left nothing listening
    /// there (and the destination's shield drops the refusal, so that
    /// shows as a timeout). The connection is closed at once.
    async fn answers(&self) -> bool {
        let at = SocketAddrV4::new(self.target, self.port);
        matches!(
            tokio::time::timeout(Self::PROBE_TIMEOUT, tokio::net::TcpStream::connect(at)).await,
            Ok(Ok(_))
        )
    }
}

/// A connection's backend flow, once its backend socket exists. Its pod
/// address is the one the socket connected to: the endpoint's, or where an
/// earlier migration had moved the pod when the connection opened.
fn backend_flow(c: &ConnInfo) -> Option<BackendFlow> {
    let b = c.backend.lock().ok().and_then(|b| *b)?;
    match b.local {
        SocketAddr::V4(node) => Some(BackendFlow {
            node,
            pod_port: b.peer.port(),
            // Only when it is not the endpoint's own: a destination that
            // predates the field refuses it, and most flows never need it.
            pod_addr: Some(*b.peer.ip()).filter(|a| a != c.orig_dst.ip()),
        }),
        SocketAddr::V6(_) => None,
    }
}

/// The pod address backend flow `f` of connection `c` uses.
fn flow_pod_addr(c: &ConnInfo, f: &BackendFlow) -> Ipv4Addr {
    f.pod_addr.unwrap_or(*c.orig_dst.ip())
}

/// The translation key of a connection's backend flow (under the pod
/// address its sockets use), once its backend socket exists.
pub(super) fn conn_flow_key(c: &ConnInfo) -> Option<FlowKey> {
    let f = backend_flow(c)?;
    Some(FlowKey::new(
        f.node.ip().octets(),
        f.node.port(),
        flow_pod_addr(c, &f).octets(),
        f.pod_port,
    ))
}

/// The backend flows of the connections of these endpoints.
fn backend_flows(states: &[Arc<EndpointState>]) -> Vec<BackendFlow> {
    let mut flows: Vec<BackendFlow> = states
        .iter()
        .flat_map(|s| s.connections())
        .filter_map(|c| backend_flow(&c))
        .collect();
    flows.sort();
    flows
}

/// Finished migrations (released or aborted) kept for `status`; older ones
/// are forgotten, oldest first, as new ones start. A controller reads a
/// migration's outcome right after it ends; keeping every record made the
/// status of a long-running agent grow without bound.
pub const FINISHED_KEPT: usize = 64;

/// Forgets the oldest finished migrations beyond [`FINISHED_KEPT`] (minus
/// one, for the one about to start); returns their ids.
fn prune_finished(migs: &mut std::collections::HashMap<String, Migration>) -> Vec<String> {
    let mut finished: Vec<(Instant, String)> = migs
        .values()
        .filter_map(|m| m.ended.map(|t| (t, m.id.clone())))
        .collect();
    if finished.len() < FINISHED_KEPT {
        return Vec::new();
    }
    finished.sort();
    let n = finished.len() + 1 - FINISHED_KEPT;
    finished
        .into_iter()
        .take(n)
        .map(|(_, id)| {
            migs.remove(&id);
            id
        })
        .collect()
}
