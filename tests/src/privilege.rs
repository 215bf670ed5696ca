//! Deciding whether a privileged test may run.
//!
//! The integration tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). As
//! root they run; otherwise they fail loudly, unless
//! `SHEPHERD_SKIP_PRIVILEGED=1` asks to skip them, in which case each prints one
//! "skipped" line and passes. A silent skip would let CI go green having tested
//! nothing, hence the default is to fail.

/// Environment variable that turns "not root" from a failure into a skip.
pub const SKIP_ENV: &str = "SHEPHERD_SKIP_PRIVILEGED";

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns true when `test` may run (we are root). When not root: returns false
/// after printing "skipped TEST: needs root" if `SHEPHERD_SKIP_PRIVILEGED=1`,
/// and panics otherwise.
pub fn require_privileged(test: &str) -> bool {
    decide(test, is_root(), std::env::var(SKIP_ENV).ok().as_deref())
}

fn decide(test: &str, root: bool, skip: Option<&str>) -> bool {
    if root {
        return true;
    }
    if skip == Some("1") {
        eprintln!("skipped {test}: needs root");
        return false;
    }
    panic!(
        "{test} needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run as root via \
         `cargo xtask ci`, or set {SKIP_ENV}=1 to skip"
    );
}

/// First line of a privileged `#[test] fn ... ()`: returns from the test early
/// when it is being skipped (see [`require_privileged`]). The test's name is
/// taken from the enclosing function unless given: `privileged!("name")`.
#[macro_export]
macro_rules! privileged {
    () => {{
        fn __here() {}
        let name = ::std::any::type_name_of_val(&__here);
        let name = name.strip_suffix("::__here").unwrap_or(name);
        if !$crate::privilege::require_privileged(name) {
            return;
        }
    }};
    ($name:expr) => {
        if !$crate::privilege::require_privileged($name) {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn root_runs() {
        assert!(decide("t", true, None));
        assert!(decide("t", true, Some("1")));
    }

    #[test]
    fn skip_when_asked() {
        assert!(!decide("t", false, Some("1")));
    }

    #[test]
    #[should_panic(expected = "needs root")]
    fn fail_otherwise() {
        decide("t", false, Some("0"));
    }

    #[test]
    fn macro_names_the_test() {
        fn __here() {}
        let name = std::any::type_name_of_val(&__here);
        assert!(name.ends_with("macro_names_the_test::__here"), "{name}");
    }
}
