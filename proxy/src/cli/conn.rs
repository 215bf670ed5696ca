//! `shepherd conn ls`.
use super::client::Api;
use super::output;
use clap::Subcommand;
use shepherd::api::types::ConnectionList;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ConnCmd {
    /// List relayed connections: client, original destination, backend socket (node and pod ends).
    Ls,
}

pub fn run(cmd: ConnCmd, api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        ConnCmd::Ls => {
            let list: ConnectionList = api.call("GET", "/v1/connections", None)?;
            if json {
                output::json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .connections
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.to_string(),
                            c.client.clone(),
                            c.endpoint.clone(),
                            match (&c.backend_local, &c.backend_peer) {
                                (Some(local), Some(peer)) => format!("{local} > {peer}"),
                                (Some(local), None) => local.clone(),
                                (None, _) => "(queued)".into(),
                            },
                            output::bytes(c.bytes_up),
                            output::bytes(c.bytes_down),
                            output::bytes(c.queued as u64),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ID",
                        "CLIENT",
                        "ENDPOINT",
                        "BACKEND (NODE > POD)",
                        "UP",
                        "DOWN",
                        "QUEUED",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
