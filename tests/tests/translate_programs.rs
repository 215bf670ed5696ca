//! The `translate_*` programs, run with `BPF_PROG_TEST_RUN` on crafted
//! frames against the agent's real maps (its own `EbpfInterception`, no
//! interface attached, nothing on any wire): each migrated backend flow gets
//! its own pod's new address, with valid checksums, even when flows to two
//! pods share the node's (address, port), which `connect()` allows and a
//! node drain that moves both pods at once exercises.

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice};
use shepherd::intercept::ebpf::EbpfInterception;
use shepherd::intercept::Interception;
use shepherd_common::{
    EndpointKey, FlowKey, Translation, EP_SHIELD, MARK_REUSED, MARK_RST, MARK_SEEN, ROLE_DEST,
    ROLE_ORIGIN,
};
use shepherd_tests::frames::{frame, Flag, PAYLOAD};
use shepherd_tests::privileged;
use std::net::{Ipv4Addr, TcpListener};

const TC_ACT_UNSPEC: u32 = u32::MAX;
const NODE: [u8; 4] = [10, 99, 0, 1];
const NODE_PORT: u16 = 40000;
const POD_PORT: u16 = 6379;
const POD_A: [u8; 4] = [10, 99, 1, 1];
const POD_A_NEW: [u8; 4] = [10, 99, 2, 1];
const POD_B: [u8; 4] = [10, 99, 1, 2];
const POD_B_NEW: [u8; 4] = [10, 99, 2, 2];
/// A third pod on the same port that did not migrate.
const POD_C: [u8; 4] = [10, 99, 1, 3];

fn load() -> (EbpfInterception, TcpListener) {
    // The sockhash needs one listener; a plain one is enough here.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let ic = EbpfInterception::load(&[], &[], std::slice::from_ref(&listener), 4096)
        .unwrap_or_else(|e| panic!("load the eBPF object: {e}"));
    (ic, listener)
}

fn translation(old: [u8; 4], new: [u8; 4], role: u32) -> Translation {
    Translation {
        old_addr: u32::from_ne_bytes(old),
        new_addr: u32::from_ne_bytes(new),
        role,
        marks: [0; 8],
    }
}

/// Runs `program` on a frame src → dst; returns the (source, destination)
/// it left with, after checking the verdict and both checksums.
fn run(
    ic: &EbpfInterception,
    program: &str,
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
) -> (Ipv4Addr, Ipv4Addr) {
    run_with(ic, program, src, dst, Flag::None)
}

fn run_with(
    ic: &EbpfInterception,
    program: &str,
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    flag: Flag,
) -> (Ipv4Addr, Ipv4Addr) {
    let (verdict, out) = ic
        .test_run(program, &frame(src, sport, dst, dport, flag))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        verdict, TC_ACT_UNSPEC,
        "{program} must never decide a verdict"
    );
    let ip = Ipv4HeaderSlice::from_slice(&out[14..]).expect("IPv4 header");
    let ip_len = usize::from(ip.ihl()) * 4;
    assert_eq!(
        ip.header_checksum(),
        ip.to_header().calc_header_checksum(),
        "{program}: IP checksum"
    );
    let tcp = TcpHeaderSlice::from_slice(&out[14 + ip_len..]).expect("TCP header");
    let payload = &out[14 + ip_len + tcp.slice().len()..];
    assert_eq!(payload, PAYLOAD, "{program}: payload");
    assert_eq!(
        tcp.checksum(),
        tcp.calc_checksum_ipv4(&ip, payload).expect("checksum"),
        "{program}: TCP checksum"
    );
    (ip.source_addr(), ip.destination_addr())
}

fn a(o: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(o)
}

/// A translated flow's marks (both entries merged).
fn marks(ic: &EbpfInterception, flow: FlowKey) -> [u8; 8] {
    ic.translation_marks(flow)
        .expect("read marks")
        .expect("translated")
}

/// The count the programs gate on must match the map.
fn assert_count(ic: &EbpfInterception, entries: usize) {
    let (published, actual) = ic.translation_count().expect("count");
    assert_eq!(actual, entries, "entries in SHEPHERD_TRANSLATE");
    assert_eq!(
        published as usize, actual,
        "SHEPHERD_TRANSLATING vs the map"
    );
}

#[test]
fn flows_sharing_a_node_port_translate_to_their_own_pods() {
    privileged!();
    let (ic, _listener) = load();
    let node = (NODE, NODE_PORT);
    let flow = |pod: [u8; 4]| FlowKey::new(NODE, NODE_PORT, pod, POD_PORT);
    // Two pods, same port, both migrated at once, their backend flows on the
    // same node port (the origin's side).
    ic.set_translation(flow(POD_A), translation(POD_A, POD_A_NEW, ROLE_ORIGIN))
        .expect("translate A");
    ic.set_translation(flow(POD_B), translation(POD_B, POD_B_NEW, ROLE_ORIGIN))
        .expect("translate B");
    assert_count(&ic, 4);
    // Setting a flow again changes nothing.
    ic.set_translation(flow(POD_B), translation(POD_B, POD_B_NEW, ROLE_ORIGIN))
        .expect("translate B again");
    assert_count(&ic, 4);

    // Out (node → pod): old address → new.
    let out = "translate_origin_out";
    assert_eq!(run(&ic, out, node, (POD_A, POD_PORT)).1, a(POD_A_NEW));
    assert_eq!(run(&ic, out, node, (POD_B, POD_PORT)).1, a(POD_B_NEW));
    // In (pod → node): new address → old, which the proxy's socket knows.
    let inn = "translate_origin_in";
    assert_eq!(run(&ic, inn, (POD_A_NEW, POD_PORT), node).0, a(POD_A));
    assert_eq!(run(&ic, inn, (POD_B_NEW, POD_PORT), node).0, a(POD_B));
    // A pod that did not migrate, on the same node port: untouched.
    assert_eq!(run(&ic, out, node, (POD_C, POD_PORT)).1, a(POD_C));
    assert_eq!(run(&ic, inn, (POD_C, POD_PORT), node).0, a(POD_C));
    // The destination's programs ignore the origin's entries.
    assert_eq!(
        run(&ic, "translate_dest_in", (POD_A, POD_PORT), node).0,
        a(POD_A)
    );

    // A's connection closes: its entries go, B's stay.
    ic.remove_translation(flow(POD_A)).expect("untranslate A");
    assert_count(&ic, 2);
    assert_eq!(run(&ic, out, node, (POD_A, POD_PORT)).1, a(POD_A));
    assert_eq!(run(&ic, inn, (POD_A_NEW, POD_PORT), node).0, a(POD_A_NEW));
    assert_eq!(run(&ic, out, node, (POD_B, POD_PORT)).1, a(POD_B_NEW));
    assert_eq!(run(&ic, inn, (POD_B_NEW, POD_PORT), node).0, a(POD_B));
    // B moves on again: its entry under the first new address goes.
    let third = [10, 99, 3, 2];
    ic.set_translation(flow(POD_B), translation(POD_B, third, ROLE_ORIGIN))
        .expect("re-target B");
    assert_count(&ic, 2);
    assert_eq!(run(&ic, out, node, (POD_B, POD_PORT)).1, a(third));
    assert_eq!(run(&ic, inn, (POD_B_NEW, POD_PORT), node).0, a(POD_B_NEW));
    ic.remove_translation(flow(POD_B)).expect("untranslate B");
    ic.remove_translation(flow(POD_B))
        .expect("untranslate B twice");
    assert_count(&ic, 0);
    assert_eq!(run(&ic, out, node, (POD_B, POD_PORT)).1, a(POD_B));
}

#[test]
fn destination_translates_restored_sockets_per_pod() {
    privileged!();
    let (ic, _listener) = load();
    // The destination sees the origin's proxy as the node side.
    let origin = (NODE, NODE_PORT);
    let flow = |pod: [u8; 4]| FlowKey::new(NODE, NODE_PORT, pod, POD_PORT);
    ic.set_translation(flow(POD_A), translation(POD_A, POD_A_NEW, ROLE_DEST))
        .expect("translate A");
    ic.set_translation(flow(POD_B), translation(POD_B, POD_B_NEW, ROLE_DEST))
        .expect("translate B");
    // From the restored pod (still bound to its old address): old → new.
    let inn = "translate_dest_in";
    assert_eq!(run(&ic, inn, (POD_A, POD_PORT), origin).0, a(POD_A_NEW));
    assert_eq!(run(&ic, inn, (POD_B, POD_PORT), origin).0, a(POD_B_NEW));
    // To it (the wire carries only the new address): new → old.
    let out = "translate_dest_out";
    assert_eq!(run(&ic, out, origin, (POD_A_NEW, POD_PORT)).1, a(POD_A));
    assert_eq!(run(&ic, out, origin, (POD_B_NEW, POD_PORT)).1, a(POD_B));
    // The origin's programs ignore the destination's entries.
    assert_eq!(
        run(&ic, "translate_origin_out", origin, (POD_A, POD_PORT)).1,
        a(POD_A)
    );
}

/// The destination's entries stay until userspace's sweep removes them, so
/// the programs must record what they see of each flow: a segment, its end
/// (a FIN each way, or an RST that the shield does not drop), and a new
/// connection reusing its tuple.
#[test]
fn translate_programs_record_each_flows_life() {
    privileged!();
    let (ic, _listener) = load();
    let origin = (NODE, NODE_PORT);
    let flow = |pod: [u8; 4]| FlowKey::new(NODE, NODE_PORT, pod, POD_PORT);
    let c_new = [10, 99, 2, 3];
    for (old, new) in [(POD_A, POD_A_NEW), (POD_B, POD_B_NEW), (POD_C, c_new)] {
        ic.set_translation(flow(old), translation(old, new, ROLE_DEST))
            .expect("translate");
    }
    let ended = |pod| Translation::ended(marks(&ic, flow(pod)));
    let inn = "translate_dest_in";
    let out = "translate_dest_out";
    // Seen means the pod's side spoke (the proxy's side always can).
    run(&ic, out, origin, (POD_A_NEW, POD_PORT));
    assert_eq!(marks(&ic, flow(POD_A))[MARK_SEEN], 0, "proxy side only");
    run(&ic, inn, (POD_A, POD_PORT), origin);
    assert_eq!(marks(&ic, flow(POD_A))[MARK_SEEN], 1, "the pod spoke");
    // Data does not end a flow.
    assert!(!ended(POD_A));
    // A FIN from the pod, then one from the proxy: ended. B is untouched.
    assert_eq!(
        run_with(&ic, inn, (POD_A, POD_PORT), origin, Flag::Fin).0,
        a(POD_A_NEW),
        "a FIN is translated like any segment"
    );
    assert!(!ended(POD_A), "one FIN is half a close");
    run_with(&ic, out, origin, (POD_A_NEW, POD_PORT), Flag::Fin);
    assert!(ended(POD_A), "a FIN each way ends the flow");
    assert!(!ended(POD_B));
    // An RST from the pod while its endpoint is shielded is dropped by
    // `rst_shield` (whichever program runs first): it ends nothing and
    // proves nothing about the pod.
    let shield = EndpointKey::new(POD_B, POD_PORT);
    ic.set_endpoint(shield, EP_SHIELD).expect("shield B");
    run_with(&ic, inn, (POD_B, POD_PORT), origin, Flag::Rst);
    let b = marks(&ic, flow(POD_B));
    assert_eq!((b[MARK_RST], b[MARK_SEEN]), (0, 0), "a shielded RST");
    ic.remove_endpoint(shield).expect("lift the shield");
    // Once the shield is down an RST from the pod ends it at once.
    run_with(&ic, inn, (POD_B, POD_PORT), origin, Flag::Rst);
    assert_eq!(marks(&ic, flow(POD_B))[MARK_RST], 1);
    assert!(ended(POD_B));

    // A SYN on a live migrated flow's wire tuple comes from another socket
    // on the node (a NodePort client SNATed to the node's address, say):
    // it passes untranslated and the migrated flow keeps its translation.
    assert_eq!(
        run_with(&ic, out, origin, (c_new, POD_PORT), Flag::Syn).1,
        a(c_new),
        "a new connection is never translated"
    );
    assert_eq!(marks(&ic, flow(POD_C))[MARK_REUSED], 0, "C is live");
    assert_eq!(run(&ic, out, origin, (c_new, POD_PORT)).1, a(POD_C));
    // A SYN-ACK is no new connection from the node's side.
    run_with(&ic, out, origin, (POD_A_NEW, POD_PORT), Flag::SynAck);
    assert_eq!(marks(&ic, flow(POD_A))[MARK_REUSED], 0);
    // Once C's flow has ended, a SYN on its tuple retires the entry: the
    // tuple belongs to the new connection now.
    run_with(&ic, inn, (POD_C, POD_PORT), origin, Flag::Fin);
    run_with(&ic, out, origin, (c_new, POD_PORT), Flag::Fin);
    assert!(ended(POD_C));
    assert_eq!(
        run_with(&ic, out, origin, (c_new, POD_PORT), Flag::Syn).1,
        a(c_new)
    );
    assert_eq!(marks(&ic, flow(POD_C))[MARK_REUSED], 1);
    assert_eq!(run(&ic, out, origin, (c_new, POD_PORT)).1, a(c_new));

    // Removal takes both of a flow's entries.
    ic.remove_translation(flow(POD_A)).expect("untranslate A");
    assert!(ic.translation_marks(flow(POD_A)).expect("read").is_none());
    assert_eq!(run(&ic, out, origin, (POD_A_NEW, POD_PORT)).1, a(POD_A_NEW));
    assert_eq!(run(&ic, out, origin, (POD_B_NEW, POD_PORT)).1, a(POD_B));
    assert_count(&ic, 4);
}
