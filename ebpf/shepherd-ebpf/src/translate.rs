//! Address translation of migrated backend flows.
//!
//! A flow is known by its node side (address, port) and its pod side
//! (address, port); userspace installs it under both the old and the new pod
//! address (see `FlowKey`). A packet belongs to it in either orientation:
//! node→pod (the pod address is the destination) or pod→node (the pod
//! address is the source). Only when the pod-side address is the one we
//! translate *from* is anything changed.
use crate::parse::{Segment, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::{count_translated, ENDPOINTS, TRANSLATE, TRANSLATING};
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    programs::TcContext,
};
use shepherd_common::{
    EndpointKey, FlowKey, Translation, EP_SHIELD, MARK_NODE_FIN, MARK_POD_FIN, MARK_REUSED,
    MARK_RST, MARK_SEEN,
};

pub enum Direction {
    ToNew,
    ToOld,
}

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;

#[inline(always)]
pub fn rewrite(ctx: &TcContext, dir: Direction, role: u32) -> Result<i32, i32> {
    // Nothing migrated on this node: skip the parse and both lookups.
    if TRANSLATING.get(0).copied().unwrap_or(0) == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    let seg = Segment::parse(ctx)?;
    // node → pod: the destination is the pod.
    let to_pod = FlowKey {
        node_addr: seg.saddr,
        pod_addr: seg.daddr,
        node_port: seg.sport,
        pod_port: seg.dport,
    };
    if let Some(entry) = TRANSLATE.get_ptr_mut(to_pod) {
        if let Some((from, to, old, new)) = applies(entry, &dir, role) {
            if seg.daddr == from {
                if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    // A new connection on the flow's wire tuple is never
                    // translated. If the migrated flow has ended, this one
                    // took its tuple for good: retire the entry. If not,
                    // another socket on the node collided with it (say a
                    // NodePort client SNATed to the node's address); the
                    // migrated flow keeps its translation.
                    if ended_with_sibling(entry, &to_pod, old, new) {
                        mark(entry, MARK_REUSED);
                    }
                    return Ok(TC_ACT_UNSPEC);
                }
                note(entry, seg.flags, MARK_NODE_FIN, false);
                store_addr(ctx, IP_DST_OFF, seg.l4_off, from, to)?;
                count_translated(&EndpointKey {
                    addr: old,
                    port: seg.dport,
                    _pad: 0,
                });
            }
            return Ok(TC_ACT_UNSPEC);
        }
    }
    // pod → node: the source is the pod.
    let from_pod = FlowKey {
        node_addr: seg.daddr,
        pod_addr: seg.saddr,
        node_port: seg.dport,
        pod_port: seg.sport,
    };
    if let Some(entry) = TRANSLATE.get_ptr_mut(from_pod) {
        if let Some((from, to, old, _)) = applies(entry, &dir, role) {
            if seg.saddr == from {
                let key = EndpointKey {
                    addr: old,
                    port: seg.sport,
                    _pad: 0,
                };
                if seg.flags & TCP_RST == 0 {
                    // The pod's side is live here (a restored socket sends a
                    // window probe as it leaves repair mode).
                    mark(entry, MARK_SEEN);
                }
                note(entry, seg.flags, MARK_POD_FIN, shielded(&key));
                store_addr(ctx, IP_SRC_OFF, seg.l4_off, from, to)?;
                count_translated(&key);
            }
        }
    }
    Ok(TC_ACT_UNSPEC)
}

/// If the entry is for this node's `role` and still in use: the address to
/// rewrite from and to in direction `dir`, then the pod's old and new one.
#[inline(always)]
fn applies(entry: *mut Translation, dir: &Direction, role: u32) -> Option<(u32, u32, u32, u32)> {
    // SAFETY: `entry` points into a live map value. Only these fields are
    // read: other CPUs may be storing single bytes into `marks`.
    let (old, new, r, reused) = unsafe {
        (
            (*entry).old_addr,
            (*entry).new_addr,
            (*entry).role,
            core::ptr::addr_of!((*entry).marks[MARK_REUSED]).read_volatile(),
        )
    };
    if r != role || reused != 0 {
        return None;
    }
    Some(match dir {
        Direction::ToNew => (old, new, old, new),
        Direction::ToOld => (new, old, old, new),
    })
}

/// Whether the flow of `entry` (found under `key`) has ended, going by the
/// marks of both of its entries: a node-side FIN marks the entry under one
/// pod address, a pod-side FIN the one under the other. `old`/`new`: the
/// pod's addresses.
#[inline(always)]
fn ended_with_sibling(entry: *mut Translation, key: &FlowKey, old: u32, new: u32) -> bool {
    let sibling = FlowKey {
        pod_addr: if key.pod_addr == old { new } else { old },
        ..*key
    };
    let mut marks = read_marks(entry);
    if let Some(other) = TRANSLATE.get_ptr_mut(sibling) {
        let theirs = read_marks(other);
        for i in 0..marks.len() {
            marks[i] |= theirs[i];
        }
    }
    Translation::ended(marks)
}

/// A copy of the entry's marks, byte by byte (other CPUs store into them).
#[inline(always)]
fn read_marks(entry: *mut Translation) -> [u8; 8] {
    let mut marks = [0u8; 8];
    for (i, m) in marks.iter_mut().enumerate() {
        // SAFETY: `entry` points into a live map value; `i` < 8.
        *m = unsafe { core::ptr::addr_of!((*entry).marks[i]).read_volatile() };
    }
    marks
}

/// Whether RSTs from this endpoint are being dropped by `rst_shield`.
#[inline(always)]
fn shielded(key: &EndpointKey) -> bool {
    // SAFETY: plain data copied out.
    unsafe { ENDPOINTS.get(key) }.is_some_and(|c| c.flags & EP_SHIELD != 0)
}

/// Records what a translated segment tells about its flow's end: a FIN
/// from `fin_side`, or an RST unless the shield drops it. Userspace removes
/// ended flows' entries once TIME_WAIT is over.
#[inline(always)]
fn note(entry: *mut Translation, tcp_flags: u8, fin_side: usize, rst_shielded: bool) {
    if tcp_flags & TCP_RST != 0 {
        if !rst_shielded {
            mark(entry, MARK_RST);
        }
    } else if tcp_flags & TCP_FIN != 0 {
        mark(entry, fin_side);
    }
}

/// Sets byte `at` of the entry's marks, unless it is set already (so a busy
/// flow does not dirty the entry's cache line on every segment).
#[inline(always)]
fn mark(entry: *mut Translation, at: usize) {
    // SAFETY: `entry` points into a live map value and every caller passes
    // a `MARK_*` index (< 8); one-byte loads and stores, so marks from other
    // CPUs (other bytes, or the same value) are never lost.
    unsafe {
        let byte = core::ptr::addr_of_mut!((*entry).marks[at]);
        if byte.read_volatile() == 0 {
            byte.write_volatile(1);
        }
    }
}

/// Replaces an IPv4 address at `off`, fixing the IP header checksum and the
/// TCP checksum (whose pseudo-header covers the addresses).
#[inline(always)]
fn store_addr(ctx: &TcContext, off: usize, l4_off: usize, from: u32, to: u32) -> Result<(), i32> {
    ctx.l4_csum_replace(
        l4_off + 16,
        u64::from(from),
        u64::from(to),
        u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|_| -1)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(from), u64::from(to), 4)
        .map_err(|_| -1)?;
    ctx.store(off, &to, 0).map_err(|_| -1)?;
    Ok(())
}
