//! Kernel-side interception, behind the small [`Interception`] trait so the
//! control plane and relay can be tested in-process without root.
//!
//! [`ebpf::EbpfInterception`] is the real one: it loads the embedded eBPF
//! object, attaches `intercept` and `rst_shield` with tcx (links die with the
//! agent, so a crashed agent leaves no program steering traffic to a dead
//! listener), and [`routing`] installs the local-delivery policy route. The
//! `translate_*` programs are attached too (origin side on the client-facing
//! interfaces, destination side on the pod-facing ones); they act only on the
//! flows a migration lists.
pub mod ebpf;
pub mod pin;
pub mod routing;

use shepherd_common::{EndpointKey, EndpointStats, FlowKey, Translation};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("the eBPF object is not embedded in this build; run `cargo xtask build-ebpf` and rebuild shepherd")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
    #[error("program {program} could not be loaded or attached to {iface}: {detail}")]
    Attach {
        program: &'static str,
        iface: String,
        detail: String,
    },
    #[error("interface {0:?} does not exist in this network namespace; check --intercept-iface/--shield-iface")]
    NoSuchInterface(String),
    #[error("map {map}: {detail}")]
    Map { map: &'static str, detail: String },
    #[error("map {map} is full")]
    Full { map: &'static str },
    #[error("policy routing ({step}): {detail}")]
    Routing { step: &'static str, detail: String },
}

impl InterceptError {
    /// A map had no room for a new entry.
    pub fn is_full(&self) -> bool {
        matches!(self, InterceptError::Full { .. })
    }
}

/// How full the kernel's flow maps are (for `/metrics` and the soak). The
/// LRU map of proxied client flows is not counted: it fills up to its
/// capacity and stays there by design, and counting it walks 65,536 keys.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Entries of `SHEPHERD_TRANSLATE` (two per translated backend flow).
    pub translations: usize,
}

/// What the control plane needs from the kernel side.
pub trait Interception: Send + Sync {
    /// Creates or updates an endpoint's entry with `EP_*` flags.
    fn set_endpoint(&self, key: EndpointKey, flags: u32) -> Result<(), InterceptError>;
    /// Deletes an endpoint's entry and counters.
    fn remove_endpoint(&self, key: EndpointKey) -> Result<(), InterceptError>;
    /// An endpoint entry's flags, if it has one (a draining endpoint's are 0).
    fn endpoint_flags(&self, key: EndpointKey) -> Option<u32>;
    /// Counters of an endpoint (zero if unknown).
    fn stats(&self, key: EndpointKey) -> EndpointStats;
    /// Starts rewriting a migrated backend flow's pod address.
    fn set_translation(&self, flow: FlowKey, t: Translation) -> Result<(), InterceptError>;
    /// Stops rewriting a flow (no-op if it was not translated).
    fn remove_translation(&self, flow: FlowKey) -> Result<(), InterceptError>;
    /// Installs `t` under `key` alone (not under its other address too):
    /// the pod→node entry of a flow's previous translation, kept while the
    /// pod may still answer from its previous address.
    fn keep_entry(&self, key: FlowKey, t: Translation) -> Result<(), InterceptError>;
    /// A flow's translation, as installed (`None` if it is not translated).
    fn translation(&self, flow: FlowKey) -> Result<Option<Translation>, InterceptError>;
    /// What the translate programs have seen of a translated flow
    /// ([`Translation::marks`], both of its entries merged); `None` if the
    /// flow is not translated.
    fn translation_marks(&self, flow: FlowKey) -> Result<Option<[u8; 8]>, InterceptError>;
    /// How full the flow maps are.
    fn occupancy(&self) -> Occupancy {
        Occupancy::default()
    }
}

/// An in-memory stand-in used by unit tests (no kernel involved): records the
/// flags each endpoint was given.
#[derive(Default)]
pub struct RecordingInterception {
    pub entries: Mutex<std::collections::HashMap<(u32, u16), u32>>,
    pub translations: Mutex<std::collections::HashMap<FlowKey, Translation>>,
}

impl Interception for RecordingInterception {
    fn endpoint_flags(&self, key: EndpointKey) -> Option<u32> {
        self.entries
            .lock()
            .ok()?
            .get(&(key.addr, key.port))
            .copied()
    }
    fn set_endpoint(&self, key: EndpointKey, flags: u32) -> Result<(), InterceptError> {
        if let Ok(mut e) = self.entries.lock() {
            e.insert((key.addr, key.port), flags);
        }
        Ok(())
    }
    fn remove_endpoint(&self, key: EndpointKey) -> Result<(), InterceptError> {
        if let Ok(mut e) = self.entries.lock() {
            e.remove(&(key.addr, key.port));
        }
        Ok(())
    }
    fn stats(&self, _key: EndpointKey) -> EndpointStats {
        EndpointStats::default()
    }
    fn set_translation(&self, flow: FlowKey, t: Translation) -> Result<(), InterceptError> {
        if let Ok(mut m) = self.translations.lock() {
            m.insert(flow, t);
        }
        Ok(())
    }
    fn remove_translation(&self, flow: FlowKey) -> Result<(), InterceptError> {
        // As the kernel map: the entry under the flow's new address goes too.
        if let Ok(mut m) = self.translations.lock() {
            if let Some(t) = m.remove(&flow) {
                let new = flow.with_pod_addr(t.new_addr);
                if new != flow {
                    m.remove(&new);
                }
            }
        }
        Ok(())
    }
    fn keep_entry(&self, key: FlowKey, t: Translation) -> Result<(), InterceptError> {
        if let Ok(mut m) = self.translations.lock() {
            m.insert(key, t);
        }
        Ok(())
    }
    fn translation(&self, flow: FlowKey) -> Result<Option<Translation>, InterceptError> {
        let m = self.translations.lock().map_err(|_| InterceptError::Map {
            map: "translations",
            detail: "lock poisoned".into(),
        })?;
        Ok(m.get(&flow).copied())
    }
    fn translation_marks(&self, flow: FlowKey) -> Result<Option<[u8; 8]>, InterceptError> {
        Ok(self.translation(flow)?.map(|t| t.marks))
    }
}
