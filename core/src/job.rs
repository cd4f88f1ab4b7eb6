//! The job record (the source of truth, stored in KV `kiln_jobs`) and the pure rules of its
//! life cycle: what a delivery of a queue message may do given the record it finds, and which
//! state changes are legal. Keeping these pure lets the tests hit every case without NATS.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::batch::ParentRef;
use crate::protocol::{ApiError, Artifact, InputValue};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Durable in the queue, not running.
    Queued,
    /// An attempt owns it and runs it.
    Running,
    /// The last attempt failed for an infrastructure reason; it waits in the queue for the next.
    Retrying,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Which node and slot own the current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub slot: String,
}

/// A job as stored in KV. Every write after creation is a compare-and-set on the KV revision,
/// which is what fences a stale attempt: it holds an old revision and its write is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub model: String,
    pub inputs: BTreeMap<String, InputValue>,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub priority: u8,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub state: JobState,
    /// Number of attempts started so far (0 while first queued).
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The last error (of the last failed attempt, or the terminal one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// Set by cancel while the job runs; the owner sees it at its next write and stops.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub dead_letter: bool,
    /// Set on the children of a batch: the batch is told when this job reaches its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

impl JobRecord {
    /// A freshly submitted job: queued, no attempt yet. Callers fill in inputs and options.
    pub fn queued(job_id: &str, model: &str, max_attempts: u32, now_ms: u64) -> JobRecord {
        JobRecord {
            job_id: job_id.to_string(),
            model: model.to_string(),
            inputs: BTreeMap::new(),
            params: Default::default(),
            priority: 0,
            max_attempts,
            deadline_ms: None,
            idempotency_key: None,
            state: JobState::Queued,
            attempt: 0,
            owner: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            error: None,
            artifacts: vec![],
            cancel_requested: false,
            dead_letter: false,
            parent: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

/// What a node does with a queue delivery, decided from the record it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryDecision {
    /// The record is terminal: a redelivery after the terminal write (crash before the ack).
    /// Ack the message, (re)publish the terminal event, run nothing.
    AlreadyTerminal,
    /// Cancel was requested before this attempt started: write `cancelled`, never run.
    CancelBeforeRun,
    /// The deadline passed before the job could start: fail it (a user error, no retry).
    DeadlinePassed,
    /// Every attempt was used by earlier deliveries that died without writing an outcome.
    AttemptsExhausted,
    /// Claim attempt `attempt` (a compare-and-set on the record) and run it.
    Run { attempt: u32 },
}

/// Decides what a delivery does. `now_ms` is passed in so the rule is pure.
///
/// A delivery that finds the record `running` means the previous owner stopped sending
/// `in_progress` for longer than the ack wait (it died, or lost its link): the new delivery
/// takes over with the next attempt, and the compare-and-set fences the old owner out.
pub fn decide_delivery(record: &JobRecord, now_ms: u64) -> DeliveryDecision {
    if record.is_terminal() {
        return DeliveryDecision::AlreadyTerminal;
    }
    if record.cancel_requested {
        return DeliveryDecision::CancelBeforeRun;
    }
    if record.deadline_ms.is_some_and(|d| now_ms > d) {
        return DeliveryDecision::DeadlinePassed;
    }
    if record.attempt >= record.max_attempts {
        return DeliveryDecision::AttemptsExhausted;
    }
    DeliveryDecision::Run { attempt: record.attempt + 1 }
}

/// How a failed attempt is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The input or the request is wrong: retrying cannot help. Fail at once.
    User,
    /// Crash, worker death, timeout, out of memory, NATS trouble: retry with backoff.
    Infrastructure,
    /// The model itself is unusable (missing or corrupt file): fail at once, not the user's fault.
    Permanent,
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Put the job back in the queue for attempt `attempt + 1` after the backoff.
    Retry,
    /// Terminal failure; `dead_letter` when it was the last attempt of an infrastructure error.
    Fail { dead_letter: bool },
}

pub fn after_failure(kind: FailureKind, attempt: u32, max_attempts: u32) -> AfterFailure {
    match kind {
        FailureKind::User | FailureKind::Permanent => AfterFailure::Fail { dead_letter: false },
        FailureKind::Infrastructure if attempt < max_attempts => AfterFailure::Retry,
        FailureKind::Infrastructure => AfterFailure::Fail { dead_letter: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: JobState, attempt: u32) -> JobRecord {
        JobRecord { state, attempt, ..JobRecord::queued("j", "m", 3, 0) }
    }

    #[test]
    fn terminal_records_are_never_run_again() {
        for s in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
            let mut r = record(s, 1);
            r.cancel_requested = true;
            assert_eq!(decide_delivery(&r, 0), DeliveryDecision::AlreadyTerminal);
        }
    }

    #[test]
    fn queued_job_runs_its_first_attempt() {
        assert_eq!(decide_delivery(&record(JobState::Queued, 0), 0), DeliveryDecision::Run { attempt: 1 });
    }

    #[test]
    fn a_running_record_is_taken_over_with_the_next_attempt() {
        assert_eq!(decide_delivery(&record(JobState::Running, 1), 0), DeliveryDecision::Run { attempt: 2 });
    }

    #[test]
    fn cancel_before_run_wins_over_running() {
        let mut r = record(JobState::Queued, 0);
        r.cancel_requested = true;
        assert_eq!(decide_delivery(&r, 0), DeliveryDecision::CancelBeforeRun);
    }

    #[test]
    fn deadline_and_attempts() {
        let mut r = record(JobState::Queued, 0);
        r.deadline_ms = Some(10);
        assert_eq!(decide_delivery(&r, 11), DeliveryDecision::DeadlinePassed);
        assert_eq!(decide_delivery(&r, 10), DeliveryDecision::Run { attempt: 1 });
        let r = record(JobState::Running, 3);
        assert_eq!(decide_delivery(&r, 0), DeliveryDecision::AttemptsExhausted);
    }

    #[test]
    fn user_errors_never_retry_and_infra_errors_retry_until_the_last_attempt() {
        assert_eq!(after_failure(FailureKind::User, 1, 3), AfterFailure::Fail { dead_letter: false });
        assert_eq!(after_failure(FailureKind::Infrastructure, 1, 3), AfterFailure::Retry);
        assert_eq!(after_failure(FailureKind::Infrastructure, 2, 3), AfterFailure::Retry);
        assert_eq!(after_failure(FailureKind::Infrastructure, 3, 3), AfterFailure::Fail { dead_letter: true });
    }
}
