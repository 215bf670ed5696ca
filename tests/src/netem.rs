//! Loss and delay on a forwarding namespace, as `tc qdisc add … netem loss
//! 5% delay 50ms` would give, for kernels built without `sch_netem` (these
//! machines: neither netem nor fq is configured, see `docs/testing.md`).
//!
//! An iptables rule in the namespace's FORWARD chain queues every forwarded
//! packet to userspace (NFQUEUE); a thread here drops each one with the
//! given probability and gives the others back to the kernel after the
//! given delay, in the order they came. The packets are the real ones, on
//! the real path: only the scheduling is done here instead of in a qdisc.
//! (`iptables-legacy`: the nftables `queue` expression is not built into
//! these kernels, the xtables NFQUEUE target is.)
use crate::netns::in_netns;
use nfq::{Queue, Verdict};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do to forwarded packets.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// The probability that a packet is dropped.
    pub loss: f64,
    /// How long every packet that is not dropped is held back.
    pub delay: Duration,
}

/// What the impairment did.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetemReport {
    pub packets: u64,
    pub dropped: u64,
    /// The longest a packet was held, beyond the delay asked for.
    pub late: Duration,
}

/// Impairs what `ns` forwards while alive; dropping it (or [`stop`]) lets
/// every packet through again, the queued ones first.
///
/// [`stop`]: Netem::stop
pub struct Netem {
    /// The namespace's name.
    ns: String,
    rule: Vec<String>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<NetemReport, String>>>,
}

/// The queue's capacity: at the delay, what the tests send stays far below.
const QUEUE_LEN: u32 = 65_536;

impl Netem {
    /// Starts impairing the packets `ns` forwards, on NFQUEUE `queue` (unique
    /// per namespace).
    pub fn start(ns: &str, queue: u16, imp: Impairment) -> Netem {
        let mut q =
            in_netns(ns, Queue::open).unwrap_or_else(|e| panic!("NFQUEUE socket in {ns}: {e}"));
        let setup = q
            .bind(queue)
            .and_then(|()| q.set_queue_max_len(queue, QUEUE_LEN))
            // A full queue lets packets through rather than dropping them:
            // the loss is the one asked for, no more.
            .and_then(|()| q.set_fail_open(queue, true));
        if let Err(e) = setup {
            panic!("NFQUEUE {queue} in {ns}: {e}");
        }
        q.set_nonblocking(true);
        // `--queue-bypass`: should the thread stop early (its socket
        // closes), packets flow unimpaired instead of being dropped.
        let rule: Vec<String> = ["FORWARD", "-j", "NFQUEUE", "--queue-bypass", "--queue-num"]
            .iter()
            .map(|s| s.to_string())
            .chain([queue.to_string()])
            .collect();
        let out = iptables(ns, "-I", &rule);
        assert!(
            out.status.success(),
            "iptables-legacy -I {} in {ns}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let stop = stop.clone();
            std::thread::spawn(move || run(q, imp, &stop))
        };
        Netem {
            ns: ns.to_string(),
            rule,
            stop,
            worker: Some(worker),
        }
    }

    /// Lets every packet through again and says what was done.
    pub fn stop(mut self) -> NetemReport {
        self.finish()
            .unwrap_or_else(|e| panic!("netem in {}: {e}", self.ns))
    }

    fn finish(&mut self) -> Result<NetemReport, String> {
        // The rule goes first: nothing more is queued, then the thread
        // gives back what it holds.
        let out = iptables(&self.ns, "-D", &self.rule);
        if !out.status.success() {
            eprintln!(
                "warning: removing the NFQUEUE rule in {}: {}",
                self.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.stop.store(true, Ordering::Release);
        match self.worker.take() {
            Some(w) => w
                .join()
                .unwrap_or_else(|_| Err("the netem thread panicked".into())),
            None => Ok(NetemReport::default()),
        }
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        if self.worker.is_some() {
            if let Err(e) = self.finish() {
                eprintln!("warning: netem in {}: {e}", self.ns);
            }
        }
    }
}

fn iptables(ns: &str, op: &str, rule: &[String]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "iptables-legacy", "-w", op])
        .args(rule)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} iptables-legacy: {e}"))
}

fn run(mut q: Queue, imp: Impairment, stop: &AtomicBool) -> Result<NetemReport, String> {
    let mut report = NetemReport::default();
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let mut rng = fastrand::Rng::with_seed(0x5eed_4e7e);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        // Everything queued so far.
        loop {
            match q.recv() {
                Ok(mut msg) => {
                    report.packets += 1;
                    if rng.f64() < imp.loss {
                        report.dropped += 1;
                        msg.set_verdict(Verdict::Drop);
                        q.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
                    } else {
                        held.push_back((Instant::now() + imp.delay, msg));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // The socket's buffer overflowed: the kernel let those
                // packets through (fail-open); carry on.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => break,
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
        // Those whose delay is over (all of them when stopping), in order.
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| stopping || *due <= now) {
            let Some((due, mut msg)) = held.pop_front() else {
                break;
            };
            report.late = report.late.max(now.saturating_duration_since(due));
            msg.set_verdict(Verdict::Accept);
            q.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
        }
        if stopping {
            return Ok(report);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
