//! `cargo xtask ci`: the project's whole test command, as CI runs it.
//!
//! setup → fmt check → build-ebpf → clippy (userspace and eBPF) → unit tests
//! → privileged integration tests (root; single-threaded, real namespaces)
//! → `soak --migrations 10` (the long run's checks, time-boxed)
//! → `fuzz --time 20` (every libFuzzer target, its corpus replayed first)
//! → `bench --quick` (so the benchmark harness cannot rot).
use crate::util::{self, workspace_root};
use crate::{build_ebpf, setup};
use anyhow::{bail, Result};
use std::process::Command;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo xtask setup` (for quick local iterations).
    #[arg(long)]
    no_setup: bool,
    /// Only run privileged tests whose name contains this filter.
    #[arg(long)]
    filter: Option<String>,
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.args(args).current_dir(workspace_root());
    c
}

pub fn run(o: &Options) -> Result<()> {
    let t0 = Instant::now();
    let step = |name: &str| eprintln!("\n=== ci: {name} ({:.0?} elapsed)", t0.elapsed());
    if !o.no_setup {
        step("setup");
        setup::run(&setup::Options::default())?;
    }
    step("fmt");
    util::run(&mut cargo(&["fmt", "--all", "--check"]))?;
    build_ebpf::fmt_check()?;
    step("build-ebpf");
    build_ebpf::build(true)?;
    step("clippy");
    util::run(&mut cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_ebpf::clippy()?;
    step("unit tests");
    util::run(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "shepherd-tests",
    ]))?;
    step("privileged integration tests");
    let root = nix_is_root();
    if !root && std::env::var("SHEPHERD_SKIP_PRIVILEGED").as_deref() != Ok("1") {
        bail!("the integration tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run `cargo xtask ci` as root, or set SHEPHERD_SKIP_PRIVILEGED=1 to skip them");
    }
    util::run(&mut cargo(&["build", "--release", "-p", "shepherd"]))?;
    let bin = workspace_root().join("target/release/shepherd");
    let mut t = cargo(&["test", "--release", "-p", "shepherd-tests", "--"]);
    if let Some(f) = &o.filter {
        t.arg(f);
    }
    crate::faults::clear_records()?;
    t.args(["--test-threads=1"])
        .env("SHEPHERD_BIN", &bin)
        .env("SHEPHERD_RECORD_DIR", crate::faults::record_dir());
    util::run(&mut t)?;
    if o.filter.is_none() && root {
        // Every fault of the matrix was shown by a test that passed.
        step("fault matrix");
        println!("{}", crate::faults::table(&crate::faults::record_dir())?);
    }
    if o.filter.is_none() {
        // Ten migrations, not a hundred: every check of the long run, in
        // about half a minute (`cargo xtask soak` runs the long one).
        step("soak --migrations 10");
        crate::soak::run(&crate::soak::Options {
            migrations: 10,
            streams: 50,
            json: false,
            write: false,
            no_setup: true,
        })?;
        step("fuzz --time 20");
        crate::fuzz::run_all(&crate::fuzz::Options {
            time: 20,
            targets: Vec::new(),
            scratch: true,
        })?;
        // Once, small: the benchmark harness must keep working (no timing
        // assertions; benchmarks are not tests).
        step("bench --quick");
        crate::bench::run(&crate::bench::Options {
            quick: true,
            json: false,
            only: Vec::new(),
            write: false,
            no_setup: true,
            plot: None,
        })?;
    }
    eprintln!("\n=== ci: all green in {:.0?}", t0.elapsed());
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
