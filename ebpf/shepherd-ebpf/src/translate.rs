//! Address translation of migrated backend flows.
//!
//! A flow is known by its node side (address, port) and its pod side
//! (address, port); userspace installs it under both the old and the new pod
//! address (see `FlowKey`). A packet belongs to it in either orientation:
//! node→pod (the pod address is the destination) or pod→node (the pod
//! address is the source). Only when the pod-side address is the one we
//! translate *from* is anything changed.
use crate::parse::{Segment, ETH_HLEN, TCP_FIN, TCP_RST};
use crate::{count_translated, TRANSLATE, TRANSLATING};
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_UNSPEC},
    programs::TcContext,
};
use shepherd_common::{
    EndpointKey, FlowKey, Translation, CLOSE_NODE_FIN, CLOSE_POD_FIN, CLOSE_RST,
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
        // SAFETY: a live map value; plain data copied out.
        let t = unsafe { *entry };
        if t.role == role {
            let (from, to) = match dir {
                Direction::ToNew => (t.old_addr, t.new_addr),
                Direction::ToOld => (t.new_addr, t.old_addr),
            };
            if seg.daddr == from {
                note_close(entry, seg.flags, CLOSE_NODE_FIN);
                store_addr(ctx, IP_DST_OFF, seg.l4_off, from, to)?;
                count_translated(&EndpointKey {
                    addr: t.old_addr,
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
        // SAFETY: as above.
        let t = unsafe { *entry };
        if t.role == role {
            let (from, to) = match dir {
                Direction::ToNew => (t.old_addr, t.new_addr),
                Direction::ToOld => (t.new_addr, t.old_addr),
            };
            if seg.saddr == from {
                note_close(entry, seg.flags, CLOSE_POD_FIN);
                store_addr(ctx, IP_SRC_OFF, seg.l4_off, from, to)?;
                count_translated(&EndpointKey {
                    addr: t.old_addr,
                    port: seg.sport,
                    _pad: 0,
                });
            }
        }
    }
    Ok(TC_ACT_UNSPEC)
}

/// Records in the entry that its flow is ending: a FIN from `fin_side`, or
/// an RST. Userspace removes ended flows' entries once TIME_WAIT is over.
#[inline(always)]
fn note_close(entry: *mut Translation, tcp_flags: u8, fin_side: usize) {
    let at = if tcp_flags & TCP_RST != 0 {
        CLOSE_RST
    } else if tcp_flags & TCP_FIN != 0 {
        fin_side
    } else {
        return;
    };
    // SAFETY: `entry` points into a live map value and `at` < 4; a one-byte
    // store, so marks from other CPUs (other bytes) are never lost.
    unsafe { core::ptr::addr_of_mut!((*entry).closing[at]).write_volatile(1) };
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
