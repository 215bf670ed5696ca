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
//! The pod wiring is docs/testing.md's "Pod wiring": the node's own packets to the pod
//! (shepherd's backend connections) leave from the node's fabric IP. The
//! builders [`wire_p2p`], [`wire_pod`] (and [`wire_pod_unrouted`]) and
//! [`node_forwarding`] take namespaces, interface names and addresses as
//! arguments, so [`TwoNode`] (a client and two nodes on a bridge, a pod behind
//! each node, same or new pod IP) reuses them; see its docs for its picture.

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

/// Wires `pod` behind `node` the way a CNI would (docs/testing.md, "Pod wiring"):
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
    wire_pod_unrouted(node, host_if, pod, pod_ip);
    ip_route(node, "add", &pod_route(host_if, pod_ip, node_fabric_ip));
}

/// [`wire_pod`] without the node's route to the pod: the veth, the gateway
/// address on the host side, and the pod's address and routes. A pod restored
/// on another node is wired like this, and its node routes it only when the
/// migration switches routes (see [`TwoNode::switch_routes`]).
pub fn wire_pod_unrouted(node: &Netns, host_if: &str, pod: &Netns, pod_ip: Ipv4Addr) {
    let gw = POD_GATEWAY.to_string();
    veth(node, host_if, pod, POD_IF);
    addr_add_scope_link(node, host_if, &format!("{gw}/32"));
    link_up(node, host_if);
    addr_add(pod, POD_IF, &format!("{pod_ip}/32"));
    link_up(pod, POD_IF);
    route_add(pod, &[&gw, "dev", POD_IF, "scope", "link"]);
    route_add(pod, &["default", "via", &gw, "dev", POD_IF]);
}

/// The node's route to a pod, as `ip route` arguments:
/// `POD_IP/32 dev HOST_IF scope link src NODE_FABRIC_IP`.
pub fn pod_route(host_if: &str, pod_ip: Ipv4Addr, node_fabric_ip: Ipv4Addr) -> Vec<String> {
    [
        &format!("{pod_ip}/32"),
        "dev",
        host_if,
        "scope",
        "link",
        "src",
        &node_fabric_ip.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// `ip -n NS route VERB ARGS...`; panics with `ip`'s stderr on failure.
fn ip_route(ns: &Netns, verb: &str, args: &[String]) {
    let mut argv = vec!["route", verb];
    argv.extend(args.iter().map(String::as_str));
    ns.ip(&argv);
}

/// Deletes the main-table route to exactly `cidr` in `ns` if there is one
/// (`ip route del` fails when there is none).
fn route_del_if_present(ns: &Netns, cidr: &str) {
    if !ns.ip(&["route", "show", "exact", cidr]).trim().is_empty() {
        ns.ip(&["route", "del", cidr]);
    }
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

// ---------------------------------------------------------------------------
// TwoNode

/// Node A's fabric address in [`TwoNode`] (the client's gateway to the pods).
pub const NODE_A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
/// Node B's fabric address in [`TwoNode`].
pub const NODE_B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 12);
/// Pod B's address in [`TwoNode::new_ip`] (a pod restored the Kubernetes way
/// gets a new IP; its restored sockets keep [`POD_IP`], kept on its `lo`).
pub const POD_B_NEW_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 20);
/// The pods' subnet, which the client routes via node A.
pub const POD_SUBNET: &str = "10.77.2.0/24";

/// A client, two nodes on a bridge, and a pod behind each node: the world of a
/// live migration from node A to node B.
///
/// ```text
///                    fabric ns: br0 (bridge, ports cli, nodea, nodeb)
///        ┌─────────────────────────┼─────────────────────────┐
///  client ns                  nodeA ns                   nodeB ns
///  eth0 10.77.1.2/24          fab0 10.77.1.11/24         fab0 10.77.1.12/24
///  10.77.2.0/24               pod0 169.254.1.1/32        pod0 169.254.1.1/32
///    via 10.77.1.11           10.77.2.10/32 dev pod0     (no pod route until
///                               src 10.77.1.11            switch_routes)
///                                  │                          │
///                             podA ns: eth0 10.77.2.10   podB ns: eth0 POD_B_IP
///                                                        (new_ip: lo 10.77.2.10)
/// ```
///
/// Namespaces are `{prefix}fab`, `{prefix}cli`, `{prefix}nodea`,
/// `{prefix}nodeb`, `{prefix}poda` and `{prefix}podb`; dropping the value
/// deletes them all. Both pods are wired as in docs/testing.md's "Pod wiring" (see
/// [`wire_pod`]), but only node A routes to its pod at first. All pod traffic
/// of the client goes to node A, the anchor, for the whole test; the
/// migration's "switch routes" step ([`switch_routes`](Self::switch_routes))
/// makes node B route to pod B and node A forward pod B's address to node B.
///
/// Both nodes forward, with `rp_filter` off (as in the pods) and ICMP
/// redirects off: node A forwards client packets out of the interface they
/// came in on, and a redirect would teach the client to bypass its anchor.
/// The client ignores redirects too.
#[derive(Debug)]
pub struct TwoNode {
    /// The client namespace (`eth0`).
    pub client: Netns,
    /// Node A, the origin and anchor (`fab0`, `pod0`).
    pub node_a: Netns,
    /// Node B, the destination (`fab0`, `pod0`).
    pub node_b: Netns,
    /// Pod A's namespace, behind node A (`eth0`).
    pub pod_a: Netns,
    /// Pod B's namespace, behind node B (`eth0`, and in the new-IP case the
    /// old IP on `lo`): where CRIU restores the pod.
    pub pod_b: Netns,
    /// The fabric namespace holding the bridge `br0`.
    pub fabric: Netns,
    /// [`CLIENT_IP`].
    pub client_ip: Ipv4Addr,
    /// [`NODE_A_IP`].
    pub node_a_ip: Ipv4Addr,
    /// [`NODE_B_IP`].
    pub node_b_ip: Ipv4Addr,
    /// [`POD_IP`]: pod A's address, the one clients connect to.
    pub pod_ip: Ipv4Addr,
    /// Pod B's address on its `eth0`: [`POD_IP`] for [`TwoNode::new`],
    /// [`POD_B_NEW_IP`] for [`TwoNode::new_ip`].
    pub pod_b_ip: Ipv4Addr,
}

impl TwoNode {
    /// Builds the topology with the SAME pod IP behind both nodes. Panics
    /// (deleting what it made) on any failure.
    pub fn new(prefix: &str) -> TwoNode {
        TwoNode::build(prefix, POD_IP)
    }

    /// Builds the topology with pod B on a NEW IP ([`POD_B_NEW_IP`]) and the
    /// old one ([`POD_IP`]/32) on pod B's `lo`, so CRIU can restore sockets
    /// bound to it. Panics (deleting what it made) on any failure.
    pub fn new_ip(prefix: &str) -> TwoNode {
        TwoNode::build(prefix, POD_B_NEW_IP)
    }

    fn build(prefix: &str, pod_b_ip: Ipv4Addr) -> TwoNode {
        // A panic anywhere below drops the guards made so far, deleting them.
        let fabric = Netns::create(&format!("{prefix}fab"));
        let client = Netns::create(&format!("{prefix}cli"));
        let node_a = Netns::create(&format!("{prefix}nodea"));
        let node_b = Netns::create(&format!("{prefix}nodeb"));
        let pod_a = Netns::create(&format!("{prefix}poda"));
        let pod_b = Netns::create(&format!("{prefix}podb"));
        let t = TwoNode {
            client,
            node_a,
            node_b,
            pod_a,
            pod_b,
            fabric,
            client_ip: CLIENT_IP,
            node_a_ip: NODE_A_IP,
            node_b_ip: NODE_B_IP,
            pod_ip: POD_IP,
            pod_b_ip,
        };
        let fab_if = t.node_fabric_if();
        let pod_if = t.node_pod_if();

        t.fabric
            .ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"]);
        link_up(&t.fabric, "br0");
        for (port, ns, ifname, ip) in [
            ("cli", &t.client, t.client_if(), CLIENT_IP),
            ("nodea", &t.node_a, fab_if, NODE_A_IP),
            ("nodeb", &t.node_b, fab_if, NODE_B_IP),
        ] {
            veth(&t.fabric, port, ns, ifname);
            t.fabric.ip(&["link", "set", port, "master", "br0"]);
            link_up(&t.fabric, port);
            addr_add(ns, ifname, &format!("{ip}/{FABRIC_PREFIX_LEN}"));
            link_up(ns, ifname);
        }
        route_add(&t.client, &[POD_SUBNET, "via", &NODE_A_IP.to_string()]);
        for conf in ["all", t.client_if()] {
            t.client
                .sysctl(&format!("net.ipv4.conf.{conf}.accept_redirects"), "0");
        }

        wire_pod(&t.node_a, pod_if, &t.pod_a, POD_IP, NODE_A_IP);
        wire_pod_unrouted(&t.node_b, pod_if, &t.pod_b, pod_b_ip);
        if pod_b_ip != POD_IP {
            addr_add(&t.pod_b, "lo", &format!("{POD_IP}/32"));
        }
        for node in [&t.node_a, &t.node_b] {
            node_forwarding(node, &[fab_if, pod_if]);
            for conf in ["all", "default", fab_if, pod_if] {
                node.sysctl(&format!("net.ipv4.conf.{conf}.send_redirects"), "0");
            }
        }
        for pod in [&t.pod_a, &t.pod_b] {
            rp_filter_off(pod, &[POD_IF, "lo"]);
        }
        t
    }

    /// Whether pod B has pod A's IP (built with [`TwoNode::new`]).
    pub fn same_ip(&self) -> bool {
        self.pod_b_ip == self.pod_ip
    }

    /// The client's interface: `eth0`.
    pub fn client_if(&self) -> &'static str {
        "eth0"
    }

    /// Each node's interface on the fabric bridge: `fab0`.
    pub fn node_fabric_if(&self) -> &'static str {
        "fab0"
    }

    /// The host side of each node's pod veth: `pod0`.
    pub fn node_pod_if(&self) -> &'static str {
        "pod0"
    }

    /// Each pod's interface: `eth0`.
    pub fn pod_if(&self) -> &'static str {
        POD_IF
    }

    /// `pod_ip:port`: pod A's (the original) address.
    pub fn pod_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pod_ip, port)
    }

    /// `pod_b_ip:port`.
    pub fn pod_b_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pod_b_ip, port)
    }

    /// Node B routes pod B's IP to pod B:
    /// `POD_B_IP/32 dev pod0 scope link src 10.77.1.12` (idempotent).
    pub fn route_pod_b_on_node_b(&self) {
        ip_route(
            &self.node_b,
            "replace",
            &pod_route(self.node_pod_if(), self.pod_b_ip, self.node_b_ip),
        );
    }

    /// Node A forwards pod B's IP to node B:
    /// `POD_B_IP/32 via 10.77.1.12 dev fab0` (idempotent). With the same IP
    /// this replaces node A's route to pod A, so whatever node A sends to the
    /// pod IP (forwarded client traffic, or its own backend connections) now
    /// goes to node B. With a new IP, node A routes the old IP to node B too:
    /// the proxy's backend sockets still address the old IP, and Shepherd's
    /// origin-side translation rewrites it to the new one as the packets
    /// leave on the fabric.
    pub fn route_node_a_to_node_b(&self) {
        let mut ips = vec![self.pod_b_ip];
        if !self.same_ip() {
            ips.push(self.pod_ip);
        }
        for ip in ips {
            ip_route(&self.node_a, "replace", &self.via_node_b(ip));
        }
    }

    /// Node A's route sending `ip` to node B:
    /// `IP/32 via 10.77.1.12 dev fab0`, as `ip route` arguments.
    fn via_node_b(&self, ip: Ipv4Addr) -> Vec<String> {
        [
            format!("{ip}/32"),
            "via".to_owned(),
            self.node_b_ip.to_string(),
            "dev".to_owned(),
            self.node_fabric_if().to_owned(),
        ]
        .to_vec()
    }

    /// The migration's "switch routes" step: first
    /// [`route_pod_b_on_node_b`](Self::route_pod_b_on_node_b), then
    /// [`route_node_a_to_node_b`](Self::route_node_a_to_node_b), so nothing
    /// reaches node B before node B can deliver it. Idempotent, and may be called before a restore (e.g.
    /// to see pod B's netns answer with RST, or a shield drop it).
    pub fn switch_routes(&self) {
        self.route_pod_b_on_node_b();
        self.route_node_a_to_node_b();
    }

    /// Undoes [`switch_routes`](Self::switch_routes) (an abort path): node A
    /// routes the pod IP to pod A again and drops any route to a new IP; node
    /// B drops its route to pod B. Idempotent.
    pub fn restore_routes(&self) {
        let pod_a = pod_route(self.node_pod_if(), self.pod_ip, self.node_a_ip);
        ip_route(&self.node_a, "replace", &pod_a);
        let pod_b = format!("{}/32", self.pod_b_ip);
        if !self.same_ip() {
            route_del_if_present(&self.node_a, &pod_b);
        }
        route_del_if_present(&self.node_b, &pod_b);
    }
}

/// Where one migration takes the pod, as the reference controller needs to
/// know it: the namespace it leaves and the one it is restored in, its new
/// address (if it changes), and the route switch (and its undoing).
pub trait PodMove: Sync {
    /// The namespace the pod runs in now.
    fn source_ns(&self) -> &Netns;
    /// The namespace it is restored in.
    fn dest_ns(&self) -> &Netns;
    /// Its address after the move, if it changes.
    fn new_ip(&self) -> Option<Ipv4Addr>;
    /// Routes the pod's addresses to where it lands.
    fn switch_routes(&self);
    /// Undoes [`switch_routes`](Self::switch_routes) (the pod stays).
    fn restore_routes(&self);
}

/// The first move: pod A to pod B.
impl PodMove for TwoNode {
    fn source_ns(&self) -> &Netns {
        &self.pod_a
    }
    fn dest_ns(&self) -> &Netns {
        &self.pod_b
    }
    fn new_ip(&self) -> Option<Ipv4Addr> {
        (!self.same_ip()).then_some(self.pod_b_ip)
    }
    fn switch_routes(&self) {
        TwoNode::switch_routes(self);
    }
    fn restore_routes(&self) {
        TwoNode::restore_routes(self);
    }
}

/// Pod C's address: the third one a pod has, for a second move.
pub const POD_C_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 30);
/// Pod D's address: the pod back behind node A, at yet another address.
pub const POD_D_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 40);

/// One more pod namespace behind a node of a [`TwoNode::new_ip`] topology,
/// for a second move: `ip` on its eth0, and the pod's two earlier addresses
/// ([`POD_IP`] and pod B's) on `lo`, so CRIU can restore sockets bound to
/// either. Its node routes to it only when a move switches routes. Dropping
/// it deletes the namespace (and the veth).
#[derive(Debug)]
pub struct ExtraPod {
    pub ns: Netns,
    /// Its node's side of the veth.
    pub host_if: &'static str,
    pub ip: Ipv4Addr,
    /// Behind node A, the proxy's own node (else behind node B).
    pub behind_origin: bool,
}

impl ExtraPod {
    /// Pod C: `{prefix}podc` behind node B (`pod1`), at [`POD_C_IP`].
    pub fn pod_c(t: &TwoNode, prefix: &str) -> ExtraPod {
        Self::behind(t, false, "pod1", &format!("{prefix}podc"), POD_C_IP)
    }

    /// Pod D: `{prefix}podd` behind node A (`pod2`), at [`POD_D_IP`].
    pub fn pod_d(t: &TwoNode, prefix: &str) -> ExtraPod {
        Self::behind(t, true, "pod2", &format!("{prefix}podd"), POD_D_IP)
    }

    fn behind(
        t: &TwoNode,
        behind_origin: bool,
        host_if: &'static str,
        name: &str,
        ip: Ipv4Addr,
    ) -> ExtraPod {
        let p = ExtraPod {
            ns: fresh_pod(t, behind_origin, host_if, name, ip),
            host_if,
            ip,
            behind_origin,
        };
        for old in [t.pod_ip, t.pod_b_ip] {
            addr_add(&p.ns, "lo", &format!("{old}/32"));
        }
        p
    }
}

/// The second move of a [`TwoNode::new_ip`] pod, from pod B to an
/// [`ExtraPod`]:
/// - to pod C (behind node B): node B routes pod C's address to it, and node
///   A (the anchor, which already routes the pod's first two addresses to
///   node B) routes pod C's there too;
/// - to pod D (back behind node A, the proxy's own node): node A routes pod
///   D's address and the pod's first two to pod D, whose sockets still use
///   those two. Nothing is translated between a proxy and a pod on one node.
pub struct SecondMove<'a> {
    pub t: &'a TwoNode,
    pub to: &'a ExtraPod,
}

impl PodMove for SecondMove<'_> {
    fn source_ns(&self) -> &Netns {
        &self.t.pod_b
    }
    fn dest_ns(&self) -> &Netns {
        &self.to.ns
    }
    fn new_ip(&self) -> Option<Ipv4Addr> {
        Some(self.to.ip)
    }
    fn switch_routes(&self) {
        let (t, to) = (self.t, self.to);
        if self.to.behind_origin {
            for ip in [to.ip, t.pod_ip, t.pod_b_ip] {
                ip_route(
                    &t.node_a,
                    "replace",
                    &pod_route(to.host_if, ip, t.node_a_ip),
                );
            }
        } else {
            // Node B first, so nothing reaches it before it can deliver.
            ip_route(
                &t.node_b,
                "replace",
                &pod_route(to.host_if, to.ip, t.node_b_ip),
            );
            ip_route(&t.node_a, "replace", &t.via_node_b(to.ip));
        }
    }
    fn restore_routes(&self) {
        let (t, to) = (self.t, self.to);
        let cidr = format!("{}/32", to.ip);
        route_del_if_present(&t.node_a, &cidr);
        if self.to.behind_origin {
            for ip in [t.pod_ip, t.pod_b_ip] {
                ip_route(&t.node_a, "replace", &t.via_node_b(ip));
            }
        } else {
            route_del_if_present(&t.node_b, &cidr);
        }
    }
}

/// A same-IP [`TwoNode`]'s pod moving back from pod B to pod A: the move
/// after a first one, for pods that ping-pong between the two nodes. Node A
/// (the origin) is the destination too.
pub struct Back<'a>(pub &'a TwoNode);

impl PodMove for Back<'_> {
    fn source_ns(&self) -> &Netns {
        &self.0.pod_b
    }
    fn dest_ns(&self) -> &Netns {
        &self.0.pod_a
    }
    fn new_ip(&self) -> Option<Ipv4Addr> {
        assert!(self.0.same_ip(), "Back moves a same-IP pod only");
        None
    }
    fn switch_routes(&self) {
        self.0.restore_routes();
    }
    fn restore_routes(&self) {
        self.0.switch_routes();
    }
}

/// Where a pod runs: its namespace, its node's side of the veth, and which
/// node that is.
#[derive(Clone, Copy)]
pub struct Place<'a> {
    pub ns: &'a Netns,
    pub host_if: &'a str,
    pub behind_a: bool,
}

impl TwoNode {
    /// Pod A's place (where a pod starts).
    pub fn place_a(&self) -> Place<'_> {
        Place {
            ns: &self.pod_a,
            host_if: self.node_pod_if(),
            behind_a: true,
        }
    }
}

/// A fresh pod namespace `name` behind node A (`behind_a`) or node B, on a
/// veth `host_if`, at `ip` (wired as [`wire_pod_unrouted`]: its node routes
/// it only when a move switches routes). A runtime restores a checkpoint
/// into a new sandbox, never into the one it left; dropping the guard
/// deletes the namespace and its veth.
pub fn fresh_pod(t: &TwoNode, behind_a: bool, host_if: &str, name: &str, ip: Ipv4Addr) -> Netns {
    let node = if behind_a { &t.node_a } else { &t.node_b };
    let ns = Netns::create(name);
    wire_pod_unrouted(node, host_if, &ns, ip);
    rp_filter_off(&ns, &[POD_IF, "lo"]);
    rp_filter_off(node, &[host_if]);
    node.sysctl(&format!("net.ipv4.conf.{host_if}.send_redirects"), "0");
    ns
}

/// One move of a pod that goes back and forth between node A and node B
/// of a [`TwoNode`] at a new address every time (the soak's pod), from one
/// [`Place`] to a fresh one: `ip` is where it lands, `history` every address
/// it had before (the sockets it keeps are bound to those).
/// [`Hop::prepare`] readies the destination first ([`fresh_pod`] made it at
/// `ip`): the history on its `lo`. Routes: every address of the pod goes wherever it
/// lands (node A routes them to node B, or straight to the pod; node B to
/// the pod).
pub struct Hop<'a> {
    pub t: &'a TwoNode,
    pub from: Place<'a>,
    pub to: Place<'a>,
    pub ip: Ipv4Addr,
    pub history: &'a [Ipv4Addr],
}

impl Hop<'_> {
    /// Puts the pod's earlier addresses on the destination's `lo`.
    pub fn prepare(&self) {
        let ns = self.to.ns;
        for old in self.history {
            ns.ip(&["addr", "replace", &format!("{old}/32"), "dev", "lo"]);
        }
    }

    fn route_all_to(&self, p: Place<'_>) {
        let t = self.t;
        for ip in self.history.iter().chain([&self.ip]) {
            if p.behind_a {
                ip_route(
                    &t.node_a,
                    "replace",
                    &pod_route(p.host_if, *ip, t.node_a_ip),
                );
            } else {
                ip_route(
                    &t.node_b,
                    "replace",
                    &pod_route(p.host_if, *ip, t.node_b_ip),
                );
                ip_route(&t.node_a, "replace", &t.via_node_b(*ip));
            }
        }
    }
}

impl PodMove for Hop<'_> {
    fn source_ns(&self) -> &Netns {
        self.from.ns
    }
    fn dest_ns(&self) -> &Netns {
        self.to.ns
    }
    fn new_ip(&self) -> Option<Ipv4Addr> {
        Some(self.ip)
    }
    fn switch_routes(&self) {
        self.route_all_to(self.to);
    }
    fn restore_routes(&self) {
        self.route_all_to(self.from);
    }
}
