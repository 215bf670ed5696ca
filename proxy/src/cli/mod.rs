//! Command-line interface. Every command except `run` is a thin client of the
//! control API; one file per verb.
mod client;
mod conn;
mod endpoint;
mod health;
mod migrate;
mod output;
mod run;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shepherd",
    version,
    about = "Keeps clients' TCP connections alive while the pod behind them is live-migrated"
)]
pub struct Cli {
    /// Path of the agent's API socket.
    #[arg(long, global = true, env = "SHEPHERD_SOCKET", default_value = shepherd::config::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(run::RunArgs),
    /// Manage the pod endpoints whose client connections shepherd terminates.
    #[command(subcommand)]
    Endpoint(endpoint::EndpointCmd),
    /// Drive a migration: hold, release, abort, status.
    #[command(subcommand)]
    Migrate(migrate::MigrateCmd),
    /// List relayed connections.
    #[command(subcommand)]
    Conn(conn::ConnCmd),
    /// Who serves the API socket; exit 0 if it answers (and, with
    /// --ready-file, if it is this pod's agent).
    Health(health::HealthArgs),
}

/// Exit codes: 0 success, 1 failure (the message says why), 2 usage,
/// 3 hold in place but the backends did not quiesce in time.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let api = client::Api::new(cli.api_socket.clone());
    let result = match cli.command {
        Command::Run(args) => run::run(args, cli.api_socket),
        Command::Endpoint(cmd) => endpoint::run(cmd, &api, cli.json),
        Command::Migrate(cmd) => migrate::run(cmd, &api, cli.json),
        Command::Conn(cmd) => conn::run(cmd, &api, cli.json),
        Command::Health(args) => health::run(args, &api, cli.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shepherd: {e:#}");
            ExitCode::from(1)
        }
    }
}
