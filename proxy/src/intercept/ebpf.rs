//! The real interception: the embedded eBPF object, its programs attached to
//! the configured interfaces, and its maps.
//!
//! Must never leave state behind: programs are attached as tcx links owned by
//! this value and go away with it (or with the agent process).
//!
//! A hand-over passes the maps and links to the successor unchanged, as
//! descriptors ([`EbpfInterception::handover_fds`]); the successor loads
//! its programs with those maps ([`EbpfInterception::adopt`]: every entry,
//! counter and LRU slot stays as it is), and once the hand-over is
//! committed swaps its programs into the links (`bpf_link_update`, atomic
//! per link: [`EbpfInterception::finish_adoption`]). A packet meets either the old program or the
//! new one, never neither and never both. Both attached side by side
//! instead would run both on every packet (the programs pass packets on
//! with `TC_ACT_UNSPEC`), translating a migrated flow twice.
use super::{InterceptError, Interception};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap, SockHash};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use shepherd_common::{
    EndpointConfig, EndpointKey, EndpointStats, FlowKey, Translation, MAP_ENDPOINTS, MAP_LISTENER,
    MAP_LISTENER_COUNT, MAP_STATS, MAP_TRANSLATE, MAP_TRANSLATING, MAX_LISTENERS, PROG_INTERCEPT,
    PROG_RST_SHIELD, PROG_TRANSLATE_DEST_IN, PROG_TRANSLATE_DEST_OUT, PROG_TRANSLATE_ORIGIN_IN,
    PROG_TRANSLATE_ORIGIN_OUT,
};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
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

    /// The entry under `key`, if there is one.
    fn get(&self, key: &FlowKey) -> Result<Option<Translation>, InterceptError> {
        match self.flows.get(key, 0) {
            Ok(t) => Ok(Some(t)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_TRANSLATE)(e)),
        }
    }

    /// Inserts or overwrites an entry, counting it if it is new.
    fn insert_counted(&mut self, key: FlowKey, t: Translation) -> Result<(), InterceptError> {
        let fresh = self.get(&key)?.is_none();
        if fresh {
            let n = self.installed.saturating_add(1);
            self.publish(n)?;
        }
        if let Err(e) = self.flows.insert(key, t, 0) {
            if fresh {
                let n = self.installed.saturating_sub(1);
                let _ = self.publish(n);
            }
            return Err(map_err(MAP_TRANSLATE)(e));
        }
        Ok(())
    }

    /// Removes an entry if present, uncounting it only if it was there.
    fn remove_counted(&mut self, key: &FlowKey) -> Result<(), InterceptError> {
        match self.flows.remove(key) {
            Ok(()) => {
                let n = self.installed.saturating_sub(1);
                self.publish(n)
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_TRANSLATE)(e)),
        }
    }
}

/// Entries of the translation map unless `--max-translations` says
/// otherwise: two per translated backend flow.
pub const DEFAULT_MAX_TRANSLATIONS: u32 = 65_536;

/// Entries of the proxied-flow map unless `--max-proxied-flows` says
/// otherwise. It is an LRU map: when it is full, the oldest flow's entry
/// makes room, and that flow only loses the drop of its stray segments
/// after its proxy socket has closed (see `SHEPHERD_PROXIED`).
pub const DEFAULT_MAX_PROXIED_FLOWS: u32 = 65_536;

/// The name of the proxied-flow map in the eBPF object.
const MAP_PROXIED: &str = "SHEPHERD_PROXIED";

/// How many entries the kernel maps get, chosen when they are loaded.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Endpoints (the kernel's endpoint maps get a quarter more, see
    /// [`kernel_endpoint_entries`]).
    pub endpoints: u32,
    /// Translation entries, two per translated backend flow.
    pub translations: u32,
    /// Client flows handed to the proxy (LRU).
    pub proxied_flows: u32,
}

impl MapSizes {
    /// `endpoints` endpoints, the other maps at their defaults.
    pub fn endpoints(endpoints: u32) -> Self {
        Self {
            endpoints,
            translations: DEFAULT_MAX_TRANSLATIONS,
            proxied_flows: DEFAULT_MAX_PROXIED_FLOWS,
        }
    }
}

/// Entries of the kernel's endpoint maps for `--max-endpoints`: a quarter
/// more, for removed endpoints still draining and a destination's shield
/// entries, which count there too.
pub fn kernel_endpoint_entries(max_endpoints: u32) -> u32 {
    max_endpoints
        .saturating_add(max_endpoints / 4)
        .saturating_add(16)
}

/// FNV-1a of the embedded object: two builds with the same programs and
/// maps have the same.
pub fn object_hash() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The object built by `cargo xtask build-ebpf` (empty if it was not built).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shepherd.bpf.o"));

/// The maps a hand-over passes on, by name (each program's `static`s).
const MAPS: [&str; 7] = [
    MAP_ENDPOINTS,
    MAP_STATS,
    MAP_LISTENER,
    MAP_LISTENER_COUNT,
    MAP_TRANSLATE,
    MAP_TRANSLATING,
    MAP_PROXIED,
];

/// Which program goes where: (program, on the intercept interfaces (else
/// the shield ones), ingress).
const PLACES: [(&str, bool, bool); 6] = [
    (PROG_INTERCEPT, true, true),
    (PROG_TRANSLATE_ORIGIN_IN, true, true),
    (PROG_TRANSLATE_ORIGIN_OUT, true, false),
    (PROG_RST_SHIELD, false, true),
    (PROG_TRANSLATE_DEST_IN, false, true),
    (PROG_TRANSLATE_DEST_OUT, false, false),
];

/// One program attached to one interface, as a tcx link.
struct Attached {
    program: &'static str,
    iface: String,
    ingress: bool,
    link: std::os::fd::OwnedFd,
}

pub struct EbpfInterception {
    endpoints: Mutex<HashMap<MapData, EndpointKey, EndpointConfig>>,
    stats: Mutex<PerCpuHashMap<MapData, EndpointKey, EndpointStats>>,
    translate: Mutex<Translations>,
    _listener: SockHash<MapData, u32>,
    /// Second descriptors of the maps in [`MAPS`], to pin them by.
    pinnable: Vec<(&'static str, MapData)>,
    /// Its links; dropping them detaches the programs (unless a successor
    /// holds them too).
    links: Mutex<Vec<Attached>>,
    sizes: MapSizes,
    /// Keeps the programs loaded.
    ebpf: Mutex<Ebpf>,
    /// Handed over: the maps are the successor's, and changes to them from
    /// here are dropped (see [`detach`](Self::detach)).
    detached: std::sync::atomic::AtomicBool,
    /// A link still runs a predecessor's program (its swap failed).
    stale_links: std::sync::atomic::AtomicBool,
}

/// A second descriptor for a map, to pin it by.
fn dup_map(name: &'static str, m: &Map) -> Result<MapData, InterceptError> {
    let data = match m {
        Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::Array(d)
        | Map::SockHash(d)
        | Map::LruHashMap(d) => d,
        _ => {
            return Err(InterceptError::Map {
                map: name,
                detail: "unexpected map type".into(),
            })
        }
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| InterceptError::Map {
            map: name,
            detail: e.to_string(),
        })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

/// What [`EbpfInterception::adopt`] took over and the commit has yet to
/// finish: the predecessor's links, opened, with the programs to swap in.
pub struct Adopted {
    links: Vec<(super::super::handover::wire::LinkPin, std::os::fd::OwnedFd)>,
    /// The predecessor's eBPF object is this build's: its programs stay.
    same: bool,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> InterceptError {
    move |e| match &e {
        // A hash map with no room left answers an insert with E2BIG.
        aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
            InterceptError::Full { map }
        }
        _ => InterceptError::Map {
            map,
            detail: e.to_string(),
        },
    }
}

impl EbpfInterception {
    /// Loads the programs, attaches `intercept` to `intercept_ifaces` and
    /// `rst_shield` to `shield_ifaces` (ingress), and registers `listeners`
    /// (one per data-plane thread) as the sockets SYNs are assigned to.
    /// The endpoint maps hold `max_endpoints` entries (registered endpoints
    /// and removed ones still draining).
    pub fn load(
        intercept_ifaces: &[String],
        shield_ifaces: &[String],
        listeners: &[impl AsRawFd],
        max_endpoints: u32,
    ) -> Result<Self, InterceptError> {
        Self::load_with(
            intercept_ifaces,
            shield_ifaces,
            listeners,
            MapSizes::endpoints(max_endpoints),
        )
    }

    /// [`load`](Self::load), with every map's size given.
    pub fn load_with(
        intercept_ifaces: &[String],
        shield_ifaces: &[String],
        listeners: &[impl AsRawFd],
        sizes: MapSizes,
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
        let mut ebpf = Self::loader(sizes, None)
            .load(OBJECT)
            .map_err(|e| InterceptError::Load(e.to_string()))?;
        let mut links = Vec::new();
        for (program, on_intercept, ingress) in PLACES {
            let ifaces = if on_intercept {
                intercept_ifaces
            } else {
                shield_ifaces
            };
            let prog = load_program(&mut ebpf, program)?;
            for iface in ifaces {
                links.push(attach(prog, program, iface, ingress)?);
            }
        }
        let raw: Vec<std::os::fd::RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        Self::from_loaded(ebpf, links, Some(&raw), sizes)
    }

    /// The loader for `sizes`, taking the maps pinned in `pinned` (a
    /// hand-over's directory) instead of creating them.
    fn loader(sizes: MapSizes, pinned: Option<&Path>) -> aya::EbpfLoader<'static> {
        let mut loader = aya::EbpfLoader::new();
        loader
            .map_max_entries(MAP_ENDPOINTS, kernel_endpoint_entries(sizes.endpoints))
            .map_max_entries(MAP_STATS, kernel_endpoint_entries(sizes.endpoints))
            .map_max_entries(MAP_TRANSLATE, sizes.translations)
            .map_max_entries(MAP_PROXIED, sizes.proxied_flows);
        if let Some(dir) = pinned {
            for name in MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        loader
    }

    /// Takes the maps out of a loaded object, registers `listeners` and
    /// keeps what must stay alive.
    /// `listeners`: `None` when the listener maps came over with a
    /// hand-over (they hold the same sockets already).
    fn from_loaded(
        mut ebpf: Ebpf,
        links: Vec<Attached>,
        listeners: Option<&[std::os::fd::RawFd]>,
        sizes: MapSizes,
    ) -> Result<Self, InterceptError> {
        let mut pinnable = Vec::new();
        for name in MAPS {
            let m = ebpf.map(name).ok_or(InterceptError::Map {
                map: name,
                detail: "missing from the object".into(),
            })?;
            pinnable.push((name, dup_map(name, m)?));
        }
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
        let mut translate = Translations {
            flows: HashMap::try_from(take(&mut ebpf, MAP_TRANSLATE)?)
                .map_err(map_err(MAP_TRANSLATE))?,
            count: Array::try_from(take(&mut ebpf, MAP_TRANSLATING)?)
                .map_err(map_err(MAP_TRANSLATING))?,
            installed: 0,
        };
        // Taken over with its entries: the count goes on from theirs.
        translate.installed = translate.count.get(&0, 0).unwrap_or(0);
        let mut sockhash: SockHash<MapData, u32> =
            SockHash::try_from(take(&mut ebpf, MAP_LISTENER)?).map_err(map_err(MAP_LISTENER))?;
        if let Some(listeners) = listeners {
            for (key, l) in (0u32..).zip(listeners) {
                sockhash.insert(key, *l, 0).map_err(map_err(MAP_LISTENER))?;
            }
            let mut count: Array<MapData, u32> =
                Array::try_from(take(&mut ebpf, MAP_LISTENER_COUNT)?)
                    .map_err(map_err(MAP_LISTENER_COUNT))?;
            // The count goes in last: until then every SYN goes to listener 0.
            count
                .set(0, listeners.len() as u32, 0)
                .map_err(map_err(MAP_LISTENER_COUNT))?;
        }
        Ok(Self {
            endpoints: Mutex::new(endpoints),
            stats: Mutex::new(stats),
            translate: Mutex::new(translate),
            _listener: sockhash,
            pinnable,
            links: Mutex::new(links),
            sizes,
            ebpf: Mutex::new(ebpf),
            detached: Default::default(),
            stale_links: Default::default(),
        })
    }

    /// After a hand-over: every later change to the maps is dropped (they
    /// are the successor's), reads still work.
    pub fn detach(&self) {
        // Under both maps' locks: a change in progress finishes first, and
        // one that waits for a lock finds the flag set once it has it.
        let _t = self.translate.lock();
        let _e = self.endpoints.lock();
        self.detached
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn is_detached(&self) -> bool {
        self.detached.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The maps' sizes.
    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// Descriptors of the maps and links for a successor, and what they
    /// are (in that order: maps, then links).
    pub fn handover_fds(
        &self,
    ) -> Result<(crate::handover::wire::Kernel, Vec<std::os::fd::OwnedFd>), InterceptError> {
        use crate::handover::wire::{Kernel, LinkPin};
        let fail = |what: String, e: &dyn std::fmt::Display| {
            InterceptError::Load(format!("{what} for the hand-over: {e}"))
        };
        let mut fds = Vec::new();
        let mut maps = Vec::new();
        for (name, m) in &self.pinnable {
            let fd = m
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| fail(format!("map {name}"), &e))?;
            fds.push(fd);
            maps.push(name.to_string());
        }
        let mut links = Vec::new();
        let attached = self
            .links
            .lock()
            .map_err(|_| fail("links".into(), &"lock poisoned"))?;
        for a in attached.iter() {
            let what = || format!("the link of {} on {}", a.program, a.iface);
            fds.push(a.link.try_clone().map_err(|e| fail(what(), &e))?);
            links.push(LinkPin {
                program: a.program.to_string(),
                iface: a.iface.clone(),
                ingress: a.ingress,
            });
        }
        Ok((
            Kernel {
                maps,
                links,
                max_endpoints: self.sizes.endpoints,
                max_translations: self.sizes.translations,
                max_proxied_flows: self.sizes.proxied_flows,
                // A link whose swap failed runs an older build's program:
                // a successor must load and swap even with this object.
                object: if self.stale_links.load(std::sync::atomic::Ordering::Acquire) {
                    0
                } else {
                    object_hash()
                },
            },
            fds,
        ))
    }

    /// `reload`: load and swap the programs even if the predecessor's
    /// object is this build's (tests of the swap).
    ///
    /// Loads the programs with the maps a predecessor handed over (`fds`,
    /// as `kernel` lists them) and takes its links. aya opens maps and
    /// links only from bpffs, so they are pinned in a [`BpfDir`] under
    /// `spare` for the load and unpinned right after: from then on only
    /// descriptors hold them. Nothing changes in the kernel until
    /// [`finish_adoption`](Self::finish_adoption).
    pub fn adopt(
        kernel: &crate::handover::wire::Kernel,
        fds: Vec<std::os::fd::OwnedFd>,
        spare: &Path,
        reload: bool,
    ) -> Result<(Self, Adopted), InterceptError> {
        if OBJECT.is_empty() {
            return Err(InterceptError::NoObject);
        }
        let names: Vec<&str> = kernel.maps.iter().map(String::as_str).collect();
        // Exactly ours (the names become file names in the pin directory).
        if names.len() != MAPS.len() || MAPS.iter().any(|m| !names.contains(m)) {
            return Err(InterceptError::Load(format!(
                "the predecessor handed over the maps {names:?}; this agent needs {MAPS:?}"
            )));
        }
        if fds.len() != kernel.maps.len() + kernel.links.len() {
            return Err(InterceptError::Load(format!(
                "{} kernel descriptors for {} maps and {} links",
                fds.len(),
                kernel.maps.len(),
                kernel.links.len()
            )));
        }
        let sizes = MapSizes {
            endpoints: kernel.max_endpoints,
            translations: kernel.max_translations,
            proxied_flows: kernel.max_proxied_flows,
        };
        let dir = super::pin::BpfDir::new(spare)
            .map_err(|e| InterceptError::Load(format!("a bpffs directory to load from: {e}")))?;
        let pin_err = |what: &str, e: &dyn std::fmt::Display| {
            InterceptError::Load(format!("pinning {what} in {}: {e}", dir.path().display()))
        };
        let mut fds = fds.into_iter();
        for name in &kernel.maps {
            let fd = fds.next().ok_or_else(|| pin_err(name, &"no descriptor"))?;
            super::pin::pin(&fd, &dir.path().join(name)).map_err(|e| pin_err(name, &e))?;
        }
        let opened: Vec<_> = kernel.links.iter().cloned().zip(fds).collect();
        let mut ebpf = Self::loader(sizes, Some(dir.path()))
            .load(OBJECT)
            .map_err(|e| InterceptError::Load(e.to_string()))?;
        drop(dir);
        // The same object: the programs in the links are this build's, so
        // none is loaded (loading runs the verifier and the JIT, which
        // stalls every connection on a 2-core node for ~100 ms, hand-over
        // or not: BENCHMARKS.md) and none is swapped. Another object: each
        // program is loaded and swapped in after the commit.
        let same = kernel.object == object_hash() && !reload;
        if !same {
            for (program, _, _) in PLACES {
                load_program(&mut ebpf, program)?;
            }
        }
        let me = Self::from_loaded(ebpf, Vec::new(), None, sizes)?;
        Ok((
            me,
            Adopted {
                links: opened,
                same,
            },
        ))
    }

    /// After the commit point: swaps this agent's programs into the links
    /// taken over (atomically, link by link), attaches them where the
    /// predecessor had no link (interfaces this agent's flags add), and
    /// drops links to interfaces it no longer names. A link whose swap
    /// fails is kept as it is, running the predecessor's program with the
    /// same maps; the error names it.
    pub fn finish_adoption(
        &self,
        adopted: Adopted,
        intercept_ifaces: &[String],
        shield_ifaces: &[String],
    ) -> Result<(), InterceptError> {
        let poisoned = || InterceptError::Load("eBPF state lock poisoned".into());
        let mut ebpf = self.ebpf.lock().map_err(|_| poisoned())?;
        let mut links = self.links.lock().map_err(|_| poisoned())?;
        let mut failed = None;
        for (pin, link) in adopted.links {
            let Some(&(program, on_intercept, ingress)) = PLACES
                .iter()
                .find(|(p, _, i)| *p == pin.program && *i == pin.ingress)
            else {
                continue;
            };
            let wanted = if on_intercept {
                intercept_ifaces
            } else {
                shield_ifaces
            };
            if !wanted.contains(&pin.iface) {
                tracing::info!(program, iface = %pin.iface, "interface no longer configured; its link goes with the predecessor");
                continue;
            }
            let swapped = if adopted.same {
                Ok(())
            } else {
                program_mut(&mut ebpf, program).and_then(|prog| {
                    let fd = prog.fd().map_err(|e| InterceptError::Attach {
                        program,
                        iface: pin.iface.clone(),
                        detail: e.to_string(),
                    })?;
                    super::pin::link_update(link.as_fd(), fd.as_fd()).map_err(|e| {
                        InterceptError::Attach {
                            program,
                            iface: pin.iface.clone(),
                            detail: format!("swapping it into the predecessor's link: {e}"),
                        }
                    })
                })
            };
            if let Err(e) = swapped {
                tracing::error!(error = %e, "the predecessor's program keeps running in this link (same maps)");
                self.stale_links
                    .store(true, std::sync::atomic::Ordering::Release);
                failed.get_or_insert(e);
            }
            // Ours either way: dropping it would detach it.
            links.push(Attached {
                program,
                iface: pin.iface,
                ingress,
                link,
            });
        }
        for (program, on_intercept, ingress) in PLACES {
            let ifaces = if on_intercept {
                intercept_ifaces
            } else {
                shield_ifaces
            };
            for iface in ifaces {
                let have = links
                    .iter()
                    .any(|a| a.program == program && &a.iface == iface);
                if !have {
                    // Loaded already unless the predecessor's programs stayed.
                    let prog = program_mut(&mut ebpf, program)?;
                    if prog.fd().is_err() {
                        load_program(&mut ebpf, program)?;
                    }
                    let prog = program_mut(&mut ebpf, program)?;
                    let a = attach(prog, program, iface, ingress)?;
                    links.push(a);
                }
            }
        }
        drop(links);
        drop(ebpf);
        // The predecessor changed translations until its commit, after this
        // agent first read the count: count the entries now. On any error
        // the count read before stays (a short count would stop
        // translations that are still needed).
        if let Ok(mut t) = self.translations() {
            let mut n = 0u32;
            let mut whole = true;
            for k in t.flows.keys() {
                if k.is_err() {
                    whole = false;
                    break;
                }
                n = n.saturating_add(1);
            }
            if whole && n != t.installed {
                if let Err(e) = t.publish(n) {
                    tracing::warn!(error = %e, "publishing the translation count");
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl EbpfInterception {
    fn translations(&self) -> Result<std::sync::MutexGuard<'_, Translations>, InterceptError> {
        self.translate.lock().map_err(|_| InterceptError::Map {
            map: MAP_TRANSLATE,
            detail: "lock poisoned".into(),
        })
    }

    /// The translation count the programs see (`SHEPHERD_TRANSLATING`) and
    /// the entries actually in `SHEPHERD_TRANSLATE`, for tests: they must
    /// agree, or translation stops early (count 0) or never (count > 0).
    #[doc(hidden)]
    pub fn translation_count(&self) -> Result<(u32, usize), InterceptError> {
        let m = self.translations()?;
        let published = m.count.get(&0, 0).map_err(map_err(MAP_TRANSLATING))?;
        Ok((published, m.flows.keys().count()))
    }

    /// Runs the loaded program `program` once on `frame` (an Ethernet frame)
    /// with `BPF_PROG_TEST_RUN`, and returns its verdict and the frame as the
    /// program left it. The packet touches no interface; this exists so that
    /// tests can check the programs' packet logic against the real maps.
    #[doc(hidden)]
    pub fn test_run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), InterceptError> {
        self.test_run_marked(program, frame, 0)
            .map(|(verdict, out, _)| (verdict, out))
    }

    /// [`test_run`](Self::test_run) on a packet carrying `mark` (the
    /// socket mark of the sender, as the proxy's backend connections carry
    /// theirs); also returns the packet's mark as the program left it.
    #[doc(hidden)]
    pub fn test_run_marked(
        &self,
        program: &str,
        frame: &[u8],
        mark: u32,
    ) -> Result<(u32, Vec<u8>, u32), InterceptError> {
        use std::os::fd::{AsFd, AsRawFd};
        let fail =
            |detail: String| InterceptError::Load(format!("test run of {program}: {detail}"));
        let ebpf = self.ebpf.lock().map_err(|_| fail("lock poisoned".into()))?;
        let prog = ebpf
            .program(program)
            .ok_or_else(|| fail("no such program".into()))?;
        let fd = prog.fd().map_err(|e| fail(e.to_string()))?;
        let mut out = vec![0u8; frame.len() + 256];
        // `union bpf_attr`'s `test` member, up to `batch_size` (kernel 5.18+
        // layout; the kernel zero-checks what it does not know).
        #[repr(C)]
        #[derive(Default)]
        struct TestRunAttr {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        // A `struct __sk_buff` (192 bytes since 5.16): the kernel takes
        // `mark` from it (other fields it does not take must be zero) and
        // writes it back.
        const SK_BUFF_LEN: usize = 192;
        const MARK_AT: usize = 8;
        let mut ctx_in = [0u8; SK_BUFF_LEN];
        ctx_in[MARK_AT..MARK_AT + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; SK_BUFF_LEN];
        let mut attr = TestRunAttr {
            prog_fd: fd.as_fd().as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: SK_BUFF_LEN as u32,
            ctx_size_out: SK_BUFF_LEN as u32,
            ctx_in: ctx_in.as_ptr() as u64,
            ctx_out: ctx_out.as_mut_ptr() as u64,
            ..Default::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: `attr` is a valid `bpf_attr.test` for its size; the kernel
        // reads `frame` and `ctx_in` and writes at most `data_size_out`
        // bytes to `out` and `ctx_size_out` to `ctx_out`, all live for the
        // call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                std::mem::size_of::<TestRunAttr>(),
            )
        };
        if r < 0 {
            return Err(fail(std::io::Error::last_os_error().to_string()));
        }
        out.truncate(attr.data_size_out as usize);
        let mut mark_out = [0u8; 4];
        mark_out.copy_from_slice(&ctx_out[MARK_AT..MARK_AT + 4]);
        Ok((attr.retval, out, u32::from_ne_bytes(mark_out)))
    }
}

fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, InterceptError> {
    let fail = |detail: String| InterceptError::Attach {
        program: name,
        iface: "-".into(),
        detail,
    };
    ebpf.program_mut(name)
        .ok_or_else(|| fail("missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| fail(e.to_string()))
}

fn load_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, InterceptError> {
    let prog = program_mut(ebpf, name)?;
    prog.load().map_err(|e| InterceptError::Attach {
        program: name,
        iface: "-".into(),
        detail: format!("{e:?}"),
    })?;
    Ok(prog)
}

/// Attaches a loaded program to `iface` as a tcx link (kernel 6.6+) that
/// this agent owns as a descriptor.
fn attach(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    ingress: bool,
) -> Result<Attached, InterceptError> {
    let fail = |detail: String| InterceptError::Attach {
        program: name,
        iface: iface.to_string(),
        detail,
    };
    let ifindex =
        nix_if_index(iface).ok_or_else(|| InterceptError::NoSuchInterface(iface.into()))?;
    let fd = prog.fd().map_err(|e| fail(e.to_string()))?;
    let link = super::pin::tcx_link(fd.as_fd(), ifindex, ingress)
        .map_err(|e| fail(format!("{e} (tcx needs Linux 6.6 or later)")))?;
    let direction = if ingress { "ingress" } else { "egress" };
    tracing::info!(program = name, iface = %iface, direction, "attached (tcx)");
    Ok(Attached {
        program: name,
        iface: iface.to_string(),
        ingress,
        link,
    })
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
        if self.is_detached() {
            return Ok(());
        }
        let mut eps = self.endpoints.lock().map_err(|_| InterceptError::Map {
            map: MAP_ENDPOINTS,
            detail: "lock poisoned".into(),
        })?;
        if self.is_detached() {
            return Ok(());
        }
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
        if self.is_detached() {
            return Ok(());
        }
        if let Ok(mut eps) = self.endpoints.lock() {
            if self.is_detached() {
                return Ok(());
            }
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
        if self.is_detached() {
            return Ok(());
        }
        let mut m = self.translations()?;
        if self.is_detached() {
            return Ok(());
        }
        // Under the old pod address (what node→pod packets carry at the
        // origin) and the new one (what pod→node packets carry there); the
        // destination sees the same two. See `FlowKey`.
        let old = flow.with_pod_addr(t.old_addr);
        let new = flow.with_pod_addr(t.new_addr);
        if let Ok(Some(prev)) = m.get(&old) {
            // Re-targeted: the entry under the previous new address goes.
            let prev_new = old.with_pod_addr(prev.new_addr);
            if prev_new != new && prev_new != old {
                m.remove_counted(&prev_new)?;
            }
        }
        // Count first: a packet that sees the count but not yet the entries
        // just misses the lookup.
        m.insert_counted(old, t)?;
        if let Err(e) = m.insert_counted(new, t) {
            let _ = m.remove_counted(&old);
            return Err(e);
        }
        Ok(())
    }

    fn remove_translation(&self, flow: FlowKey) -> Result<(), InterceptError> {
        if self.is_detached() {
            return Ok(());
        }
        let mut m = self.translations()?;
        if self.is_detached() {
            return Ok(());
        }
        // `flow` is keyed by the old pod address; its entry names the new
        // one. The old-address entry goes last, so a failure in between
        // leaves it to find the other by on a retry.
        let Some(t) = m.get(&flow)? else {
            return Ok(());
        };
        let new = flow.with_pod_addr(t.new_addr);
        if new != flow {
            m.remove_counted(&new)?;
        }
        m.remove_counted(&flow)
    }

    fn endpoint_flags(&self, key: EndpointKey) -> Option<u32> {
        self.endpoints
            .lock()
            .ok()?
            .get(&key, 0)
            .ok()
            .map(|c| c.flags)
    }

    fn keep_entry(&self, key: FlowKey, t: Translation) -> Result<(), InterceptError> {
        if self.is_detached() {
            return Ok(());
        }
        let mut m = self.translations()?;
        if self.is_detached() {
            return Ok(());
        }
        m.insert_counted(key, t)
    }

    fn occupancy(&self) -> super::Occupancy {
        super::Occupancy {
            translations: self.translations().map_or(0, |m| m.installed as usize),
        }
    }

    fn translation(&self, flow: FlowKey) -> Result<Option<Translation>, InterceptError> {
        let m = self.translations()?;
        m.get(&flow)
    }

    fn translation_marks(&self, flow: FlowKey) -> Result<Option<[u8; 8]>, InterceptError> {
        let m = self.translations()?;
        let Some(old) = m.get(&flow)? else {
            return Ok(None);
        };
        let mut marks = old.marks;
        // Packets mark the entry they were looked up by: merge both.
        if let Some(new) = m.get(&flow.with_pod_addr(old.new_addr))? {
            for (a, b) in marks.iter_mut().zip(new.marks) {
                *a |= b;
            }
        }
        Ok(Some(marks))
    }
}
