//! Bounded parsing of Ethernet/IPv4/TCP headers out of an skb.
//!
//! Reads go through `bpf_skb_load_bytes` (`TcContext::load`), so the verifier
//! sees no direct packet pointers. Anything that is not an unfragmented
//! IPv4/TCP segment is an `Err`, and the caller leaves the packet alone.
use aya_ebpf::programs::TcContext;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;

/// Addresses and ports in network byte order, as on the wire.
pub struct Segment {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Offset of the TCP header in the frame.
    pub l4_off: usize,
}

impl Segment {
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Self, i32> {
        let proto: u16 = ctx.load(12).map_err(|_| -1)?;
        if u16::from_be(proto) != ETH_P_IP {
            return Err(-1);
        }
        let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| -1)?;
        if ver_ihl >> 4 != 4 {
            return Err(-1);
        }
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        if ihl < 20 {
            return Err(-1);
        }
        let l4proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| -1)?;
        if l4proto != IPPROTO_TCP {
            return Err(-1);
        }
        let frag: u16 = ctx.load(ETH_HLEN + 6).map_err(|_| -1)?;
        if u16::from_be(frag) & 0x1fff != 0 {
            return Err(-1);
        }
        let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| -1)?;
        let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| -1)?;
        let l4 = ETH_HLEN + ihl;
        let sport: u16 = ctx.load(l4).map_err(|_| -1)?;
        let dport: u16 = ctx.load(l4 + 2).map_err(|_| -1)?;
        let flags: u8 = ctx.load(l4 + 13).map_err(|_| -1)?;
        Ok(Self {
            saddr,
            daddr,
            sport,
            dport,
            flags,
            l4_off: l4,
        })
    }
}
