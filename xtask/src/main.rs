//! Developer tasks. `cargo xtask <task>`; every task is idempotent.
mod bench;
mod build_ebpf;
mod ci;
mod demo;
mod faults;
mod fuzz;
mod plot;
mod reliability;
mod scenario;
mod setup;
mod soak;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Shepherd developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything a fresh machine needs (idempotent; fast when done).
    Setup(setup::Options),
    /// Build the eBPF object that the `shepherd` binary embeds.
    BuildEbpf(build_ebpf::Options),
    /// setup, fmt check, clippy, unit tests, privileged integration tests.
    Ci(ci::Options),
    /// A real CRIU live migration with and without Shepherd, side by side.
    Demo(demo::Options),
    /// Benchmarks against the baselines (table, --json, BENCHMARKS.md).
    Bench(bench::Options),
    /// Back-to-back live migrations under load, checked (RELIABILITY.md).
    Soak(soak::Options),
    /// The libFuzzer targets under fuzz/, each for a bounded time.
    Fuzz(fuzz::Options),
    /// The fault matrix: one privileged test per fault (RELIABILITY.md).
    Faults(faults::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(o) => setup::run(&o),
        Task::BuildEbpf(o) => build_ebpf::run(&o),
        Task::Ci(o) => ci::run(&o),
        Task::Demo(o) => demo::run(&o),
        Task::Bench(o) => bench::run(&o),
        Task::Soak(o) => soak::run(&o),
        Task::Fuzz(o) => fuzz::run_cmd(&o),
        Task::Faults(o) => faults::run(&o),
    }
}
