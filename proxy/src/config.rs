//! The agent's typed configuration, parsed and checked before anything binds
//! a socket or touches the kernel.
use crate::relay::Mechanism;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/shepherd/shepherd.sock";

#[derive(Clone, Debug)]
pub struct Config {
    pub api_socket: PathBuf,
    pub intercept_ifaces: Vec<String>,
    pub shield_ifaces: Vec<String>,
    pub hold_deadline: Duration,
    pub quiesce_timeout: Duration,
    pub connect_timeout: Duration,
    pub hold_buffer_per_conn: usize,
    pub hold_buffer_total: usize,
    /// Cap on the bytes one endpoint's connections hold together (`None`:
    /// a quarter of the total, at least the per-connection cap).
    pub hold_buffer_per_endpoint: Option<usize>,
    pub listen_backlog: i32,
    /// Take over from an agent already running on this API socket (a
    /// hand-over) instead of refusing to start.
    pub takeover: bool,
    /// The hand-over protocol spoken (tests make it another).
    pub handover_protocol: u32,
    /// After handing over, wait for SIGTERM instead of exiting (a
    /// DaemonSet would restart a container that exits).
    pub after_handover_wait: bool,
    /// Where to write this agent's instance id once it serves.
    pub ready_file: Option<PathBuf>,
    /// Load and swap the eBPF programs in a hand-over even when the
    /// predecessor runs the same object (tests).
    pub handover_reload: bool,
    pub relay: Mechanism,
    /// Data-plane threads, each with its own listener and connections.
    pub data_threads: usize,
    /// Relayed connections at once (`None`: what RLIMIT_NOFILE allows).
    pub max_connections: Option<usize>,
    /// Entries of the kernel's endpoint maps: registered endpoints, and
    /// removed ones whose connections are still draining.
    pub max_endpoints: u32,
    /// Entries of the kernel's translation map (two per translated flow).
    pub max_translations: u32,
    /// Entries of the kernel's proxied-flow map (LRU: the oldest goes).
    pub max_proxied_flows: u32,
    /// Keepalive and user timeout of relayed sockets.
    pub liveness: crate::transport::liveness::Liveness,
}

/// Most endpoints `--max-endpoints` may ask for (the kernel maps are
/// allocated up front, about 100 bytes per entry per CPU for the counters).
pub const MAX_ENDPOINTS_CEILING: u32 = 65_536;

impl Config {
    /// The per-endpoint hold cap in force.
    pub fn hold_buffer_per_endpoint(&self) -> usize {
        self.hold_buffer_per_endpoint
            .unwrap_or((self.hold_buffer_total / 4).max(self.hold_buffer_per_conn))
    }

    /// Checks relations between values; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.intercept_ifaces.is_empty() {
            return Err(
                "no --intercept-iface given: name at least one client-facing interface".into(),
            );
        }
        for i in self.intercept_ifaces.iter().chain(&self.shield_ifaces) {
            if i.is_empty() || i.len() > 15 || i.contains('/') {
                return Err(format!("invalid interface name {i:?}"));
            }
        }
        if self.hold_buffer_per_conn > self.hold_buffer_total {
            return Err(format!(
                "--hold-buffer-per-conn ({}) is larger than --hold-buffer-total ({})",
                self.hold_buffer_per_conn, self.hold_buffer_total
            ));
        }
        let per_ep = self.hold_buffer_per_endpoint();
        if per_ep < self.hold_buffer_per_conn || per_ep > self.hold_buffer_total {
            return Err(format!(
                "--hold-buffer-per-endpoint ({per_ep}) must be between --hold-buffer-per-conn ({}) \
                 and --hold-buffer-total ({})",
                self.hold_buffer_per_conn, self.hold_buffer_total
            ));
        }
        let max = shepherd_common::MAX_LISTENERS as usize;
        if self.data_threads == 0 || self.data_threads > max {
            return Err(format!(
                "--data-threads must be between 1 and {max} (got {})",
                self.data_threads
            ));
        }
        if self.max_endpoints == 0 || self.max_endpoints > MAX_ENDPOINTS_CEILING {
            return Err(format!(
                "--max-endpoints must be between 1 and {MAX_ENDPOINTS_CEILING} (got {})",
                self.max_endpoints
            ));
        }
        self.liveness.validate()?;
        if !(2..=1 << 20).contains(&self.max_translations) {
            return Err(format!(
                "--max-translations must be between 2 and {} (got {})",
                1 << 20,
                self.max_translations
            ));
        }
        if !(16..=1 << 22).contains(&self.max_proxied_flows) {
            return Err(format!(
                "--max-proxied-flows must be between 16 and {} (got {})",
                1 << 22,
                self.max_proxied_flows
            ));
        }
        if self.hold_deadline.is_zero() {
            return Err("--hold-deadline must be > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            api_socket: DEFAULT_SOCKET.into(),
            intercept_ifaces: vec!["eth0".into()],
            shield_ifaces: vec![],
            hold_deadline: Duration::from_secs(30),
            quiesce_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            hold_buffer_per_conn: 4 << 20,
            hold_buffer_total: 256 << 20,
            hold_buffer_per_endpoint: None,
            listen_backlog: 4096,
            takeover: true,
            handover_protocol: crate::handover::wire::PROTOCOL,
            after_handover_wait: false,
            ready_file: None,
            handover_reload: false,
            relay: Mechanism::Splice,
            data_threads: 2,
            max_connections: None,
            max_endpoints: 4096,
            max_translations: 65_536,
            max_proxied_flows: crate::intercept::ebpf::DEFAULT_MAX_PROXIED_FLOWS,
            liveness: Default::default(),
        }
    }

    #[test]
    fn valid_config_passes() {
        assert!(base().validate().is_ok());
    }

    #[test]
    fn bad_configs_say_what_to_change() {
        let mut c = base();
        c.intercept_ifaces.clear();
        assert!(c
            .validate()
            .expect_err("no iface")
            .contains("--intercept-iface"));
        let mut c = base();
        c.hold_buffer_per_conn = c.hold_buffer_total + 1;
        assert!(c
            .validate()
            .expect_err("caps")
            .contains("--hold-buffer-total"));
        let mut c = base();
        c.shield_ifaces.push("a-very-long-interface-name".into());
        assert!(c.validate().is_err());
        let mut c = base();
        c.data_threads = 0;
        assert!(c
            .validate()
            .expect_err("threads")
            .contains("--data-threads"));
    }
}
