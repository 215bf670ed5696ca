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
use shepherd::transport::backend::MarkedConnector;
use shepherd::transport::orig_dst::LocalAddr;
use shepherd::{api, relay, single_instance, transport};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    raise_fd_limit();
    let _lock = single_instance::acquire()?;
    let api_listener = api::socket::bind(&config.api_socket)?;
    let socket_path = config.api_socket.clone();
    let _socket_cleanup = RemoveOnDrop(socket_path.clone());

    let listeners =
        transport::listener::transparent_listeners(config.data_threads, config.listen_backlog)
            .context("creating the transparent listeners (needs CAP_NET_ADMIN)")?;
    let intercept = Arc::new(EbpfInterception::load(
        &config.intercept_ifaces,
        &config.shield_ifaces,
        &listeners,
    )?);
    let routing = Routing::install().await?;

    let relay = RelayContext {
        connector: Arc::new(MarkedConnector {
            timeout: config.connect_timeout,
            mark: true,
        }),
        budget: Budget::new(config.hold_buffer_total),
        hold_cap_per_conn: config.hold_buffer_per_conn,
        close_linger: Duration::from_secs(5),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let control = Control::new(
        ControlConfig {
            default_deadline: config.hold_deadline,
            quiesce_timeout: config.quiesce_timeout,
            default_relay: config.relay,
        },
        intercept.clone(),
        relay,
    );
    let (data_plane, mut failure) =
        relay::workers::DataPlane::start(listeners, control.clone(), Arc::new(LocalAddr))
            .context("starting the data-plane threads")?;
    let sweeper = spawn_ended_flow_sweep(&control);
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
    let server = axum::serve(api_listener, app).with_graceful_shutdown(stop);
    let served = server.await;
    tracing::info!("shutting down");
    sweeper.abort();
    drop(data_plane);
    routing.remove().await;
    drop(control);
    drop(intercept);
    served.context("API server failed")?;
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

/// Each relayed connection holds two descriptors (client and backend), so
/// the soft `RLIMIT_NOFILE` (often 1024) would cap the agent at ~500
/// connections: raise it to the hard limit, as HAProxy and Envoy do.
fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit in a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return;
    }
    if r.rlim_cur < r.rlim_max {
        let before = r.rlim_cur;
        r.rlim_cur = r.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            r.rlim_cur = before;
        }
    }
    tracing::info!(
        open_files = r.rlim_cur,
        max_connections = r.rlim_cur.saturating_sub(64) / 2,
        "file descriptor limit (two per relayed connection)"
    );
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
