//! `shepherd run`: wires the parts together in order — lock, listener, eBPF,
//! policy route, API — and undoes them in reverse on SIGTERM/SIGINT.
//!
//! Client connections are not preserved across an agent restart yet (a later
//! issue hands them over); the agent removes everything it installed.
use anyhow::Context;
use shepherd::config::Config;
use shepherd::control::{Control, ControlConfig};
use shepherd::intercept::ebpf::EbpfInterception;
use shepherd::intercept::routing::Routing;
use shepherd::relay::connection::RelayContext;
use shepherd::relay::hold_buffer::Budget;
use shepherd::relay::slots::{self, Slots};
use shepherd::transport::backend::MarkedConnector;
use shepherd::transport::orig_dst::LocalAddr;
use shepherd::{api, relay, single_instance, transport};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let nofile = raise_fd_limit();
    let max_connections = connection_limit(nofile, config.max_connections)?;
    let _lock = single_instance::acquire(&config.api_socket)?;
    let api_listener = api::socket::bind(&config.api_socket)?;
    let socket_path = config.api_socket.clone();
    let _socket_cleanup = RemoveOnDrop(socket_path.clone());

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
    let routing = Routing::install().await?;

    let relay = RelayContext {
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
    };
    let relay_slots = relay.slots.clone();
    let control = Control::new(
        ControlConfig {
            default_deadline: config.hold_deadline,
            quiesce_timeout: config.quiesce_timeout,
            default_relay: config.relay,
            max_endpoints: config.max_endpoints as usize,
            own_listeners: listeners
                .iter()
                .filter_map(|l| match l.local_addr() {
                    Ok(std::net::SocketAddr::V4(a)) => Some(a),
                    _ => None,
                })
                .collect(),
        },
        intercept.clone(),
        relay,
    );
    let (data_plane, mut failure) =
        relay::workers::DataPlane::start(listeners, control.clone(), Arc::new(LocalAddr))
            .context("starting the data-plane threads")?;
    let sweeper = spawn_ended_flow_sweep(&control);
    let trimmer = spawn_memory_trim(relay_slots);
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
    // so exit with an error and let the supervisor restart the agent.
    let (died_tx, died_rx) = tokio::sync::oneshot::channel::<String>();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            why = failure.wait() => {
                tracing::error!(reason = %why, "a data-plane thread died; stopping the agent");
                let _ = died_tx.send(why);
            }
        }
    };
    api::serve::serve(api_listener, app, stop).await;
    tracing::info!("shutting down");
    sweeper.abort();
    trimmer.abort();
    drop(data_plane);
    routing.remove().await;
    drop(control);
    drop(intercept);
    if let Ok(why) = died_rx.await {
        anyhow::bail!("{why}; restart the agent (connections it relayed were closed)");
    }
    Ok(())
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

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
