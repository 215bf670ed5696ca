//! Packet capture on one interface of a namespace, counting TCP RSTs.
//!
//! Shepherd promises clients never see a reset, so tests capture on the
//! client's interface and assert that no RST went by. [`Capture::start`] opens
//! an AF_PACKET raw socket inside the namespace, bound to the interface, before
//! it returns (nothing is missed), and a thread parses every frame (both
//! directions) with `etherparse`. Malformed frames are counted, never fatal.
//! [`Capture::stop`] returns a [`CaptureReport`]; dropping the guard stops too.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use crate::netns::{in_netns, Netns};

// Linux UAPI values (linux/if_packet.h, asm-generic/socket.h) that libc does not
// export on every target.
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_OUTGOING: u8 = 4;
const SO_RCVBUFFORCE: libc::c_int = 33;

#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: u32,
    tp_drops: u32,
}

/// What a capture saw.
#[derive(Debug, Clone, Default)]
pub struct CaptureReport {
    /// Frames received (both directions).
    pub frames: u64,
    /// Frames that carried a TCP segment (a GSO frame counts once).
    pub tcp_packets: u64,
    /// TCP segments with RST set.
    pub rsts: u64,
    /// One line per RST: `DIR SRC:PORT > DST:PORT seq=N ack=N t=S`, DIR
    /// being `in` or `out` as seen from the captured interface, and S the
    /// wall clock's seconds modulo 100 000 (to line up with a log).
    pub rst_lines: Vec<String>,
    /// RSTs on the harness's own readiness probes (not counted in `rsts`).
    pub probe_rsts: u64,
    /// Frames etherparse could not parse.
    pub malformed: u64,
    /// Frames the kernel dropped because the socket's buffer was full.
    pub kernel_drops: u64,
    /// A receive error that ended the capture early, if any.
    pub error: Option<String>,
    /// TCP segments per IPv4 address seen as source or destination (a
    /// segment counts for both of its addresses).
    pub tcp_by_addr: std::collections::BTreeMap<std::net::Ipv4Addr, u64>,
}

/// A running capture; see the module docs.
#[derive(Debug)]
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<CaptureReport>>,
}

impl Capture {
    /// Starts capturing on `ifname` inside `ns`. The socket is open and bound
    /// when this returns. Panics if it can't be (e.g. no such interface).
    pub fn start(ns: &Netns, ifname: &str) -> Capture {
        let fd = in_netns(ns, || open_socket(ifname)).unwrap_or_else(|e| {
            panic!(
                "capture: AF_PACKET socket on {ifname} in netns {}: {e}",
                ns.name()
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn(move || capture_loop(&fd, &flag))
            .expect("spawn capture thread");
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture and returns what it saw.
    pub fn stop(mut self) -> CaptureReport {
        self.finish()
    }

    fn finish(&mut self) -> CaptureReport {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| CaptureReport {
                error: Some("capture thread panicked".into()),
                ..CaptureReport::default()
            }),
            None => CaptureReport::default(),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.finish();
    }
}

fn last_err<T>() -> io::Result<T> {
    Err(io::Error::last_os_error())
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        last_err()
    }
}

/// Opens an AF_PACKET socket bound to `ifname` (in the current thread's netns).
fn open_socket(ifname: &str) -> io::Result<OwnedFd> {
    let cname = CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return last_err();
    }
    // Protocol 0: receive nothing until bind() names the interface, so the
    // capture never sees other interfaces' frames.
    // SAFETY: plain socket(2) call.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return last_err();
    }
    // SAFETY: `raw` is a fresh fd that we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A big buffer, so a bulk transfer doesn't overflow it (drops are reported).
    let size: libc::c_int = 8 << 20;
    if setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_RCVBUFFORCE, &size).is_err() {
        setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &size)?;
    }
    // A short receive timeout, so the thread notices `stop`.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // SAFETY: an all-zero sockaddr_ll is valid; we then fill the used fields.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return last_err();
    }
    Ok(fd)
}

fn capture_loop(fd: &OwnedFd, stop: &AtomicBool) -> CaptureReport {
    let mut report = CaptureReport::default();
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                _ => {
                    report.error = Some(format!("recvfrom: {e}"));
                    break;
                }
            }
        }
        let outgoing = from.sll_pkttype == PACKET_OUTGOING;
        record_frame(&mut report, &buf[..n as usize], outgoing);
    }
    let mut stats = TpacketStats::default();
    let mut len = size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `stats` is a valid tpacket_stats of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            (&mut stats as *mut TpacketStats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        report.kernel_drops = u64::from(stats.tp_drops);
    }
    report
}

/// Accounts one Ethernet frame; never panics on malformed input.
pub fn record_frame(report: &mut CaptureReport, frame: &[u8], outgoing: bool) {
    report.frames += 1;
    let packet = match SlicedPacket::from_ethernet(frame) {
        Ok(p) => p,
        Err(_) => {
            report.malformed += 1;
            return;
        }
    };
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return;
    };
    report.tcp_packets += 1;
    if let Some(NetSlice::Ipv4(ip)) = &packet.net {
        for a in [ip.header().source_addr(), ip.header().destination_addr()] {
            *report.tcp_by_addr.entry(a).or_default() += 1;
        }
    }
    if !tcp.rst() {
        return;
    }
    if let Some(NetSlice::Ipv4(ip)) = &packet.net {
        let h = ip.header();
        let ends = [
            std::net::SocketAddr::from((h.source_addr(), tcp.source_port())),
            std::net::SocketAddr::from((h.destination_addr(), tcp.destination_port())),
        ];
        if ends.into_iter().any(crate::process::is_probe) {
            // A harness readiness probe's teardown, not a connection under test.
            report.probe_rsts += 1;
            return;
        }
    }
    report.rsts += 1;
    let (src, dst) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().to_string(),
            ip.header().destination_addr().to_string(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            format!("[{}]", ip.header().source_addr()),
            format!("[{}]", ip.header().destination_addr()),
        ),
        _ => ("?".into(), "?".into()),
    };
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() % 100_000) as f64 / 1000.0);
    report.rst_lines.push(format!(
        "{} {src}:{} > {dst}:{} seq={} ack={} t={at:.3}",
        if outgoing { "out" } else { "in" },
        tcp.source_port(),
        tcp.destination_port(),
        tcp.sequence_number(),
        tcp.acknowledgment_number(),
    ));
}

#[cfg(test)]
mod tests {
    use super::{record_frame, CaptureReport};
    use etherparse::PacketBuilder;

    fn tcp_frame(rst: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 77, 2, 10], [10, 77, 1, 2], 64)
            .tcp(7000, 40000, 1234, 1000);
        if rst {
            b = b.rst();
        }
        let mut out = Vec::new();
        b.write(&mut out, &[]).expect("build frame");
        out
    }

    #[test]
    fn counts_tcp_and_rsts() {
        let mut r = CaptureReport::default();
        record_frame(&mut r, &tcp_frame(false), false);
        record_frame(&mut r, &tcp_frame(true), true);
        record_frame(&mut r, &[0xff; 7], false);
        record_frame(&mut r, &tcp_frame(true)[..30], false);
        assert_eq!((r.frames, r.tcp_packets, r.rsts, r.malformed), (4, 2, 1, 2));
        assert_eq!(r.rst_lines.len(), 1, "{:?}", r.rst_lines);
        assert!(
            r.rst_lines[0].starts_with("out 10.77.2.10:7000 > 10.77.1.2:40000 seq=1234 ack=0 t="),
            "{:?}",
            r.rst_lines
        );
    }
}
