//! `cargo xtask faults [--write]`: runs the fault matrix (one privileged
//! test per fault) and prints its table from what each test recorded (see
//! `shepherd_tests::record`); `--write` puts the table in RELIABILITY.md.
//! `cargo xtask ci` records while it runs every privileged test, and fails
//! if a fault test left no record.
use crate::reliability::write_section;
use crate::util::{self, workspace_root};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct Options {
    /// Write the table into RELIABILITY.md.
    #[arg(long)]
    write: bool,
}

/// The fault matrix, in order: each fault and the test (`file::name` under
/// tests/tests) whose record gives its outcome.
pub const FAULTS: &[(&str, &str)] = &[
    (
        "the destination agent down when `incoming` is called",
        "migration::destination_agent_down_before_incoming_changes_nothing",
    ),
    (
        "the destination agent dies when `complete` is due (new IP: its translation back to the old address goes with it)",
        "migration::destination_agent_dead_at_complete_ends_clients_cleanly",
    ),
    (
        "5% loss and 50 ms delay on the fabric from the restore on, through the release and the replay (NFQUEUE: these kernels have no `sch_netem`)",
        "migration::loss_and_delay_on_the_fabric_during_the_replay_lose_nothing",
    ),
    (
        "the link between the nodes cut for 2 s right after the restore, before the release",
        "migration::a_two_second_cut_between_restore_and_release_loses_nothing",
    ),
    (
        "CRIU restore fails on B (the address the sockets are bound to is missing there), then succeeds back on A",
        "migration::a_restore_that_fails_on_b_is_restored_on_a",
    ),
    (
        "the controller vanishes after the hold",
        "data_path::hold_without_release_aborts_at_deadline",
    ),
    (
        "the controller vanishes after `target` (the hold's `to`)",
        "safety::a_controller_that_vanishes_after_target_is_undone_by_the_deadline",
    ),
    (
        "the controller vanishes after the restore (no release, no `complete`)",
        "migration::a_controller_that_vanishes_after_the_restore_is_rolled_forward",
    ),
    (
        "the pod's process dies during a hold, is restarted, and is released in reconnect mode",
        "data_path::a_pod_killed_during_a_hold_and_restarted_keeps_its_clients",
    ),
    (
        "the pod is gone when the deadline aborts",
        "data_path::deadline_abort_with_the_pod_gone_closes_cleanly_and_says_why",
    ),
    (
        "the hold buffers exhausted (the total cap) by 100 clients pushing",
        "data_path::a_hundred_clients_exhaust_the_total_hold_budget_and_lose_nothing",
    ),
    (
        "one client pushing far past its connection's hold cap",
        "data_path::hold_buffer_cap_applies_back_pressure",
    ),
    (
        "the translation map full when a hold asks for the new address (`--max-translations`)",
        "safety::a_full_translation_map_aborts_the_hold_cleanly",
    ),
    (
        "the proxied-flow map full (`--max-proxied-flows`)",
        "safety::a_full_proxied_flow_map_refuses_and_resets_nothing",
    ),
    (
        "the descriptor limit reached",
        "safety::the_connection_limit_refuses_cleanly_and_keeps_the_api",
    ),
    (
        "100 slow or half-open API callers",
        "safety::slow_api_callers_are_cut_off_and_others_served",
    ),
    (
        "the pod cannot be reached",
        "data_path::unreachable_backend_closes_the_client_cleanly",
    ),
    (
        "a dump fails (ENOSPC)",
        "migration::failed_dump_aborts_and_the_pod_keeps_serving",
    ),
    (
        "a post-dump script vetoes the dump (raw CRIU, no Shepherd)",
        "criu_harness::vetoed_dump_rolls_back_and_a_later_migration_works",
    ),
    (
        "the pod's second move (from B) fails at its dump",
        "migration::failed_second_move_leaves_the_pod_serving_where_it_was",
    ),
    (
        "routes switched before the restore",
        "migration::route_switched_before_restore_resets_nobody",
    ),
];

const BEGIN: &str = "<!-- faults:begin -->";
const END: &str = "<!-- faults:end -->";

/// Where the tests record (`SHEPHERD_RECORD_DIR`).
pub fn record_dir() -> PathBuf {
    workspace_root().join("target/reliability")
}

/// Empties the record directory, for a run whose records must all be new.
pub fn clear_records() -> Result<()> {
    let dir = record_dir().join("faults");
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("clearing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

pub fn run(o: &Options) -> Result<()> {
    let bin = util::build_release_binaries()?.join("shepherd");
    clear_records()?;
    let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (_, test) in FAULTS {
        let (file, name) = test.split_once("::").context("a test is file::name")?;
        by_file.entry(file).or_default().push(name);
    }
    for (file, names) in by_file {
        let mut t = Command::new("cargo");
        t.args([
            "test",
            "--release",
            "-p",
            "shepherd-tests",
            "--test",
            file,
            "--",
        ])
        .args(["--test-threads=1", "--exact"])
        .args(&names)
        .env("SHEPHERD_BIN", &bin)
        .env("SHEPHERD_RECORD_DIR", record_dir());
        util::run(&mut t)?;
    }
    let table = table(&record_dir())?;
    println!("{table}");
    if o.write {
        write_section(BEGIN, END, &table)?;
        eprintln!("faults: RELIABILITY.md updated");
    }
    Ok(())
}

/// The fault table from the records under `dir`; an error names the fault
/// tests that recorded nothing.
pub fn table(dir: &Path) -> Result<String> {
    let mut missing = Vec::new();
    let mut s = String::from(
        "Produced by `cargo xtask faults --write` (every row is a privileged test that passed and recorded what it measured).\n\n| fault | outcome | test |\n|---|---|---|\n",
    );
    for (fault, test) in FAULTS {
        let name = test.split_once("::").map_or(*test, |(_, n)| n);
        let path = dir.join("faults").join(format!("{name}.json"));
        let outcome = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["outcome"].as_str().map(str::to_owned));
        match outcome {
            Some(o) => s.push_str(&format!(
                "| {fault} | {} | `{test}` |\n",
                o.replace('|', "\\|")
            )),
            None => missing.push(*test),
        }
    }
    if !missing.is_empty() {
        bail!(
            "these fault tests recorded no outcome (did they run, and pass?): {}",
            missing.join(", ")
        );
    }
    Ok(s)
}
