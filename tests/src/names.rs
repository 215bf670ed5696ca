//! Unique, short names for the resources a test creates.
//!
//! Namespace names are global to the machine, and tests of several processes
//! (or a crashed earlier run) may coexist, so each test takes a prefix made of
//! a short tag, this process's pid and a per-process counter, and names every
//! namespace `{prefix}{role}`. Interfaces live inside those namespaces and need
//! no prefix. Keep prefixes short: a namespace name plus role stays ≤ ~20 chars.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this call: `sh{tag}{pid % 100000, 5 digits}{counter}`,
/// e.g. `shtb012340`. `tag` is cut to 6 characters and must be alphanumeric.
pub fn unique_prefix(tag: &str) -> String {
    assert!(
        tag.chars().all(|c| c.is_ascii_alphanumeric()),
        "unique_prefix: tag {tag:?} must be ASCII alphanumeric"
    );
    let tag: String = tag.chars().take(6).collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sh{tag}{:05}{n}", std::process::id() % 100_000)
}

#[cfg(test)]
mod tests {
    use super::unique_prefix;

    #[test]
    fn unique_and_short() {
        let a = unique_prefix("abcdefghij");
        let b = unique_prefix("abcdefghij");
        assert_ne!(a, b);
        assert!(a.starts_with("shabcdef"), "{a}");
        assert!(a.len() <= 16, "{a}");
    }
}
