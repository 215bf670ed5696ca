//! `shepherd run`: wires the parts together in order — lock, listener, eBPF,
//! policy route, API — and undoes them in reverse on SIGTERM/SIGINT.
//!
//! An agent started where one already runs takes over from it (a
//! hand-over: `shepherd::handover`, LIFECYCLE.md): it receives the running
//! agent's locks, sockets, connections, state and kernel objects, and the
//! old one exits without undoing anything. Either kind of agent then
//! serves its own successor the same way.
use anyhow::Context;
use shepherd::config::Config;
use shepherd::control::model::{AgentInfo, TakeoverInfo};
use shepherd::control::{Control, ControlConfig};
use shepherd::handover::{client, server};
use shepherd::intercept::ebpf::{Adopted, EbpfInterception};
use shepherd::intercept::routing::Routing;
use shepherd::relay::connection::RelayContext;
use shepherd::relay::freeze::{FreezeState, Freezer};
use shepherd::relay::hold_buffer::Budget;
use shepherd::relay::slots::{self, Slots};
use shepherd::relay::Restored;
use shepherd::single_instance::{self, InstanceError, InstanceLock};
use shepherd::transport::backend::MarkedConnector;
use shepherd::transport::orig_dst::LocalAddr;
use shepherd::{api, relay, transport};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What an agent starts from: nothing (a fresh start), or what its
/// predecessor handed over.
enum Start {
    Fresh(InstanceLock),
    Inherited(Box<Inheritance>),
}

/// A hand-over received and ready to run, before its commit.
struct Inheritance {
    received: client::Received,
    offer_version: String,
    intercept: Arc<EbpfInterception>,
    adopted: Adopted,
    routing: Routing,
    /// When it asked the running agent to freeze.
    ready_at: Instant,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let started = SystemTime::now();
    let asked = Instant::now();
    let nofile = raise_fd_limit();
    let max_connections = connection_limit(nofile, config.max_connections)?;
    let start = match single_instance::acquire(&config.api_socket) {
        Ok(lock) => Start::Fresh(lock),
        Err(InstanceError::AlreadyRunning { pid })
            if config.takeover && server::socket_path(&config.api_socket).exists() =>
        {
            tracing::info!(
                running = %pid,
                "an agent already runs on this socket; taking over from it"
            );
            Start::Inherited(Box::new(receive(&config).await?))
        }
        Err(e) => return Err(e.into()),
    };
    let freezer = Freezer::new();
    let relay_ctx = RelayContext {
        connector: Arc::new(MarkedConnector {
            timeout: config.connect_timeout,
            mark: true,
            liveness: config.liveness,
        }),
        budget: Budget::new(config.hold_buffer_total),
        hold_cap_per_conn: config.hold_buffer_per_conn,
        hold_cap_per_endpoint: config.hold_buffer_per_endpoint(),
        close_linger: Duration::from_secs(5),
        next_id: Arc::new(AtomicU64::new(1)),
        slots: Slots::new(max_connections),
        liveness: config.liveness,
        freezer: freezer.clone(),
    };
    let relay_slots = relay_ctx.slots.clone();
    let control_config = |own: &[std::net::TcpListener]| ControlConfig {
        default_deadline: config.hold_deadline,
        quiesce_timeout: config.quiesce_timeout,
        default_relay: config.relay,
        max_endpoints: config.max_endpoints as usize,
        own_listeners: own
            .iter()
            .filter_map(|l| match l.local_addr() {
                Ok(std::net::SocketAddr::V4(a)) => Some(a),
                _ => None,
            })
            .collect(),
    };
    let mut info = AgentInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        instance: instance_id(),
        pid: std::process::id(),
        started: Some(started),
        handovers: 0,
        took_over: None,
        lost_in_crash: None,
    };
    let census_path = census::path(&config.api_socket);
    if matches!(start, Start::Fresh(_)) {
        info.lost_in_crash = census::lost(&census_path);
    }

    let (lock, api_listener, listeners, intercept, control, restored, routing) = match start {
        Start::Fresh(lock) => {
            shepherd::intercept::pin::sweep_stale();
            let api_listener = api::socket::bind(&config.api_socket)?
                .into_std()
                .context("the API listener")?;
            let listeners = transport::listener::transparent_listeners(
                config.data_threads,
                config.listen_backlog,
                &config.liveness,
            )
            .context("creating the transparent listeners (needs CAP_NET_ADMIN)")?;
            let intercept = Arc::new(EbpfInterception::load_with(
                &config.intercept_ifaces,
                &config.shield_ifaces,
                &listeners,
                map_sizes(&config),
            )?);
            let control = Control::new(
                control_config(&listeners),
                intercept.clone(),
                relay_ctx.clone(),
            );
            let routing = Routing::install().await?;
            (
                lock,
                api_listener,
                listeners,
                intercept,
                control,
                Vec::new(),
                routing,
            )
        }
        Start::Inherited(inh) => {
            let Inheritance {
                received,
                offer_version,
                intercept,
                adopted,
                routing,
                ready_at,
            } = *inh;
            let (state, fds, pending) = received.into_parts();
            match adopt(
                state,
                fds,
                &config,
                relay_ctx.clone(),
                &intercept,
                control_config,
            ) {
                Ok(adoption) => {
                    // The commit point (see LIFECYCLE.md).
                    let commit = Instant::now();
                    tokio::task::spawn_blocking(move || pending.commit())
                        .await
                        .context("the hand-over task")?
                        .context("committing the hand-over")?;
                    tracing::info!(took = ?commit.elapsed(), "committed");
                    let (lock_file, lock_listener) = adoption.lock;
                    let lock = InstanceLock::adopt(lock_file, lock_listener)
                        .context("taking over the agent lock")?;
                    // Ours now: swap our programs into the links taken over.
                    if let Err(e) = intercept.finish_adoption(
                        adopted,
                        &config.intercept_ifaces,
                        &config.shield_ifaces,
                    ) {
                        tracing::error!(error = %e, "after the hand-over, this agent's programs could not replace the predecessor's; the predecessor's keep running in the links, with the same maps");
                    }
                    info.handovers = adoption.handovers + 1;
                    info.took_over = Some(TakeoverInfo {
                        from_version: offer_version,
                        connections: adoption.restored.len(),
                        endpoints: adoption.endpoints,
                        migrations: adoption.control.migration_count(),
                        took: asked.elapsed(),
                        paused: ready_at.elapsed(),
                    });
                    tracing::info!(
                        connections = adoption.restored.len(),
                        endpoints = adoption.endpoints,
                        took = ?asked.elapsed(),
                        "took over from the previous agent"
                    );
                    (
                        lock,
                        adoption.api,
                        adoption.listeners,
                        intercept,
                        adoption.control,
                        adoption.restored,
                        routing,
                    )
                }
                Err(e) => {
                    pending.fail(&format!("{e:#}"));
                    return Err(e.context("taking over (the running agent serves on)"));
                }
            }
        }
    };
    control.set_agent(info.clone());
    let _ready = config
        .ready_file
        .as_ref()
        .map(|p| ReadyFile::write(p, &info.instance));
    let socket_path = config.api_socket.clone();
    let mut socket_cleanup = RemoveOnDrop(Some(socket_path.clone()));
    let (lock_file, lock_listener) = lock.fds();
    let fds = server::AgentFds {
        lock_file,
        lock_listener,
        api: std::os::fd::AsRawFd::as_raw_fd(&api_listener),
        listeners: listeners.iter().map(AsRawFd::as_raw_fd).collect(),
    };
    let loops = listeners.len();
    let (data_plane, mut failure) =
        relay::workers::DataPlane::start(listeners, control.clone(), Arc::new(LocalAddr), restored)
            .context("starting the data-plane threads")?;
    control.rearm();
    tracing::debug!(since_start = ?asked.elapsed(), "data plane running");
    let sweeper = spawn_ended_flow_sweep(&control);
    let counter = census::spawn(census_path.clone(), relay_slots.clone());
    let trimmer = spawn_memory_trim(relay_slots.clone());
    let (committed_tx, mut committed_rx) = tokio::sync::oneshot::channel();
    let handover_path = server::socket_path(&config.api_socket);
    let _handover_cleanup = RemoveOnDrop(Some(handover_path.clone()));
    let handover_listener = server::bind(&handover_path)
        .with_context(|| format!("binding the hand-over socket {}", handover_path.display()))?;
    server::spawn(
        handover_listener,
        server::Serving {
            control: control.clone(),
            freezer: freezer.clone(),
            intercept: intercept.clone(),
            fds,
            loops,
            started,
            handovers: info.handovers,
            protocol: config.handover_protocol,
            runtime: tokio::runtime::Handle::current(),
        },
        committed_tx,
    )
    .context("starting the hand-over thread")?;
    let app = api::router(control.clone());
    tracing::info!(
        socket = %socket_path.display(),
        intercept = ?config.intercept_ifaces,
        shield = ?config.shield_ifaces,
        data_threads = config.data_threads,
        "shepherd agent ready"
    );
    // Stop on SIGTERM/SIGINT, or when a data-plane thread dies: its
    // connections are gone and its share of new ones would not be proxied,
    // so exit with an error and let the supervisor restart the agent. A
    // hand-over ends the API too (see `api::serve`).
    let (died_tx, died_rx) = tokio::sync::oneshot::channel::<String>();
    // One listener for the agent's life: a signal is never lost between
    // two of them (the API's stop, and the wait after a hand-over).
    let signalled = spawn_signal_watch();
    let mut stop_signal = signalled.clone();
    let stop = async move {
        tokio::select! {
            _ = stop_signal.wait_for(|s| *s) => {}
            why = failure.wait() => {
                tracing::error!(reason = %why, "a data-plane thread died; stopping the agent");
                let _ = died_tx.send(why);
            }
        }
    };
    // The API serves on a duplicate: the listener handed over is this one,
    // which stays open until the agent is done, whenever the API stops.
    let api_for_serve = api_listener
        .try_clone()
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .context("duplicating the API listener")?;
    api::serve::serve(api_for_serve, app, stop, freezer.subscribe()).await;
    if freezer.stop() && freezer.state() != FreezeState::Committed {
        // Stopped in the middle of a hand-over: its outcome decides what
        // stopping means (every step is bounded). Stopping now would shut
        // down sockets the successor may already own.
        tracing::info!("a hand-over is in progress; waiting for its outcome before stopping");
        // Longer than all of a hand-over's step timeouts together.
        let deadline = Instant::now() + Duration::from_secs(180);
        while freezer.handing_over()
            && freezer.state() != FreezeState::Committed
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    sweeper.abort();
    counter.abort();
    trimmer.abort();
    let handed_over = if freezer.state() == FreezeState::Committed {
        // The hand-over thread says what it handed over right after.
        committed_rx.await.ok()
    } else {
        committed_rx.try_recv().ok()
    };
    if let Some(done) = handed_over {
        // Handed over: the successor owns the sockets, the locks, the
        // routes and the kernel objects. Undo nothing, remove no file;
        // connections that were only closing finish first.
        socket_cleanup.0 = None;
        std::mem::forget(_handover_cleanup);
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay_slots.live() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Hold nothing from here: a process that kept a descriptor of the
        // lock, a link or a map would keep them from a successor's crash
        // (see LIFECYCLE.md).
        drop(data_plane);
        drop(control);
        drop(intercept);
        drop(api_listener);
        lock.hand_over();
        tracing::info!(
            connections = done.connections,
            successor = done.successor_pid,
            paused = ?done.frozen_for,
            "handed over to the successor"
        );
        if config.after_handover_wait {
            // Under a supervisor that restarts what exits (a DaemonSet's
            // container): holding nothing, wait to be stopped.
            tracing::info!("holding nothing; waiting for SIGTERM (--after-handover wait)");
            let mut s = signalled;
            let _ = s.wait_for(|s| *s).await;
        }
        return Ok(());
    }
    tracing::info!("shutting down");
    // A clean stop loses nothing it has to count.
    let _ = std::fs::remove_file(&census_path);
    drop(data_plane);
    routing.remove().await;
    drop(control);
    drop(intercept);
    if let Ok(why) = died_rx.await {
        anyhow::bail!("{why}; restart the agent (connections it relayed were closed)");
    }
    Ok(())
}

/// Asks the running agent for a hand-over, loads this agent's programs
/// with its maps, and receives everything (before the commit).
async fn receive(config: &Config) -> anyhow::Result<Inheritance> {
    let path = server::socket_path(&config.api_socket);
    let protocol = config.handover_protocol;
    let offer = tokio::task::spawn_blocking(move || client::connect(&path, protocol))
        .await
        .context("the hand-over task")??;
    tracing::info!(predecessor = %offer.predecessor_version, "the running agent agreed to hand over");
    let mut offer = offer;
    let kernel_fds = std::mem::take(&mut offer.kernel_fds);
    let spare = config
        .api_socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    // Loading (the verifier) takes a few hundred milliseconds of CPU while
    // the running agent still relays: on a thread of the lowest priority,
    // so that it takes only what the running agent leaves.
    let kernel = offer.kernel.clone();
    let spare = spare.to_path_buf();
    let reload = config.handover_reload;
    let loaded = std::thread::Builder::new()
        .name("shepherd-load".into())
        .spawn(move || {
            background_priority();
            EbpfInterception::adopt(&kernel, kernel_fds, &spare, reload)
        })
        .context("starting the loader thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the loader thread panicked"))?;
    let (intercept, adopted) = match loaded {
        Ok(x) => x,
        Err(e) => {
            offer.fail(&e.to_string());
            return Err(anyhow::Error::new(e)
                .context("loading this agent's programs with the running agent's maps"));
        }
    };
    // Idempotent: the running agent installed the same route and rule.
    let routing = match Routing::install().await {
        Ok(r) => r,
        Err(e) => {
            offer.fail(&e.to_string());
            return Err(e.into());
        }
    };
    let version = offer.predecessor_version.clone();
    let ready = Instant::now();
    let received = tokio::task::spawn_blocking(move || offer.ready())
        .await
        .context("the hand-over task")??;
    tracing::info!(took = ?ready.elapsed(), "state and descriptors received");
    Ok(Inheritance {
        received,
        offer_version: version,
        intercept: Arc::new(intercept),
        adopted,
        routing,
        ready_at: ready,
    })
}

/// Everything a hand-over gave, rebuilt and ready to run.
struct Adoption {
    /// The lock's descriptors, taken (and its pid written) only after the
    /// commit: before it the lock is the running agent's, and a `Flock`
    /// dropped on a failure would unlock it for both.
    lock: (std::os::fd::OwnedFd, Option<std::os::fd::OwnedFd>),
    api: std::os::unix::net::UnixListener,
    listeners: Vec<std::net::TcpListener>,
    control: Arc<Control>,
    restored: Vec<Restored>,
    endpoints: usize,
    handovers: u64,
}

/// Rebuilds the predecessor's agent from what it handed over. On an error
/// the hand-over is still undecided: the caller tells the predecessor,
/// which serves on.
fn adopt(
    state: shepherd::handover::wire::State,
    fds: client::Fds,
    config: &Config,
    relay_ctx: RelayContext,
    intercept: &Arc<EbpfInterception>,
    control_config: impl Fn(&[std::net::TcpListener]) -> ControlConfig,
) -> anyhow::Result<Adoption> {
    let handovers = state.handovers;
    let draining = state.draining;
    let control_state = state.control;
    let state = state.conns;
    {
        let api = std::os::unix::net::UnixListener::from(fds.api);
        let listeners: Vec<std::net::TcpListener> = fds
            .listeners
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect();
        if listeners.len() != config.data_threads {
            tracing::info!(
                listeners = listeners.len(),
                asked = config.data_threads,
                "data-plane threads follow the listeners handed over"
            );
        }
        let endpoints = control_state.endpoint_count();
        let (control, holds) = Control::restore(
            control_config(&listeners),
            intercept.clone(),
            relay_ctx.clone(),
            control_state,
        );
        let mut draining_states = std::collections::HashMap::new();
        for e in draining {
            let addr = e.addr;
            let s = shepherd::endpoint::EndpointState::restore(
                e,
                intercept.clone(),
                relay_ctx.hold_cap_per_endpoint,
                &mut |epoch| {
                    holds.get(&epoch).cloned().unwrap_or_else(|| {
                        Arc::new(shepherd::endpoint::HoldStats {
                            epoch,
                            ..Default::default()
                        })
                    })
                },
            );
            draining_states.insert(addr, s);
        }
        let mut restored = Vec::with_capacity(state.len());
        for (c, (client, backend)) in state.into_iter().zip(fds.conns) {
            let dst = c.state.orig_dst;
            let draining = draining_states
                .get(&shepherd::endpoint::EndpointAddr(dst))
                .cloned()
                .filter(|_| c.draining);
            let endpoint = match draining
                .or_else(|| shepherd::relay::Endpoints::endpoint_for(control.as_ref(), dst))
            {
                Some(e) => e,
                None => anyhow::bail!(
                    "connection {} is to {dst}, which the state does not describe",
                    c.state.id
                ),
            };
            let replay = c
                .state
                .replay
                .and_then(|(epoch, _)| holds.get(&epoch).cloned());
            restored.push(Restored {
                state: c.state,
                client,
                backend,
                endpoint,
                replay,
            });
        }
        Ok(Adoption {
            lock: (fds.lock_file, fds.lock_listener),
            api,
            listeners,
            control,
            restored,
            endpoints,
            handovers,
        })
    }
}

/// The connection census: every second the agent writes how many
/// connections it relays to a small file next to the API socket (its pid
/// and a count, no payload). An agent that dies without a hand-over leaves
/// its last census behind, and the next one says how many connections
/// ended with it (`shepherd_connections_lost_in_crash`, and in its log).
/// At most a second old: connections opened in the last second before a
/// crash may be missed.
mod census {
    use shepherd::relay::slots::Slots;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    pub fn path(api_socket: &Path) -> PathBuf {
        let mut p = api_socket.as_os_str().to_owned();
        p.push(".census");
        PathBuf::from(p)
    }

    /// What a dead predecessor's census says it held. Called on a fresh
    /// start only: the agent lock was free, so no agent runs, and one that
    /// stopped cleanly removed its census; one left behind is a crash's.
    pub fn lost(path: &Path) -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        let conns = text.lines().find_map(|line| match line.split_once(' ') {
            Some(("connections", v)) => v.trim().parse::<u64>().ok(),
            _ => None,
        })?;
        let _ = std::fs::remove_file(path);
        tracing::warn!(
            connections = conns,
            "the previous agent died without a hand-over; its connections ended with it"
        );
        Some(conns)
    }

    pub fn spawn(path: PathBuf, slots: Arc<Slots>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let tmp = path.with_extension("census.tmp");
            loop {
                tick.tick().await;
                let text = format!("pid {}\nconnections {}\n", std::process::id(), slots.live());
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        })
    }
}

/// A random id for this agent process (128 bits from the kernel).
fn instance_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy to be had: the pid and the clock are unique enough here.
        let t = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{:x}-{t:x}", std::process::id());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Puts the calling thread in `SCHED_IDLE` (lowering a priority needs no
/// privilege); best effort.
fn background_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 names the calling thread; `param` is a live sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SCHED_IDLE not set");
    }
}

/// Every 10 s, removes the translations of migrated flows that ended on
/// this node as a destination (see `Control::sweep_ended_flows`).
fn spawn_ended_flow_sweep(control: &Arc<Control>) -> tokio::task::JoinHandle<()> {
    let control = Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let Some(c) = control.upgrade() else { break };
            c.sweep_ended_flows(std::time::Instant::now());
        }
    })
}

/// The data plane's connection limit: `--max-connections`, or what the
/// descriptor limit allows after the control reserve (see `relay::slots`).
fn connection_limit(nofile: u64, asked: Option<usize>) -> anyhow::Result<usize> {
    let most = slots::max_for_fd_limit(nofile);
    let max = asked.unwrap_or(most);
    if max == 0 || max > most {
        anyhow::bail!(
            "RLIMIT_NOFILE is {nofile}, which carries at most {most} relayed connections \
             (two descriptors each, after {} for the API, eBPF and splice pipes){}; \
             raise the limit (ulimit -n) or lower --max-connections",
            slots::CONTROL_RESERVE + 2 * shepherd::relay::splice::MAX_PIPES as u64,
            asked
                .map(|m| format!(", not the {m} asked"))
                .unwrap_or_default()
        );
    }
    tracing::info!(
        open_files = nofile,
        max_connections = max,
        "connection limit (two descriptors per relayed connection)"
    );
    Ok(max)
}

/// Gives memory freed by ended connections back to the system (see
/// `shepherd::memory`).
fn spawn_memory_trim(slots: Arc<Slots>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut trimmer = shepherd::memory::Trimmer::default();
        let mut tick = tokio::time::interval(shepherd::memory::TRIM_INTERVAL);
        loop {
            tick.tick().await;
            if let Some(took) = trimmer.tick(slots.ended()) {
                tracing::debug!(
                    ?took,
                    live = slots.live(),
                    "freed memory returned to the system"
                );
            }
        }
    })
}

/// Each relayed connection holds two descriptors (client and backend), so
/// the soft `RLIMIT_NOFILE` (often 1024) would cap the agent at ~500
/// connections: raise it to the hard limit, as HAProxy and Envoy do.
/// Returns the limit now in force.
fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit in a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let before = r.rlim_cur;
        r.rlim_cur = r.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            r.rlim_cur = before;
        }
    }
    r.rlim_cur
}

/// Watches SIGTERM and SIGINT from now on: the value turns true at the
/// first one.
fn spawn_signal_watch() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
        // Keep the sender: receivers wait on a value, not a closed channel.
        std::future::pending::<()>().await;
    });
    rx
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// This agent's instance id in `--ready-file`, for `shepherd health
/// --ready-file` (a readiness probe) to tell this agent from another one
/// serving the same socket; removed when the agent stops.
struct ReadyFile(std::path::PathBuf);

impl ReadyFile {
    fn write(path: &std::path::Path, instance: &str) -> Option<Self> {
        match std::fs::write(path, instance) {
            Ok(()) => Some(Self(path.to_path_buf())),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the ready file");
                None
            }
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes a file on drop, unless emptied first.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The kernel maps' sizes the configuration asks for.
fn map_sizes(config: &Config) -> shepherd::intercept::ebpf::MapSizes {
    shepherd::intercept::ebpf::MapSizes {
        endpoints: config.max_endpoints,
        translations: config.max_translations,
        proxied_flows: config.max_proxied_flows,
    }
}
