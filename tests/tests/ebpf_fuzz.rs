//! Random and malformed frames through every eBPF program, with
//! `BPF_PROG_TEST_RUN`, against the agent's real maps populated as during a
//! migration (an endpoint intercepted and shielded, flows translated for
//! both roles): truncated headers, IP options, fragments, VLAN tags,
//! non-TCP protocols, bad checksums, every TCP flag mix, random bytes.
//!
//! For every frame:
//! - the verdict is one the program may return (`translate_*` never decide
//!   one; `rst_shield` may drop; `intercept` may pass, drop or assign);
//! - a frame the program rewrote has valid IPv4 and TCP checksums after
//!   if it had them before, and bad ones if it had bad ones (rewritten
//!   incrementally, as any NAT does: a corrupted frame is never made to
//!   look right), recomputed here independently of the program; a first
//!   fragment is checked on its IP header (its TCP checksum covers the
//!   whole segment), and a later one, which has no TCP header, is never
//!   rewritten;
//! - a frame neither from nor to an address the maps name is not modified.
//!
//! Seeded (`SHEPHERD_FUZZ_SEED`, else a fixed one), so a failure replays.

use shepherd::intercept::ebpf::EbpfInterception;
use shepherd::intercept::Interception;
use shepherd_common::{
    EndpointKey, FlowKey, Translation, EP_INTERCEPT, EP_SHIELD, PROG_INTERCEPT, PROG_RST_SHIELD,
    PROG_TRANSLATE_DEST_IN, PROG_TRANSLATE_DEST_OUT, PROG_TRANSLATE_ORIGIN_IN,
    PROG_TRANSLATE_ORIGIN_OUT, ROLE_DEST, ROLE_ORIGIN,
};
use shepherd_tests::privileged;
use std::net::TcpListener;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;

const NODE: [u8; 4] = [10, 98, 0, 1];
const POD: [u8; 4] = [10, 98, 1, 1];
const POD_NEW: [u8; 4] = [10, 98, 2, 1];
const DEST_POD: [u8; 4] = [10, 98, 1, 2];
const DEST_POD_NEW: [u8; 4] = [10, 98, 2, 2];
const NODE_PORT: u16 = 40000;
const POD_PORT: u16 = 6379;
/// Frames per program.
const FRAMES: usize = 20_000;

/// Addresses the maps name; frames with none of them must pass untouched.
const KNOWN: [[u8; 4]; 5] = [NODE, POD, POD_NEW, DEST_POD, DEST_POD_NEW];

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Where the IPv4 header starts (after Ethernet, and a VLAN tag if any).
fn ip_offset(f: &[u8]) -> Option<usize> {
    match f.get(12..14)? {
        [0x08, 0x00] => Some(14),
        [0x81, 0x00] if f.get(16..18)? == [0x08, 0x00] => Some(18),
        _ => None,
    }
}

/// An IPv4 TCP frame's (IP header, TCP segment), if it is one, whole and
/// unfragmented.
fn tcp_parts(f: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = ip_offset(f)?;
    let ip = f.get(at..)?;
    if ip.first()? >> 4 != 4 || ip.get(9)? != &6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
    if ihl < 20 || total < ihl + 20 || total > ip.len() || frag != 0 {
        return None;
    }
    Some((&ip[..ihl], &ip[ihl..total]))
}

/// Whether a frame's IPv4 header and TCP checksums are both right.
fn checksums_valid(f: &[u8]) -> bool {
    let Some((ip, tcp)) = tcp_parts(f) else {
        return false;
    };
    if checksum(ip, 0) != 0 {
        return false;
    }
    let mut pseudo = 0u32;
    for w in [&ip[12..14], &ip[14..16], &ip[16..18], &ip[18..20]] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + tcp.len() as u32;
    checksum(tcp, pseudo) == 0
}

/// A fragment's offset (0: the first), or `None` if the frame is not an
/// IPv4 fragment.
fn fragment(f: &[u8]) -> Option<u16> {
    let at = ip_offset(f)?;
    let v = u16::from_be_bytes([*f.get(at + 6)?, *f.get(at + 7)?]);
    (v & 0x3fff != 0).then_some(v & 0x1fff)
}

fn ip_checksum_valid(f: &[u8]) -> bool {
    let Some(at) = ip_offset(f) else { return false };
    let ihl = usize::from(f.get(at).map_or(0, |b| b & 0x0f)) * 4;
    ihl >= 20 && f.len() >= at + ihl && checksum(&f[at..at + ihl], 0) == 0
}

fn addrs(f: &[u8]) -> Option<([u8; 4], [u8; 4])> {
    let at = ip_offset(f)?;
    let src = f.get(at + 12..at + 16)?.try_into().ok()?;
    let dst = f.get(at + 16..at + 20)?.try_into().ok()?;
    Some((src, dst))
}

fn set_ip_checksum(f: &mut [u8], at: usize, ihl: usize) {
    f[at + 10] = 0;
    f[at + 11] = 0;
    let c = checksum(&f[at..at + ihl], 0);
    f[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
}

/// A valid TCP frame between two of the interesting (or random) addresses,
/// then mangled in one or more ways.
fn frame(rng: &mut Rng) -> Vec<u8> {
    let addr = |rng: &mut Rng| {
        if rng.chance(85) {
            rng.pick(&KNOWN)
        } else {
            [10, 97, rng.below(256) as u8, rng.below(256) as u8]
        }
    };
    let port = |rng: &mut Rng| match rng.below(4) {
        0 => NODE_PORT,
        1 | 2 => POD_PORT,
        _ => rng.below(65536) as u16,
    };
    // Half the frames belong to a translated flow, either way, before or
    // after the rewrite; the rest are anything.
    const FLOWS: [([u8; 4], u16, [u8; 4], u16); 8] = [
        (NODE, NODE_PORT, POD, POD_PORT),
        (NODE, NODE_PORT, POD_NEW, POD_PORT),
        (POD, POD_PORT, NODE, NODE_PORT),
        (POD_NEW, POD_PORT, NODE, NODE_PORT),
        (NODE, NODE_PORT + 1, DEST_POD, POD_PORT),
        (NODE, NODE_PORT + 1, DEST_POD_NEW, POD_PORT),
        (DEST_POD, POD_PORT, NODE, NODE_PORT + 1),
        (DEST_POD_NEW, POD_PORT, NODE, NODE_PORT + 1),
    ];
    let (src, sport, dst, dport) = if rng.chance(50) {
        rng.pick(&FLOWS)
    } else {
        (addr(rng), port(rng), addr(rng), port(rng))
    };
    let payload: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
    let b = etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, rng.next() as u32, 64000);
    let mut f = Vec::new();
    if b.write(&mut f, &payload).is_err() {
        return vec![0; 14];
    }
    // Every flag mix, SYN+RST and FIN+SYN+RST included; mostly an
    // established flow's (a SYN from the node's side retires a
    // translation, by design).
    f[14 + 20 + 13] = if rng.chance(70) {
        rng.pick(&[0x10u8, 0x18, 0x11, 0x14, 0x19])
    } else {
        rng.next() as u8
    };
    if let Some((ip, tcp)) = tcp_parts(&f) {
        let (ip, tcp) = (ip.to_vec(), tcp.to_vec());
        let mut pseudo = 0u32;
        for w in ip[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        pseudo += 6 + tcp.len() as u32;
        let mut seg = tcp.clone();
        seg[16] = 0;
        seg[17] = 0;
        let c = checksum(&seg, pseudo);
        f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&c.to_be_bytes());
    }
    if rng.chance(15) {
        // IP options (NOPs and an end), lengthening the header.
        let words = 1 + rng.below(10) as usize;
        let opts: Vec<u8> = (0..words * 4)
            .map(|i| if i + 1 == words * 4 { 0 } else { 1 })
            .collect();
        f.splice(34..34, opts);
        f[14] = 0x40 | (5 + words) as u8;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize + words * 4;
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        set_ip_checksum(&mut f, 14, (5 + words) * 4);
    }
    if rng.chance(10) {
        // A fragment: more-fragments, or an offset.
        let v: u16 = if rng.chance(50) {
            0x2000
        } else {
            1 + rng.below(100) as u16
        };
        f[20..22].copy_from_slice(&v.to_be_bytes());
        let ihl = usize::from(f[14] & 0x0f) * 4;
        set_ip_checksum(&mut f, 14, ihl);
    }
    if rng.chance(8) {
        // A VLAN tag.
        f.splice(12..12, [0x81, 0x00, 0x00, 0x2a]);
    }
    if rng.chance(8) {
        // Another protocol in the same bytes: UDP, ICMP, SCTP.
        let p = rng.pick(&[17u8, 1, 132]);
        let at = ip_offset(&f).unwrap_or(14);
        if let Some(b) = f.get_mut(at + 9) {
            *b = p;
        }
    }
    if rng.chance(10) {
        // A bad checksum (IP or TCP).
        let i = if rng.chance(50) { 24 } else { 50 };
        if let Some(b) = f.get_mut(i) {
            *b ^= 0x5a;
        }
    }
    if rng.chance(5) {
        // A random byte anywhere.
        let i = rng.below(f.len() as u64) as usize;
        f[i] = rng.next() as u8;
    }
    if rng.chance(10) {
        // Truncated anywhere, down to nothing.
        f.truncate(rng.below(f.len() as u64 + 1) as usize);
    }
    f
}

fn load() -> (EbpfInterception, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let ic = EbpfInterception::load(&[], &[], std::slice::from_ref(&listener), 4096)
        .unwrap_or_else(|e| panic!("load the eBPF object: {e}"));
    // As during a migration: the pod's endpoint intercepted and shielded.
    ic.set_endpoint(EndpointKey::new(POD, POD_PORT), EP_INTERCEPT | EP_SHIELD)
        .expect("endpoint");
    translate(&ic);
    (ic, listener)
}

/// One backend flow translated as an origin translates it, another as a
/// destination does (afresh: a SYN on a flow's tuple retires its entry).
fn translate(ic: &EbpfInterception) {
    let t = |old: [u8; 4], new: [u8; 4], role| Translation {
        old_addr: u32::from_ne_bytes(old),
        new_addr: u32::from_ne_bytes(new),
        role,
        marks: [0; 8],
    };
    ic.set_translation(
        FlowKey::new(NODE, NODE_PORT, POD, POD_PORT),
        t(POD, POD_NEW, ROLE_ORIGIN),
    )
    .expect("origin translation");
    ic.set_translation(
        FlowKey::new(NODE, NODE_PORT + 1, DEST_POD, POD_PORT),
        t(DEST_POD, DEST_POD_NEW, ROLE_DEST),
    )
    .expect("destination translation");
}

#[test]
fn random_and_malformed_frames_through_every_program() {
    privileged!();
    let seed = std::env::var("SHEPHERD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5348_4550_4845_5244);
    eprintln!("seed {seed} (SHEPHERD_FUZZ_SEED replays it)");
    let (ic, _listener) = load();
    let programs: [(&str, &[u32]); 6] = [
        (PROG_INTERCEPT, &[TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT]),
        (PROG_RST_SHIELD, &[TC_ACT_UNSPEC, TC_ACT_SHOT]),
        (PROG_TRANSLATE_ORIGIN_OUT, &[TC_ACT_UNSPEC]),
        (PROG_TRANSLATE_ORIGIN_IN, &[TC_ACT_UNSPEC]),
        (PROG_TRANSLATE_DEST_IN, &[TC_ACT_UNSPEC]),
        (PROG_TRANSLATE_DEST_OUT, &[TC_ACT_UNSPEC]),
    ];
    let (mut rewritten, mut tried, mut refused, mut valid) = (0, 0, 0, 0);
    for (i, (program, verdicts)) in programs.iter().enumerate() {
        let mut rng = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for n in 0..FRAMES {
            if n % 50 == 0 {
                translate(&ic);
            }
            let input = frame(&mut rng);
            // The kernel refuses a test run on less than an Ethernet header.
            if input.len() < 14 {
                refused += 1;
                continue;
            }
            let (verdict, out) = match ic.test_run(program, &input) {
                Ok(r) => r,
                // The kernel refuses to test-run an IPv4 frame shorter than
                // an IPv4 header (EINVAL): such frames cannot be tried here.
                Err(e) if input.len() < 34 && e.to_string().contains("os error 22") => {
                    refused += 1;
                    continue;
                }
                Err(e) => panic!("{program}, frame {n}: {e}: {input:02x?}"),
            };
            tried += 1;
            assert!(
                verdicts.contains(&verdict),
                "{program}, frame {n}: verdict {verdict} (may be {verdicts:?}) for {input:02x?}"
            );
            if out == input {
                continue;
            }
            rewritten += 1;
            valid += usize::from(checksums_valid(&out));
            let named =
                |f: &[u8]| addrs(f).is_some_and(|(s, d)| KNOWN.contains(&s) || KNOWN.contains(&d));
            assert!(
                named(&input),
                "{program}, frame {n}: a frame naming no known address was modified:\n{input:02x?}\n{out:02x?}"
            );
            match fragment(&input) {
                // The first fragment carries the TCP header, whose checksum
                // covers the whole segment: only the IP header's can be
                // recomputed here.
                Some(0) => assert_eq!(
                    ip_checksum_valid(&input),
                    ip_checksum_valid(&out),
                    "{program}, frame {n}: a first fragment's IP checksum:\n{input:02x?}\n{out:02x?}"
                ),
                Some(_) => panic!(
                    "{program}, frame {n}: a later fragment (no TCP header) was rewritten:\n{input:02x?}\n{out:02x?}"
                ),
                // Rewritten incrementally, as any NAT does: valid stays
                // valid, and a corrupted frame stays corrupted (never
                // turned into one the receiver would take).
                None => assert_eq!(
                    checksums_valid(&input),
                    checksums_valid(&out),
                    "{program}, frame {n}: checksums valid before, not after (or the reverse):\n{input:02x?}\n{out:02x?}"
                ),
            }
            assert_eq!(
                out.len(),
                input.len(),
                "{program}, frame {n}: length changed"
            );
        }
    }
    assert!(
        valid > 100,
        "few valid frames were rewritten ({valid}): the maps are not exercised"
    );
    eprintln!(
        "{tried} frames run ({refused} too short to test-run), {rewritten} rewritten ({valid} valid before and after)"
    );
}
