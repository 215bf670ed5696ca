//! Crafted Ethernet frames for running the eBPF programs with
//! `BPF_PROG_TEST_RUN` (see `EbpfInterception::test_run`).
use etherparse::PacketBuilder;

/// The payload every frame carries.
pub const PAYLOAD: &[u8] = b"held bytes";

/// TCP flags a test frame carries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flag {
    /// ACK alone (a data segment).
    None,
    /// A connection's first segment: SYN alone.
    Syn,
    SynAck,
    Fin,
    /// RST with ACK.
    Rst,
    /// RST alone.
    BareRst,
    /// SYN and RST together (no stack sends it; a hostile one might).
    SynRst,
}

/// An IPv4/TCP frame src:sport → dst:dport with `flag`, carrying [`PAYLOAD`],
/// with valid checksums.
pub fn frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flag: Flag) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2([1; 6], [2; 6])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1234, 64000);
    let b = match flag {
        Flag::None => b.ack(99),
        Flag::Syn => b.syn(),
        Flag::SynAck => b.syn().ack(99),
        Flag::Fin => b.ack(99).fin(),
        Flag::Rst => b.ack(99).rst(),
        Flag::BareRst => b.rst(),
        Flag::SynRst => b.syn().rst(),
    };
    // Writing into a Vec cannot fail for a well-formed header.
    if let Err(e) = b.write(&mut out, PAYLOAD) {
        panic!("build a test frame: {e}");
    }
    out
}
