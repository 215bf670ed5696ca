//! The `intercept` and `rst_shield` programs, run with `BPF_PROG_TEST_RUN`
//! on crafted frames against the agent's real maps and listener sockhash
//! (its own `EbpfInterception`, no interface attached): each verdict, each
//! mark and each counter the programs own, case by case. The random and
//! malformed frames are `ebpf_fuzz.rs`'s; these are the cases the design
//! names. (`bpf_sk_assign` works only in the tc ingress hook, not in a
//! test run: the assignment itself is shown on the wire, in `data_path.rs`.)

use shepherd::intercept::ebpf::EbpfInterception;
use shepherd::intercept::Interception;
use shepherd_common::{EndpointKey, BACKEND_MARK, EP_INTERCEPT, EP_SHIELD, INTERCEPT_MARK};
use shepherd_tests::frames::{frame, Flag};
use shepherd_tests::privileged;
use std::net::{SocketAddr, TcpListener, TcpStream};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const CLIENT: [u8; 4] = [10, 98, 0, 7];
const CLIENT_PORT: u16 = 45000;
const POD: [u8; 4] = [10, 98, 1, 1];
const PORT: u16 = 6379;
/// A pod no endpoint names.
const OTHER: [u8; 4] = [10, 98, 1, 2];

/// The agent's programs and maps, with `listener` as the transparent
/// listener the programs assign SYNs to.
fn load(listener: &TcpListener) -> EbpfInterception {
    EbpfInterception::load(&[], &[], std::slice::from_ref(listener), 4096)
        .unwrap_or_else(|e| panic!("load the eBPF object: {e}"))
}

/// A listener in the test's namespace (where test runs look sockets up).
fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind a listener")
}

/// Runs `program` on `f` sent with `mark`; returns the verdict and the mark
/// the packet left with, after checking that the frame was not modified.
fn run(ic: &EbpfInterception, program: &str, f: &[u8], mark: u32) -> (u32, u32) {
    let (verdict, out, mark_out) = ic
        .test_run_marked(program, f, mark)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out, f, "{program} never rewrites a frame");
    (verdict, mark_out)
}

#[test]
fn rst_shield_drops_only_a_shielded_endpoints_rsts() {
    privileged!();
    let l = listener();
    let ic = load(&l);
    let ep = EndpointKey::new(POD, PORT);
    ic.set_endpoint(ep, EP_INTERCEPT | EP_SHIELD)
        .expect("shield the endpoint");
    let shield = |f: &[u8]| run(&ic, "rst_shield", f, 0).0;
    let shielded = || ic.stats(ep).rsts_shielded;
    let from_pod = |flag| frame(POD, PORT, CLIENT, CLIENT_PORT, flag);

    // Every segment with RST set, from the endpoint: dropped, counted.
    for (n, flag) in [Flag::Rst, Flag::BareRst, Flag::SynRst]
        .into_iter()
        .enumerate()
    {
        assert_eq!(shield(&from_pod(flag)), TC_ACT_SHOT, "{flag:?}");
        assert_eq!(shielded(), n as u64 + 1, "{flag:?} counted");
    }
    // Anything else from it passes untouched: data, FIN, SYN-ACK.
    for flag in [Flag::None, Flag::Fin, Flag::SynAck, Flag::Syn] {
        assert_eq!(shield(&from_pod(flag)), TC_ACT_UNSPEC, "{flag:?}");
    }
    assert_eq!(shielded(), 3, "only RSTs are counted");
    // RSTs that are not the endpoint's: another port of the pod, another
    // pod, and the client's RST *to* the endpoint.
    assert_eq!(
        shield(&frame(POD, PORT + 1, CLIENT, CLIENT_PORT, Flag::Rst)),
        TC_ACT_UNSPEC
    );
    assert_eq!(
        shield(&frame(OTHER, PORT, CLIENT, CLIENT_PORT, Flag::Rst)),
        TC_ACT_UNSPEC
    );
    assert_eq!(
        shield(&frame(CLIENT, CLIENT_PORT, POD, PORT, Flag::Rst)),
        TC_ACT_UNSPEC
    );
    // The shield lifted (intercepted, not held): RSTs pass again.
    ic.set_endpoint(ep, EP_INTERCEPT).expect("lift the shield");
    assert_eq!(shield(&from_pod(Flag::Rst)), TC_ACT_UNSPEC);
    // A shield alone (the destination's, for a pod it does not proxy).
    ic.set_endpoint(ep, EP_SHIELD).expect("shield only");
    assert_eq!(shield(&from_pod(Flag::Rst)), TC_ACT_SHOT);
    // Unregistered: passes.
    ic.remove_endpoint(ep).expect("remove");
    assert_eq!(shield(&from_pod(Flag::Rst)), TC_ACT_UNSPEC);
}

#[test]
fn intercept_takes_new_connections_to_endpoints_and_nothing_else() {
    privileged!();
    let l = listener();
    let ic = load(&l);
    let ep = EndpointKey::new(POD, PORT);
    ic.set_endpoint(ep, EP_INTERCEPT).expect("register");
    let intercept = |f: &[u8], mark| run(&ic, "intercept", f, mark);
    let to_pod = |flag| frame(CLIENT, CLIENT_PORT, POD, PORT, flag);

    // A SYN to an address no endpoint names: not ours.
    assert_eq!(
        intercept(&frame(CLIENT, CLIENT_PORT, OTHER, PORT, Flag::Syn), 0),
        (TC_ACT_UNSPEC, 0)
    );
    // The proxy's own backend connection to the pod (its socket mark):
    // never taken back to the proxy, or it would connect to itself.
    assert_eq!(
        intercept(&to_pod(Flag::Syn), BACKEND_MARK),
        (TC_ACT_UNSPEC, BACKEND_MARK)
    );
    // A segment of a flow that predates registration (no SYN, no socket
    // here, never proxied): it goes on to the pod.
    assert_eq!(intercept(&to_pod(Flag::None), 0), (TC_ACT_UNSPEC, 0));
    let before = ic.stats(ep);
    assert_eq!((before.syns_assigned, before.packets), (0, 0));

    // A new connection to the endpoint goes to the listener. A test run is
    // not the tc ingress hook, so the kernel refuses `bpf_sk_assign` there:
    // what is seen is the program's answer to a failed assignment, which
    // must be to let the SYN go on to the pod (never to drop it) and to
    // count it. The assignment itself, and the drop of a stray segment of a
    // proxied flow, are shown on the wire (`data_path.rs`).
    assert_eq!(intercept(&to_pod(Flag::Syn), 0), (TC_ACT_UNSPEC, 0));
    let s = ic.stats(ep);
    assert_eq!((s.syns_assigned, s.packets, s.assign_failures), (0, 0, 1));
    // Not proxied, so its later segments go on to the pod too.
    assert_eq!(intercept(&to_pod(Flag::None), 0), (TC_ACT_UNSPEC, 0));
    assert_eq!(ic.stats(ep).strays_dropped, 0);

    // Draining (or shielded only): new connections go to the pod, and no
    // assignment is even tried.
    ic.set_endpoint(ep, EP_SHIELD).expect("drain");
    let other_client = frame(CLIENT, CLIENT_PORT + 1, POD, PORT, Flag::Syn);
    assert_eq!(intercept(&other_client, 0), (TC_ACT_UNSPEC, 0));
    ic.set_endpoint(ep, 0).expect("drain");
    assert_eq!(intercept(&other_client, 0), (TC_ACT_UNSPEC, 0));
    assert_eq!(
        ic.stats(ep).assign_failures,
        1,
        "nothing tried while draining"
    );
    // Non-TCP and RST-only segments to the endpoint change nothing either.
    ic.set_endpoint(ep, EP_INTERCEPT).expect("register again");
    assert_eq!(
        intercept(&frame(CLIENT, CLIENT_PORT + 2, POD, PORT, Flag::BareRst), 0),
        (TC_ACT_UNSPEC, 0)
    );
}

/// A segment of a connection the node has a socket for (the proxy's, in
/// production) is delivered locally: marked, not assigned. Shown with a
/// real connection in the test's namespace, which the program's socket
/// lookup finds.
#[test]
fn intercept_delivers_segments_of_the_proxys_own_sockets_locally() {
    privileged!();
    let l = listener();
    let ic = load(&l);
    let SocketAddr::V4(server) = l.local_addr().expect("addr") else {
        panic!("IPv4 listener");
    };
    let client = TcpStream::connect(server).expect("connect");
    let (_accepted, _) = l.accept().expect("accept");
    let SocketAddr::V4(from) = client.local_addr().expect("addr") else {
        panic!("IPv4 client");
    };
    let ep = EndpointKey::new(server.ip().octets(), server.port());
    ic.set_endpoint(ep, EP_INTERCEPT).expect("register");
    let seg = |flag| {
        frame(
            from.ip().octets(),
            from.port(),
            server.ip().octets(),
            server.port(),
            flag,
        )
    };
    assert_eq!(
        run(&ic, "intercept", &seg(Flag::None), 0),
        (TC_ACT_OK, INTERCEPT_MARK)
    );
    assert_eq!(
        run(&ic, "intercept", &seg(Flag::Fin), 0),
        (TC_ACT_OK, INTERCEPT_MARK)
    );
    let s = ic.stats(ep);
    assert_eq!((s.packets, s.syns_assigned, s.strays_dropped), (2, 0, 0));
}
