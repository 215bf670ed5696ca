//! Shepherd's kernel-side programs (tc classifiers).
//!
//! - `intercept` (ingress on client-facing interfaces): a SYN to a managed
//!   endpoint is `bpf_sk_assign`ed to the proxy's transparent listener; later
//!   packets of flows the node already has a socket for (the proxy's) are
//!   marked so the agent's policy route delivers them locally. Anything else —
//!   unmanaged addresses, and flows that predate registration — is untouched.
//! - `rst_shield` (ingress on pod-facing host interfaces): while an endpoint is
//!   held, RSTs whose source is that endpoint are dropped and counted.
//!
//! - `translate_origin_{out,in}` / `translate_dest_{in,out}`: for exactly the migrated backend
//!   flows listed in `SHEPHERD_TRANSLATE`, rewrite the pod's old address to its
//!   new one (or back) and fix the IP and TCP checksums, so restored sockets
//!   still bound to the old address keep talking to the proxy while the wire
//!   between the nodes carries only the new address.
//!
//! These programs must never drop or rewrite a packet they are not sure about:
//! on any doubt they return `TC_ACT_UNSPEC` and the packet goes on unchanged.
//! The one drop besides the shield's is a stray segment of a flow this node
//! proxied and has already closed (see `PROXIED`).
#![no_std]
#![no_main]

mod parse;
mod translate;

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, tcphdr, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    cty::c_void,
    helpers::generated::{
        bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, SockHash},
    programs::TcContext,
};
use parse::{Segment, ETH_HLEN, TCP_ACK, TCP_RST, TCP_SYN};
use shepherd_common::{
    EndpointConfig, EndpointKey, EndpointStats, FlowKey, Translation, BACKEND_MARK, EP_INTERCEPT,
    EP_SHIELD, INTERCEPT_MARK, LISTENER_KEY, MAX_LISTENERS, ROLE_DEST, ROLE_ORIGIN,
};

/// Key: managed endpoint (pod ip, port). Value: its flags. Written by userspace.
#[map(name = "SHEPHERD_ENDPOINTS")]
static ENDPOINTS: HashMap<EndpointKey, EndpointConfig> = HashMap::with_max_entries(4096, 0);

/// Key: managed endpoint. Value: per-CPU counters. Entries created by
/// userspace on endpoint add; incremented here.
#[map(name = "SHEPHERD_STATS")]
static STATS: PerCpuHashMap<EndpointKey, EndpointStats> = PerCpuHashMap::with_max_entries(4096, 0);

/// Key: `0..n`. Value: one of the proxy's transparent listening sockets (one
/// per data-plane thread). Written by userspace at start-up.
#[map(name = "SHEPHERD_LISTENER")]
static LISTENER: SockHash<u32> = SockHash::with_max_entries(MAX_LISTENERS, 0);

/// `n`, the number of listeners in `LISTENER`. Written by userspace.
#[map(name = "SHEPHERD_LISTENER_COUNT")]
static LISTENER_COUNT: Array<u32> = Array::with_max_entries(1, 0);

/// Key: migrated backend flow, once under the pod's old address and once
/// under its new one (see `FlowKey`), so 32768 flows fit. Value: old and new
/// pod address, and the marks the translate programs set. Written by
/// userspace.
///
/// Not preallocated: memory is taken as flows are migrated, so a node that
/// never migrates holds none. Known race, left alone: a program that found
/// an entry just as userspace removed it, and the memory went straight to a
/// new entry, sets its one-byte mark in the new entry. That takes a removal
/// and an insertion within the few instructions between lookup and store.
#[map(name = "SHEPHERD_TRANSLATE")]
static TRANSLATE: HashMap<FlowKey, Translation> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Entries in `TRANSLATE` (see `shepherd_common::MAP_TRANSLATING`). Written
/// by userspace.
#[map(name = "SHEPHERD_TRANSLATING")]
static TRANSLATING: Array<u32> = Array::with_max_entries(1, 0);

/// A client flow's 4-tuple, as it arrives (client → pod endpoint).
#[repr(C)]
#[derive(Clone, Copy)]
struct ProxiedFlow {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// Client flows handed to the proxy. A later non-SYN segment of one of them
/// that finds no proxy socket comes after the proxy's side has fully closed
/// (say, the ACK of a FIN the proxy retransmitted under load, arriving after
/// the first ACK closed the socket). Forwarded, it would reach the pod, which
/// never knew the flow and would reset the client: it is dropped instead.
/// Only this program reads and writes it.
#[map(name = "SHEPHERD_PROXIED")]
static PROXIED: LruHashMap<ProxiedFlow, u8> = LruHashMap::with_max_entries(65536, 0);

const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the netns of the skb's device.
const CURRENT_NETNS: u64 = -1i64 as u64;

#[classifier]
pub fn intercept(ctx: TcContext) -> i32 {
    try_intercept(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn rst_shield(ctx: TcContext) -> i32 {
    try_rst_shield(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn translate_origin_out(ctx: TcContext) -> i32 {
    translate::rewrite(&ctx, translate::Direction::ToNew, ROLE_ORIGIN).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn translate_origin_in(ctx: TcContext) -> i32 {
    translate::rewrite(&ctx, translate::Direction::ToOld, ROLE_ORIGIN).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn translate_dest_in(ctx: TcContext) -> i32 {
    translate::rewrite(&ctx, translate::Direction::ToNew, ROLE_DEST).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn translate_dest_out(ctx: TcContext) -> i32 {
    translate::rewrite(&ctx, translate::Direction::ToOld, ROLE_DEST).unwrap_or(TC_ACT_UNSPEC)
}

fn try_intercept(ctx: &TcContext) -> Result<i32, i32> {
    // SAFETY: `skb` is the context pointer the kernel handed us.
    if unsafe { (*ctx.skb.skb).mark } == BACKEND_MARK {
        return Ok(TC_ACT_UNSPEC);
    }
    let seg = Segment::parse(ctx)?;
    let key = EndpointKey {
        addr: seg.daddr,
        port: seg.dport,
        _pad: 0,
    };
    // SAFETY: the value is plain data copied out before any map update.
    let Some(cfg) = (unsafe { ENDPOINTS.get(key) }).copied() else {
        return Ok(TC_ACT_UNSPEC);
    };
    let is_syn = seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0;
    let existing = existing_socket_state(ctx, &seg);
    // A TIME_WAIT socket for this 4-tuple can only be one of the proxy's
    // (only its transparent sockets use the pod's address on the node): late
    // segments of that flow (a retransmitted FIN, its ACK) belong to it, not
    // to the pod, which would answer them with an RST. A SYN reusing the
    // tuple is a new connection and goes to the listener.
    let ours = matches!(existing, Some(s) if s != TCP_LISTEN && (s != TCP_TIME_WAIT || !is_syn));
    if ours {
        // One of the proxy's sockets (or a request socket): deliver locally.
        ctx.set_mark(INTERCEPT_MARK);
        count(&key, ctx.len(), false, false);
        return Ok(TC_ACT_OK);
    }
    let flow = ProxiedFlow {
        saddr: seg.saddr,
        daddr: seg.daddr,
        sport: seg.sport,
        dport: seg.dport,
    };
    // SAFETY: the value is plain data and only tested for presence.
    if !is_syn && unsafe { PROXIED.get(flow) }.is_some() {
        // No socket, but the kernel may have answered the SYN with a cookie
        // (its SYN queue was full) and kept no request socket: then this
        // ACK completes the handshake, and the listener must have it.
        if seg.flags & TCP_ACK != 0 && to_listener(ctx, &flow, Some(&seg)).is_ok() {
            ctx.set_mark(INTERCEPT_MARK);
            count(&key, ctx.len(), false, false);
            return Ok(TC_ACT_OK);
        }
        // A proxied flow whose proxy socket is gone: see `PROXIED`.
        if let Some(stats) = STATS.get_ptr_mut(key) {
            // SAFETY: per-CPU value, no concurrent writer on this CPU.
            unsafe { (*stats).strays_dropped += 1 };
        }
        return Ok(TC_ACT_SHOT);
    }
    if !is_syn || cfg.flags & EP_INTERCEPT == 0 {
        // Not ours: a flow from before registration, or a draining endpoint.
        return Ok(TC_ACT_UNSPEC);
    }
    if to_listener(ctx, &flow, None).is_err() {
        count(&key, ctx.len(), false, true);
        return Ok(TC_ACT_UNSPEC);
    }
    // Best effort: a full map only loses this protection for the flow.
    let _ = PROXIED.insert(flow, 1u8, 0);
    ctx.set_mark(INTERCEPT_MARK);
    count(&key, ctx.len(), true, false);
    Ok(TC_ACT_OK)
}

fn try_rst_shield(ctx: &TcContext) -> Result<i32, i32> {
    let seg = Segment::parse(ctx)?;
    if seg.flags & TCP_RST == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = EndpointKey {
        addr: seg.saddr,
        port: seg.sport,
        _pad: 0,
    };
    // SAFETY: plain data copied out.
    let Some(cfg) = (unsafe { ENDPOINTS.get(key) }).copied() else {
        return Ok(TC_ACT_UNSPEC);
    };
    if cfg.flags & EP_SHIELD == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    if let Some(stats) = STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { (*stats).rsts_shielded += 1 };
    }
    Ok(TC_ACT_SHOT)
}

/// State of the socket (established, request or listener) the node has for
/// this segment's 4-tuple, if any. Uses the `skc` lookup so a request socket
/// (SYN_RECV) is returned as itself rather than as its listener.
#[inline(never)]
fn existing_socket_state(ctx: &TcContext, seg: &Segment) -> Option<u32> {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Writing a union field is safe; we use the ipv4 member only.
    tuple.__bindgen_anon_1.ipv4.saddr = seg.saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = seg.daddr;
    tuple.__bindgen_anon_1.ipv4.sport = seg.sport;
    tuple.__bindgen_anon_1.ipv4.dport = seg.dport;
    let tuple_size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    // SAFETY: helper contract: ctx is the skb, tuple points to tuple_size
    // readable bytes; a non-null result must be released, which we do.
    let sk: *mut bpf_sock = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut c_void,
            &mut tuple,
            tuple_size,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: `state` is readable on a sock_common pointer; sk is non-null.
    let state = unsafe { (*sk).state };
    // SAFETY: sk came from a lookup helper and is released exactly once.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    Some(state)
}

/// Hands the segment to the flow's listener (see `flow_listener`): a SYN
/// always; with `cookie_ack`, an ACK only if it carries a valid SYN cookie of
/// that listener (which then creates the connection).
#[inline(never)]
fn to_listener(
    ctx: &TcContext,
    flow: &ProxiedFlow,
    cookie_ack: Option<&Segment>,
) -> Result<(), i64> {
    // The IPv4 and TCP headers, for the cookie check (it reads the
    // addresses, ports, sequence and acknowledgment numbers).
    let headers: Option<([u8; 20], [u8; 20])> = match cookie_ack {
        Some(seg) => Some((
            ctx.load(ETH_HLEN).map_err(|_| -1i64)?,
            ctx.load(seg.l4_off).map_err(|_| -1i64)?,
        )),
        None => None,
    };
    let sk = flow_listener(flow);
    if sk.is_null() {
        return Err(-2);
    }
    let mut ret = 0;
    if let Some((mut iph, mut th)) = headers {
        // SAFETY: sk is a referenced listening socket; iph and th are 20
        // readable bytes on the stack.
        ret = unsafe {
            bpf_tcp_check_syncookie(
                sk,
                iph.as_mut_ptr() as *mut c_void,
                20,
                th.as_mut_ptr() as *mut tcphdr,
                20,
            )
        };
    }
    if ret == 0 {
        // SAFETY: ctx is the skb; sk is a referenced full listening socket.
        ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut c_void, sk, 0) };
    }
    // SAFETY: release the reference taken by the lookup, exactly once.
    unsafe { bpf_sk_release(sk) };
    if ret != 0 {
        return Err(ret);
    }
    Ok(())
}

/// The flow's listener (a referenced socket the caller must release), or
/// null: `LISTENER[hash % n]`, else the first.
#[inline(always)]
fn flow_listener(flow: &ProxiedFlow) -> *mut c_void {
    let n = LISTENER_COUNT.get(0).copied().unwrap_or(1);
    let key = if n > 1 {
        flow_hash(flow) % n
    } else {
        LISTENER_KEY
    };
    let sk = listener(&key);
    if sk.is_null() && key != LISTENER_KEY {
        return listener(&LISTENER_KEY);
    }
    sk
}

/// The listener at `key` (a referenced socket the caller must release), or
/// null.
#[inline(always)]
fn listener(key: &u32) -> *mut c_void {
    // SAFETY: SockHash is `repr(transparent)` over its map definition, so its
    // address is the map pointer the helper expects; a non-null result is a
    // referenced socket, released by the caller.
    unsafe {
        aya_ebpf::helpers::generated::bpf_map_lookup_elem(
            core::ptr::addr_of!(LISTENER) as *mut c_void,
            key as *const u32 as *const c_void,
        )
    }
}

/// Spreads flows evenly; stable for a flow's lifetime (only its SYN uses it).
#[inline(always)]
fn flow_hash(f: &ProxiedFlow) -> u32 {
    let mut h = f.saddr ^ ((u32::from(f.sport) << 16) | u32::from(f.dport));
    h ^= h >> 16;
    h = h.wrapping_mul(0x045d_9f3b);
    h ^ (h >> 16)
}

/// Adds to an endpoint's counters (no-op for unknown endpoints).
fn count_translated(key: &EndpointKey) {
    if let Some(stats) = STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { (*stats).translated += 1 };
    }
}

fn count(key: &EndpointKey, len: u32, syn_assigned: bool, assign_failed: bool) {
    if let Some(stats) = STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            if assign_failed {
                (*stats).assign_failures += 1;
                return;
            }
            (*stats).packets += 1;
            (*stats).bytes += u64::from(len);
            if syn_assigned {
                (*stats).syns_assigned += 1;
            }
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
