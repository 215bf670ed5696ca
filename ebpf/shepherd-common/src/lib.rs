//! `#[repr(C)]` types that cross the map boundary between Shepherd's eBPF
//! programs and the userspace agent, plus the constants both sides must agree
//! on (map names, packet marks, flags).
//!
//! Every type here uses fixed-width integers and explicit padding; the layout
//! tests at the bottom pin sizes and offsets so a change on one side cannot
//! silently disagree with the other. Nothing here may allocate or depend on
//! `std`: the eBPF crate builds it for `bpfel-unknown-none`.
#![no_std]

/// Map: managed endpoints. Key [`EndpointKey`], value [`EndpointConfig`].
/// Written by userspace (endpoint add/rm, hold/release); read by `intercept`
/// and `rst_shield`.
pub const MAP_ENDPOINTS: &str = "SHEPHERD_ENDPOINTS";
/// Map (per-CPU hash): counters per endpoint. Key [`EndpointKey`], value
/// [`EndpointStats`]. Created (zeroed) by userspace on endpoint add; written by
/// the eBPF programs; summed over CPUs by userspace.
pub const MAP_STATS: &str = "SHEPHERD_STATS";
/// Map (sockhash): the proxy's transparent listeners, one per data-plane
/// thread. Key `0..n`, value the listening socket. Written by userspace at
/// start-up; read by `intercept`, which spreads SYNs over them by flow hash.
pub const MAP_LISTENER: &str = "SHEPHERD_LISTENER";
/// Array of one `u32`: how many listeners [`MAP_LISTENER`] holds (`n`).
pub const MAP_LISTENER_COUNT: &str = "SHEPHERD_LISTENER_COUNT";
/// Most listeners (data-plane threads) the agent may register.
pub const MAX_LISTENERS: u32 = 64;

/// Map: migrated backend flows whose pod address changed. Key [`FlowKey`],
/// value [`Translation`]. Written by userspace (origin: `migrate target` or
/// `release --to`; destination: `migrate incoming`); read by `translate_*`.
pub const MAP_TRANSLATE: &str = "SHEPHERD_TRANSLATE";
/// Array of one `u32`: how many entries [`MAP_TRANSLATE`] holds. The
/// translate programs look flows up only when it is non-zero, so a node with
/// no migrated flows pays one array read per packet, not two hash lookups.
/// Userspace raises it before inserting and lowers it after removing.
pub const MAP_TRANSLATING: &str = "SHEPHERD_TRANSLATING";

/// Program names in the object file.
pub const PROG_INTERCEPT: &str = "intercept";
pub const PROG_RST_SHIELD: &str = "rst_shield";
/// Origin, egress on client-facing interfaces: old pod address → new.
pub const PROG_TRANSLATE_ORIGIN_OUT: &str = "translate_origin_out";
/// Origin, ingress on client-facing interfaces: new pod address → old.
pub const PROG_TRANSLATE_ORIGIN_IN: &str = "translate_origin_in";
/// Destination, ingress on pod-facing interfaces: old pod address → new.
pub const PROG_TRANSLATE_DEST_IN: &str = "translate_dest_in";
/// Destination, egress on pod-facing interfaces: new pod address → old.
pub const PROG_TRANSLATE_DEST_OUT: &str = "translate_dest_out";

/// [`Translation::role`]: this node holds the proxy (the origin).
pub const ROLE_ORIGIN: u32 = 1;
/// [`Translation::role`]: this node hosts the restored pod (the destination).
pub const ROLE_DEST: u32 = 2;

/// The key of the first listener in [`MAP_LISTENER`], used when the flow's
/// own listener cannot be found.
pub const LISTENER_KEY: u32 = 0;

/// skb mark `intercept` sets on packets that must be delivered locally to the
/// proxy; the agent's policy rule `fwmark INTERCEPT_MARK lookup ROUTE_TABLE`
/// routes them to `local 0.0.0.0/0 dev lo`.
pub const INTERCEPT_MARK: u32 = 0x5348_0001;
/// `SO_MARK` of the proxy's backend sockets. It must differ from
/// [`INTERCEPT_MARK`] (or the backend connect fails with ENETUNREACH) and
/// `intercept` leaves packets carrying it alone.
pub const BACKEND_MARK: u32 = 0x5348_0002;
/// Routing table holding the local-delivery route.
pub const ROUTE_TABLE: u32 = 0x5348;
/// Priority of the policy rule (before the `main` table at 32766).
pub const RULE_PRIORITY: u32 = 0x5348;

/// [`EndpointConfig::flags`]: new SYNs to this endpoint go to the proxy.
pub const EP_INTERCEPT: u32 = 1 << 0;
/// [`EndpointConfig::flags`]: RSTs whose source is this endpoint are dropped
/// (set while the endpoint is held or migrating).
pub const EP_SHIELD: u32 = 1 << 1;

/// A managed endpoint: IPv4 address and TCP port, both in network byte order
/// exactly as they appear in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct EndpointKey {
    /// IPv4 address, network byte order (the packet's bytes read as a native u32).
    pub addr: u32,
    /// TCP port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl EndpointKey {
    /// Builds a key from an address's octets and a host-order port.
    pub const fn new(octets: [u8; 4], port: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(octets),
            port: u16::from_ne_bytes(port.to_be_bytes()),
            _pad: 0,
        }
    }

    /// The address's octets.
    pub const fn octets(&self) -> [u8; 4] {
        self.addr.to_ne_bytes()
    }

    /// The port in host order.
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port.to_ne_bytes())
    }
}

/// What the kernel side does for an endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `EP_*` bits. 0 means draining: existing proxied flows keep being
    /// delivered to the proxy, new SYNs pass through untouched.
    pub flags: u32,
    pub _pad: u32,
}

/// Counters per endpoint (per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Packets steered to the proxy (SYNs and established).
    pub packets: u64,
    /// Bytes (skb length) of those packets.
    pub bytes: u64,
    /// SYNs assigned to the proxy's listener.
    pub syns_assigned: u64,
    /// SYNs that could not be assigned (no listener, or the helper failed);
    /// they pass through to the pod.
    pub assign_failures: u64,
    /// RSTs from the endpoint dropped by `rst_shield`.
    pub rsts_shielded: u64,
    /// Packets of migrated flows whose address `translate_*` rewrote.
    pub translated: u64,
    /// Stray segments `intercept` dropped: non-SYN segments of a flow it
    /// handed to the proxy whose proxy socket is gone (forwarded, the pod
    /// would answer them with an RST to the client).
    pub strays_dropped: u64,
}

/// A proxy→pod backend flow as one of its packets shows it on the wire: the
/// proxy's (node) address and port, and the pod's address and port. All in
/// network byte order.
///
/// The pod's address is part of the key because the node's port alone does
/// not tell two backend flows apart: `connect()` reuses a local port for
/// different destinations, so flows to two pods that listen on the same
/// port may share the node's (address, port). Both pods may migrate at once
/// (a node drain). Userspace installs each migrated flow twice: under the
/// pod's old address and under its new one, since a packet carries one or
/// the other depending on which side of the rewrite it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct FlowKey {
    pub node_addr: u32,
    pub pod_addr: u32,
    pub node_port: u16,
    pub pod_port: u16,
}

impl FlowKey {
    pub const fn new(node: [u8; 4], node_port: u16, pod: [u8; 4], pod_port: u16) -> Self {
        Self {
            node_addr: u32::from_ne_bytes(node),
            pod_addr: u32::from_ne_bytes(pod),
            node_port: u16::from_ne_bytes(node_port.to_be_bytes()),
            pod_port: u16::from_ne_bytes(pod_port.to_be_bytes()),
        }
    }

    /// The same flow as it looks with the pod at `pod_addr` (network order).
    pub const fn with_pod_addr(self, pod_addr: u32) -> Self {
        Self { pod_addr, ..self }
    }
}

/// The pod's address before and after the migration (network byte order),
/// and which side of the migration this node is on: the origin rewrites on
/// its client-facing interfaces, the destination on its pod-facing ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct Translation {
    pub old_addr: u32,
    pub new_addr: u32,
    /// `ROLE_ORIGIN` or `ROLE_DEST`.
    pub role: u32,
    /// What the translate programs have seen of the flow: byte `MARK_*`
    /// becomes 1. One byte per event, so marks from several CPUs are plain
    /// stores that cannot undo each other. Userspace writes zeros and only
    /// reads it afterwards.
    pub marks: [u8; 8],
}

/// Index in [`Translation::marks`]: a FIN from the node's side (the proxy).
pub const MARK_NODE_FIN: usize = 0;
/// Index in [`Translation::marks`]: a FIN from the pod's side.
pub const MARK_POD_FIN: usize = 1;
/// Index in [`Translation::marks`]: an RST (one from a shielded pod, which
/// `rst_shield` drops, does not count).
pub const MARK_RST: usize = 2;
/// Index in [`Translation::marks`]: a SYN from the node's side on the
/// flow's wire tuple: the migrated flow is gone and a new connection reuses
/// its tuple. The entry then translates nothing more.
pub const MARK_REUSED: usize = 3;
/// Index in [`Translation::marks`]: a segment from the pod's side of the
/// flow (not an RST) was translated: the pod's socket is live there. A
/// restored socket sends a window probe as it leaves repair mode.
pub const MARK_SEEN: usize = 4;

impl Translation {
    /// The flow has ended on the wire, going by `marks` (of one entry, or
    /// both of a flow's entries merged): an RST, or a FIN each way. Its
    /// TIME_WAIT may still need the entry for a while.
    pub const fn ended(marks: [u8; 8]) -> bool {
        marks[MARK_RST] != 0 || (marks[MARK_NODE_FIN] != 0 && marks[MARK_POD_FIN] != 0)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all five are `#[repr(C)]`, made only of integers, with explicit
    // padding, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointConfig {}
    unsafe impl aya::Pod for super::EndpointStats {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Translation {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_are_pinned() {
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(offset_of!(EndpointKey, addr), 0);
        assert_eq!(offset_of!(EndpointKey, port), 4);
        assert_eq!(size_of::<EndpointConfig>(), 8);
        assert_eq!(size_of::<EndpointStats>(), 56);
        assert_eq!(offset_of!(EndpointStats, rsts_shielded), 32);
        assert_eq!(offset_of!(EndpointStats, translated), 40);
        assert_eq!(offset_of!(EndpointStats, strays_dropped), 48);
        assert_eq!(size_of::<FlowKey>(), 12);
        assert_eq!(offset_of!(FlowKey, pod_addr), 4);
        assert_eq!(offset_of!(FlowKey, node_port), 8);
        assert_eq!(offset_of!(FlowKey, pod_port), 10);
        assert_eq!(size_of::<Translation>(), 20);
        assert_eq!(offset_of!(Translation, role), 8);
        assert_eq!(offset_of!(Translation, marks), 12);
    }

    #[test]
    fn key_is_in_network_order() {
        let k = EndpointKey::new([10, 0, 0, 1], 0x1234);
        let bytes: [u8; 8] = unsafe { core::mem::transmute(k) };
        assert_eq!(&bytes[..6], &[10, 0, 0, 1, 0x12, 0x34]);
        assert_eq!(k.port(), 0x1234);
        assert_eq!(k.octets(), [10, 0, 0, 1]);
    }

    #[test]
    fn marks_differ() {
        assert_ne!(INTERCEPT_MARK, BACKEND_MARK);
    }
}
