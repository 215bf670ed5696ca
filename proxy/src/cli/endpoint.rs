//! `shepherd endpoint add|rm|ls`.
use super::client::Api;
use super::output;
use clap::Subcommand;
use serde_json::json;
use shepherd::api::types::EndpointList;
use shepherd::endpoint::EndpointAddr;
use shepherd::relay::Mechanism;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum EndpointCmd {
    /// Register pod endpoints (IP:PORT ...); idempotent.
    Add {
        #[arg(required = true, value_name = "IP:PORT")]
        endpoints: Vec<EndpointAddr>,
        /// How their new connections forward (default: the agent's --relay).
        #[arg(long, value_enum)]
        relay: Option<Mechanism>,
        /// Accept loopback and this node's own addresses. Refused by default:
        /// connections to them would be steered back into the agent.
        #[arg(long)]
        allow_local: bool,
    },
    /// Unregister endpoints; their open connections keep flowing until closed.
    Rm {
        #[arg(required = true, value_name = "IP:PORT")]
        endpoints: Vec<EndpointAddr>,
    },
    /// List endpoints with their counters.
    Ls,
}

pub fn run(cmd: EndpointCmd, api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        EndpointCmd::Add {
            endpoints,
            relay,
            allow_local,
        } => {
            let list: EndpointList = api.call(
                "POST",
                "/v1/endpoints",
                Some(
                    &json!({ "endpoints": endpoints, "relay": relay, "allow_local": allow_local }),
                ),
            )?;
            if json {
                output::json(&list)?;
            } else {
                for e in &list.endpoints {
                    println!("registered {}", e.endpoint);
                }
            }
        }
        EndpointCmd::Rm { endpoints } => {
            for e in &endpoints {
                let _: serde_json::Value =
                    api.call("DELETE", &format!("/v1/endpoints/{e}"), None)?;
                if !json {
                    println!("unregistered {e}");
                }
            }
            if json {
                output::json(&json!({ "removed": endpoints }))?;
            }
        }
        EndpointCmd::Ls => {
            let list: EndpointList = api.call("GET", "/v1/endpoints", None)?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .endpoints
                    .iter()
                    .map(|e| {
                        vec![
                            e.endpoint.to_string(),
                            e.state.clone(),
                            e.migration.clone().unwrap_or_else(|| "-".into()),
                            e.connections.to_string(),
                            e.syns_assigned.to_string(),
                            e.packets_intercepted.to_string(),
                            e.rsts_shielded.to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ENDPOINT",
                        "STATE",
                        "MIGRATION",
                        "CONNS",
                        "SYNS",
                        "PACKETS",
                        "RSTS_SHIELDED",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
