//! The real interception: the embedded eBPF object, its programs attached to
//! the configured interfaces, and its maps.
//!
//! Must never leave state behind: programs are attached as tcx links owned by
//! this value and go away with it (or with the agent process).
use super::{InterceptError, Interception};
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap, SockHash};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use shepherd_common::{
    EndpointConfig, EndpointKey, EndpointStats, FlowKey, Translation, MAP_ENDPOINTS, MAP_LISTENER,
    MAP_LISTENER_COUNT, MAP_STATS, MAP_TRANSLATE, MAP_TRANSLATING, MAX_LISTENERS, PROG_INTERCEPT,
    PROG_RST_SHIELD, PROG_TRANSLATE_DEST_IN, PROG_TRANSLATE_DEST_OUT, PROG_TRANSLATE_ORIGIN_IN,
    PROG_TRANSLATE_ORIGIN_OUT,
};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

/// `SHEPHERD_TRANSLATE` and its entry count in `SHEPHERD_TRANSLATING`, kept
/// in step under one lock.
struct Translations {
    flows: HashMap<MapData, FlowKey, Translation>,
    count: Array<MapData, u32>,
    installed: u32,
}

impl Translations {
    fn publish(&mut self, n: u32) -> Result<(), InterceptError> {
        self.count.set(0, n, 0).map_err(map_err(MAP_TRANSLATING))?;
        self.installed = n;
        Ok(())
    }
}

/// The object built by `cargo xtask build-ebpf` (empty if it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shepherd.bpf.o"));

pub struct EbpfInterception {
    endpoints: Mutex<HashMap<MapData, EndpointKey, EndpointConfig>>,
    stats: Mutex<PerCpuHashMap<MapData, EndpointKey, EndpointStats>>,
    translate: Mutex<Translations>,
    _listener: SockHash<MapData, u32>,
    /// Keeps programs and their links alive.
    _ebpf: Ebpf,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InterceptError {
    move |e| InterceptError::Map {
        map,
        detail: e.to_string(),
    }
}

impl EbpfInterception {
    /// Loads the programs, attaches `intercept` to `intercept_ifaces` and
    /// `rst_shield` to `shield_ifaces` (ingress), and registers `listeners`
    /// (one per data-plane thread) as the sockets SYNs are assigned to.
    pub fn load(
        intercept_ifaces: &[String],
        shield_ifaces: &[String],
        listeners: &[impl AsRawFd],
    ) -> Result<Self, InterceptError> {
        if OBJECT.is_empty() {
            return Err(InterceptError::NoObject);
        }
        if listeners.is_empty() || listeners.len() > MAX_LISTENERS as usize {
            return Err(InterceptError::Map {
                map: MAP_LISTENER,
                detail: format!(
                    "{} listeners given; 1 to {MAX_LISTENERS} fit",
                    listeners.len()
                ),
            });
        }
        for iface in intercept_ifaces.iter().chain(shield_ifaces) {
            if nix_if_index(iface).is_none() {
                return Err(InterceptError::NoSuchInterface(iface.clone()));
            }
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| InterceptError::Load(e.to_string()))?;
        use TcAttachType::{Egress, Ingress};
        attach(&mut ebpf, PROG_INTERCEPT, intercept_ifaces, Ingress)?;
        attach(
            &mut ebpf,
            PROG_TRANSLATE_ORIGIN_IN,
            intercept_ifaces,
            Ingress,
        )?;
        attach(
            &mut ebpf,
            PROG_TRANSLATE_ORIGIN_OUT,
            intercept_ifaces,
            Egress,
        )?;
        attach(&mut ebpf, PROG_RST_SHIELD, shield_ifaces, Ingress)?;
        attach(&mut ebpf, PROG_TRANSLATE_DEST_IN, shield_ifaces, Ingress)?;
        attach(&mut ebpf, PROG_TRANSLATE_DEST_OUT, shield_ifaces, Egress)?;

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(InterceptError::Map {
                map: name,
                detail: "missing from the object".into(),
            })
        };
        let endpoints =
            HashMap::try_from(take(&mut ebpf, MAP_ENDPOINTS)?).map_err(map_err(MAP_ENDPOINTS))?;
        let stats =
            PerCpuHashMap::try_from(take(&mut ebpf, MAP_STATS)?).map_err(map_err(MAP_STATS))?;
        let translate = Translations {
            flows: HashMap::try_from(take(&mut ebpf, MAP_TRANSLATE)?)
                .map_err(map_err(MAP_TRANSLATE))?,
            count: Array::try_from(take(&mut ebpf, MAP_TRANSLATING)?)
                .map_err(map_err(MAP_TRANSLATING))?,
            installed: 0,
        };
        let mut sockhash: SockHash<MapData, u32> =
            SockHash::try_from(take(&mut ebpf, MAP_LISTENER)?).map_err(map_err(MAP_LISTENER))?;
        for (key, l) in (0u32..).zip(listeners) {
            sockhash
                .insert(key, l.as_raw_fd(), 0)
                .map_err(map_err(MAP_LISTENER))?;
        }
        let mut count: Array<MapData, u32> = Array::try_from(take(&mut ebpf, MAP_LISTENER_COUNT)?)
            .map_err(map_err(MAP_LISTENER_COUNT))?;
        // The count goes in last: until then every SYN goes to listener 0.
        count
            .set(0, listeners.len() as u32, 0)
            .map_err(map_err(MAP_LISTENER_COUNT))?;
        Ok(Self {
            endpoints: Mutex::new(endpoints),
            stats: Mutex::new(stats),
            translate: Mutex::new(translate),
            _listener: sockhash,
            _ebpf: ebpf,
        })
    }
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    ifaces: &[String],
    direction: TcAttachType,
) -> Result<(), InterceptError> {
    let fail = |iface: &str, detail: String| InterceptError::Attach {
        program: name,
        iface: iface.to_string(),
        detail,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| fail("-", "missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| fail("-", e.to_string()))?;
    prog.load().map_err(|e| fail("-", format!("{e:?}")))?;
    for iface in ifaces {
        prog.attach(iface, direction)
            .map_err(|e| fail(iface, e.to_string()))?;
        tracing::info!(program = name, iface = %iface, ?direction, "attached (tcx)");
    }
    Ok(())
}

/// The interface's index, if it exists in this network namespace.
pub fn nix_if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

impl Interception for EbpfInterception {
    fn set_endpoint(&self, key: EndpointKey, flags: u32) -> Result<(), InterceptError> {
        let mut eps = self.endpoints.lock().map_err(|_| InterceptError::Map {
            map: MAP_ENDPOINTS,
            detail: "lock poisoned".into(),
        })?;
        if let Ok(mut stats) = self.stats.lock() {
            if stats.get(&key, 0).is_err() {
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| InterceptError::Map {
                    map: MAP_STATS,
                    detail: e.to_string(),
                })?;
                let zeros = aya::maps::PerCpuValues::try_from(vec![EndpointStats::default(); cpus])
                    .map_err(|e| InterceptError::Map {
                        map: MAP_STATS,
                        detail: e.to_string(),
                    })?;
                stats.insert(key, zeros, 0).map_err(map_err(MAP_STATS))?;
            }
        }
        eps.insert(key, EndpointConfig { flags, _pad: 0 }, 0)
            .map_err(map_err(MAP_ENDPOINTS))
    }

    fn remove_endpoint(&self, key: EndpointKey) -> Result<(), InterceptError> {
        if let Ok(mut eps) = self.endpoints.lock() {
            match eps.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_ENDPOINTS)(e)),
            }
        }
        if let Ok(mut stats) = self.stats.lock() {
            let _ = stats.remove(&key);
        }
        Ok(())
    }

    fn stats(&self, key: EndpointKey) -> EndpointStats {
        let Ok(stats) = self.stats.lock() else {
            return EndpointStats::default();
        };
        let Ok(per_cpu) = stats.get(&key, 0) else {
            return EndpointStats::default();
        };
        per_cpu.iter().fold(EndpointStats::default(), |mut acc, s| {
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.syns_assigned += s.syns_assigned;
            acc.assign_failures += s.assign_failures;
            acc.rsts_shielded += s.rsts_shielded;
            acc.translated += s.translated;
            acc.strays_dropped += s.strays_dropped;
            acc
        })
    }

    fn set_translation(&self, flow: FlowKey, t: Translation) -> Result<(), InterceptError> {
        let mut m = self.translate.lock().map_err(|_| InterceptError::Map {
            map: MAP_TRANSLATE,
            detail: "lock poisoned".into(),
        })?;
        if m.flows.get(&flow, 0).is_ok() {
            return m.flows.insert(flow, t, 0).map_err(map_err(MAP_TRANSLATE));
        }
        // Count first: a packet that sees the count but not yet the entry
        // just misses the lookup.
        let n = m.installed.saturating_add(1);
        m.publish(n)?;
        if let Err(e) = m.flows.insert(flow, t, 0) {
            let n = m.installed.saturating_sub(1);
            let _ = m.publish(n);
            return Err(map_err(MAP_TRANSLATE)(e));
        }
        Ok(())
    }

    fn remove_translation(&self, flow: FlowKey) -> Result<(), InterceptError> {
        if let Ok(mut m) = self.translate.lock() {
            match m.flows.remove(&flow) {
                Ok(()) => {
                    let n = m.installed.saturating_sub(1);
                    m.publish(n)?;
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_TRANSLATE)(e)),
            }
        }
        Ok(())
    }
}
