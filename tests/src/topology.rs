//! Test topologies of network namespaces, and the generic builders they use.
//!
//! [`SingleNode`] is a client, one node and one pod behind it:
//!
//! ```text
//!  client ns              node ns                                pod ns
//!  eth0 10.77.1.2/24 ──── cli0 10.77.1.1/24 (fabric IP)
//!  default via 10.77.1.1  pod0 169.254.1.1/32 scope link ──────── eth0 10.77.2.10/32
//!                         10.77.2.10/32 dev pod0 src 10.77.1.1    default via 169.254.1.1
//!                         ip_forward=1, rp_filter=0
//! ```
//!
//! The pod wiring is DESIGN.md's "Pod wiring": the node's own packets to the pod
//! (shepherd's backend connections) leave from the node's fabric IP. The
//! builders [`wire_p2p`], [`wire_pod`] and [`node_forwarding`] take namespaces,
//! interface names and addresses as arguments, so a two-node topology (nodes on
//! a bridge, the same pod IP behind each node) can reuse them.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::link::{addr_add, addr_add_scope_link, link_up, route_add, rp_filter_off, veth};
use crate::netns::Netns;

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
/// The node's client-facing ("fabric") address, the client's gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// Prefix length of the client/node subnet.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// The pod's address.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 10);
/// Link-local gateway address on every pod's host-side veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Name of the pod's interface inside its namespace.
pub const POD_IF: &str = "eth0";

/// Creates a veth pair `a:if_a` ↔ `b:if_b`, puts `a_cidr` / `b_cidr` on the
/// ends and brings both up.
pub fn wire_p2p(a: &Netns, if_a: &str, a_cidr: &str, b: &Netns, if_b: &str, b_cidr: &str) {
    veth(a, if_a, b, if_b);
    addr_add(a, if_a, a_cidr);
    addr_add(b, if_b, b_cidr);
    link_up(a, if_a);
    link_up(b, if_b);
}

/// Wires `pod` behind `node` the way a CNI would (DESIGN.md "Pod wiring"):
/// - veth `node:host_if` ↔ `pod:eth0`;
/// - host side: `169.254.1.1/32 scope link`, and
///   `POD_IP/32 dev host_if scope link src node_fabric_ip`;
/// - pod side: `POD_IP/32` on eth0, `169.254.1.1 dev eth0 scope link`,
///   `default via 169.254.1.1 dev eth0`.
pub fn wire_pod(
    node: &Netns,
    host_if: &str,
    pod: &Netns,
    pod_ip: Ipv4Addr,
    node_fabric_ip: Ipv4Addr,
) {
    let gw = POD_GATEWAY.to_string();
    let pod_ip = pod_ip.to_string();
    veth(node, host_if, pod, POD_IF);
    addr_add_scope_link(node, host_if, &format!("{gw}/32"));
    link_up(node, host_if);
    route_add(
        node,
        &[
            &format!("{pod_ip}/32"),
            "dev",
            host_if,
            "scope",
            "link",
            "src",
            &node_fabric_ip.to_string(),
        ],
    );
    addr_add(pod, POD_IF, &format!("{pod_ip}/32"));
    link_up(pod, POD_IF);
    route_add(pod, &[&gw, "dev", POD_IF, "scope", "link"]);
    route_add(pod, &["default", "via", &gw, "dev", POD_IF]);
}

/// Makes `node` a router: `ip_forward=1`, and `rp_filter=0` on all, default
/// and `ifaces`.
pub fn node_forwarding(node: &Netns, ifaces: &[&str]) {
    node.sysctl("net.ipv4.ip_forward", "1");
    rp_filter_off(node, ifaces);
}

/// A client, a node and a pod: namespaces `{prefix}cli`, `{prefix}node` and
/// `{prefix}pod`, wired as in the module docs. Dropping it deletes all three.
#[derive(Debug)]
pub struct SingleNode {
    /// The client namespace (`eth0`).
    pub client: Netns,
    /// The node namespace (`cli0` towards the client, `pod0` towards the pod),
    /// where the agent runs.
    pub node: Netns,
    /// The pod namespace (`eth0`).
    pub pod: Netns,
    /// [`CLIENT_IP`].
    pub client_ip: Ipv4Addr,
    /// [`NODE_IP`].
    pub node_ip: Ipv4Addr,
    /// [`POD_IP`].
    pub pod_ip: Ipv4Addr,
}

impl SingleNode {
    /// Builds the topology; panics (deleting what it made) on any failure.
    pub fn new(prefix: &str) -> SingleNode {
        let client = Netns::create(&format!("{prefix}cli"));
        let node = Netns::create(&format!("{prefix}node"));
        let pod = Netns::create(&format!("{prefix}pod"));
        let t = SingleNode {
            client,
            node,
            pod,
            client_ip: CLIENT_IP,
            node_ip: NODE_IP,
            pod_ip: POD_IP,
        };
        wire_p2p(
            &t.client,
            t.client_if(),
            &format!("{CLIENT_IP}/{FABRIC_PREFIX_LEN}"),
            &t.node,
            t.node_client_if(),
            &format!("{NODE_IP}/{FABRIC_PREFIX_LEN}"),
        );
        route_add(&t.client, &["default", "via", &NODE_IP.to_string()]);
        wire_pod(&t.node, t.node_pod_if(), &t.pod, POD_IP, NODE_IP);
        node_forwarding(&t.node, &[t.node_client_if(), t.node_pod_if()]);
        t
    }

    /// The client's interface, in the client namespace: `eth0`.
    pub fn client_if(&self) -> &'static str {
        "eth0"
    }

    /// The node's client-facing interface: `cli0`.
    pub fn node_client_if(&self) -> &'static str {
        "cli0"
    }

    /// The host side of the pod's veth, in the node namespace: `pod0`.
    pub fn node_pod_if(&self) -> &'static str {
        "pod0"
    }

    /// The pod's interface, in the pod namespace: `eth0`.
    pub fn pod_if(&self) -> &'static str {
        POD_IF
    }

    /// `pod_ip:port`.
    pub fn pod_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pod_ip, port)
    }
}
