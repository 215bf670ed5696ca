//! `shepherd migrate hold|release|abort|status`.
use super::client::Api;
use super::output;
use clap::Subcommand;
use serde_json::json;
use shepherd::api::types::{IncomingStatus, MigrationList, MigrationStatus};
use shepherd::endpoint::EndpointAddr;
use shepherd::units::parse_duration;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum MigrateCmd {
    /// Hold endpoints: buffer client bytes, return once the pod has acknowledged everything.
    Hold {
        #[arg(long)]
        id: String,
        #[arg(required = true, value_name = "IP:PORT")]
        endpoints: Vec<EndpointAddr>,
        /// Abort automatically if no release arrives in time (default: the agent's --hold-deadline).
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
        /// How long to wait for quiescence (default: the agent's --quiesce-timeout).
        #[arg(long, value_parser = parse_duration)]
        quiesce_timeout: Option<Duration>,
        /// The pod's new address, if known now (same as `migrate target`).
        #[arg(long, value_name = "IP")]
        to: Option<std::net::Ipv4Addr>,
    },
    /// Release a hold: replay held bytes to the pod, in order, then relay normally.
    Release {
        #[arg(long)]
        id: String,
        /// resume: the pod's connections were restored (CRIU --tcp-established).
        /// reconnect: they were not; held bytes go to new backend connections.
        #[arg(long, default_value = "resume")]
        mode: String,
        /// The pod's new address: new backend connections go there (with
        /// resume, the held flows are translated to it, as `migrate target`
        /// does). Default: the address `migrate target` set, if any.
        #[arg(long, value_name = "IP")]
        to: Option<String>,
    },
    /// Abort a hold: resume towards the original backend.
    Abort {
        #[arg(long)]
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Show a migration (or all of them without --id).
    Status {
        #[arg(long)]
        id: Option<String>,
    },
    /// Origin: say where the pod lands; if its address changes, start
    /// translating the held backend flows. Call before the restore.
    Target {
        #[arg(long)]
        id: String,
        #[arg(long, value_name = "IP")]
        to: std::net::Ipv4Addr,
    },
    /// Destination: prepare for a pod about to be restored here (shield its
    /// endpoints; translate its flows if its address changes).
    Incoming {
        #[arg(long)]
        id: String,
        /// The pod's endpoints at their original address.
        #[arg(required = true, value_name = "IP:PORT")]
        endpoints: Vec<EndpointAddr>,
        /// The pod's new address, if it changes.
        #[arg(long, value_name = "IP")]
        to: Option<std::net::Ipv4Addr>,
        /// The origin's `migrate status --json` output (file, or - for stdin):
        /// its backend_flows are the flows to translate.
        #[arg(long, value_name = "FILE")]
        flows_from: Option<String>,
        /// Lift the shield by itself after this long.
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
    },
    /// Destination: the restore is done (or failed: give --reason); lift
    /// the shield.
    Complete {
        #[arg(long)]
        id: String,
        /// The migration failed: its translations are undone at once (an
        /// earlier migration's, replaced by this one, come back). Give it
        /// only if the pod is not running here.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Destination, later: the pod this migration brought here has left
    /// this node (it moved on). Its flows' translations are removed and
    /// the record forgotten.
    Retire {
        #[arg(long)]
        id: String,
    },
}

pub fn run(cmd: MigrateCmd, api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    let status: MigrationStatus = match cmd {
        MigrateCmd::Hold {
            id,
            endpoints,
            deadline,
            quiesce_timeout,
            to,
        } => {
            let body = json!({
                "endpoints": endpoints,
                "to": to,
                "deadline_ms": deadline.map(|d| d.as_millis() as u64),
                "quiesce_timeout_ms": quiesce_timeout.map(|d| d.as_millis() as u64),
            });
            let s: MigrationStatus = api.call(
                "PUT",
                &format!("/v1/migrations/{}/hold", enc(&id)),
                Some(&body),
            )?;
            print(&s, json)?;
            if !s.quiescent {
                eprintln!(
                    "shepherd: warning: hold {} is in place but backends still had unacknowledged bytes after {} ms; checkpointing now may capture in-flight data (abort with `shepherd migrate abort --id {}`)",
                    s.id,
                    s.quiesce_ms.unwrap_or(0),
                    s.id
                );
                return Ok(ExitCode::from(3));
            }
            return Ok(ExitCode::SUCCESS);
        }
        MigrateCmd::Release { id, mode, to } => api.call(
            "POST",
            &format!("/v1/migrations/{}/release", enc(&id)),
            Some(&json!({ "mode": mode, "to": to })),
        )?,
        MigrateCmd::Abort { id, reason } => api.call(
            "POST",
            &format!("/v1/migrations/{}/abort", enc(&id)),
            Some(&json!({ "reason": reason })),
        )?,
        MigrateCmd::Status { id: Some(id) } => {
            api.call("GET", &format!("/v1/migrations/{}", enc(&id)), None)?
        }
        MigrateCmd::Target { id, to } => api.call(
            "PUT",
            &format!("/v1/migrations/{}/target", enc(&id)),
            Some(&json!({ "to": to })),
        )?,
        MigrateCmd::Incoming {
            id,
            endpoints,
            to,
            flows_from,
            deadline,
        } => {
            let flows = match flows_from {
                Some(src) => read_flows(&src)?,
                None => serde_json::Value::Array(vec![]),
            };
            let body = json!({
                "endpoints": endpoints,
                "to": to,
                "flows": flows,
                "deadline_ms": deadline.map(|d| d.as_millis() as u64),
            });
            let s: IncomingStatus = api.call(
                "PUT",
                &format!("/v1/migrations/{}/incoming", enc(&id)),
                Some(&body),
            )?;
            return print_incoming(&s, json);
        }
        MigrateCmd::Complete { id, reason } => {
            let s: IncomingStatus = api.call(
                "POST",
                &format!("/v1/migrations/{}/incoming/complete", enc(&id)),
                Some(&json!({ "reason": reason })),
            )?;
            return print_incoming(&s, json);
        }
        MigrateCmd::Retire { id } => {
            let _: serde_json::Value = api.call(
                "DELETE",
                &format!("/v1/migrations/{}/incoming", enc(&id)),
                None,
            )?;
            if json {
                output::json(&json!({ "retired": id }))?;
            } else {
                println!("retired incoming migration {id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        MigrateCmd::Status { id: None } => {
            let list: MigrationList = api.call("GET", "/v1/migrations", None)?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list.migrations.iter().map(summary_row).collect();
                output::table(&SUMMARY_HEADER, &rows);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    print(&status, json)?;
    Ok(ExitCode::SUCCESS)
}

/// Migration ids are restricted to URL-safe characters by the agent; anything
/// else is percent-encoded so the agent can reject it with a clear message.
fn enc(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const SUMMARY_HEADER: [&str; 7] = [
    "ID",
    "STATE",
    "CONNS",
    "HELD",
    "REPLAYED",
    "HOLD_MS",
    "RSTS_SHIELDED",
];

fn state_line(s: &MigrationStatus) -> String {
    match &s.reason {
        Some(r) => format!("{}: {r}", s.state),
        None => s.state.to_string(),
    }
}

fn summary_row(s: &MigrationStatus) -> Vec<String> {
    vec![
        s.id.clone(),
        state_line(s),
        s.connections.to_string(),
        output::bytes(s.bytes_held),
        output::bytes(s.bytes_replayed),
        s.hold_duration_ms.to_string(),
        s.rsts_shielded.to_string(),
    ]
}

fn print(s: &MigrationStatus, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json(s);
    }
    let eps: Vec<String> = s.endpoints.iter().map(|e| e.to_string()).collect();
    println!("migration:      {}", s.id);
    println!("state:          {}", state_line(s));
    println!("endpoints:      {}", eps.join(" "));
    println!(
        "connections:    {} held ({} queued during the hold, {} closed)",
        s.connections, s.connections_queued, s.connections_closed
    );
    if s.backends_ended > 0 {
        println!(
            "backends ended: {} during the hold (the pod closed them; a reconnect release reopens them)",
            s.backends_ended
        );
    }
    println!(
        "quiescent:      {}{}",
        if s.quiescent { "yes" } else { "no" },
        s.quiesce_ms
            .map(|m| format!(" (after {m} ms)"))
            .unwrap_or_default()
    );
    println!("bytes held:     {}", output::bytes(s.bytes_held));
    println!("bytes replayed: {}", output::bytes(s.bytes_replayed));
    println!(
        "hold duration:  {} ms (deadline {} ms)",
        s.hold_duration_ms, s.deadline_ms
    );
    println!("rsts shielded:  {}", s.rsts_shielded);
    if let Some(t) = s.target {
        println!(
            "target:         {t} ({} flows, {} packets translated)",
            s.backend_flows.len(),
            s.packets_translated
        );
    }
    Ok(())
}

/// The `backend_flows` of an origin's status JSON, from a file or stdin.
fn read_flows(src: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let text = if src == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).context("reading stdin")?;
        t
    } else {
        std::fs::read_to_string(src).with_context(|| format!("reading {src}"))?
    };
    shepherd::api::types::flows_from_status(&text, src).map_err(anyhow::Error::msg)
}

fn print_incoming(s: &IncomingStatus, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(s)?;
        return Ok(ExitCode::SUCCESS);
    }
    let eps: Vec<String> = s.endpoints.iter().map(|e| e.to_string()).collect();
    println!("incoming:       {}", s.id);
    println!(
        "state:          {}{}",
        s.state,
        s.reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    println!("endpoints:      {}", eps.join(" "));
    println!(
        "new address:    {}",
        s.to.map(|t| t.to_string())
            .unwrap_or_else(|| "(unchanged)".into())
    );
    println!("flows:          {}", s.flows.len());
    println!("rsts shielded:  {}", s.rsts_shielded);
    println!("translated:     {} packets", s.packets_translated);
    Ok(ExitCode::SUCCESS)
}
