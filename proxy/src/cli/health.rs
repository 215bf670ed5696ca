//! `shepherd health [--ready-file PATH]`: a cheap check for probes and
//! people. Prints who serves the API socket (version, pid, start, what it
//! took over) and exits 0 if it answers. With `--ready-file` (the file
//! `shepherd run --ready-file` writes), also exits 1 unless the agent that
//! answers is the one that wrote it: during a hand-over the socket is
//! served by the old agent, and a new pod must not look ready until its own
//! agent has taken over.
use super::client::Api;
use super::output;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct HealthArgs {
    /// The file this pod's agent writes its instance id to once it serves.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

pub fn run(args: HealthArgs, api: &Api, json: bool) -> anyhow::Result<ExitCode> {
    let h: serde_json::Value = api.call("GET", "/healthz", None)?;
    let serving = h["instance"].as_str().unwrap_or_default().to_string();
    let ours = match &args.ready_file {
        None => true,
        Some(p) => std::fs::read_to_string(p)
            .map(|id| id.trim() == serving)
            .unwrap_or(false),
    };
    if json {
        output::json(&h)?;
    } else {
        println!(
            "shepherd {} (pid {}) serving; {} hand-over(s) in its line{}",
            h["version"].as_str().unwrap_or("?"),
            h["pid"],
            h["handovers"],
            match h["took_over"]["connections"].as_u64() {
                Some(n) => format!("; took over {n} connections"),
                None => String::new(),
            }
        );
    }
    if !ours {
        eprintln!(
            "shepherd: the agent serving the socket is not this pod's (a hand-over to it has not happened yet)"
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
