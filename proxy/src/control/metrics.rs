//! Prometheus text exposition of the agent's counters.
use super::model::EndpointView;
use super::{lock, Control};
use crate::migration::Phase;
use crate::relay::{splice, workers};
use std::sync::atomic::Ordering;

impl Control {
    // ---- metrics ---------------------------------------------------------

    /// Prometheus text exposition.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let eps = self.list_endpoints();
        let migs = self.list_migrations_with(false);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per_ep = |f: &dyn Fn(&EndpointView) -> f64| -> Vec<(String, f64)> {
            eps.iter()
                .map(|e| (format!("{{endpoint=\"{}\"}}", e.endpoint), f(e)))
                .collect()
        };
        metric(
            "shepherd_endpoints",
            "gauge",
            "Managed endpoints.",
            vec![(String::new(), eps.len() as f64)],
        );
        metric(
            "shepherd_connections",
            "gauge",
            "Open relayed connections.",
            per_ep(&|e| e.connections as f64),
        );
        metric(
            "shepherd_connections_total",
            "counter",
            "Relayed connections accepted.",
            per_ep(&|e| e.connections_total as f64),
        );
        let agent = self.agent();
        metric(
            "shepherd_handovers",
            "gauge",
            "Hand-overs in this agent's line: 0 for an agent started afresh, one more for each successor.",
            vec![(String::new(), agent.handovers as f64)],
        );
        metric(
            "shepherd_handover_connections",
            "gauge",
            "Connections this agent received in the hand-over it started with.",
            vec![(
                String::new(),
                agent.took_over.as_ref().map_or(0, |t| t.connections) as f64,
            )],
        );
        metric(
            "shepherd_connections_lost_in_crash",
            "gauge",
            "Relayed connections the previous agent held when it died without a hand-over (SIGKILL, OOM, panic), as its last census said; they ended when it did.",
            vec![(String::new(), agent.lost_in_crash.unwrap_or(0) as f64)],
        );
        metric(
            "shepherd_connection_limit",
            "gauge",
            "Relayed connections the data plane may hold at once (--max-connections).",
            vec![(String::new(), self.relay.slots.max() as f64)],
        );
        metric(
            "shepherd_connections_refused_total",
            "counter",
            "Connections closed at accept because the connection limit was reached.",
            vec![(String::new(), self.relay.slots.refused() as f64)],
        );
        metric(
            "shepherd_data_thread_accepted_total",
            "counter",
            "Connections accepted by each data-plane thread (intercept spreads them by flow hash).",
            workers::accepted_per_thread()
                .into_iter()
                .enumerate()
                .map(|(i, n)| (format!("{{thread=\"{i}\"}}"), n as f64))
                .collect(),
        );
        metric(
            "shepherd_spliced_bytes_total",
            "counter",
            "Bytes forwarded with splice(2), both directions, all endpoints.",
            vec![(String::new(), splice::spliced_bytes() as f64)],
        );
        metric(
            "shepherd_splice_pipes",
            "gauge",
            "Pipes open for splicing (in use or pooled; 2 fds each).",
            vec![(String::new(), splice::pool::live() as f64)],
        );
        metric(
            "shepherd_intercepted_packets_total",
            "counter",
            "Packets steered to the proxy by eBPF.",
            per_ep(&|e| e.packets_intercepted as f64),
        );
        metric(
            "shepherd_intercepted_bytes_total",
            "counter",
            "Bytes steered to the proxy by eBPF.",
            per_ep(&|e| e.bytes_intercepted as f64),
        );
        metric(
            "shepherd_rsts_shielded_total",
            "counter",
            "RSTs from held endpoints dropped by eBPF.",
            per_ep(&|e| e.rsts_shielded as f64),
        );
        metric(
            "shepherd_stray_segments_dropped_total",
            "counter",
            "Late segments of closed proxied flows dropped by eBPF (the pod would have reset the client).",
            per_ep(&|e| e.strays_dropped as f64),
        );
        let occ = self.intercept.occupancy();
        metric(
            "shepherd_translated_flows",
            "gauge",
            "Backend flows the eBPF programs translate (entries of SHEPHERD_TRANSLATE).",
            vec![(String::new(), occ.translations as f64)],
        );
        metric(
            "shepherd_hold_buffer_bytes",
            "gauge",
            "Client bytes queued in hold buffers.",
            vec![(String::new(), self.relay.budget.used() as f64)],
        );
        metric(
            "shepherd_hold_buffer_capacity_bytes",
            "gauge",
            "Node-wide hold buffer cap.",
            vec![(String::new(), self.relay.budget.capacity() as f64)],
        );
        let count = |p: Phase| migs.iter().filter(|m| m.state == p).count() as f64;
        metric(
            "shepherd_migrations",
            "gauge",
            "Migrations known to this agent, by state.",
            [Phase::Holding, Phase::Released, Phase::Aborted]
                .into_iter()
                .map(|p| (format!("{{state=\"{p}\"}}"), count(p)))
                .collect(),
        );
        metric(
            "shepherd_aborts_total",
            "counter",
            "Migrations aborted (requested or deadline).",
            vec![(
                String::new(),
                self.aborts_total.load(Ordering::Relaxed) as f64,
            )],
        );
        metric(
            "shepherd_bytes_held_total",
            "counter",
            "Client bytes held across all migrations.",
            vec![(
                String::new(),
                migs.iter().map(|m| m.bytes_held as f64).sum(),
            )],
        );
        metric(
            "shepherd_bytes_replayed_total",
            "counter",
            "Held bytes replayed to pods.",
            vec![(
                String::new(),
                migs.iter().map(|m| m.bytes_replayed as f64).sum(),
            )],
        );
        metric(
            "shepherd_hold_seconds_total",
            "counter",
            "Total time endpoints spent held (ended holds).",
            vec![(String::new(), *lock(&self.hold_seconds_total))],
        );
        out
    }
}
