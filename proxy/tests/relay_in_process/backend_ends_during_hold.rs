//! The pod's end of a backend connection closes, resets or fails while the
//! endpoint is held: Kubernetes' path (checkpoint with the container left
//! running, stop the original, restore elsewhere). The client must not
//! see it during the hold; the release decides what it means.
use super::*;
use tokio::sync::watch;

/// How the stand-in pod ends its connections when told to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stop {
    /// Writes `farewell`, then closes (FIN): a stopped process.
    Fin { farewell: &'static [u8] },
    /// Closes with SO_LINGER 0 (RST): a process killed with unread bytes.
    Reset,
}

/// What each backend connection of a stand-in pod received, in accept
/// order.
pub(super) type Received = Arc<std::sync::Mutex<Vec<Arc<std::sync::Mutex<Vec<u8>>>>>>;

/// An echo pod whose open connections all end as `Stop` says when the
/// returned sender is given one. Connections accepted afterwards are served
/// normally: the restored pod. Also returns what each connection received.
pub(super) async fn stoppable_echo_backend() -> (
    (SocketAddrV4, Arc<AtomicUsize>),
    watch::Sender<Option<Stop>>,
    Received,
) {
    let (l, addr) = backend_listener().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(None);
    let counted = seen.clone();
    let received = Received::default();
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = counted.clone();
            let mine = Arc::new(std::sync::Mutex::new(Vec::new()));
            if let Ok(mut all) = log.lock() {
                all.push(mine.clone());
            }
            let mut stop = stop_rx.clone();
            stop.mark_unchanged();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    tokio::select! {
                        r = s.read(&mut buf) => match r {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.fetch_add(n, Ordering::SeqCst);
                                if let Ok(mut m) = mine.lock() {
                                    m.extend_from_slice(&buf[..n]);
                                }
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        },
                        changed = stop.changed() => {
                            // The test is over (its sender dropped): the
                            // pod goes with it.
                            if changed.is_err() {
                                return;
                            }
                            let how = *stop.borrow_and_update();
                            match how {
                                Some(Stop::Fin { farewell }) => {
                                    // A stopped process: its last words,
                                    // then its socket closes for good.
                                    let _ = s.write_all(farewell).await;
                                    let _ = s.shutdown().await;
                                }
                                Some(Stop::Reset) => {
                                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                                }
                                None => continue,
                            }
                            return;
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    ((addr, seen), stop_tx, received)
}

/// Holds migration `id` over a connection the pod has served once, stops
/// the pod's end as `how` says, and checks that the client saw nothing of
/// it while the hold stays on; then queues `held` bytes.
async fn stopped_during_hold(
    r: &Rig,
    stop: &watch::Sender<Option<Stop>>,
    how: Stop,
    id: &str,
    held: &[u8],
) -> TcpStream {
    let (mut c, _) = consumed_then_held(r, id).await;
    stop.send_replace(Some(how));
    let t0 = std::time::Instant::now();
    while r.control.status(id).expect("status").backends_ended < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the backend's end was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Whatever the pod sent before it ended reaches the client, and then
    // nothing: no EOF, no error while the hold is on.
    if let Stop::Fin { farewell } = how {
        assert_eq!(read_exact_timeout(&mut c, farewell.len()).await, farewell);
    }
    let mut one = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(200), c.read(&mut one)).await {
        Err(_) => {}
        Ok(r) => panic!("the client saw the pod's end during the hold: {r:?}"),
    }
    write_held(r, &mut c, id, held).await;
    let st = r.control.status(id).expect("status");
    assert_eq!(st.state, Phase::Holding);
    assert_eq!(st.connections_closed, 0, "{st:?}");
    c
}

/// The whole Kubernetes sequence: hold, the original stops (FIN, or a
/// reset), a fresh pod serves, `release --mode reconnect`: the client's
/// connection goes on, and exactly the held bytes reach the new pod.
async fn a_pod_stopped_during_a_hold_is_reconnected(m: Mechanism) {
    for (i, how) in [Stop::Fin { farewell: b"bye;" }, Stop::Reset]
        .into_iter()
        .enumerate()
    {
        let (backend, stop, _) = stoppable_echo_backend().await;
        let r = rig_on(backend, m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
        let id = format!("k{i}");
        let mut c = stopped_during_hold(&r, &stop, how, &id, b"held-1;held-2;").await;
        let before = r.backend_seen.load(Ordering::SeqCst);
        let st = r
            .control
            .release(&id, ReleaseMode::Reconnect, None)
            .expect("release");
        assert_eq!(st.mode, Some(ReleaseMode::Reconnect));
        assert_eq!(
            read_exact_timeout(&mut c, 14).await,
            b"held-1;held-2;",
            "{how:?}"
        );
        c.write_all(b"after;").await.expect("write after release");
        assert_eq!(read_exact_timeout(&mut c, 6).await, b"after;", "{how:?}");
        // Exactly the held bytes and what followed, once.
        assert_eq!(
            r.backend_seen.load(Ordering::SeqCst) - before,
            20,
            "{how:?}"
        );
        let st = r.control.status(&id).expect("status");
        assert_eq!(st.connections_closed, 0, "{how:?}: {st:?}");
        assert_eq!(st.backends_ended, 1, "{how:?}: {st:?}");
        assert_eq!(st.bytes_replayed, st.bytes_held, "{how:?}: {st:?}");
    }
}

/// `resume` finds no restored socket behind a connection whose pod end
/// closed during the hold: the client gets a clean FIN after every byte the
/// pod sent, and the status says why.
async fn resume_after_the_pod_closed_ends_the_client_cleanly(m: Mechanism) {
    let (backend, stop, _) = stoppable_echo_backend().await;
    let r = rig_on(backend, m, 1 << 20, 8 << 20, Duration::from_secs(30)).await;
    let how = Stop::Fin { farewell: b"last;" };
    let mut c = stopped_during_hold(&r, &stop, how, "r1", b"held;").await;
    r.control
        .release("r1", ReleaseMode::Resume, None)
        .expect("release");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("the client was told in time")
        .expect("a clean FIN, not a reset");
    assert!(rest.is_empty(), "nothing after the pod's FIN: {rest:?}");
    let st = r.control.status("r1").expect("status");
    assert_eq!(st.connections_closed, 1, "{st:?}");
    // Nothing was written into the dead socket.
    assert_eq!(st.bytes_replayed, 0, "{st:?}");
    let reason = st.reason.unwrap_or_default();
    assert!(
        reason.contains("closed the connection during the hold"),
        "{reason}"
    );
}

/// An abort (or the deadline) with the backend reset during the hold: the
/// client is closed cleanly, as when a backend fails while forwarding.
async fn abort_after_the_pod_reset_ends_the_client_cleanly(m: Mechanism) {
    let (backend, stop, _) = stoppable_echo_backend().await;
    let r = rig_on(backend, m, 1 << 20, 8 << 20, Duration::from_millis(1500)).await;
    let mut c = stopped_during_hold(&r, &stop, Stop::Reset, "a1", b"held;").await;
    // No release: the deadline aborts.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("the client was told in time")
        .expect("a clean FIN, not a reset");
    assert!(rest.is_empty(), "{rest:?}");
    let st = r.control.status("a1").expect("status");
    assert_eq!(st.state, Phase::Aborted);
    assert_eq!(st.connections_closed, 1, "{st:?}");
    let reason = st.reason.unwrap_or_default();
    assert!(reason.starts_with("deadline"), "{reason}");
    assert!(reason.contains("during the hold"), "{reason}");
}

for_each_mechanism!(
    a_pod_stopped_during_a_hold_is_reconnected,
    resume_after_the_pod_closed_ends_the_client_cleanly,
    abort_after_the_pod_reset_ends_the_client_cleanly,
);
