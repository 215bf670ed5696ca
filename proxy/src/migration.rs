//! The migration state machine, kept free of I/O so it can be tested alone.
//!
//! Per migration: `Holding → Released | Aborted`. Every call is idempotent by
//! migration id: repeating the call that produced the current phase is a
//! no-op that returns the current status, and a call that contradicts it is a
//! conflict with a message saying what happened. A finished migration's id is
//! never reused.
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Holding,
    Released,
    Aborted,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Holding => "holding",
            Phase::Released => "released",
            Phase::Aborted => "aborted",
        })
    }
}

/// How held bytes go back to the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseMode {
    /// The pod's TCP connections were restored (CRIU `--tcp-established`): keep
    /// the backend sockets and flush held bytes into them.
    #[default]
    Resume,
    /// The pod came back without its connections: open new ones and replay.
    Reconnect,
}

impl std::str::FromStr for ReleaseMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resume" => Ok(Self::Resume),
            "reconnect" => Ok(Self::Reconnect),
            _ => Err(format!(
                "unknown release mode {s:?}: expected resume or reconnect"
            )),
        }
    }
}

/// What a caller asks of a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Release,
    Abort,
}

/// What the caller must do after asking.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Apply the transition to this phase.
    Go(Phase),
    /// Already in the requested phase: return the status unchanged.
    AlreadyThere,
}

/// Decides a request against the current phase.
pub fn decide(
    id: &str,
    current: Phase,
    request: &Request,
    reason: Option<&str>,
) -> Result<Step, String> {
    let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    match (current, request) {
        (Phase::Holding, Request::Release) => Ok(Step::Go(Phase::Released)),
        (Phase::Holding, Request::Abort) => Ok(Step::Go(Phase::Aborted)),
        (Phase::Released, Request::Release) | (Phase::Aborted, Request::Abort) => {
            Ok(Step::AlreadyThere)
        }
        (Phase::Aborted, Request::Release) => Err(format!(
            "migration {id} was aborted{why}; its connections were already resumed towards the original backend; start a new migration with a new id"
        )),
        (Phase::Released, Request::Abort) => Err(format!(
            "migration {id} was already released; it cannot be aborted"
        )),
    }
}

/// Decides a repeated hold with the same id.
pub fn decide_repeat_hold(id: &str, current: Phase, same_endpoints: bool) -> Result<Step, String> {
    match (current, same_endpoints) {
        (Phase::Holding, true) => Ok(Step::AlreadyThere),
        (Phase::Holding, false) => Err(format!(
            "migration {id} is already holding a different set of endpoints; release or abort it first"
        )),
        (done, _) => Err(format!(
            "migration {id} is already {done}; use a new id for a new migration"
        )),
    }
}

/// Checks a migration id: 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn validate_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid migration id {id:?}: use 1-128 characters of letters, digits, '.', '_', ':' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holding_goes_to_released_or_aborted() {
        assert_eq!(
            decide("m", Phase::Holding, &Request::Release, None),
            Ok(Step::Go(Phase::Released))
        );
        assert_eq!(
            decide("m", Phase::Holding, &Request::Abort, None),
            Ok(Step::Go(Phase::Aborted))
        );
    }

    #[test]
    fn repeats_are_idempotent() {
        assert_eq!(
            decide("m", Phase::Released, &Request::Release, None),
            Ok(Step::AlreadyThere)
        );
        assert_eq!(
            decide("m", Phase::Aborted, &Request::Abort, None),
            Ok(Step::AlreadyThere)
        );
        assert_eq!(
            decide_repeat_hold("m", Phase::Holding, true),
            Ok(Step::AlreadyThere)
        );
    }

    #[test]
    fn contradictions_are_conflicts_that_say_why() {
        let e =
            decide("m", Phase::Aborted, &Request::Release, Some("deadline")).expect_err("conflict");
        assert!(e.contains("aborted (deadline)"), "{e}");
        assert!(decide("m", Phase::Released, &Request::Abort, None).is_err());
        assert!(decide_repeat_hold("m", Phase::Holding, false).is_err());
        let e = decide_repeat_hold("m", Phase::Released, true).expect_err("finished");
        assert!(e.contains("new id"), "{e}");
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("mig-1.a_b:c").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn release_modes_parse() {
        assert_eq!("resume".parse(), Ok(ReleaseMode::Resume));
        assert_eq!("reconnect".parse(), Ok(ReleaseMode::Reconnect));
        assert!("teleport".parse::<ReleaseMode>().is_err());
    }
}
