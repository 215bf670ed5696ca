//! RELIABILITY.md: the soak's figures, written by `cargo xtask soak
//! --write`, and the fault table, written by `cargo xtask faults --write`,
//! each between its markers, so the hand-written parts (the probing
//! findings, the fuzz targets) stay as they are.
use crate::bench::report::Machine;
use crate::util::workspace_root;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write;

const BEGIN: &str = "<!-- soak:begin -->";
const END: &str = "<!-- soak:end -->";

/// Replaces what RELIABILITY.md holds between `begin` and `end` with
/// `body` (the markers stay).
pub fn write_section(begin: &str, end: &str, body: &str) -> Result<()> {
    let path = workspace_root().join("RELIABILITY.md");
    let old = std::fs::read_to_string(&path).context("reading RELIABILITY.md")?;
    let (Some(b), Some(e)) = (old.find(begin), old.find(end)) else {
        anyhow::bail!("RELIABILITY.md has no {begin} … {end} markers");
    };
    let new = format!("{}{begin}\n{body}{}", &old[..b], &old[e..]);
    std::fs::write(&path, new).context("writing RELIABILITY.md")
}

/// Replaces the soak section of RELIABILITY.md with `r`.
pub fn write_soak(r: &Value) -> Result<()> {
    let m = Machine::read();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Produced by `cargo xtask soak --migrations {} --streams {} --write` on {} cores ({}), {:.0} GiB, kernel {}: {} live migrations in {} s.\n",
        r["asked"], r["load"]["counter_streams"], m.cores, m.cpu, m.memory_gib, m.kernel, r["migrations"], r["elapsed_s"]
    );
    let f = |v: &Value| format!("{:.0}", v.as_f64().unwrap_or(0.0));
    let _ = writeln!(
        s,
        "| per migration | median | p99 | max |\n|---|---|---|---|"
    );
    for (name, key) in [
        ("client pause − freeze (ms)", "pause_minus_freeze_ms"),
        ("time per migration (ms)", "per_migration_ms"),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            f(&r[key]["median"]),
            f(&r[key]["p99"]),
            f(&r[key]["max"])
        );
    }
    let l = &r["load"];
    let _ = writeln!(
        s,
        "\nLoad throughout: {} counter streams ({} values, every one back once and in order; streams not clean: {}), {} Redis clients ({} `INCR`s answered, each checked), {} short-lived connections ({} failed); RSTs on the clients' wire: {}.\n",
        l["counter_streams"], l["counter_values_sent"], l["streams_not_clean"], l["redis_clients"],
        l["redis_commands_answered"], l["short_connections"], l["short_connections_failed"], l["rsts"]
    );
    let _ = writeln!(
        s,
        "| at start → end | origin (node A) | destination (node B) | bound |\n|---|---|---|---|"
    );
    for (key, bound) in [
        ("rss_mib", format!("+{} MiB", r["bounds"]["rss_mib"])),
        ("fds", format!("+{}", r["bounds"]["fds"])),
        (
            "translations",
            format!(
                "≤ {} once clients are gone",
                r["bounds"]["translations_after"]
            ),
        ),
        (
            "migration_records",
            format!("≤ {}", r["bounds"]["migration_records"]),
        ),
        ("routes", "the agent's table: unchanged".to_string()),
        ("rules", "unchanged".to_string()),
    ] {
        let _ = writeln!(
            s,
            "| {key} | {} → {} | {} → {} | {bound} |",
            r["start"]["origin"][key],
            r["end"]["origin"][key],
            r["start"]["destination"][key],
            r["end"]["destination"][key]
        );
    }
    let _ = writeln!(
        s,
        "\nNetwork namespaces left behind: {}. Failures: {}.",
        r["end"]["leftover_namespaces"],
        r["failures"].as_array().map_or(0, Vec::len)
    );
    write_section(BEGIN, END, &s)
}
