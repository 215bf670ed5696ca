//! The migration state machine, kept free of I/O so it can be tested alone.
//!
//! Per migration: `Holding → Released | Aborted`. Every call is idempotent by
//! migration id: repeating the call that produced the current phase is a
//! no-op that returns the current status, and a call that contradicts it is a
//! conflict with a message saying what happened. A finished migration's id is
//! never reused.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Longest hold or incoming deadline a caller may ask for. A hold stops
/// clients' bytes from reaching their pod for as long as it lasts; an hour
/// covers the checkpoint of any pod this machine could hold in memory, and
/// anything longer is a unit mistake (seconds given as milliseconds'
/// thousands, or a sentinel like u64::MAX).
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);
/// Longest quiesce timeout a caller may ask for.
pub const MAX_QUIESCE_TIMEOUT: Duration = Duration::from_secs(600);

/// A duration field of a request, in milliseconds: `None` if absent, an
/// error naming the field if it is above `max`, or 0 where 0 means nothing
/// (`zero_ok` false).
pub fn bounded_ms(
    field: &str,
    ms: Option<u64>,
    max: Duration,
    zero_ok: bool,
) -> Result<Option<Duration>, String> {
    let Some(ms) = ms else { return Ok(None) };
    let d = Duration::from_millis(ms);
    if (ms == 0 && !zero_ok) || d > max {
        return Err(format!(
            "{field} must be between {} and {} ({} s); got {ms}",
            u8::from(!zero_ok),
            max.as_millis(),
            max.as_secs()
        ));
    }
    Ok(Some(d))
}

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
    Release(ReleaseMode),
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

/// Decides a request against the current phase. `released`: the mode of
/// the release that ended the migration, if one did.
pub fn decide(
    id: &str,
    current: Phase,
    request: &Request,
    reason: Option<&str>,
    released: Option<ReleaseMode>,
) -> Result<Step, String> {
    let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
    match (current, request) {
        (Phase::Holding, Request::Release(_)) => Ok(Step::Go(Phase::Released)),
        (Phase::Holding, Request::Abort) => Ok(Step::Go(Phase::Aborted)),
        (Phase::Released, Request::Release(mode)) => match released {
            Some(done) if done != *mode => Err(format!(
                "migration {id} was already released in {} mode; a release in {} mode \
                 cannot change what was done (start a new migration with a new id)",
                mode_name(done),
                mode_name(*mode)
            )),
            _ => Ok(Step::AlreadyThere),
        },
        (Phase::Aborted, Request::Abort) => Ok(Step::AlreadyThere),
        (Phase::Aborted, Request::Release(_)) => Err(format!(
            "migration {id} was aborted{why}; its connections were already resumed towards the original backend; start a new migration with a new id"
        )),
        (Phase::Released, Request::Abort) => Err(format!(
            "migration {id} was already released; it cannot be aborted"
        )),
    }
}

fn mode_name(m: ReleaseMode) -> &'static str {
    match m {
        ReleaseMode::Resume => "resume",
        ReleaseMode::Reconnect => "reconnect",
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

/// Ids of records the agent no longer keeps (finished migrations pruned,
/// incoming records retired), so that a late or repeated call with one is
/// refused rather than taken for a new migration. Bounded: the oldest go
/// first, after [`Forgotten::CAPACITY`].
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Forgotten {
    order: std::collections::VecDeque<String>,
    ids: std::collections::HashSet<String>,
}

impl Forgotten {
    pub const CAPACITY: usize = 4096;

    pub fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
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
            decide(
                "m",
                Phase::Holding,
                &Request::Release(ReleaseMode::Resume),
                None,
                None
            ),
            Ok(Step::Go(Phase::Released))
        );
        assert_eq!(
            decide("m", Phase::Holding, &Request::Abort, None, None),
            Ok(Step::Go(Phase::Aborted))
        );
    }

    #[test]
    fn repeats_are_idempotent() {
        assert_eq!(
            decide(
                "m",
                Phase::Released,
                &Request::Release(ReleaseMode::Resume),
                None,
                Some(ReleaseMode::Resume)
            ),
            Ok(Step::AlreadyThere)
        );
        assert_eq!(
            decide("m", Phase::Aborted, &Request::Abort, None, None),
            Ok(Step::AlreadyThere)
        );
        assert_eq!(
            decide_repeat_hold("m", Phase::Holding, true),
            Ok(Step::AlreadyThere)
        );
    }

    #[test]
    fn contradictions_are_conflicts_that_say_why() {
        let e = decide(
            "m",
            Phase::Aborted,
            &Request::Release(ReleaseMode::Resume),
            Some("deadline"),
            None,
        )
        .expect_err("conflict");
        assert!(e.contains("aborted (deadline)"), "{e}");
        assert!(decide("m", Phase::Released, &Request::Abort, None, None).is_err());
        let e = decide(
            "m",
            Phase::Released,
            &Request::Release(ReleaseMode::Reconnect),
            None,
            Some(ReleaseMode::Resume),
        )
        .expect_err("another mode");
        assert!(
            e.contains("resume mode") && e.contains("reconnect mode"),
            "{e}"
        );
        assert!(decide_repeat_hold("m", Phase::Holding, false).is_err());
        let e = decide_repeat_hold("m", Phase::Released, true).expect_err("finished");
        assert!(e.contains("new id"), "{e}");
    }

    #[test]
    fn forgotten_ids_are_remembered_up_to_a_bound() {
        let mut f = Forgotten::default();
        for i in 0..Forgotten::CAPACITY + 10 {
            f.insert(format!("m{i}"));
        }
        assert!(!f.contains("m0"), "the oldest go first");
        assert!(f.contains(&format!("m{}", Forgotten::CAPACITY + 9)));
        assert!(f.contains("m10"));
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("mig-1.a_b:c").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(
            bounded_ms("deadline_ms", None, MAX_DEADLINE, false),
            Ok(None)
        );
        assert_eq!(
            bounded_ms("deadline_ms", Some(1500), MAX_DEADLINE, false),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            bounded_ms("quiesce_timeout_ms", Some(0), MAX_QUIESCE_TIMEOUT, true),
            Ok(Some(Duration::ZERO))
        );
        for bad in [0, u64::MAX, 3_600_001] {
            let e = bounded_ms("deadline_ms", Some(bad), MAX_DEADLINE, false).expect_err("bounded");
            assert!(e.contains("deadline_ms") && e.contains("3600"), "{e}");
        }
    }

    #[test]
    fn release_modes_parse() {
        assert_eq!("resume".parse(), Ok(ReleaseMode::Resume));
        assert_eq!("reconnect".parse(), Ok(ReleaseMode::Reconnect));
        assert!("teleport".parse::<ReleaseMode>().is_err());
    }
}
