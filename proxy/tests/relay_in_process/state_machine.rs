//! A property test of the relay's whole state machine, over real loopback
//! sockets: arbitrary interleavings of client writes, holds, releases in
//! both modes, aborts, pod crashes (every backend connection reset) and
//! pauses, against a tight per-connection cap. For every client:
//! - what comes back is the stream it wrote, in order, each byte at most
//!   once (runs of it, never a byte twice or out of place);
//! - without a reconnect and without a crash, all of it comes back;
//! - a byte that never comes back was received by a backend connection:
//!   consumed, as reconnect mode defines it (its pod took it, and with
//!   the pod's connection gone, so is its answer), never lost in the proxy;
//! - a client is only ended by a crash, and then cleanly (EOF, no error).
use super::backend_ends_during_hold::{stoppable_echo_backend, Stop};
use super::*;
use proptest::prelude::*;
use std::sync::Mutex;

#[derive(Clone, Debug)]
enum Op {
    /// Client `conn` writes `len` more bytes of its stream.
    Write {
        conn: usize,
        len: usize,
    },
    Hold,
    Release(ReleaseMode),
    Abort,
    /// The pod dies: every backend connection it has is reset.
    Crash,
    /// Lets the data plane run.
    Pause {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..CLIENTS, 1usize..48_000).prop_map(|(conn, len)| Op::Write { conn, len }),
        2 => Just(Op::Hold),
        1 => Just(Op::Release(ReleaseMode::Resume)),
        1 => Just(Op::Release(ReleaseMode::Reconnect)),
        1 => Just(Op::Abort),
        1 => Just(Op::Crash),
        2 => (0u64..40).prop_map(|ms| Op::Pause { ms }),
    ]
}

const CLIENTS: usize = 3;
/// Held bytes per connection: small, so caps and back-pressure are in play.
const CAP: usize = 64 << 10;

/// Byte `i` of client `conn`'s stream: pseudo-random, so that 16 bytes in a
/// row name their client and position.
fn byte(conn: usize, i: usize) -> u8 {
    let mut z = ((conn as u64) << 40 | i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u8
}

fn stream(conn: usize, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| byte(conn, i)).collect()
}

/// The shortest run of a stream taken as itself: shorter agreement is
/// chance (one byte in 256 agrees by chance; 16 in a row, never).
const WINDOW: usize = 16;

/// Where each byte of `got` sits in client `conn`'s stream of `len` bytes,
/// if `got` is runs of that stream in order, each byte at most once: the
/// positions, strictly increasing. `None` otherwise.
fn positions(conn: usize, len: usize, got: &[u8]) -> Option<Vec<usize>> {
    // How far the stream from `i` and `got` from `j` agree.
    let agree = |i: usize, j: usize| {
        (0..(len - i).min(got.len() - j))
            .take_while(|&d| byte(conn, i + d) == got[j + d])
            .count()
    };
    let mut at = Vec::with_capacity(got.len());
    let (mut i, mut j) = (0, 0);
    while j < got.len() {
        let need = WINDOW.min(got.len() - j);
        // The run goes on here, or after a gap (later in the stream only).
        let k = (i..len).find(|&k| agree(k, j) >= need)?;
        let run = agree(k, j);
        at.extend(k..k + run);
        i = k + run;
        j += run;
    }
    Some(at)
}

/// One client: what it wrote, and what came back. Writes go through a
/// task of their own: a held connection's window closes at its cap, and the
/// write finishes once the hold ends, while the next operations run.
struct Client {
    chunks: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    /// The writing task; it gives the socket's write half back when its
    /// chunks are done (dropping it would half-close the connection).
    writer: Option<tokio::task::JoinHandle<Option<tokio::net::tcp::OwnedWriteHalf>>>,
    open: Option<tokio::net::tcp::OwnedWriteHalf>,
    /// Bytes handed to the writer.
    queued: usize,
    /// Bytes the socket took (a failed write is not counted).
    written: Arc<AtomicUsize>,
    /// Set once a write failed (the proxy closed the connection).
    failed: Arc<std::sync::atomic::AtomicBool>,
    echo: Arc<Mutex<Vec<u8>>>,
    /// How the echo ended: `Some(Ok)` on EOF, `Some(Err)` on an error.
    end: Arc<Mutex<Option<Result<(), String>>>>,
}

async fn client(proxy: SocketAddr) -> Client {
    let s = TcpStream::connect(proxy).await.expect("connect");
    let (mut reader, mut w) = s.into_split();
    let echo = Arc::new(Mutex::new(Vec::new()));
    let end = Arc::new(Mutex::new(None));
    let (e, d) = (echo.clone(), end.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let how = loop {
            match reader.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Ok(mut e) = e.lock() {
                        e.extend_from_slice(&buf[..n]);
                    }
                }
                Err(err) => break Err(err.to_string()),
            }
        };
        if let Ok(mut d) = d.lock() {
            *d = Some(how);
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let written = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (n, f) = (written.clone(), failed.clone());
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if w.write_all(&chunk).await.is_err() {
                f.store(true, Ordering::SeqCst);
                return None;
            }
            n.fetch_add(chunk.len(), Ordering::SeqCst);
        }
        Some(w)
    });
    Client {
        chunks: Some(tx),
        writer: Some(writer),
        open: None,
        queued: 0,
        written,
        failed,
        echo,
        end,
    }
}

async fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (backend, crash, received) = stoppable_echo_backend().await;
    let r = rig_on(
        backend,
        Mechanism::Copy,
        CAP,
        16 << 20,
        Duration::from_secs(60),
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(client(r.proxy).await);
    }
    let mut id = 0u32;
    let mut holding = false;
    let (mut lossy, mut crashed) = (false, false);
    for op in &ops {
        let mig = format!("p{id}");
        match *op {
            Op::Write { conn, len } => {
                let c = &mut clients[conn];
                let bytes = stream(conn, c.queued, len);
                if c.chunks.as_ref().is_some_and(|t| t.send(bytes).is_ok()) {
                    c.queued += len;
                }
            }
            Op::Hold => {
                if !holding {
                    let st = r.control.hold(&mig, &hold_req(r.endpoint)).await;
                    prop_assert!(st.is_ok(), "hold: {st:?}");
                    holding = true;
                }
            }
            Op::Release(mode) => {
                if holding {
                    let st = r.control.release(&mig, mode, None);
                    prop_assert!(st.is_ok(), "release: {st:?}");
                    lossy |= mode == ReleaseMode::Reconnect;
                    holding = false;
                    id += 1;
                }
            }
            Op::Abort => {
                if holding {
                    let st = r.control.abort(&mig, None);
                    prop_assert!(st.is_ok(), "abort: {st:?}");
                    holding = false;
                    id += 1;
                }
            }
            Op::Crash => {
                crashed = true;
                let _ = crash.send(Some(Stop::Reset));
            }
            Op::Pause { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    if holding {
        let st = r
            .control
            .release(&format!("p{id}"), ReleaseMode::Resume, None);
        prop_assert!(st.is_ok(), "final release: {st:?}");
    }
    // Every write finishes (or fails), then whatever is in flight comes
    // back, or the connection ends.
    for c in &mut clients {
        c.chunks = None;
        if let Some(w) = c.writer.take() {
            let done = tokio::time::timeout(Duration::from_secs(15), w).await;
            prop_assert!(done.is_ok(), "a client's writes never finished");
            c.open = done.ok().and_then(Result::ok).flatten();
        }
    }
    let settle = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done = clients.iter().all(|c| {
            c.echo.lock().map_or(0, |e| e.len()) == c.written.load(Ordering::SeqCst)
                || c.end.lock().is_ok_and(|e| e.is_some())
        });
        if done || std::time::Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if lossy || crashed {
        // What was lost stays lost: let the clock make sure.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received: Vec<Vec<u8>> = received
        .lock()
        .map(|all| {
            all.iter()
                .map(|m| m.lock().map(|v| v.clone()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    for (conn, c) in clients.iter().enumerate() {
        let echo = c.echo.lock().map(|e| e.clone()).unwrap_or_default();
        let end = c.end.lock().map(|e| e.clone()).unwrap_or(None);
        let written = c.written.load(Ordering::SeqCst);
        let failed = c.failed.load(Ordering::SeqCst);
        let at = positions(conn, c.queued, &echo);
        prop_assert!(
            at.is_some(),
            "client {conn}: the echo is not its stream in order, each byte once ({} of {} bytes back)",
            echo.len(),
            written
        );
        let at = at.unwrap_or_default();
        if let Some(Err(e)) = &end {
            prop_assert!(false, "client {conn} ended with an error: {e}");
        }
        if crashed {
            // A crash loses what the pod had not taken: the client is ended
            // cleanly (checked above), nothing more can be asked.
            continue;
        }
        prop_assert!(
            end.is_none(),
            "client {conn} ended without a crash: {end:?}"
        );
        prop_assert!(!failed, "client {conn} could not write without a crash");
        if !lossy {
            prop_assert_eq!(echo.len(), written, "client {}: bytes missing", conn);
            continue;
        }
        // Reconnect mode: every byte missing was taken by the pod on some
        // connection (it is gone with that connection's answer).
        let mut back = vec![false; written];
        for i in at {
            back[i] = true;
        }
        let mut taken = vec![false; written];
        for log in &received {
            if log.len() < WINDOW.min(written) {
                continue;
            }
            if let Some(pos) = positions(conn, written, log) {
                for i in pos {
                    taken[i] = true;
                }
            }
        }
        let lost: Vec<usize> = (0..written).filter(|&i| !back[i] && !taken[i]).collect();
        prop_assert!(
            lost.is_empty(),
            "client {conn}: {} byte(s) neither echoed nor taken by the pod, first at {:?} ({} written)",
            lost.len(),
            lost.first(),
            written
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_interleaving_keeps_order_and_exactly_once(ops in proptest::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_case(ops))?;
    }
}

/// The checker itself: runs in order pass, with gaps; a byte twice, bytes
/// out of order or bytes from elsewhere do not.
#[test]
fn the_checker_refuses_duplicates_reorders_and_strangers() {
    let s = stream(1, 0, 4096);
    assert!(positions(1, 4096, &s).is_some_and(|p| p.len() == 4096));
    let gap = [&s[..1000], &s[1500..]].concat();
    assert_eq!(positions(1, 4096, &gap).map(|p| p[1000]), Some(1500));
    let twice = [&s[..1000], &s[900..]].concat();
    assert!(positions(1, 4096, &twice).is_none(), "a run repeated");
    let swapped = [&s[2000..3000], &s[..2000], &s[3000..]].concat();
    assert!(positions(1, 4096, &swapped).is_none(), "runs out of order");
    assert!(positions(2, 4096, &s).is_none(), "another client's stream");
    let one_dup = [&s[..100], &s[99..100], &s[100..]].concat();
    assert!(positions(1, 4096, &one_dup).is_none(), "one byte twice");
}
