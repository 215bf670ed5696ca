//! The `shepherd` binary: the node agent (`shepherd run`) and the CLI that
//! drives it through the control API.
mod agent;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
