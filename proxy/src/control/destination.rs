//! The destination side of a migration: the node where the pod is restored.
//!
//! Before the restore the controller tells this agent what is coming
//! (`incoming`): it shields the pod's endpoints (RSTs from them are dropped on
//! the pod-facing interfaces, so a route that races ahead of the restore
//! cannot reset a client) and, when the pod's address changes, translates the
//! migrated backend flows between the old address (which the restored sockets
//! still use, kept on the pod's `lo`) and the new one (the only one on the
//! wire). Flows of this node's own proxy (a pod restored beside the proxy
//! that holds its connections) are shielded but not translated: both ends
//! meet on the pod-facing side at the old addresses. `complete` lifts the
//! shield. The translations outlive the
//! migration, as the flows they serve do: each one goes when the translate
//! programs have seen its flow end (an RST, or a FIN each way) and TIME_WAIT
//! is over ([`Control::sweep_ended_flows`], run every 10 s by the agent).
use super::model::{BackendFlow, IncomingSpec, IncomingView};
use super::{lock, translated_key, Control};
use crate::endpoint::EndpointAddr;
use crate::error::ControlError;
use crate::migration;
use shepherd_common::{
    EndpointKey, FlowKey, Translation, EP_INTERCEPT, EP_SHIELD, MARK_REUSED, MARK_SEEN, ROLE_DEST,
    ROLE_ORIGIN,
};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a translated flow's entries outlive the end of the flow seen on
/// the wire: the side in TIME_WAIT (60 s on Linux) may still answer a
/// retransmitted FIN through them.
pub const ENDED_FLOW_LINGER: Duration = Duration::from_secs(65);

/// How long after a migration its deadline ended (no `complete` came) a
/// flow none of whose pod-side segments crossed this node keeps its
/// entries: the pod was never restored here. (A failure the controller
/// reports, `complete` with a reason, undoes them at once.) A restored
/// established socket sends a window probe as it leaves repair mode, so a
/// flow that did arrive is seen within moments.
pub const UNSEEN_FLOW_LIMIT: Duration = Duration::from_secs(600);

/// What the sweep knows of one translated flow.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
struct FlowWatch {
    /// When the sweep first saw the flow ended.
    #[serde(with = "super::snapshot::instant::option")]
    ended: Option<Instant>,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Incoming {
    id: String,
    endpoints: Vec<EndpointAddr>,
    to: Option<Ipv4Addr>,
    flows: Vec<BackendFlow>,
    completed: bool,
    reason: Option<String>,
    /// Kernel entries shielded: the endpoints at their old and new address,
    /// and at each flow's `pod_addr`.
    shielded: Vec<EndpointKey>,
    /// Counters kept when the shield is lifted (entries may be removed).
    final_rsts: u64,
    final_translated: u64,
    /// When `complete` (or the deadline) lifted the shield.
    #[serde(with = "super::snapshot::instant::option")]
    completed_at: Option<Instant>,
    /// What the sweep knows of each translated flow (see
    /// [`Control::sweep_ended_flows`]).
    watch: HashMap<BackendFlow, FlowWatch>,
    /// Flows whose entries the sweep removed: a repeated `incoming` must not
    /// install them again.
    swept: HashSet<BackendFlow>,
    /// Entries of other records this one overwrote (the pod moves on from
    /// this node to this node, or a retry): a failure the controller reports
    /// puts them back.
    overwritten: HashMap<FlowKey, Overwritten>,
    /// Completed by its deadline, not by the controller: a reason the
    /// controller gives later still counts as its word.
    by_deadline: bool,
    /// When its deadline completes it, if it has one.
    #[serde(with = "super::snapshot::instant::option")]
    deadline_at: Option<Instant>,
}

/// What [`Control::install`] did: the entries it made, those it overwrote
/// (as they were), and the shield entries it raised.
struct Installed {
    keys: Vec<FlowKey>,
    prev: HashMap<FlowKey, Translation>,
    shielded: Vec<EndpointKey>,
}

/// An earlier record's entry that `incoming` overwrote.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Overwritten {
    prev: Translation,
    owner: String,
    flow: BackendFlow,
}

impl Incoming {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// When its deadline is due, if it has one and nothing completed it.
    pub(super) fn deadline_pending(&self) -> Option<Instant> {
        self.deadline_at.filter(|_| !self.completed)
    }

    /// Keeps the translated flows for which `keep` says so, handing it each
    /// one's key and the record's watch and swept sets. Flows with nothing
    /// to translate (and every flow of a record without a new address) stay.
    fn retain_translated(
        &mut self,
        mut keep: impl FnMut(
            &BackendFlow,
            FlowKey,
            &mut HashMap<BackendFlow, FlowWatch>,
            &mut HashSet<BackendFlow>,
        ) -> bool,
    ) {
        let Some(to) = self.to else { return };
        let Incoming {
            endpoints,
            flows,
            watch,
            swept,
            ..
        } = self;
        flows.retain(|f| match translated_key(endpoints, to, f) {
            Some((key, _)) => keep(f, key, watch, swept),
            None => true,
        });
    }
}

impl Control {
    /// Prepares this node for a pod that is about to be restored here.
    /// Idempotent; a repeat with the same endpoints and address may add flows
    /// (the shield can go up before the origin holds and knows its flows).
    /// Different endpoints or address under the same id are a conflict.
    pub fn incoming(
        self: &Arc<Self>,
        id: &str,
        req: &IncomingSpec,
    ) -> Result<IncomingView, ControlError> {
        let _op = self.op()?;
        migration::validate_id(id).map_err(ControlError::Invalid)?;
        if lock(&self.forgotten_incoming).contains(id) {
            return Err(ControlError::Conflict(format!(
                "incoming migration {id} was retired (the pod left this node); use a new id"
            )));
        }
        // 0 has always meant "no deadline" here.
        migration::bounded_ms(
            "deadline_ms",
            req.deadline_ms.filter(|ms| *ms > 0),
            migration::MAX_DEADLINE,
            false,
        )
        .map_err(ControlError::Invalid)?;
        if req.endpoints.is_empty() {
            return Err(ControlError::Invalid(
                "incoming needs at least one endpoint".into(),
            ));
        }
        if req.to.is_some() {
            super::one_pod_address(&req.endpoints)?;
        }
        if !req.flows.is_empty() && req.to.is_none() {
            return Err(ControlError::Invalid(
                "flows are only translated when the pod's address changes: give \"to\"".into(),
            ));
        }
        let mut endpoints = req.endpoints.clone();
        endpoints.sort();
        endpoints.dedup();
        let mut flows = req.flows.clone();
        for f in &mut flows {
            let Some(ep) = endpoints.iter().find(|e| e.0.port() == f.pod_port) else {
                return Err(ControlError::Invalid(format!(
                    "flow {} > pod port {} matches none of the endpoints",
                    f.node, f.pod_port
                )));
            };
            if let Some(a) = f.pod_addr {
                if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                    return Err(ControlError::Invalid(format!(
                        "flow {} > {a}:{}: pod_addr must be a unicast address",
                        f.node, f.pod_port
                    )));
                }
            }
            // One spelling per flow: the endpoint's own address is implied.
            if f.pod_addr == Some(*ep.0.ip()) {
                f.pod_addr = None;
            }
        }
        flows.sort();
        flows.dedup();
        // Shielded whether or not they are translated here (below).
        let shield_flows = flows.clone();
        if let Some(to) = req.to {
            let own_conns = self.own_backend_flows();
            // Two kinds of flow need nothing here:
            // - one already at `to`;
            // - one of this node's own proxy (the pod comes back to the
            //   node it left). The proxy's and the pod's sockets meet on the
            //   pod-facing side, both at the flow's old address; the origin
            //   side's entries (`target`) act only where packets leave the
            //   node. This side's entries put over them would rewrite the
            //   pod's replies to an address the proxy's socket does not
            //   know.
            flows.retain(|f| {
                let Some((key, _)) = translated_key(&endpoints, to, f) else {
                    return false;
                };
                // A live connection of this agent's proxy, or an entry
                // `target` installed for one (whichever came first).
                let own = own_conns.contains(&key)
                    || self
                        .intercept
                        .translation(key)
                        .ok()
                        .flatten()
                        .is_some_and(|t| t.role == ROLE_ORIGIN);
                if own {
                    tracing::info!(migration = id, flow = %f.node, "incoming: flow of this node's own proxy, not translated here");
                }
                !own
            });
        }
        let registered: Vec<EndpointAddr> = lock(&self.endpoints).keys().copied().collect();
        let mut incoming = lock(&self.incoming);
        if let Some(existing) = incoming.get_mut(id) {
            if existing.endpoints != endpoints || existing.to != req.to {
                return Err(ControlError::Conflict(format!(
                    "incoming migration {id} was prepared with different endpoints or address; use a new id"
                )));
            }
            // Same migration: flows may arrive after the shield (the origin
            // knows them only once it holds). Add the new ones.
            let fresh: Vec<BackendFlow> = flows
                .into_iter()
                .filter(|f| !existing.flows.contains(f) && !existing.swept.contains(f))
                .collect();
            if !fresh.is_empty() && existing.reason.is_some() && !existing.by_deadline {
                return Err(ControlError::Conflict(format!(
                    "incoming migration {id} was completed as failed; use a new id for a retry"
                )));
            }
            let fresh_shield: Vec<BackendFlow> = shield_flows
                .into_iter()
                .filter(|f| !existing.swept.contains(f))
                .collect();
            // Flows from a connection opened after an earlier move use the
            // address the pod had then: shield that one too (while the
            // shield is up).
            let Installed {
                keys,
                prev,
                shielded,
            } = self.install(
                &existing.endpoints,
                existing.to,
                &fresh,
                (!existing.completed).then_some(&fresh_shield[..]),
                &registered,
                &existing.shielded,
            )?;
            existing.shielded.extend(shielded);
            let given = take_over(&mut incoming, id, &keys);
            let Some(existing) = incoming.get_mut(id) else {
                return Err(ControlError::UnknownMigration(id.to_string()));
            };
            existing.overwritten.extend(overwritten(given, &prev));
            existing.flows.extend(fresh);
            existing.flows.sort();
            return Ok(self.incoming_status_of(existing));
        }
        // On an error nothing is left: no record will exist to lift or
        // sweep anything.
        let Installed {
            keys,
            prev,
            shielded,
        } = self.install(
            &endpoints,
            req.to,
            &flows,
            Some(&shield_flows),
            &registered,
            &[],
        )?;
        let given = take_over(&mut incoming, id, &keys);
        let rec = Incoming {
            id: id.to_string(),
            endpoints,
            to: req.to,
            flows,
            completed: false,
            reason: None,
            shielded,
            final_rsts: 0,
            final_translated: 0,
            completed_at: None,
            watch: HashMap::new(),
            swept: HashSet::new(),
            overwritten: overwritten(given, &prev),
            by_deadline: false,
            deadline_at: None,
        };
        tracing::info!(migration = id, endpoints = ?rec.endpoints, to = ?rec.to, flows = rec.flows.len(), "incoming: shielding and translating");
        let status = self.incoming_status_of(&rec);
        incoming.insert(id.to_string(), rec);
        drop(incoming);
        if let Some(ms) = req.deadline_ms.filter(|ms| *ms > 0) {
            let after = Duration::from_millis(ms);
            if let Some(rec) = lock(&self.incoming).get_mut(id) {
                rec.deadline_at = Some(Instant::now() + after);
            }
            self.spawn_incoming_deadline(id.to_string(), after);
        }
        Ok(status)
    }

    /// Completes incoming `id` as failed ("deadline") after `after`, unless
    /// it was completed by then.
    pub(super) fn spawn_incoming_deadline(self: &Arc<Self>, id: String, after: Duration) {
        let control = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(control) = control.upgrade() {
                let Some(_op) = control.op_when_open().await else {
                    return;
                };
                // Only if nobody completed it: a migration completed as
                // a success must not turn into a failure now.
                let _ = control.complete(&id, Some("deadline".into()), false);
            }
        });
    }

    /// Lifts the shield of an incoming migration (idempotent). A `reason`
    /// says it failed; it may also come after a completion without one.
    /// Either way its translations are undone at once (see
    /// [`undo_translations`](Self::undo_translations)).
    pub fn complete_incoming(
        &self,
        id: &str,
        reason: Option<String>,
    ) -> Result<IncomingView, ControlError> {
        let _op = self.op()?;
        self.complete(id, reason, true)
    }

    /// The pod that `incoming` `id` brought to this node has left it (it
    /// moved on): its flows will never cross this node again, so their
    /// translations go now instead of waiting for ends the sweep would
    /// never see, and the record is forgotten. Entries a later record has
    /// taken over stay theirs. Only a completed record can be retired.
    pub fn retire_incoming(&self, id: &str) -> Result<(), ControlError> {
        let _op = self.op()?;
        let mut incoming = lock(&self.incoming);
        let rec = incoming
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        if !rec.completed {
            return Err(ControlError::Conflict(format!(
                "incoming migration {id} is not complete: complete it (the restore is done, or \
                 failed) before retiring it"
            )));
        }
        let to = rec.to;
        let mut removed = 0;
        rec.retain_translated(|f, key, _, _| {
            let ours = match (self.intercept.translation(key), to) {
                (Ok(Some(t)), Some(to)) => t.new_addr == u32::from_ne_bytes(to.octets()),
                _ => false,
            };
            if ours {
                match self.intercept.remove_translation(key) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(migration = %id, flow = %f.node, error = %e, "could not remove a retired migration's translation"),
                }
            }
            false
        });
        incoming.remove(id);
        lock(&self.forgotten_incoming).insert(id.to_string());
        // Nothing is given back to a record that is gone: a failure of a
        // later one removes what it installed.
        for other in incoming.values_mut() {
            other.overwritten.retain(|_, o| o.owner != id);
        }
        tracing::info!(
            migration = id,
            translations = removed,
            "incoming retired: the pod left this node"
        );
        Ok(())
    }

    /// `by_controller`: the controller's call, not the deadline's. Only the
    /// controller knows a restore failed: its reason may come after a
    /// completion without one (it learned later), and it puts back the
    /// entries this record overwrote. The deadline's only lets the sweep
    /// remove flows never seen here.
    fn complete(
        &self,
        id: &str,
        reason: Option<String>,
        by_controller: bool,
    ) -> Result<IncomingView, ControlError> {
        let registered: Vec<EndpointAddr> = lock(&self.endpoints).keys().copied().collect();
        let mut incoming = lock(&self.incoming);
        let rec = incoming
            .get_mut(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        let failed = by_controller && reason.is_some();
        if rec.completed {
            // A controller that learns later that the restore failed may
            // still say so (see `undo_translations`), also after the
            // deadline completed it.
            if failed && (rec.reason.is_none() || rec.by_deadline) {
                rec.reason = reason;
                rec.by_deadline = false;
                rec.completed_at = Some(Instant::now());
                self.undo_translations(&mut incoming, id);
            }
        } else {
            let (rsts, translated) = self.incoming_counters(rec);
            rec.final_rsts = rsts;
            rec.final_translated = translated;
            self.lift_shield(&rec.shielded, &registered);
            rec.completed = true;
            rec.completed_at = Some(Instant::now());
            rec.reason = reason;
            rec.by_deadline = !by_controller;
            tracing::info!(migration = id, reason = ?rec.reason, "incoming: shield lifted");
            if failed {
                self.undo_translations(&mut incoming, id);
            }
        }
        let rec = incoming
            .get(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        Ok(self.incoming_status_of(rec))
    }

    /// A migration the controller says failed undoes its translations at
    /// once: the pod is not here, or it is here from before (it failed to
    /// move on), and then this record's entries would rewrite its replies.
    /// Entries it made anew go; those it overwrote go back to their earlier
    /// translation, and to the record that had them.
    fn undo_translations(&self, incoming: &mut HashMap<String, Incoming>, id: &str) {
        let Some(rec) = incoming.get_mut(id) else {
            return;
        };
        let mut over = std::mem::take(&mut rec.overwritten);
        let mut give_back = Vec::new();
        let mut removed = 0;
        // Flows this record still holds. One whose kernel entry cannot be
        // changed stays listed, so a later sweep can still remove it.
        rec.retain_translated(|f, key, watch, swept| {
            let done = match over.remove(&key) {
                Some(o) => match self.intercept.set_translation(key, o.prev) {
                    Ok(()) => {
                        give_back.push((o.owner, o.flow));
                        true
                    }
                    Err(e) => {
                        tracing::warn!(migration = %id, flow = %f.node, error = %e, "could not put back a flow's earlier translation; removing it");
                        self.intercept.remove_translation(key).is_ok()
                    }
                },
                None => match self.intercept.remove_translation(key) {
                    Ok(()) => {
                        removed += 1;
                        true
                    }
                    Err(e) => {
                        tracing::warn!(migration = %id, flow = %f.node, error = %e, "could not remove a failed migration's translation");
                        false
                    }
                },
            };
            if done {
                watch.remove(f);
                swept.insert(*f);
            }
            !done
        });
        // Keys this record gave away since (a retry, or the pod moving on
        // again) are not touched in the kernel: their holder inherits what
        // this record would have put back, so this failed record's
        // translation never comes back. Keys whose flow ended here are gone.
        for other in incoming.values_mut().filter(|r| r.id != id) {
            other.overwritten.retain(|key, o| {
                if o.owner != id {
                    return true;
                }
                match over.remove(key) {
                    Some(mine) => {
                        *o = mine;
                        true
                    }
                    None => false,
                }
            });
        }
        for (owner, flow) in give_back {
            if let Some(owner) = incoming.get_mut(&owner) {
                owner.swept.remove(&flow);
                if !owner.flows.contains(&flow) {
                    owner.flows.push(flow);
                    owner.flows.sort();
                }
            }
        }
        tracing::info!(
            migration = id,
            removed,
            "incoming failed: its translations are undone"
        );
    }

    /// Puts back entries an `incoming` overwrote and then had to remove (its
    /// own rollback).
    fn put_back(&self, prev: &HashMap<FlowKey, Translation>) {
        for (key, t) in prev {
            if let Err(e) = self.intercept.set_translation(*key, *t) {
                tracing::warn!(error = %e, "could not put back an earlier translation");
            }
        }
    }

    /// This node's destination entries for `flows` as they are now (before
    /// an `incoming` overwrites them), by key.
    fn dest_entries(
        &self,
        endpoints: &[EndpointAddr],
        to: Ipv4Addr,
        flows: &[BackendFlow],
    ) -> HashMap<FlowKey, Translation> {
        flows
            .iter()
            .filter_map(|f| {
                let (key, _) = translated_key(endpoints, to, f)?;
                let t = self.intercept.translation(key).ok()??;
                (t.role == ROLE_DEST).then_some((key, t))
            })
            .collect()
    }

    /// Removes the destination's translations that no flow needs any more,
    /// as the translate programs' marks tell:
    /// - the flow ended (an RST, or a FIN each way) at least
    ///   [`ENDED_FLOW_LINGER`] before `now`, so its TIME_WAIT is over;
    /// - a new connection reused the flow's wire tuple (at once);
    /// - the migration's deadline ended it [`UNSEEN_FLOW_LIMIT`] before
    ///   `now` (a reason from the controller undoes them at once), and no pod-side
    ///   segment of the flow ever crossed this node (the pod never came
    ///   back here). After a completion without a reason the flows are
    ///   taken to have arrived: a restored socket that is half closed sends
    ///   nothing until it has something to say.
    ///
    /// The origin removes its own entries when its backend sockets close;
    /// here the sockets are the pod's, so without this the map would fill
    /// up across migrations. A flow that was seen here and whose end never
    /// crosses this node (the pod migrated on, or its netns was deleted
    /// under it) keeps its entries. Returns how many flows' entries went.
    pub fn sweep_ended_flows(&self, now: Instant) -> usize {
        // Not during a hand-over: the next sweep (or the next agent's) does it.
        let Ok(_op) = self.op() else { return 0 };
        let mut removed = 0;
        let mut incoming = lock(&self.incoming);
        for rec in incoming.values_mut() {
            // Failed, and long enough ago: flows never seen here go.
            let failed_long_ago = rec.reason.is_some()
                && rec
                    .completed_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= UNSEEN_FLOW_LIMIT);
            let id = rec.id.clone();
            rec.retain_translated(|f, key, watch, swept| {
                let marks = match self.intercept.translation_marks(key) {
                    Ok(Some(marks)) => marks,
                    // Gone already: nothing to watch.
                    Ok(None) => {
                        watch.remove(f);
                        return false;
                    }
                    Err(e) => {
                        tracing::debug!(migration = %id, flow = %f.node, error = %e, "could not read a flow's translation");
                        return true;
                    }
                };
                let w = watch.entry(*f).or_default();
                let done = if marks[MARK_REUSED] != 0 {
                    true
                } else if Translation::ended(marks) {
                    let since = *w.ended.get_or_insert(now);
                    now.saturating_duration_since(since) >= ENDED_FLOW_LINGER
                } else {
                    w.ended = None;
                    failed_long_ago && marks[MARK_SEEN] == 0
                };
                if !done {
                    return true;
                }
                if let Err(e) = self.intercept.remove_translation(key) {
                    tracing::warn!(migration = %id, flow = %f.node, error = %e, "could not remove a finished flow's translation");
                    return true;
                }
                watch.remove(f);
                swept.insert(*f);
                removed += 1;
                false
            });
        }
        if removed > 0 {
            tracing::info!(
                flows = removed,
                "incoming: removed the translations of finished flows"
            );
        }
        removed
    }

    /// The translation keys (under the pod address their sockets use) of
    /// this agent's own live backend flows.
    fn own_backend_flows(&self) -> HashSet<FlowKey> {
        let states: Vec<_> = lock(&self.endpoints).values().cloned().collect();
        states
            .iter()
            .flat_map(|s| s.connections())
            .filter_map(|c| super::origin::conn_flow_key(&c))
            .collect()
    }

    /// Translates `flows` (when the pod's address changes, to `to`) and,
    /// given `shield_flows`, raises the shield on the endpoints' addresses,
    /// those flows' and those the replaced entries had (see
    /// [`prev_addrs`]), leaving out what `shielded` has up already. All or
    /// nothing: translate first, and if anything fails, undo what this call
    /// did and put back the entries it overwrote.
    fn install(
        &self,
        endpoints: &[EndpointAddr],
        to: Option<Ipv4Addr>,
        flows: &[BackendFlow],
        shield_flows: Option<&[BackendFlow]>,
        registered: &[EndpointAddr],
        shielded: &[EndpointKey],
    ) -> Result<Installed, ControlError> {
        let (keys, prev) = match to {
            Some(to) => {
                let prev = self.dest_entries(endpoints, to, flows);
                match self.translate_flows(endpoints, to, flows, ROLE_DEST) {
                    Ok(keys) => (keys, prev),
                    Err(e) => {
                        // `translate_flows` removed its own entries.
                        self.put_back(&prev);
                        return Err(e);
                    }
                }
            }
            None => Default::default(),
        };
        let mut added = Vec::new();
        if let Some(shield_flows) = shield_flows {
            let mut wanted = shield_addrs(endpoints, to, shield_flows);
            wanted.extend(prev_addrs(&prev));
            if let Err(e) = self.shield(&wanted, registered, shielded, &mut added) {
                self.lift_shield(&added, registered);
                for k in &keys {
                    let _ = self.intercept.remove_translation(*k);
                }
                self.put_back(&prev);
                return Err(e);
            }
        }
        Ok(Installed {
            keys,
            prev,
            shielded: added,
        })
    }

    /// Raises the shield on each of `addrs` not already in `done`, pushing
    /// the keys it set to `added` (so a failure can be undone).
    fn shield(
        &self,
        addrs: &[EndpointAddr],
        registered: &[EndpointAddr],
        done: &[EndpointKey],
        added: &mut Vec<EndpointKey>,
    ) -> Result<(), ControlError> {
        for ep in addrs {
            if done.contains(&ep.key()) || added.contains(&ep.key()) {
                continue;
            }
            let flags = if registered.contains(ep) {
                EP_INTERCEPT | EP_SHIELD
            } else {
                EP_SHIELD
            };
            self.intercept.set_endpoint(ep.key(), flags)?;
            added.push(ep.key());
        }
        Ok(())
    }

    /// Takes `shielded` entries back to what they were before `incoming`:
    /// intercepting if the endpoint is registered here, else gone.
    fn lift_shield(&self, shielded: &[EndpointKey], registered: &[EndpointAddr]) {
        for key in shielded {
            let ep = EndpointAddr(SocketAddrV4::new(key.octets().into(), key.port()));
            let result = if registered.contains(&ep) {
                self.intercept.set_endpoint(*key, EP_INTERCEPT)
            } else {
                self.intercept.remove_endpoint(*key)
            };
            if let Err(e) = result {
                tracing::warn!(endpoint = %ep, error = %e, "could not lift the shield");
            }
        }
    }

    pub fn incoming_status(&self, id: &str) -> Result<IncomingView, ControlError> {
        let incoming = lock(&self.incoming);
        let rec = incoming
            .get(id)
            .ok_or_else(|| ControlError::UnknownMigration(id.to_string()))?;
        Ok(self.incoming_status_of(rec))
    }

    fn incoming_counters(&self, rec: &Incoming) -> (u64, u64) {
        rec.shielded.iter().fold((0, 0), |(r, t), k| {
            let s = self.intercept.stats(*k);
            (r + s.rsts_shielded, t + s.translated)
        })
    }

    fn incoming_status_of(&self, rec: &Incoming) -> IncomingView {
        let (rsts, translated) = if rec.completed {
            (rec.final_rsts, rec.final_translated)
        } else {
            self.incoming_counters(rec)
        };
        IncomingView {
            id: rec.id.clone(),
            state: if rec.completed {
                "completed"
            } else {
                "shielding"
            }
            .into(),
            reason: rec.reason.clone(),
            endpoints: rec.endpoints.clone(),
            to: rec.to,
            flows: rec.flows.clone(),
            rsts_shielded: rsts,
            packets_translated: translated,
        }
    }
}

/// Where the restored pod's sockets may send from: each endpoint at its old
/// address and at `to`, and at the pod address of any flow that uses
/// another one (a connection opened after an earlier move).
fn shield_addrs(
    endpoints: &[EndpointAddr],
    to: Option<Ipv4Addr>,
    flows: &[BackendFlow],
) -> Vec<EndpointAddr> {
    let mut addrs: Vec<EndpointAddr> = endpoints.to_vec();
    if let Some(to) = to {
        addrs.extend(
            endpoints
                .iter()
                .map(|e| EndpointAddr(SocketAddrV4::new(to, e.0.port()))),
        );
    }
    addrs.extend(
        flows
            .iter()
            .filter_map(|f| Some(EndpointAddr(SocketAddrV4::new(f.pod_addr?, f.pod_port)))),
    );
    addrs.sort();
    addrs.dedup();
    addrs
}

/// The addresses the pod had under the entries an `incoming` overwrites (it
/// is moving on from this node): if the move fails, the origin's abort may
/// send to them before the failure is reported here and the entries put
/// back, and the pod's kernel must not reset those flows meanwhile.
fn prev_addrs(prev: &HashMap<FlowKey, Translation>) -> Vec<EndpointAddr> {
    prev.iter()
        .map(|(k, t)| {
            EndpointAddr(SocketAddrV4::new(
                Ipv4Addr::from(t.new_addr.to_ne_bytes()),
                u16::from_be_bytes(k.pod_port.to_ne_bytes()),
            ))
        })
        .collect()
}

/// Entries `keys` now belong to incoming migration `id` (it has just
/// installed them: a retry of a migration that failed, or the pod moving on
/// from this node): other records stop watching them, so their sweep cannot
/// remove what `id` needs. Returns what was given away: each key, the
/// record that had it, and its flow there.
fn take_over(
    incoming: &mut HashMap<String, Incoming>,
    id: &str,
    keys: &[FlowKey],
) -> Vec<(FlowKey, String, BackendFlow)> {
    let mut given = Vec::new();
    if keys.is_empty() {
        return given;
    }
    let keys: HashSet<FlowKey> = keys.iter().copied().collect();
    for rec in incoming.values_mut().filter(|r| r.id != id) {
        let owner = rec.id.clone();
        rec.retain_translated(|f, key, watch, swept| {
            if !keys.contains(&key) {
                return true;
            }
            // Given away: a late repeat of that record's `incoming` must not
            // take it back.
            watch.remove(f);
            swept.insert(*f);
            given.push((key, owner.clone(), *f));
            false
        });
    }
    given
}

/// The overwritten entries to keep for a failure, from what `take_over`
/// gave away and the entries as they were before (`dest_entries`).
fn overwritten(
    given: Vec<(FlowKey, String, BackendFlow)>,
    prev: &HashMap<FlowKey, Translation>,
) -> HashMap<FlowKey, Overwritten> {
    given
        .into_iter()
        .filter_map(|(key, owner, flow)| {
            let prev = *prev.get(&key)?;
            Some((key, Overwritten { prev, owner, flow }))
        })
        .collect()
}
