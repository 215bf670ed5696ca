//! The relay, hold buffer and migration control driven in-process over
//! loopback, with no kernel interception (a recording stand-in replaces the
//! eBPF maps and a fixed original destination replaces getsockname). The
//! privileged tests in `tests/` cover the real kernel path.
use shepherd::control::model::{HoldSpec, MigrationView};
use shepherd::control::{Control, ControlConfig, ENDED_FLOW_LINGER, UNSEEN_FLOW_LIMIT};
use shepherd::endpoint::EndpointAddr;
use shepherd::intercept::RecordingInterception;
use shepherd::migration::{Phase, ReleaseMode};
use shepherd::relay::connection::RelayContext;
use shepherd::relay::hold_buffer::Budget;
use shepherd::relay::Mechanism;
use shepherd::transport::backend::MarkedConnector;
use shepherd::transport::listener::plain_listener;
use shepherd::transport::orig_dst::Fixed;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Rig {
    control: Arc<Control>,
    proxy: SocketAddr,
    endpoint: EndpointAddr,
    /// Bytes the backend has received so far (all connections).
    backend_seen: Arc<AtomicUsize>,
    /// What the control plane asked of the (stand-in) kernel maps.
    intercept: Arc<RecordingInterception>,
}

/// A listener on a free loopback port, and its address.
async fn backend_listener() -> (TcpListener, SocketAddrV4) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = match l.local_addr().expect("addr") {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound v4"),
    };
    (l, addr)
}

/// An echo backend that counts what it receives.
async fn echo_backend() -> (SocketAddrV4, Arc<AtomicUsize>) {
    let (l, addr) = backend_listener().await;
    let seen = Arc::new(AtomicUsize::new(0));
    serve_echo(l, seen.clone());
    (addr, seen)
}

/// Echoes every connection `l` accepts, counting bytes received in `seen`.
fn serve_echo(l: TcpListener, seen: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen.fetch_add(n, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

async fn rig(m: Mechanism, per_conn_cap: usize, total_cap: usize, deadline: Duration) -> Rig {
    rig_on(echo_backend().await, m, per_conn_cap, total_cap, deadline).await
}

/// As [`rig`], with the pod served by `backend` (its address and the count
/// of bytes it received).
async fn rig_on(
    backend: (SocketAddrV4, Arc<AtomicUsize>),
    m: Mechanism,
    per_conn_cap: usize,
    total_cap: usize,
    deadline: Duration,
) -> Rig {
    let (control, endpoint, backend_seen, intercept) =
        control_on(backend, m, per_conn_cap, total_cap, deadline).await;
    let listener = plain_listener().expect("listener");
    let proxy = listener.local_addr().expect("addr");
    static ACCEPTED: AtomicU64 = AtomicU64::new(0);
    let backend = endpoint.0;
    tokio::spawn(shepherd::relay::accept_loop(
        listener,
        control.clone(),
        Arc::new(Fixed(backend)),
        &ACCEPTED,
    ));
    Rig {
        control,
        proxy,
        endpoint,
        backend_seen,
        intercept,
    }
}

/// A control plane with one endpoint, the backend's received-byte count,
/// and the stand-in kernel maps.
type Plane = (
    Arc<Control>,
    EndpointAddr,
    Arc<AtomicUsize>,
    Arc<RecordingInterception>,
);

/// A control plane with one endpoint: an echo backend.
async fn control_for(
    m: Mechanism,
    per_conn_cap: usize,
    total_cap: usize,
    deadline: Duration,
) -> Plane {
    control_on(echo_backend().await, m, per_conn_cap, total_cap, deadline).await
}

/// As [`control_for`], with the endpoint served by `backend`.
async fn control_on(
    (backend, backend_seen): (SocketAddrV4, Arc<AtomicUsize>),
    m: Mechanism,
    per_conn_cap: usize,
    total_cap: usize,
    deadline: Duration,
) -> Plane {
    let relay = RelayContext {
        connector: Arc::new(MarkedConnector {
            timeout: Duration::from_secs(2),
            mark: false,
            liveness: shepherd::transport::liveness::Liveness::default(),
        }),
        budget: Budget::new(total_cap),
        hold_cap_per_conn: per_conn_cap,
        hold_cap_per_endpoint: total_cap,
        close_linger: Duration::from_secs(2),
        next_id: Arc::new(AtomicU64::new(1)),
        slots: shepherd::relay::slots::Slots::new(10_000),
        liveness: shepherd::transport::liveness::Liveness::default(),
        freezer: shepherd::relay::freeze::Freezer::new(),
    };
    let intercept = Arc::new(RecordingInterception::default());
    let control = Control::new(
        ControlConfig {
            default_deadline: deadline,
            quiesce_timeout: Duration::from_secs(2),
            default_relay: m,
            max_endpoints: 4096,
            own_listeners: Vec::new(),
        },
        intercept.clone(),
        relay,
    );
    let endpoint = EndpointAddr(backend);
    control
        .add_endpoints(&[endpoint], None, true)
        .expect("add endpoint");
    (control, endpoint, backend_seen, intercept)
}

fn hold_req(ep: EndpointAddr) -> HoldSpec {
    HoldSpec {
        endpoints: vec![ep],
        deadline_ms: None,
        quiesce_timeout_ms: None,
        to: None,
    }
}

async fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo arrived in time")
        .expect("read echo");
    buf
}

async fn steady_state_relays_both_ways(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    // A short message first: small messages are copied, not spliced.
    c.write_all(b"hi").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 2).await, b"hi");
    let (mut rd, mut wr) = c.split();
    let (echo, _) = tokio::join!(
        async {
            let mut out = vec![0u8; data.len()];
            rd.read_exact(&mut out).await.expect("read echo");
            out
        },
        async { wr.write_all(&data).await.expect("write") }
    );
    assert!(echo == data, "echo differs from what was sent");
    let conns = r.control.connections();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let (spliced, total) = (
        conns[0].bytes_spliced,
        conns[0].bytes_up + conns[0].bytes_down,
    );
    match m {
        // Bulk goes through the pipe, each way.
        Mechanism::Splice => assert!(
            spliced > total / 2,
            "splice mode spliced only {spliced} of {total} bytes"
        ),
        Mechanism::Copy => assert_eq!(spliced, 0, "copy mode spliced"),
    }
    c.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .await
        .expect("eof after half-close");
    assert!(rest.is_empty());
}

/// A hold that lands in the middle of a bulk transfer: bytes in flight
/// inside the proxy (in a splice pipe or a copy buffer) are held with the
/// rest, and the echo comes back complete and in order.
async fn hold_mid_bulk_loses_and_repeats_nothing(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let c = TcpStream::connect(r.proxy).await.expect("connect");
    let total = 24 << 20;
    let data: Arc<Vec<u8>> = Arc::new((0..total).map(|i| (i * 7 % 251) as u8).collect());
    let (mut rd, mut wr) = c.into_split();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&d2).await.expect("write");
        wr.shutdown().await.expect("fin");
    });
    let reader = tokio::spawn(async move {
        let mut echo = Vec::with_capacity(total);
        rd.read_to_end(&mut echo).await.expect("read");
        echo
    });
    // Mid-transfer: some bytes have made the round trip, not all.
    while r.backend_seen.load(Ordering::SeqCst) < 1 << 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let st = r
        .control
        .hold("mb", &hold_req(r.endpoint))
        .await
        .expect("hold");
    assert!(
        st.quiescent,
        "the echo backend acknowledges everything: {st:?}"
    );
    // Quiescent means acknowledged by the pod's kernel; the echo backend may
    // still be reading what it acknowledged. Then nothing more may arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen_at_hold = r.backend_seen.load(Ordering::SeqCst);
    assert!(
        seen_at_hold < total,
        "the hold came too late to test anything"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        r.backend_seen.load(Ordering::SeqCst),
        seen_at_hold,
        "nothing may reach the pod during a hold"
    );
    r.control
        .release("mb", ReleaseMode::Resume, None)
        .expect("release");
    let echo = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("all echoed in time")
        .expect("reader");
    writer.await.expect("writer");
    assert_eq!(echo.len(), data.len(), "echo length");
    assert!(echo == *data, "echo differs from what was sent");
    let st = r.control.status("mb").expect("status");
    assert_eq!(st.bytes_replayed, st.bytes_held);
}

/// TCP urgent data in the middle of a bulk upload: splice cannot move it
/// (it stops at the urgent mark), so the relay must fall back to a plain
/// read rather than stall or take it for the end of the stream. The urgent
/// byte itself is out of band and not part of the stream. (A copied read
/// stops short at the mark too: through `AsyncRead`, tokio took that for a
/// drained socket and cleared its readiness, and the bytes after the mark
/// waited for a segment that never came. The relay reads with `try_read`,
/// which keeps readiness until EAGAIN.)
async fn urgent_data_neither_stalls_nor_cuts_the_stream(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let c = TcpStream::connect(r.proxy).await.expect("connect");
    let first: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 241) as u8).collect();
    let second: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 239) as u8).collect();
    let (mut rd, mut wr) = c.into_split();
    let reader = tokio::spawn(async move {
        let mut echo = Vec::new();
        rd.read_to_end(&mut echo).await.expect("read");
        echo
    });
    wr.write_all(&first).await.expect("write");
    socket2::SockRef::from(wr.as_ref())
        .send_out_of_band(b"!")
        .expect("urgent byte");
    wr.write_all(&second).await.expect("write");
    wr.shutdown().await.expect("fin");
    let echo = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the stream neither stalled nor lost its end")
        .expect("reader");
    let mut want = first;
    want.extend_from_slice(&second);
    assert_eq!(echo.len(), want.len(), "echo length");
    assert!(echo == want, "echo differs from the in-band bytes sent");
}

/// Urgent data queued behind a full hold buffer: once the release frees
/// room, the relay's first read stops short at the urgent mark with the rest
/// of the stream (and the client's FIN) already queued behind it. Through
/// `AsyncRead`, tokio took that short read for a drained socket, cleared the
/// readiness, and the rest waited for a segment that never came; the relay
/// reads with `try_read`, which keeps readiness until EAGAIN.
async fn urgent_mark_behind_a_full_hold_buffer_does_not_stall(m: Mechanism) {
    let cap = 64 * 1024;
    let r = rig(m, cap, 8 << 20, Duration::from_secs(30)).await;
    let c = TcpStream::connect(r.proxy).await.expect("connect");
    r.control
        .hold("urg", &hold_req(r.endpoint))
        .await
        .expect("hold");
    let (mut rd, mut wr) = c.into_split();
    let filler: Vec<u8> = (0..cap as u32).map(|i| (i % 251) as u8).collect();
    let mut want = filler.clone();
    want.extend_from_slice(b"before-mark;after-mark;");
    let n = want.len();
    // No FIN until the end: a FIN already received keeps the socket
    // readable and would hide the stall.
    let reader = tokio::spawn(async move {
        let mut echo = vec![0u8; n];
        rd.read_exact(&mut echo).await.map(|_| echo)
    });
    wr.write_all(&filler).await.expect("write");
    // The hold buffer is full: the relay stops reading, and what follows
    // queues in the proxy's socket.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.control.connections()[0].queued, cap, "hold buffer full");
    wr.write_all(b"before-mark;").await.expect("write");
    socket2::SockRef::from(wr.as_ref())
        .send_out_of_band(b"!")
        .expect("urgent byte");
    wr.write_all(b"after-mark;").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.control
        .release("urg", ReleaseMode::Resume, None)
        .expect("release");
    let echo = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the stream stalled at the urgent mark")
        .expect("reader")
        .expect("read");
    assert!(echo == want, "echo differs from the in-band bytes sent");
    wr.shutdown().await.expect("fin");
}

async fn held_bytes_are_replayed_in_order_exactly_once(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    c.write_all(b"before;").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 7).await, b"before;");

    let st = r
        .control
        .hold("m1", &hold_req(r.endpoint))
        .await
        .expect("hold");
    assert_eq!(st.state, Phase::Holding);
    assert!(st.quiescent, "nothing in flight, so quiescent: {st:?}");
    assert_eq!(st.connections, 1);
    let seen_at_hold = r.backend_seen.load(Ordering::SeqCst);

    let mut held = Vec::new();
    for i in 0..100 {
        let msg = format!("held-{i};");
        held.extend_from_slice(msg.as_bytes());
        c.write_all(msg.as_bytes())
            .await
            .expect("write during hold");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        r.backend_seen.load(Ordering::SeqCst),
        seen_at_hold,
        "nothing may reach the pod during a hold"
    );
    let st = r.control.status("m1").expect("status");
    assert_eq!(st.bytes_held, held.len() as u64);

    let st = r
        .control
        .release("m1", ReleaseMode::Resume, None)
        .expect("release");
    assert_eq!(st.state, Phase::Released);
    assert_eq!(read_exact_timeout(&mut c, held.len()).await, held);
    // Idempotent repeat, and the contradicting call is a conflict.
    assert_eq!(
        r.control
            .release("m1", ReleaseMode::Resume, None)
            .expect("again")
            .state,
        Phase::Released
    );
    assert!(r.control.abort("m1", None).is_err());
    let st = r.control.status("m1").expect("status");
    assert_eq!(st.bytes_replayed, st.bytes_held);
}

async fn connection_opened_during_hold_is_queued_then_served(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    r.control
        .hold("m2", &hold_req(r.endpoint))
        .await
        .expect("hold");
    let mut c = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(r.proxy))
        .await
        .expect("connect is immediate during a hold")
        .expect("connect");
    c.write_all(b"ping").await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        r.backend_seen.load(Ordering::SeqCst),
        0,
        "queued connection must not reach the pod"
    );
    assert_eq!(
        r.control.status("m2").expect("status").connections_queued,
        1
    );
    r.control
        .release("m2", ReleaseMode::Resume, None)
        .expect("release");
    assert_eq!(read_exact_timeout(&mut c, 4).await, b"ping");
}

async fn per_connection_cap_applies_back_pressure_without_loss(m: Mechanism) {
    let cap = 256 * 1024;
    let r = rig(m, cap, 8 << 20, Duration::from_secs(30)).await;
    let c = TcpStream::connect(r.proxy).await.expect("connect");
    r.control
        .hold("m3", &hold_req(r.endpoint))
        .await
        .expect("hold");
    let total = 8 << 20;
    let data: Arc<Vec<u8>> = Arc::new((0..total).map(|i| (i % 253) as u8).collect());
    let (mut rd, mut wr) = c.into_split();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&d2).await.expect("write");
        wr.shutdown().await.expect("fin");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conns = r.control.connections();
    assert_eq!(conns.len(), 1);
    assert!(
        conns[0].queued <= cap,
        "queued {} > cap {cap}",
        conns[0].queued
    );
    assert!(
        !writer.is_finished(),
        "the client must be blocked by the closed window"
    );
    r.control
        .release("m3", ReleaseMode::Resume, None)
        .expect("release");
    let mut echo = Vec::with_capacity(total);
    tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut echo))
        .await
        .expect("all echoed in time")
        .expect("read");
    writer.await.expect("writer");
    assert!(
        echo == *data,
        "echo differs (len {} vs {})",
        echo.len(),
        data.len()
    );
}

async fn deadline_aborts_and_resumes(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_millis(300)).await;
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    c.write_all(b"a").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"a");
    r.control
        .hold("m4", &hold_req(r.endpoint))
        .await
        .expect("hold");
    c.write_all(b"bc").await.expect("write");
    // No release: the deadline aborts and the bytes flow to the original backend.
    assert_eq!(read_exact_timeout(&mut c, 2).await, b"bc");
    let st = r.control.status("m4").expect("status");
    assert_eq!(st.state, Phase::Aborted);
    assert_eq!(st.reason.as_deref(), Some("deadline"));
    assert!(r.control.release("m4", ReleaseMode::Resume, None).is_err());
}

async fn bad_requests_are_rejected_and_change_nothing(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let unknown: EndpointAddr = "10.9.9.9:1".parse().expect("addr");
    assert!(r.control.hold("m5", &hold_req(unknown)).await.is_err());
    assert!(
        r.control.status("m5").is_err(),
        "a failed hold leaves no migration"
    );
    assert!(r
        .control
        .release("nope", ReleaseMode::Resume, None)
        .is_err());
    assert!(r
        .control
        .hold("bad id!", &hold_req(r.endpoint))
        .await
        .is_err());
    r.control
        .hold("m6", &hold_req(r.endpoint))
        .await
        .expect("hold");
    assert!(
        r.control.hold("m7", &hold_req(r.endpoint)).await.is_err(),
        "one hold per endpoint"
    );
    assert!(
        r.control.remove_endpoint(&r.endpoint).is_err(),
        "held endpoints cannot be removed"
    );
    r.control.abort("m6", None).expect("abort");
}

/// One connection whose first bytes the pod has echoed (and so consumed),
/// then held by migration `id`; with its backend socket's local address.
async fn consumed_then_held(r: &Rig, id: &str) -> (TcpStream, Option<String>) {
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    c.write_all(b"consumed;").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 9).await, b"consumed;");
    let backend = r.control.connections()[0].backend_local.clone();
    r.control
        .hold(id, &hold_req(r.endpoint))
        .await
        .expect("hold");
    (c, backend)
}

/// Writes `bytes` on `c` while hold `id` is on, and waits until the hold
/// has queued them all (it held nothing before).
async fn write_held(r: &Rig, c: &mut TcpStream, id: &str, bytes: &[u8]) {
    c.write_all(bytes).await.expect("write during hold");
    let t0 = std::time::Instant::now();
    while r.control.status(id).expect("status").bytes_held < bytes.len() as u64 {
        assert!(t0.elapsed() < Duration::from_secs(5), "never held");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn reconnect_mode_replays_held_bytes_on_a_new_backend_connection(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let (mut c, first_backend) = consumed_then_held(&r, "m8").await;
    c.write_all(b"held-1;held-2;")
        .await
        .expect("write during hold");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = r
        .control
        .release("m8", ReleaseMode::Reconnect, Some("127.0.0.1"))
        .expect("release");
    assert_eq!(st.mode, Some(ReleaseMode::Reconnect));
    // Only the held bytes are replayed; what the pod got before the hold is not.
    assert_eq!(read_exact_timeout(&mut c, 14).await, b"held-1;held-2;");
    let now = r.control.connections()[0].backend_local.clone();
    assert_ne!(now, first_backend, "a new backend connection was expected");
    assert!(r
        .control
        .release("m9", ReleaseMode::Resume, Some("10.0.0.1"))
        .is_err());
    assert!(r
        .control
        .release("m8", ReleaseMode::Reconnect, Some("not-an-ip"))
        .is_err());
}

/// A reconnect release followed by the next hold before a connection has
/// looked: it sees Holding → Holding, yet must still drop the backend
/// socket the restored pod no longer has, and replay everything it held to
/// a new one. On one thread, the release and the hold's first step run with
/// no connection task in between, so the two changes always coalesce.
#[tokio::test(flavor = "current_thread")]
async fn a_reconnect_hidden_by_the_next_hold_still_reconnects() {
    for m in [Mechanism::Copy, Mechanism::Splice] {
        let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
        let (mut c, first_backend) = consumed_then_held(&r, "h1").await;
        write_held(&r, &mut c, "h1", b"held;").await;
        r.control
            .release("h1", ReleaseMode::Reconnect, None)
            .expect("release");
        r.control
            .hold("h2", &hold_req(r.endpoint))
            .await
            .expect("the next hold");
        let h2 = r.control.status("h2").expect("status");
        assert_eq!((h2.connections, h2.bytes_held), (1, 5), "{h2:?}");
        // The dead backend socket is gone from view: nothing to translate.
        assert_eq!(h2.connections_queued, 1, "{h2:?}");
        assert!(h2.backend_flows.is_empty(), "{h2:?}");
        assert_eq!(r.control.connections()[0].backend_local, None);
        // The pod lands at a new address, where it also listens.
        let to = SocketAddrV4::new("127.0.0.2".parse().expect("ip"), r.endpoint.0.port());
        serve_echo(
            TcpListener::bind(to).await.expect("bind"),
            r.backend_seen.clone(),
        );
        r.control.target("h2", *to.ip()).expect("target");
        assert_eq!(r.translations(), 0, "a dead flow must not be translated");
        let h1 = r.control.status("h1").expect("status");
        assert_eq!(
            h1.bytes_replayed, h1.bytes_held,
            "the first hold's bytes are handed on: {h1:?}"
        );
        r.control
            .release("h2", ReleaseMode::Resume, None)
            .expect("release");
        assert_eq!(read_exact_timeout(&mut c, 5).await, b"held;");
        let now = r.control.connections()[0].backend_local.clone();
        assert_ne!(
            now, first_backend,
            "{m:?}: the hidden reconnect must still open a new backend connection"
        );
    }
}

/// A whole hold and release a connection never saw (the hold stopped
/// waiting for quiescence at once) between the release of the hold it is
/// in and its next look: it sees Holding(h1) → Forwarding after h2. Its
/// bytes are replayed once, and both holds' counters add up: h1's held
/// bytes count as replayed (handed on), and h2 never shows more replayed
/// than held. On one thread, nothing runs the connection in between.
#[tokio::test(flavor = "current_thread")]
async fn a_hold_and_release_never_seen_keep_the_counters_straight() {
    let r = rig(Mechanism::Copy, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let (mut c, _) = consumed_then_held(&r, "g1").await;
    write_held(&r, &mut c, "g1", b"held;").await;
    r.control
        .release("g1", ReleaseMode::Resume, None)
        .expect("release");
    let no_wait = HoldSpec {
        quiesce_timeout_ms: Some(0),
        ..hold_req(r.endpoint)
    };
    let st = r.control.hold("g2", &no_wait).await.expect("hold");
    assert!(!st.quiescent, "{st:?}");
    r.control
        .release("g2", ReleaseMode::Resume, None)
        .expect("release");
    assert_eq!(read_exact_timeout(&mut c, 5).await, b"held;");
    let g1 = r.control.status("g1").expect("status");
    assert_eq!(g1.bytes_replayed, g1.bytes_held, "{g1:?}");
    let g2 = r.control.status("g2").expect("status");
    assert!(g2.bytes_replayed <= g2.bytes_held, "{g2:?}");
}

/// The controller vanished after the restore: when the deadline comes, the
/// pod's restored connections already answer from its target (a segment from
/// there crossed the node on a held flow). An abort would send the replay to
/// the address the pod has left, so the deadline releases at the target, in
/// resume mode, and says why. Without that sign it aborts, as before
/// (`deadline_aborts_and_resumes`, `abort_after_target_removes_the_translation`).
async fn a_deadline_after_the_restore_releases_at_the_target(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_millis(500)).await;
    // The restored pod accepts connections at its target.
    let at_target = SocketAddrV4::new("127.0.0.2".parse().expect("ip"), r.endpoint.0.port());
    let l = TcpListener::bind(at_target).await.expect("bind the target");
    serve_echo(l, r.backend_seen.clone());
    let mut c = held_and_translated(&r, "m30").await;
    r.pod_spoke_from_the_target();
    c.write_all(b"held").await.expect("write during hold");
    assert_eq!(read_exact_timeout(&mut c, 4).await, b"held");
    let st = r.control.status("m30").expect("status");
    assert_eq!(st.state, Phase::Released, "{st:?}");
    assert_eq!(st.mode, Some(ReleaseMode::Resume));
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.starts_with("deadline") && reason.contains("target 127.0.0.2"),
        "{reason}"
    );
    assert_eq!(r.translations(), 1, "the flow stays translated");
    // The controller, back, finds it done: a resume release is a no-op.
    r.control
        .release("m30", ReleaseMode::Resume, None)
        .expect("a late release in the same mode");
}

/// As above, but nothing accepts connections at the target (a restore that
/// failed after its sockets had spoken): the deadline aborts, and says why.
async fn a_deadline_aborts_when_the_pod_does_not_answer_at_its_target(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_millis(300)).await;
    let mut c = held_and_translated(&r, "m31").await;
    r.pod_spoke_from_the_target();
    c.write_all(b"held").await.expect("write during hold");
    // Aborted: forwarding resumes to the pod where it was.
    assert_eq!(read_exact_timeout(&mut c, 4).await, b"held");
    let st = r.control.status("m31").expect("status");
    assert_eq!(st.state, Phase::Aborted, "{st:?}");
    let reason = st.reason.unwrap_or_default();
    assert!(reason.contains("accepts no connection there"), "{reason}");
    assert_eq!(r.translations(), 0, "the aborted move's entry is gone");
}

impl Rig {
    /// As the translate programs mark it: a segment from the pod's side
    /// crossed the node on every translated flow (a restored socket's
    /// window probe).
    fn pod_spoke_from_the_target(&self) {
        if let Ok(mut t) = self.intercept.translations.lock() {
            for v in t.values_mut() {
                v.marks[shepherd_common::MARK_SEEN] = 1;
            }
        }
    }

    /// Holds the endpoint under migration `id` and says the pod lands at `to`.
    async fn hold_to(&self, id: &str, to: std::net::Ipv4Addr) -> MigrationView {
        self.control
            .hold(id, &hold_req(self.endpoint))
            .await
            .expect("hold");
        self.control.target(id, to).expect("target")
    }

    /// Backend-flow translations installed in the (stand-in) kernel map.
    fn translations(&self) -> usize {
        self.intercept.translations.lock().map_or(0, |t| t.len())
    }
}

/// One connection that has echoed a byte, held by migration `id`, whose pod
/// then "moves" to 127.0.0.2: its backend flow is translated.
async fn held_and_translated(r: &Rig, id: &str) -> TcpStream {
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    c.write_all(b"x").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"x");
    r.hold_to(id, "127.0.0.2".parse().expect("ip")).await;
    assert_eq!(r.translations(), 1, "the held flow is translated");
    c
}

/// The origin translates a held connection's backend flow when its pod moves
/// to a new address, and removes the entry when that connection closes, so
/// the map does not fill up across migrations.
async fn origin_translation_goes_when_its_connection_closes(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = held_and_translated(&r, "m13").await;
    // Resume: the connection keeps its backend socket (the translated flow).
    r.control
        .release("m13", ReleaseMode::Resume, None)
        .expect("release");
    c.write_all(b"y").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"y");
    assert_eq!(r.translations(), 1, "still in use");
    c.shutdown().await.expect("fin");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.expect("eof");
    let t0 = std::time::Instant::now();
    while r.translations() != 0 && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(r.translations(), 0, "the closed connection's entry is gone");
}

/// A reconnect release drops the translated backend socket: its entry goes
/// at once (a stale one could catch a new flow on the same port), not when
/// the client eventually closes.
async fn reconnect_removes_the_old_flows_translation(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    // The pod came back at the target without its connections.
    let at_target = SocketAddrV4::new("127.0.0.2".parse().expect("ip"), r.endpoint.0.port());
    let l = TcpListener::bind(at_target).await.expect("bind the target");
    serve_echo(l, r.backend_seen.clone());
    let mut c = held_and_translated(&r, "m14").await;
    c.write_all(b"held").await.expect("write during hold");
    r.control
        .release("m14", ReleaseMode::Reconnect, None)
        .expect("release");
    assert_eq!(read_exact_timeout(&mut c, 4).await, b"held");
    assert_eq!(r.translations(), 0, "the dropped backend's entry is gone");
    let peer = r.control.connections()[0].backend_peer.clone();
    assert_eq!(
        peer,
        Some(at_target.to_string()),
        "without --to, the reconnect goes to the target"
    );
}

/// An abort after `target` leaves the pod where it was: the held flow must
/// not keep being rewritten to the address it never moved to.
async fn abort_after_target_removes_the_translation(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = held_and_translated(&r, "m16").await;
    c.write_all(b"held").await.expect("write during hold");
    r.control
        .abort("m16", Some("dump failed".into()))
        .expect("abort");
    assert_eq!(r.translations(), 0, "the aborted migration's entry is gone");
    assert_eq!(read_exact_timeout(&mut c, 4).await, b"held");
}

/// A flow an earlier migration moved (and still translates), re-targeted by
/// a second migration that is then aborted, goes back to the earlier
/// translation: the pod is still where the first migration put it. While
/// the second hold lasts, what the pod sends from its earlier address is
/// still translated back (it is not frozen yet): that entry is kept until
/// the hold ends, and goes at a release.
async fn abort_puts_back_an_earlier_migrations_translation(m: Mechanism) {
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = held_and_translated(&r, "m20").await;
    r.control
        .release("m20", ReleaseMode::Resume, None)
        .expect("release");
    // The flow's own entry (the stand-in keeps one per flow, under the
    // address its sockets use), not the kept pod→node one.
    let new_addr = |r: &Rig| {
        let t = r.intercept.translations.lock().expect("lock");
        let own: Vec<_> = t
            .iter()
            .filter(|(k, v)| **k == k.with_pod_addr(v.old_addr))
            .collect();
        assert!(own.len() <= 1, "{t:?}");
        own.first()
            .map(|(_, t)| std::net::Ipv4Addr::from(t.new_addr.to_ne_bytes()))
    };
    let kept = |r: &Rig| -> Vec<std::net::Ipv4Addr> {
        let t = r.intercept.translations.lock().expect("lock");
        t.iter()
            .filter(|(k, v)| **k != k.with_pod_addr(v.old_addr))
            .map(|(k, _)| std::net::Ipv4Addr::from(k.pod_addr.to_ne_bytes()))
            .collect()
    };
    assert_eq!(new_addr(&r), Some("127.0.0.2".parse().expect("ip")));
    r.hold_to("m21", "127.0.0.3".parse().expect("ip")).await;
    assert_eq!(new_addr(&r), Some("127.0.0.3".parse().expect("ip")));
    assert_eq!(
        kept(&r),
        ["127.0.0.2".parse::<std::net::Ipv4Addr>().expect("ip")],
        "the pod's replies from its earlier address are still translated back"
    );
    r.control.abort("m21", None).expect("abort");
    assert_eq!(
        new_addr(&r),
        Some("127.0.0.2".parse().expect("ip")),
        "the first migration's translation is back"
    );
    // A move back to the registered address removes the translation; an
    // abort of that move puts it back.
    r.hold_to("m23", *r.endpoint.0.ip()).await;
    assert_eq!(new_addr(&r), None, "back home: nothing translated");
    assert_eq!(kept(&r).len(), 1, "but the earlier address still answers");
    r.control.abort("m23", None).expect("abort");
    assert_eq!(new_addr(&r), Some("127.0.0.2".parse().expect("ip")));
    // A move that is released: the kept entry goes with the hold.
    r.hold_to("m24", "127.0.0.4".parse().expect("ip")).await;
    assert_eq!(kept(&r).len(), 1);
    r.control
        .release("m24", ReleaseMode::Resume, None)
        .expect("release");
    assert!(kept(&r).is_empty(), "kept past the release: {:?}", kept(&r));
    assert_eq!(new_addr(&r), Some("127.0.0.4".parse().expect("ip")));
    c.write_all(b"z").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"z");
}

/// The (old, new) pod addresses of each flow's translation in the
/// stand-in map (one entry per flow, under the address its sockets use),
/// sorted.
fn translated_addrs(
    intercept: &RecordingInterception,
) -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    addrs_where(intercept, true)
}

/// The (old, new) addresses of entries kept from an earlier translation
/// while a hold lasts (see `Control::target`), sorted.
fn kept_addrs(intercept: &RecordingInterception) -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    addrs_where(intercept, false)
}

fn addrs_where(
    intercept: &RecordingInterception,
    own: bool,
) -> Vec<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let t = intercept.translations.lock().expect("lock");
    let mut v: Vec<_> = t
        .iter()
        .filter(|(k, t)| (**k == k.with_pod_addr(t.old_addr)) == own)
        .map(|(_, t)| {
            (
                t.old_addr.to_ne_bytes().into(),
                t.new_addr.to_ne_bytes().into(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A pod restored on the node of the proxy that holds its flows (back on
/// the node it left, at a new address): the proxy's and the pod's sockets
/// meet on the pod-facing side, both at the old address. `incoming` there
/// must not put the destination's rewrite over the origin's entries, or the
/// pod's replies would come from an address the proxy's socket does not
/// know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_restored_beside_its_proxy_keeps_the_origin_entries() {
    use shepherd::control::model::IncomingSpec;
    let r = rig(Mechanism::Copy, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let roles = |r: &Rig| -> Vec<u32> {
        let t = r.intercept.translations.lock().expect("lock");
        t.values().map(|t| t.role).collect()
    };
    // Whichever comes first: `incoming` with the flows before `target`...
    let (_c, _) = consumed_then_held(&r, "m40").await;
    let st = r.control.status("m40").expect("status");
    let req = IncomingSpec {
        endpoints: vec![r.endpoint],
        to: Some("127.0.0.2".parse().expect("ip")),
        flows: st.backend_flows.clone(),
        deadline_ms: None,
    };
    let inc = r.control.incoming("m40", &req).expect("incoming");
    assert!(inc.flows.is_empty(), "{inc:?}");
    assert_eq!(r.translations(), 0, "no destination entry for our own flow");
    r.control
        .target("m40", "127.0.0.2".parse().expect("ip"))
        .expect("target");
    assert_eq!(roles(&r), [shepherd_common::ROLE_ORIGIN]);
    // ... or after it.
    let inc = r.control.incoming("m40", &req).expect("incoming again");
    assert!(inc.flows.is_empty(), "{inc:?}");
    assert_eq!(
        roles(&r),
        [shepherd_common::ROLE_ORIGIN],
        "left as they were"
    );
    r.control
        .release("m40", ReleaseMode::Resume, None)
        .expect("release");
    r.control.complete_incoming("m40", None).expect("complete");
}

/// `incoming` reads a flow's `pod_addr` strictly: the endpoint's own
/// address is the same flow as no address, a flow already at the new
/// address needs nothing, and a non-unicast address is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_normalises_and_checks_flow_addresses() {
    use shepherd::control::model::{BackendFlow, IncomingSpec};
    let (dest, ep, _, _) =
        control_for(Mechanism::Copy, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let flow = |port: u16, pod_addr: Option<&str>| BackendFlow {
        node: SocketAddrV4::new("10.1.0.1".parse().expect("ip"), port),
        pod_port: ep.0.port(),
        pod_addr: pod_addr.map(|a| a.parse().expect("ip")),
    };
    let req = |flows: Vec<BackendFlow>| IncomingSpec {
        endpoints: vec![ep],
        to: Some("127.0.0.3".parse().expect("ip")),
        flows,
        deadline_ms: None,
    };
    let st = dest
        .incoming(
            "n1",
            &req(vec![
                flow(40001, None),
                flow(40001, Some("127.0.0.1")),
                flow(40002, Some("127.0.0.3")),
                flow(40003, Some("127.0.0.2")),
            ]),
        )
        .expect("incoming");
    assert_eq!(
        st.flows,
        [flow(40001, None), flow(40003, Some("127.0.0.2"))],
        "one spelling per flow, and nothing for a flow already at the new address"
    );
    for bad in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
        assert!(
            dest.incoming("n2", &req(vec![flow(40004, Some(bad))]))
                .is_err(),
            "{bad} accepted"
        );
    }
}

/// The pod moves on from this node, and that move fails: the controller's
/// `complete` with a reason puts back the earlier migration's entries (the
/// pod stays here, and its flows need them), and gives the flow back to
/// that record. A second move that succeeds keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_move_on_from_this_node_puts_back_the_earlier_entries() {
    use shepherd::control::model::{BackendFlow, IncomingSpec};
    use std::net::Ipv4Addr;
    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("ip") };
    let (dest, _, _, intercept) =
        control_for(Mechanism::Copy, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let flow = BackendFlow {
        node: "10.1.0.1:40001".parse().expect("node"),
        pod_port: 80,
        pod_addr: None,
    };
    let to = |id: &str, new: &str| {
        let req = IncomingSpec {
            endpoints: vec!["10.1.0.5:80".parse().expect("ep")],
            to: Some(ip(new)),
            flows: vec![flow],
            deadline_ms: None,
        };
        dest.incoming(id, &req).expect("incoming")
    };
    to("here", "10.1.0.6");
    dest.complete_incoming("here", None).expect("arrived");
    assert_eq!(
        translated_addrs(&intercept),
        [(ip("10.1.0.5"), ip("10.1.0.6"))]
    );
    // On to another pod on this node; the restore fails.
    to("on", "10.1.0.7");
    assert_eq!(
        translated_addrs(&intercept),
        [(ip("10.1.0.5"), ip("10.1.0.7"))]
    );
    assert!(dest
        .incoming_status("here")
        .expect("status")
        .flows
        .is_empty());
    dest.complete_incoming("on", Some("restore failed".into()))
        .expect("failed");
    assert_eq!(
        translated_addrs(&intercept),
        [(ip("10.1.0.5"), ip("10.1.0.6"))],
        "the earlier translation is back"
    );
    assert_eq!(dest.incoming_status("here").expect("status").flows, [flow]);
    assert!(dest.incoming_status("on").expect("status").flows.is_empty());
    // A move on that succeeds keeps its entries, even if a late reason
    // then says it failed after all... which puts them back too.
    to("again", "10.1.0.8");
    dest.complete_incoming("again", None).expect("arrived");
    assert_eq!(
        translated_addrs(&intercept),
        [(ip("10.1.0.5"), ip("10.1.0.8"))]
    );
    dest.complete_incoming("again", Some("it died after all".into()))
        .expect("late reason");
    assert_eq!(
        translated_addrs(&intercept),
        [(ip("10.1.0.5"), ip("10.1.0.6"))]
    );
    let now = |r: &[(Ipv4Addr, Ipv4Addr)]| assert_eq!(translated_addrs(&intercept), r);
    let held_by_here = || dest.incoming_status("here").expect("status").flows == [flow];
    let at = |new: &str| [(ip("10.1.0.5"), ip(new))];

    // A chain (here → c1 → c2): c1's failure, reported late, leaves c2's
    // entry alone; c2's then brings back here's, not c1's.
    to("c1", "10.1.0.7");
    dest.complete_incoming("c1", None).expect("arrived");
    to("c2", "10.1.0.8");
    dest.complete_incoming("c1", Some("late".into()))
        .expect("late reason");
    now(&at("10.1.0.8"));
    assert!(!held_by_here());
    dest.complete_incoming("c2", Some("failed".into()))
        .expect("failed");
    now(&at("10.1.0.6"));
    assert!(held_by_here());

    // A retry (r2, same address) supersedes r1; r1's late failure leaves
    // r2's entry; r2's failure brings back here's.
    to("r1", "10.1.0.7");
    to("r2", "10.1.0.7");
    dest.complete_incoming("r2", None).expect("arrived");
    dest.complete_incoming("r1", Some("late".into()))
        .expect("late reason");
    now(&at("10.1.0.7"));
    assert!(!held_by_here());
    dest.complete_incoming("r2", Some("failed".into()))
        .expect("failed");
    now(&at("10.1.0.6"));
    assert!(held_by_here());

    // The deadline completed it; the controller's reason still undoes it.
    let late = IncomingSpec {
        endpoints: vec!["10.1.0.5:80".parse().expect("ep")],
        to: Some(ip("10.1.0.9")),
        flows: vec![flow],
        deadline_ms: Some(30),
    };
    dest.incoming("dl", &late).expect("incoming");
    tokio::time::sleep(Duration::from_millis(100)).await;
    now(&at("10.1.0.9"));
    dest.complete_incoming("dl", Some("restore failed".into()))
        .expect("reason after the deadline");
    now(&at("10.1.0.6"));
    // A record the controller said failed takes no new flows.
    let more = IncomingSpec {
        flows: vec![BackendFlow {
            node: "10.1.0.1:40002".parse().expect("node"),
            ..flow
        }],
        ..late.clone()
    };
    assert!(dest.incoming("dl", &more).is_err(), "a failed record grew");

    // A flow that ended under a later record is not brought back by that
    // record's failure.
    to("e1", "10.1.0.7");
    for t in intercept.translations.lock().expect("lock").values_mut() {
        t.marks[shepherd_common::MARK_RST] = 1;
    }
    let t0 = std::time::Instant::now();
    dest.sweep_ended_flows(t0);
    assert_eq!(dest.sweep_ended_flows(t0 + ENDED_FLOW_LINGER), 1);
    dest.complete_incoming("e1", Some("failed".into()))
        .expect("failed");
    now(&[]);
    assert!(!held_by_here());
}

/// A pod that moves twice. A connection opened between the moves reached
/// the pod at its second address, so the second move translates that flow
/// from there, and the first connection's from the registered one; the
/// destination shields the second address too. A move back to the
/// registered address leaves only the second connection translated.
async fn a_second_move_translates_flows_opened_after_the_first(m: Mechanism) {
    use shepherd::control::model::IncomingSpec;
    use std::net::Ipv4Addr;
    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("ip") };
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let port = r.endpoint.0.port();
    // The pod at its second address: the same echo server, listening there
    // too (the translation itself is the kernel's part, not exercised here).
    let second = TcpListener::bind(SocketAddrV4::new(ip("127.0.0.2"), port))
        .await
        .expect("bind the second address");
    serve_echo(second, r.backend_seen.clone());
    let mut first = held_and_translated(&r, "m30").await;
    r.control
        .release("m30", ReleaseMode::Resume, Some("127.0.0.2"))
        .expect("release to the second address");
    let mut between = TcpStream::connect(r.proxy).await.expect("connect");
    between.write_all(b"b").await.expect("write");
    assert_eq!(read_exact_timeout(&mut between, 1).await, b"b");
    let peers: Vec<Option<String>> = r
        .control
        .connections()
        .into_iter()
        .map(|c| c.backend_peer)
        .collect();
    assert_eq!(
        peers,
        [
            Some(r.endpoint.0.to_string()),
            Some(format!("127.0.0.2:{port}"))
        ],
        "the second connection's backend is at the second address"
    );

    let translated = |r: &Rig| translated_addrs(&r.intercept);
    let st = r.hold_to("m31", ip("127.0.0.3")).await;
    assert_eq!(
        translated(&r),
        [
            (ip("127.0.0.1"), ip("127.0.0.3")),
            (ip("127.0.0.2"), ip("127.0.0.3"))
        ],
        "each flow is translated from the address its sockets use"
    );
    assert_eq!(
        kept_addrs(&r.intercept),
        [(ip("127.0.0.1"), ip("127.0.0.2"))],
        "the first flow's first translation is kept for the pod's replies from 127.0.0.2 until the hold ends"
    );
    let mut addrs: Vec<Option<Ipv4Addr>> = st.backend_flows.iter().map(|f| f.pod_addr).collect();
    addrs.sort();
    // Only where it is not the endpoint's own (older destinations refuse it).
    assert_eq!(addrs, [None, Some(ip("127.0.0.2"))]);

    // The destination translates and shields both old addresses.
    let (dest, _, _, dest_intercept) =
        control_for(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let req = IncomingSpec {
        endpoints: vec![r.endpoint],
        to: Some(ip("127.0.0.3")),
        flows: Vec::new(),
        deadline_ms: None,
    };
    dest.incoming("m31", &req).expect("shield first");
    let shielded = |addr: &str| {
        let key = EndpointAddr(SocketAddrV4::new(ip(addr), port)).key();
        dest_intercept
            .entries
            .lock()
            .expect("lock")
            .get(&(key.addr, key.port))
            .is_some_and(|f| f & shepherd_common::EP_SHIELD != 0)
    };
    assert!(!shielded("127.0.0.2"), "no flow uses it yet");
    let with_flows = IncomingSpec {
        flows: st.backend_flows.clone(),
        ..req.clone()
    };
    dest.incoming("m31", &with_flows).expect("then the flows");
    for a in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        assert!(shielded(a), "{a} not shielded");
    }
    assert_eq!(translated_addrs(&dest_intercept), translated(&r));
    dest.complete_incoming("m31", None).expect("complete");
    assert!(!shielded("127.0.0.2"), "the shield is lifted");
    let backend = |r: &Rig| r.control.list_endpoints()[0].backend;
    r.control
        .release("m31", ReleaseMode::Resume, None)
        .expect("release");
    assert_eq!(
        backend(&r),
        SocketAddrV4::new(ip("127.0.0.3"), port),
        "a release without --to sends new connections to the target"
    );

    // Back to the registered address: only the connection opened between
    // the moves is still translated, from the second address.
    r.hold_to("m32", *r.endpoint.0.ip()).await;
    assert_eq!(translated(&r), [(ip("127.0.0.2"), ip("127.0.0.1"))]);
    r.control
        .release("m32", ReleaseMode::Resume, None)
        .expect("release");
    assert_eq!(backend(&r), r.endpoint.0, "home again");
    for c in [&mut first, &mut between] {
        c.write_all(b"z").await.expect("write");
        assert_eq!(read_exact_timeout(c, 1).await, b"z");
    }
}

async fn target_translates_held_flows_and_incoming_shields_and_translates(m: Mechanism) {
    use shepherd::control::model::IncomingSpec;
    let r = rig(m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let mut c = TcpStream::connect(r.proxy).await.expect("connect");
    c.write_all(b"x").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"x");
    r.control
        .hold("m10", &hold_req(r.endpoint))
        .await
        .expect("hold");
    let st = r.control.status("m10").expect("status");
    assert_eq!(st.backend_flows.len(), 1, "{st:?}");
    let new_ip: std::net::Ipv4Addr = "127.0.0.1".parse().expect("ip");
    // Same address: nothing to translate, but the target is recorded.
    let st = r.control.target("m10", new_ip).expect("target");
    assert_eq!(st.target, Some(new_ip));
    assert!(
        r.control
            .target("m10", "127.0.0.2".parse().expect("ip"))
            .is_err(),
        "target cannot change"
    );
    r.control
        .release("m10", ReleaseMode::Resume, Some("127.0.0.1"))
        .expect("release");
    c.write_all(b"y").await.expect("write");
    assert_eq!(read_exact_timeout(&mut c, 1).await, b"y");

    let req = IncomingSpec {
        endpoints: vec!["10.1.0.5:80".parse().expect("ep")],
        to: Some("10.1.0.6".parse().expect("ip")),
        flows: st
            .backend_flows
            .iter()
            .map(|f| shepherd::control::model::BackendFlow {
                node: f.node,
                pod_port: 80,
                // An older controller's flow: the endpoint's address.
                pod_addr: None,
            })
            .collect(),
        deadline_ms: None,
    };
    let inc = r.control.incoming("m11", &req).expect("incoming");
    assert_eq!(inc.state, "shielding");
    assert_eq!(
        r.control.incoming("m11", &req).expect("idempotent").state,
        "shielding"
    );
    let mut other = req.clone();
    other.to = Some("10.1.0.7".parse().expect("ip"));
    assert!(
        r.control.incoming("m11", &other).is_err(),
        "a different request under the same id conflicts"
    );
    let mut bad = req.clone();
    bad.to = None;
    assert!(
        r.control.incoming("m12", &bad).is_err(),
        "flows need a new address"
    );
    assert_eq!(
        r.control
            .complete_incoming("m11", None)
            .expect("complete")
            .state,
        "completed"
    );
    assert_eq!(
        r.control
            .complete_incoming("m11", None)
            .expect("again")
            .state,
        "completed"
    );
    assert!(r.control.incoming_status("nope").is_err());

    // The destination's entry goes once the flow has ended on the wire
    // (the programs mark FINs and RSTs) and its TIME_WAIT is over.
    let live = r.translations();
    assert_eq!(live, 1, "the incoming flow is translated");
    let t0 = std::time::Instant::now();
    let mark = |at: usize| {
        let mut m = r.intercept.translations.lock().expect("lock");
        for t in m.values_mut() {
            t.marks[at] = 1;
        }
    };
    assert_eq!(
        r.control.sweep_ended_flows(t0),
        0,
        "a live flow keeps its entry"
    );
    mark(shepherd_common::MARK_NODE_FIN);
    assert_eq!(r.control.sweep_ended_flows(t0), 0, "half closed: kept");
    mark(shepherd_common::MARK_POD_FIN);
    assert_eq!(r.control.sweep_ended_flows(t0), 0, "in TIME_WAIT: kept");
    let almost = t0 + ENDED_FLOW_LINGER - Duration::from_secs(1);
    assert_eq!(r.control.sweep_ended_flows(almost), 0, "in TIME_WAIT: kept");
    assert_eq!(r.control.sweep_ended_flows(t0 + ENDED_FLOW_LINGER), 1);
    assert_eq!(r.translations(), 0, "the ended flow's entry is gone");
    let st = r.control.incoming_status("m11").expect("status");
    assert!(st.flows.is_empty(), "{st:?}");
    assert_eq!(r.control.sweep_ended_flows(t0 + 2 * ENDED_FLOW_LINGER), 0);
    // A controller retrying `incoming` does not bring a swept flow back.
    r.control.incoming("m11", &req).expect("retry");
    assert_eq!(r.translations(), 0, "a swept flow stays swept");

    // A failure the controller reports undoes the migration's entries at
    // once. One that only its deadline ended keeps a flow that no pod-side
    // segment ever crossed (the pod was never restored here) for
    // UNSEEN_FLOW_LIMIT. A successful one's flows are taken to have arrived.
    let flow_on = |port: u16| shepherd::control::model::BackendFlow {
        node: std::net::SocketAddrV4::new("10.1.0.1".parse().expect("ip"), port),
        pod_port: 80,
        pod_addr: None,
    };
    let on = |port: u16| IncomingSpec {
        flows: vec![flow_on(port)],
        ..req.clone()
    };
    let by_deadline = |port: u16| IncomingSpec {
        deadline_ms: Some(30),
        ..on(port)
    };
    r.control.incoming("m13", &on(40001)).expect("incoming");
    r.control.incoming("m17", &on(40003)).expect("incoming");
    let t1 = std::time::Instant::now();
    let much_later = t1 + 10 * UNSEEN_FLOW_LIMIT;
    assert_eq!(r.control.sweep_ended_flows(much_later), 0, "not completed");
    r.control
        .complete_incoming("m17", None)
        .expect("complete, restored");
    let before = r.translations();
    r.control
        .complete_incoming("m13", Some("restore failed".into()))
        .expect("complete, failed");
    assert_eq!(r.translations(), before - 1, "undone at once");
    let st = r.control.incoming_status("m13").expect("status");
    assert!(st.flows.is_empty(), "{st:?}");
    r.control
        .incoming("m18", &by_deadline(40004))
        .expect("incoming");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = r.control.incoming_status("m18").expect("status");
    assert_eq!(st.reason.as_deref(), Some("deadline"), "{st:?}");
    let t2 = std::time::Instant::now();
    let limit = UNSEEN_FLOW_LIMIT - Duration::from_secs(1);
    assert_eq!(r.control.sweep_ended_flows(t2 + limit), 0, "not yet");
    assert_eq!(r.control.sweep_ended_flows(t2 + UNSEEN_FLOW_LIMIT), 1);
    assert_eq!(r.control.sweep_ended_flows(much_later), 0, "m17's stays");
    // A retry that installs a failed migration's flow again owns it: the
    // old record's sweep leaves it alone.
    r.control
        .incoming("m20", &by_deadline(40006))
        .expect("incoming");
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.control.incoming("m19", &on(40006)).expect("the retry");
    assert_eq!(
        r.control.sweep_ended_flows(much_later),
        0,
        "m19 owns it now"
    );
    // A late repeat of the failed one's `incoming` does not take it back.
    r.control.incoming("m20", &on(40006)).expect("late repeat");
    let st = r.control.incoming_status("m20").expect("status");
    assert!(st.flows.is_empty(), "{st:?}");
    let st = r.control.incoming_status("m19").expect("status");
    assert_eq!(st.flows.len(), 1, "{st:?}");
    // A controller that learns late that m17's restore failed can say so.
    let before = r.translations();
    r.control
        .complete_incoming("m17", Some("restore failed after all".into()))
        .expect("late reason");
    assert_eq!(r.translations(), before - 1, "undone at once");
    // One seen and then reused by a new connection goes at once.
    r.control.incoming("m14", &on(40002)).expect("incoming");
    let before = r.translations();
    mark(shepherd_common::MARK_SEEN);
    assert_eq!(r.control.sweep_ended_flows(t1), 0, "seen and live: kept");
    mark(shepherd_common::MARK_REUSED);
    assert_eq!(
        r.control.sweep_ended_flows(t1),
        before,
        "reused: removed at once"
    );
    // The incoming deadline firing after a successful `complete` leaves it
    // a success (its flows keep their translations).
    let with_deadline = IncomingSpec {
        flows: vec![flow_on(40005)],
        deadline_ms: Some(30),
        ..req.clone()
    };
    r.control.incoming("m22", &with_deadline).expect("incoming");
    r.control.complete_incoming("m22", None).expect("success");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let st = r.control.incoming_status("m22").expect("status");
    assert_eq!(
        st.reason, None,
        "the deadline must not turn a success into a failure"
    );
    // A new address with endpoints at two addresses is two pods: refused.
    let two_pods = IncomingSpec {
        endpoints: vec![
            "10.1.0.5:80".parse().expect("ep"),
            "10.1.0.9:81".parse().expect("ep"),
        ],
        flows: Vec::new(),
        ..req.clone()
    };
    assert!(r.control.incoming("m15", &two_pods).is_err());
}

/// The agent's data plane: two threads, each its own runtime and listener,
/// driven by a control plane on the test's runtime. A hold and a release
/// reach connections on both threads; stopping the plane reports no failure,
/// returns, and closes the connections. (The only test that starts a
/// `DataPlane`: one per process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_threads_hold_replay_and_stop() {
    use shepherd::relay::workers::{accepted_per_thread, DataPlane};
    let (control, endpoint, _, _) =
        control_for(Mechanism::Splice, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let listeners: Vec<std::net::TcpListener> = (0..2)
        .map(|_| {
            plain_listener()
                .and_then(TcpListener::into_std)
                .expect("listener")
        })
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let (plane, mut failure) = DataPlane::start(
        listeners,
        control.clone(),
        Arc::new(Fixed(endpoint.0)),
        Vec::new(),
    )
    .expect("start");
    let mut clients = Vec::new();
    for a in &addrs {
        let mut c = TcpStream::connect(a).await.expect("connect");
        c.write_all(b"hello;").await.expect("write");
        assert_eq!(read_exact_timeout(&mut c, 6).await, b"hello;");
        clients.push(c);
    }
    assert_eq!(accepted_per_thread(), vec![1, 1]);
    control
        .hold("dp", &hold_req(endpoint))
        .await
        .expect("hold reaches both threads' connections and quiesces");
    for c in &mut clients {
        c.write_all(b"held;").await.expect("write");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(control.status("dp").expect("status").bytes_held, 10);
    control
        .release("dp", ReleaseMode::Resume, None)
        .expect("release");
    for c in &mut clients {
        assert_eq!(read_exact_timeout(c, 5).await, b"held;");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), failure.wait())
            .await
            .is_err(),
        "no data-plane thread may have failed"
    );
    tokio::task::spawn_blocking(move || drop(plane))
        .await
        .expect("the data plane stops");
    for c in &mut clients {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "a stopped data plane leaves no connection open");
    }
}

/// Every scenario runs with each forwarding mechanism: holds and replays must
/// behave the same whether steady-state bytes were spliced or copied.
macro_rules! for_each_mechanism {
    ($($name:ident),* $(,)?) => {
        mod splice {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mechanism::Splice).await
                }
            )*
        }
        mod copy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Mechanism::Copy).await
                }
            )*
        }
    };
}

for_each_mechanism!(
    reconnect_removes_the_old_flows_translation,
    origin_translation_goes_when_its_connection_closes,
    hold_mid_bulk_loses_and_repeats_nothing,
    steady_state_relays_both_ways,
    held_bytes_are_replayed_in_order_exactly_once,
    connection_opened_during_hold_is_queued_then_served,
    per_connection_cap_applies_back_pressure_without_loss,
    deadline_aborts_and_resumes,
    a_deadline_after_the_restore_releases_at_the_target,
    a_deadline_aborts_when_the_pod_does_not_answer_at_its_target,
    bad_requests_are_rejected_and_change_nothing,
    reconnect_mode_replays_held_bytes_on_a_new_backend_connection,
    target_translates_held_flows_and_incoming_shields_and_translates,
    a_second_move_translates_flows_opened_after_the_first,
    abort_after_target_removes_the_translation,
    abort_puts_back_an_earlier_migrations_translation,
    urgent_data_neither_stalls_nor_cuts_the_stream,
    urgent_mark_behind_a_full_hold_buffer_does_not_stall,
);

// After the macro: its scenarios run with each mechanism too.
mod backend_ends_during_hold;
mod state_machine;
