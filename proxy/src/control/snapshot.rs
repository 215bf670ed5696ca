//! The control plane's state as a hand-over carries it to the next agent:
//! endpoints (with their mode), migrations (a hold in progress included,
//! with what is left of its deadline), incoming records, and the counters
//! behind `/metrics`. The relay's connections travel beside it (see
//! `relay::snapshot`) and name the holds they belong to by epoch.
//!
//! Taken while the control plane is frozen ([`Control::freeze`]): no call
//! changes anything between the snapshot and the commit point.
use super::destination::Incoming;
use super::{lock, Control, ControlConfig, Migration};
use crate::endpoint::{EndpointSnapshot, EndpointState, HoldStats};
use crate::intercept::Interception;
use crate::migration::{Forgotten, Phase};
use crate::relay::connection::RelayContext;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything the control plane knows.
#[derive(Default, Serialize, Deserialize)]
pub struct ControlState {
    endpoints: Vec<EndpointSnapshot>,
    migrations: Vec<Migration>,
    incoming: Vec<Incoming>,
    next_epoch: u64,
    forgotten: Forgotten,
    forgotten_incoming: Forgotten,
    aborts_total: u64,
    hold_seconds_total: f64,
    /// The next relayed connection's id.
    next_conn_id: u64,
}

impl ControlState {
    /// How many endpoints it carries.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

/// The holds of a restored control plane, by epoch, for the connections'
/// replays to count into.
pub type Holds = HashMap<u64, Arc<HoldStats>>;

impl Control {
    /// Everything it knows (call while frozen).
    pub fn snapshot(&self) -> ControlState {
        let endpoints = lock(&self.endpoints)
            .values()
            .map(|e| e.snapshot())
            .collect();
        let migrations = lock(&self.migrations).values().cloned().collect();
        let incoming = lock(&self.incoming).values().cloned().collect();
        ControlState {
            endpoints,
            migrations,
            incoming,
            next_epoch: self.next_epoch.load(Ordering::Acquire),
            forgotten: lock(&self.forgotten).clone(),
            forgotten_incoming: lock(&self.forgotten_incoming).clone(),
            aborts_total: self.aborts_total.load(Ordering::Relaxed),
            hold_seconds_total: *lock(&self.hold_seconds_total),
            next_conn_id: self.relay.next_id.load(Ordering::Relaxed),
        }
    }

    /// A control plane with the previous agent's state, and its holds by
    /// epoch. Nothing runs yet: [`Control::rearm`] starts the deadlines.
    /// The kernel's maps came over as they were, so nothing is written to
    /// them here.
    pub fn restore(
        config: ControlConfig,
        intercept: Arc<dyn Interception>,
        relay: RelayContext,
        state: ControlState,
    ) -> (Arc<Self>, Holds) {
        relay
            .next_id
            .store(state.next_conn_id.max(1), Ordering::Relaxed);
        let mut holds: Holds = state
            .migrations
            .iter()
            .map(|m| (m.stats.epoch, m.stats.clone()))
            .collect();
        let hold_cap = relay.hold_cap_per_endpoint;
        let mut endpoints = BTreeMap::new();
        for e in state.endpoints {
            let s = EndpointState::restore(e, intercept.clone(), hold_cap, &mut |epoch| {
                holds
                    .entry(epoch)
                    .or_insert_with(|| {
                        Arc::new(HoldStats {
                            epoch,
                            ..Default::default()
                        })
                    })
                    .clone()
            });
            endpoints.insert(s.addr, s);
        }
        let mut migrations = HashMap::new();
        for mut m in state.migrations {
            m.states = m
                .endpoints
                .iter()
                .filter_map(|a| endpoints.get(a).cloned())
                .collect();
            migrations.insert(m.id.clone(), m);
        }
        let incoming = state
            .incoming
            .into_iter()
            .map(|i| (i.id().to_string(), i))
            .collect();
        let control = Arc::new(Self {
            config,
            intercept,
            relay,
            endpoints: Mutex::new(endpoints),
            migrations: Mutex::new(migrations),
            incoming: Mutex::new(incoming),
            next_epoch: state.next_epoch.into(),
            forgotten: Mutex::new(state.forgotten),
            forgotten_incoming: Mutex::new(state.forgotten_incoming),
            aborts_total: state.aborts_total.into(),
            hold_seconds_total: Mutex::new(state.hold_seconds_total),
            gate: super::Gate::default(),
            agent: Mutex::default(),
        });
        (control, holds)
    }

    /// Starts what the previous agent had running: the deadlines of holds
    /// in progress (with what is left of them) and of incoming records.
    pub fn rearm(self: &Arc<Self>) {
        let holding: Vec<(String, u64, std::time::Duration)> = lock(&self.migrations)
            .values()
            .filter(|m| m.phase == Phase::Holding)
            .map(|m| {
                let left = m.deadline.saturating_sub(m.started.elapsed());
                (m.id.clone(), m.stats.epoch, left)
            })
            .collect();
        for (id, epoch, left) in holding {
            tracing::info!(migration = %id, left = ?left, "hold taken over; its deadline runs on");
            self.spawn_deadline(id, epoch, left);
        }
        let incoming: Vec<(String, Instant)> = lock(&self.incoming)
            .values()
            .filter_map(|i| i.deadline_pending().map(|at| (i.id().to_string(), at)))
            .collect();
        for (id, at) in incoming {
            self.spawn_incoming_deadline(id, at.saturating_duration_since(Instant::now()));
        }
    }
}

/// Instants as milliseconds from the moment they are encoded (negative:
/// past), so that they mean the same in the next agent's clock.
pub(super) mod instant {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::{Duration, Instant};

    pub fn to_ms(t: Instant) -> i64 {
        let now = Instant::now();
        if t >= now {
            (t - now).as_millis().min(i64::MAX as u128) as i64
        } else {
            -((now - t).as_millis().min(i64::MAX as u128) as i64)
        }
    }

    pub fn from_ms(ms: i64) -> Instant {
        let now = Instant::now();
        let d = Duration::from_millis(ms.unsigned_abs());
        if ms >= 0 {
            now.checked_add(d).unwrap_or(now)
        } else {
            now.checked_sub(d).unwrap_or(now)
        }
    }

    pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
        to_ms(*t).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        Ok(from_ms(i64::deserialize(d)?))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(t: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
            t.map(to_ms).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
            Ok(Option::<i64>::deserialize(d)?.map(from_ms))
        }
    }
}

/// A hold's counters, by value.
pub(crate) mod hold {
    use crate::endpoint::HoldStats;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Serialize, Deserialize)]
    struct Counters {
        epoch: u64,
        connections_held: u64,
        connections_queued: u64,
        bytes_held: u64,
        bytes_replayed: u64,
        backends_ended: u64,
        connections_closed: u64,
        close_reason: Option<String>,
    }

    pub fn serialize<S: Serializer>(h: &Arc<HoldStats>, s: S) -> Result<S::Ok, S::Error> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            epoch: h.epoch,
            connections_held: load(&h.connections_held),
            connections_queued: load(&h.connections_queued),
            bytes_held: load(&h.bytes_held),
            bytes_replayed: load(&h.bytes_replayed),
            backends_ended: load(&h.backends_ended),
            connections_closed: load(&h.connections_closed),
            close_reason: h.close_reason.lock().ok().and_then(|r| r.clone()),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<HoldStats>, D::Error> {
        let c = Counters::deserialize(d)?;
        Ok(Arc::new(HoldStats {
            epoch: c.epoch,
            connections_held: c.connections_held.into(),
            connections_queued: c.connections_queued.into(),
            bytes_held: c.bytes_held.into(),
            bytes_replayed: c.bytes_replayed.into(),
            backends_ended: c.backends_ended.into(),
            connections_closed: c.connections_closed.into(),
            close_reason: Mutex::new(c.close_reason),
            quiesced: Default::default(),
        }))
    }
}
