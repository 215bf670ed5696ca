//! `cargo xtask bench`: Shepherd measured side by side with its baselines in
//! one run: migration pause (what clients feel, against CRIU alone),
//! steady-state overhead (against direct and HAProxy), scale, hold under
//! pressure. These machines are noisy: every
//! figure is repeated and reported as min/median/max, with the ratio to its
//! baseline. Benchmarks assert nothing about absolute times; `--quick` runs a
//! small version of each section so CI keeps the harness from rotting.
pub mod handover;
pub mod haproxy;
pub mod migration;
pub mod pressure;
pub mod report;
pub mod scale;
pub mod steady;

use crate::setup;
use crate::util::{self, workspace_root};
use anyhow::{bail, Result};
use report::Section;

#[derive(clap::Args)]
pub struct Options {
    /// Small sizes and one repetition: a smoke run of every section (CI).
    #[arg(long)]
    pub quick: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Only these sections (migration, steady, scale, pressure, handover); default all.
    /// `steady:bulk`, `steady:rr` and `steady:conn` pick parts of steady.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Write the results to BENCHMARKS.md (the full run does this by default).
    #[arg(long)]
    pub write: bool,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    pub no_setup: bool,
    /// Draw the migration section's clients over time (first repetition at
    /// each freeze, Shepherd beside CRIU alone) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

pub fn run(o: &Options) -> Result<()> {
    if !shepherd_tests::privilege::is_root() {
        bail!("the benchmarks create network namespaces, load eBPF and run CRIU: run them as root");
    }
    if !o.no_setup {
        setup::run(&setup::Options::default())?;
    }
    let target = util::build_release_binaries()?;
    let want = |s: &str| {
        o.only.is_empty()
            || o.only
                .iter()
                .any(|x| x == s || x.strip_prefix(s).is_some_and(|r| r.starts_with(':')))
    };
    let mut sections: Vec<Section> = Vec::new();
    if want("migration") {
        sections.push(migration::run(o.quick, &target, o.plot.as_deref())?);
    }
    if want("scale") {
        sections.push(scale::run(o.quick, &target)?);
    }
    if want("handover") {
        sections.push(handover::run(o.quick, &target)?);
    }
    if want("pressure") {
        sections.push(pressure::run(o.quick, &target)?);
    }
    if want("steady") {
        let parts = steady::Parts::from_only(&o.only)?;
        sections.push(steady::run(o.quick, parts)?);
    }
    let machine = report::Machine::read();
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::to_json(&machine, &sections, o.quick))?
        );
    } else {
        print!("{}", report::to_text(&machine, &sections));
    }
    if o.write || (!o.quick && o.only.is_empty()) {
        report::write_markdown(
            &workspace_root().join("BENCHMARKS.md"),
            &machine,
            &sections,
            o.quick,
        )?;
        eprintln!("bench: wrote BENCHMARKS.md");
    }
    Ok(())
}
