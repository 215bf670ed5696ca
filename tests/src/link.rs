//! Link, address and route builders: thin wrappers over `ip -n NS ...`.
//!
//! They panic with `ip`'s stderr on failure. Nothing here needs cleaning up on
//! its own: links, addresses and routes vanish with their namespace, so the
//! [`Netns`] guards are the cleanup.

use crate::netns::Netns;

/// Creates a veth pair directly in both namespaces: `if_a` in `a`, `if_b` in
/// `b` (never visible in the caller's namespace, so names can't clash there).
/// Both ends stay down; see [`link_up`].
pub fn veth(a: &Netns, if_a: &str, b: &Netns, if_b: &str) {
    a.ip(&[
        "link",
        "add",
        if_a,
        "type",
        "veth",
        "peer",
        "name",
        if_b,
        "netns",
        b.name(),
    ]);
}

/// `ip addr add CIDR dev IF` in `ns`.
pub fn addr_add(ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&["addr", "add", cidr, "dev", ifname]);
}

/// `ip addr add CIDR dev IF scope link` in `ns` (e.g. the pod gateway
/// `169.254.1.1/32` on a pod's host-side veth).
pub fn addr_add_scope_link(ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&["addr", "add", cidr, "dev", ifname, "scope", "link"]);
}

/// `ip link set IF up` in `ns`.
pub fn link_up(ns: &Netns, ifname: &str) {
    ns.ip(&["link", "set", ifname, "up"]);
}

/// `ip route add ARGS...` in `ns`, e.g. `&["default", "via", "10.77.1.1"]`.
pub fn route_add(ns: &Netns, args: &[&str]) {
    let mut argv = vec!["route", "add"];
    argv.extend_from_slice(args);
    ns.ip(&argv);
}

/// Sets `rp_filter` to 0 on `all`, `default` and each of `ifaces` in `ns`: a
/// node forwards between asymmetric paths (pod routes are /32 on veths).
pub fn rp_filter_off(ns: &Netns, ifaces: &[&str]) {
    for conf in ["all", "default"].iter().chain(ifaces) {
        ns.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0");
    }
}

/// While alive, every packet `ns` sends is dropped (an nftables output
/// hook): a host that lost power, or a pod behind CRIU's network lock,
/// answers nothing. Dropping the guard lets packets through again.
pub struct Blackhole<'a> {
    ns: &'a Netns,
}

const BLACKHOLE_TABLE: &str = "shepherd_blackhole";

/// Starts dropping everything `ns` sends.
pub fn blackhole(ns: &Netns) -> Blackhole<'_> {
    ns.run(&["nft", "add", "table", "inet", BLACKHOLE_TABLE]);
    ns.run(&[
        "nft",
        &format!(
            "add chain inet {BLACKHOLE_TABLE} out {{ type filter hook output priority 0; policy drop; }}"
        ),
    ]);
    Blackhole { ns }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        let out = self
            .ns
            .exec(&["nft", "delete", "table", "inet", BLACKHOLE_TABLE]);
        if !out.status.success() {
            eprintln!(
                "warning: lifting the blackhole in {}: {}",
                self.ns.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
