//! Noticing a peer that vanished without a word: TCP keepalive and
//! `TCP_USER_TIMEOUT`, on both of a relayed connection's sockets.
//!
//! A client that loses power, or a pod whose node or namespace disappears,
//! sends no FIN and no RST. Without a timer the proxy keeps its socket (and
//! the other side's) for good when the connection is idle, and for
//! `tcp_retries2` (about 15 minutes) when bytes are outstanding. Keepalive
//! probes an idle connection after `idle`, every `interval`, `probes` times;
//! `TCP_USER_TIMEOUT` ends a connection whose sent bytes (or probes) have
//! gone unacknowledged for `user_timeout`. When one side is given up, the
//! relay closes the other cleanly, as for any backend failure.
//!
//! During a hold the pod is frozen, not dead: CRIU's network lock drops
//! every segment, probes included. Holding a connection therefore turns
//! both timers off on its backend socket, and the release turns them back
//! on. Client sockets keep theirs: clients are alive during a hold.
//!
//! Defaults: probes after 60 s idle, every 10 s, 6 of them, and a user
//! timeout of 120 s (idle + interval × probes, so both agree on when a peer
//! is dead): about two minutes to notice, as Envoy's and HAProxy's common
//! production settings do, and far above any pause a live migration makes.
use socket2::{SockRef, TcpKeepalive};
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// The timers a relayed socket gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Idle time before the first probe; zero turns keepalive off.
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
    /// Zero leaves the kernel's default (`tcp_retries2`).
    pub user_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            probes: 6,
            user_timeout: Duration::from_secs(120),
        }
    }
}

impl Liveness {
    /// No timers at all (unit tests; a socket that must not time out).
    pub const OFF: Liveness = Liveness {
        idle: Duration::ZERO,
        interval: Duration::ZERO,
        probes: 0,
        user_timeout: Duration::ZERO,
    };

    /// Puts the timers on `sock` (accepted sockets inherit them from their
    /// listener).
    pub fn apply(&self, sock: &impl AsFd) -> io::Result<()> {
        let s = SockRef::from(sock);
        if self.idle.is_zero() {
            s.set_keepalive(false)?;
        } else {
            s.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(self.idle)
                    .with_interval(self.interval)
                    .with_retries(self.probes),
            )?;
        }
        s.set_tcp_user_timeout((!self.user_timeout.is_zero()).then_some(self.user_timeout))
    }

    /// Takes both timers off `sock`: its pod is held (frozen), not gone.
    pub fn suspend(sock: &impl AsFd) -> io::Result<()> {
        Self::OFF.apply(sock)
    }

    /// Checks relations between the values; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !self.idle.is_zero() && (self.interval.is_zero() || self.probes == 0) {
            return Err(
                "--keepalive-interval and --keepalive-probes must be > 0 when --keepalive-idle is"
                    .into(),
            );
        }
        if self.user_timeout.as_millis() > u128::from(u32::MAX) {
            return Err("--user-timeout is too large".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn timers_go_on_and_off() {
        let l = crate::transport::listener::plain_listener().expect("listener");
        let s = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let live = Liveness::default();
        live.apply(&s).expect("apply");
        let r = SockRef::from(&s);
        assert!(r.keepalive().expect("keepalive"));
        assert_eq!(r.tcp_keepalive_time().expect("idle"), live.idle);
        assert_eq!(r.tcp_user_timeout().expect("ut"), Some(live.user_timeout));
        Liveness::suspend(&s).expect("suspend");
        assert!(!r.keepalive().expect("keepalive"));
        assert_eq!(r.tcp_user_timeout().expect("ut"), None);
    }

    #[test]
    fn validation_names_the_flag() {
        let bad = Liveness {
            probes: 0,
            ..Liveness::default()
        };
        assert!(bad
            .validate()
            .expect_err("probes")
            .contains("--keepalive-probes"));
        assert!(Liveness::OFF.validate().is_ok());
    }
}
