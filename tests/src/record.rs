//! What the fault tests saw, for RELIABILITY.md's fault table.
//!
//! A fault test that passed records its outcome, with the figures it
//! measured, as one JSON file under `$SHEPHERD_RECORD_DIR/faults/`, named
//! after the test. `cargo xtask faults --write` runs the fault tests with
//! that variable set and writes the table from the records; `cargo xtask
//! ci` does the same without writing and fails if a fault test recorded
//! nothing. Without the variable, recording does nothing.
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

/// The variable naming the record directory.
pub const RECORD_DIR: &str = "SHEPHERD_RECORD_DIR";

/// Records that `test` (its name, as `cargo test` lists it) passed with
/// `outcome`: what happened, in the user's terms, with the measured figures.
pub fn fault(test: &str, outcome: impl Into<String>) {
    let Some(dir) = std::env::var_os(RECORD_DIR).map(PathBuf::from) else {
        return;
    };
    let dir = dir.join("faults");
    let body = json!({ "test": test, "outcome": outcome.into() });
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{test}.json")), body.to_string()));
    if let Err(e) = written {
        panic!("recording {test} under {}: {e}", dir.display());
    }
}

/// A duration as a table shows it: whole milliseconds.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
