//! `cargo xtask fuzz [--time SECONDS] [TARGET ...]`: the libFuzzer targets
//! under `fuzz/`, each for a bounded time (CI: 20 s each), starting from its
//! committed corpus (`fuzz/corpus/TARGET`), which every run replays first:
//! an input that once crashed, added there, is a test case forever. New
//! inputs the run finds land in the same directory, to be committed when
//! they add coverage.
use crate::util::{clean_cargo, run, workspace_root};
use anyhow::{bail, Result};

/// Every target (`fuzz/Cargo.toml`).
pub const TARGETS: &[&str] = &["api", "values", "flows_file", "handover"];

#[derive(clap::Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
    /// Keep new inputs in a scratch directory, not in the committed
    /// corpus (CI: the checkout stays as it was).
    #[arg(long)]
    pub scratch: bool,
}

/// What one target's run left.
pub struct Ran {
    pub target: String,
    pub seconds: u64,
    pub corpus: usize,
}

pub fn run_all(o: &Options) -> Result<Vec<Ran>> {
    let targets: Vec<String> = if o.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        o.targets.clone()
    };
    let mut ran = Vec::new();
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?}: one of {}", TARGETS.join(", "));
        }
        let corpus = workspace_root().join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        // libFuzzer writes new inputs into the first corpus directory and
        // replays them all.
        let scratch = tempfile::Builder::new()
            .prefix("shepherd-fuzz-")
            .tempdir()?;
        let mut cmd = clean_cargo("cargo");
        cmd.current_dir(workspace_root()).args([
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            t,
        ]);
        if o.scratch {
            cmd.arg(scratch.path());
        }
        let status = run(cmd
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", o.time))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1"));
        if let Err(e) = status {
            let artifacts = workspace_root().join("fuzz/artifacts").join(t);
            let crashed = std::fs::read_dir(&artifacts).is_ok_and(|mut d| d.next().is_some());
            if crashed {
                bail!(
                    "fuzz target {t} found a crash ({e}): the input is under {}; fix the bug, \
                     then copy the input into fuzz/corpus/{t}/ so every later run replays it",
                    artifacts.display()
                );
            }
            bail!("fuzz target {t} could not be built or run: {e}");
        }
        ran.push(Ran {
            target: t.clone(),
            seconds: o.time,
            corpus: std::fs::read_dir(&corpus).map_or(0, |d| d.count()),
        });
    }
    Ok(ran)
}

pub fn run_cmd(o: &Options) -> Result<()> {
    for r in run_all(o)? {
        println!(
            "fuzz {}: {} s, corpus {} inputs, no crash",
            r.target, r.seconds, r.corpus
        );
    }
    Ok(())
}
