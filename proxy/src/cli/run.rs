//! `shepherd run`: parse the agent's flags into a `Config` and start it.
use clap::Args;
use shepherd::config::Config;
use shepherd::relay::Mechanism;
use shepherd::units::{parse_duration, parse_size};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AfterHandover {
    Exit,
    Wait,
}

#[derive(Args)]
pub struct RunArgs {
    /// Refuse to start while another agent runs on this API socket,
    /// instead of taking over from it (the default hands every connection
    /// over; see LIFECYCLE.md).
    #[arg(long)]
    no_takeover: bool,
    /// What to do once handed over to a successor: exit, or wait for
    /// SIGTERM holding nothing (under a supervisor that restarts what
    /// exits, such as a DaemonSet's container).
    #[arg(long, value_enum, default_value_t = AfterHandover::Exit)]
    after_handover: AfterHandover,
    /// Write this agent's instance id here once it serves (removed when it
    /// stops); `shepherd health --ready-file` compares it with the agent
    /// that answers the socket. For a readiness probe in a pod-local
    /// directory.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// In a hand-over, load this build's programs and swap them into the
    /// links even if the running agent runs the same object (for tests of
    /// an upgrade that changes the programs).
    #[arg(long, hide = true)]
    handover_reload_programs: bool,
    /// The hand-over protocol to speak (for tests of a refused hand-over).
    #[arg(long, hide = true, default_value_t = shepherd::handover::wire::PROTOCOL)]
    handover_protocol: u32,
    /// Client-facing interface where SYNs to managed endpoints are intercepted (repeatable).
    #[arg(long = "intercept-iface", value_name = "IF")]
    intercept_ifaces: Vec<String>,
    /// Pod-facing interface where RSTs from held endpoints are dropped (repeatable).
    #[arg(long = "shield-iface", value_name = "IF")]
    shield_ifaces: Vec<String>,
    /// Abort a hold that gets no release within this time.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    hold_deadline: Duration,
    /// How long `hold` waits for backends to acknowledge all bytes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    quiesce_timeout: Duration,
    /// Timeout of each backend connect.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Max client bytes held per connection; past it the client's window closes.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    hold_buffer_per_conn: usize,
    /// Max client bytes held across all connections.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    hold_buffer_total: usize,
    /// Max client bytes held by one endpoint's connections together, so
    /// that one held endpoint cannot take the whole total (default: a
    /// quarter of --hold-buffer-total, at least --hold-buffer-per-conn).
    /// Forwarding connections' read-ahead is charged to neither cap.
    #[arg(long, value_parser = parse_size)]
    hold_buffer_per_endpoint: Option<usize>,
    /// How forwarding connections move bytes: splice (zero-copy through a
    /// pipe) or copy (through a userspace buffer). Per endpoint with
    /// `endpoint add --relay`. Holds always buffer in userspace.
    #[arg(long, value_enum, default_value_t = Mechanism::Splice, env = "SHEPHERD_RELAY")]
    relay: Mechanism,
    /// Data-plane threads (default: one per two CPUs, at least one). Each has
    /// its own listener and event loop and keeps its connections, as
    /// HAProxy's and Envoy's workers do; the control API runs on a thread of
    /// its own. The agent shares the node with the pods it serves: more
    /// threads than the load needs each sleep and wake more often (on 2
    /// vCPUs, 2 threads cost ~15% more CPU per new connection than 1).
    #[arg(long, env = "SHEPHERD_DATA_THREADS")]
    data_threads: Option<usize>,
    /// Relayed connections at once; past it new connections are closed at
    /// accept (FIN) and counted. Default: what RLIMIT_NOFILE allows after a
    /// reserve for the API, eBPF and splice pipes (logged at start).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Endpoints the agent can register (with removed ones still draining).
    /// The kernel maps are sized for it at start.
    #[arg(long, default_value_t = 4096)]
    max_endpoints: u32,
    /// Entries of the kernel's translation map, two per backend flow
    /// translated after a move to a new address. A hold whose flows do not
    /// fit is aborted and answers 409 limit_reached.
    #[arg(long, default_value_t = 65_536)]
    max_translations: u32,
    /// Entries of the kernel's map of client flows handed to the proxy,
    /// used to drop a stray segment of a flow whose proxy socket has closed
    /// (which the pod would answer with a reset). An LRU map: when full, the
    /// oldest flow's entry makes room; nothing is refused.
    #[arg(long, default_value_t = shepherd::intercept::ebpf::DEFAULT_MAX_PROXIED_FLOWS)]
    max_proxied_flows: u32,
    /// Idle time before keepalive probes a relayed connection's sockets (0:
    /// no keepalive). A peer that vanished silently is noticed after about
    /// idle + interval × probes; never during a hold (the backend's timers
    /// are off while its pod is frozen).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    keepalive_idle: Duration,
    /// Time between keepalive probes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// Unanswered probes before the connection is given up.
    #[arg(long, default_value_t = 6)]
    keepalive_probes: u32,
    /// TCP_USER_TIMEOUT of relayed sockets: how long sent bytes may go
    /// unacknowledged before the connection is given up (0: the kernel's
    /// default, about 15 minutes).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    user_timeout: Duration,
    /// Log filter (RUST_LOG syntax), e.g. info or shepherd=debug.
    #[arg(long, default_value = "info", env = "RUST_LOG")]
    log_level: String,
}

pub fn run(args: RunArgs, api_socket: PathBuf) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = Config {
        api_socket,
        intercept_ifaces: args.intercept_ifaces,
        shield_ifaces: args.shield_ifaces,
        hold_deadline: args.hold_deadline,
        quiesce_timeout: args.quiesce_timeout,
        connect_timeout: args.connect_timeout,
        hold_buffer_per_conn: args.hold_buffer_per_conn,
        hold_buffer_total: args.hold_buffer_total,
        hold_buffer_per_endpoint: args.hold_buffer_per_endpoint,
        listen_backlog: 4096,
        takeover: !args.no_takeover,
        handover_protocol: args.handover_protocol,
        after_handover_wait: args.after_handover == AfterHandover::Wait,
        ready_file: args.ready_file,
        handover_reload: args.handover_reload_programs,
        relay: args.relay,
        data_threads: args.data_threads.unwrap_or_else(default_data_threads),
        max_connections: args.max_connections,
        max_endpoints: args.max_endpoints,
        max_translations: args.max_translations,
        max_proxied_flows: args.max_proxied_flows,
        liveness: shepherd::transport::liveness::Liveness {
            idle: args.keepalive_idle,
            interval: args.keepalive_interval,
            probes: args.keepalive_probes,
            user_timeout: args.user_timeout,
        },
    };
    // The control plane (API, migrations) needs little CPU: one thread. The
    // data plane starts its own threads (`relay::workers`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::agent::run(config))?;
    Ok(ExitCode::SUCCESS)
}

/// One data-plane thread per two CPUs, at least one (see `--data-threads`).
fn default_data_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 2).clamp(1, shepherd_common::MAX_LISTENERS as usize)
}
