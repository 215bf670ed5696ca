//! This node's own addresses, as its network namespace has them now.
use std::io;
use std::net::Ipv4Addr;

/// Every IPv4 address on an interface of the current network namespace.
pub fn node_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_among_them() {
        let addrs = super::node_addresses().expect("getifaddrs");
        assert!(addrs.contains(&std::net::Ipv4Addr::LOCALHOST), "{addrs:?}");
    }
}
