//! Why a job gets another attempt: the reason its `retrying` event states before the new
//! attempt's `running`.
//!
//! The attempt that claims the job (the compare-and-set in the node's delivery) is the one
//! place every new attempt passes through, whatever handed the job back: a retryable failure
//! NAKed with backoff, a timeout or a worker crash (the slot restarts), the loss detector
//! handing a lost node's deliveries back, an ack-wait redelivery after a silent death, a node
//! that left with its job unfinished. So the claimer states the reason, derived from the record
//! it replaced: a `retrying` record carries the failed attempt's error; a `running` one means
//! its owner never concluded, and what the registry says about that owner's life tells a lost
//! node from a live one that went silent on this job. Everything here is pure.

use crate::job::{JobRecord, JobState};
use crate::protocol::ApiError;
// The reason is a wire type (in `protocol`, which must not import this module's rules).
pub use crate::protocol::RetryReason;

/// The message of the error a job gets when its slot's inference actor stops under it; one
/// definition, so [`failure_reason`] recognises it.
pub const SLOT_STOPPED: &str = "the inference actor stopped while running the job";

/// What the registry says about the life of the node that owned a `running` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerLife {
    /// No registry entry: it expired, or the node left or was removed as lost.
    Gone,
    /// An entry of a life that began after the attempt started: the node restarted.
    Restarted,
    /// A survivor claimed the hand-back of that life (`_lost.<node>.<started_ms>`).
    HandedBack,
    /// The life that ran the attempt is still registered and nobody declared it lost.
    Alive,
    /// The registry could not be read.
    Unknown,
}

/// Judges the owner's life from its registry entry's `started_ms` (`None`: no entry) and
/// whether that life's hand-back was claimed. `attempt_started_ms` is the record's
/// `started_ms`: both come from the owner's own clock, so comparing them is sound.
pub fn owner_life(attempt_started_ms: Option<u64>, entry_started_ms: Option<u64>, handed_back: bool) -> OwnerLife {
    match entry_started_ms {
        None => OwnerLife::Gone,
        Some(life) if attempt_started_ms.is_some_and(|started| life > started) => OwnerLife::Restarted,
        Some(_) if handed_back => OwnerLife::HandedBack,
        Some(_) => OwnerLife::Alive,
    }
}

/// The reason of a retryable failure, from the error its attempt wrote. The messages are the
/// engine's own (`EngineError`'s `Display`, tested beside it in kiln-core's `engine`), whose
/// prefixes are stable.
pub fn failure_reason(error: Option<&ApiError>) -> RetryReason {
    let Some(message) = error.map(|e| e.message.as_str()) else { return RetryReason::EngineFailed };
    if message.contains(SLOT_STOPPED) {
        RetryReason::SlotRestarted
    } else if message.starts_with("worker died:") {
        RetryReason::WorkerCrashed
    } else if message.starts_with("timed out after ") {
        RetryReason::Timeout
    } else if message.starts_with("cannot load model:") {
        RetryReason::LoadFailed
    } else {
        RetryReason::EngineFailed
    }
}

/// Why the attempt that replaces `previous` (the record its claim read) runs, with a message
/// for people: `None` for a first attempt. `life` matters only for a `running` record (a
/// takeover); pass [`OwnerLife::Unknown`] otherwise.
pub fn why_next_attempt(previous: &JobRecord, life: OwnerLife) -> Option<(RetryReason, String)> {
    if previous.attempt == 0 {
        return None;
    }
    let n = previous.attempt;
    match previous.state {
        JobState::Retrying => {
            let reason = failure_reason(previous.error.as_ref());
            let what = previous.error.as_ref().map(|e| e.message.as_str()).unwrap_or("a retryable error");
            let place = previous.owner.as_ref().map(|o| format!(" on {} ({})", o.node, o.slot)).unwrap_or_default();
            Some((reason, format!("attempt {n} failed{place}: {what}")))
        }
        JobState::Running => {
            let owner = previous.owner.as_ref().map(|o| format!("{} ({})", o.node, o.slot)).unwrap_or_else(|| "its node".into());
            Some(match life {
                OwnerLife::Gone => (RetryReason::NodeLost, format!("attempt {n} was lost with node {owner}: the node is gone")),
                OwnerLife::Restarted => (RetryReason::NodeLost, format!("attempt {n} was lost with node {owner}: the node restarted")),
                OwnerLife::HandedBack => (
                    RetryReason::NodeLost,
                    format!("attempt {n} was lost with node {owner}: the node stopped answering and its jobs were handed back"),
                ),
                OwnerLife::Alive | OwnerLife::Unknown => (
                    RetryReason::AckWaitExpired,
                    format!("attempt {n} on {owner} sent no news for longer than the ack wait; the job was redelivered"),
                ),
            })
        }
        // A claim replaces only queued, retrying or running records.
        JobState::Queued | JobState::Completed | JobState::Failed | JobState::Cancelled => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Owner;

    fn record(state: JobState, attempt: u32) -> JobRecord {
        JobRecord { state, attempt, started_ms: Some(1_000), ..JobRecord::queued("j", "m", 3, 0) }
    }

    #[test]
    fn a_first_attempt_has_no_reason() {
        assert_eq!(why_next_attempt(&record(JobState::Queued, 0), OwnerLife::Unknown), None);
    }

    #[test]
    fn an_attempt_without_an_error_failed_in_its_engine() {
        assert_eq!(failure_reason(None), RetryReason::EngineFailed);
    }

    #[test]
    fn a_takeover_names_a_lost_node_or_an_expired_ack_wait() {
        let mut r = record(JobState::Running, 2);
        r.owner = Some(Owner { node: "gpu-a".into(), slot: "cuda:0".into() });
        for (life, reason) in [
            (OwnerLife::Gone, RetryReason::NodeLost),
            (OwnerLife::Restarted, RetryReason::NodeLost),
            (OwnerLife::HandedBack, RetryReason::NodeLost),
            (OwnerLife::Alive, RetryReason::AckWaitExpired),
            (OwnerLife::Unknown, RetryReason::AckWaitExpired),
        ] {
            let (got, message) = why_next_attempt(&r, life).expect("a retry");
            assert_eq!(got, reason);
            assert!(message.contains("attempt 2") && message.contains("gpu-a"), "{message}");
        }
    }

    #[test]
    fn the_owner_life_is_judged_from_its_entry() {
        assert_eq!(owner_life(Some(1_000), None, false), OwnerLife::Gone);
        assert_eq!(owner_life(Some(1_000), Some(2_000), false), OwnerLife::Restarted);
        assert_eq!(owner_life(Some(1_000), Some(900), true), OwnerLife::HandedBack);
        assert_eq!(owner_life(Some(1_000), Some(900), false), OwnerLife::Alive);
        // A record without a start time cannot prove a restart.
        assert_eq!(owner_life(None, Some(2_000), false), OwnerLife::Alive);
    }

    #[test]
    fn reasons_have_stable_codes() {
        for reason in [
            RetryReason::NodeLost,
            RetryReason::AckWaitExpired,
            RetryReason::WorkerCrashed,
            RetryReason::SlotRestarted,
            RetryReason::Timeout,
            RetryReason::LoadFailed,
            RetryReason::EngineFailed,
        ] {
            assert_eq!(serde_json::to_value(reason).unwrap(), serde_json::Value::String(reason.as_str().into()));
        }
    }
}
