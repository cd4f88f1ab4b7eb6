//! The job record (the source of truth, stored in KV `kiln_jobs`) and the pure rules of its
//! life cycle: what a delivery of a queue message may do given the record it finds, and every
//! change of the record, each a function from the record read to the record to write. Writers
//! (the job actor, the API's cancel) only call these through one compare-and-set
//! ([`crate::nats::cas`]), so a rule lives in one place and the tests (property tests among
//! them) hit every case without NATS.
//!
//! | change                 | from                                       | to                                          | by         |
//! |------------------------|--------------------------------------------|---------------------------------------------|------------|
//! | [`claim`]              | queued, retrying, running (a takeover)     | running, attempt + 1, this owner            | a delivery |
//! | [`cancel_before_run`]  | not terminal, cancel requested             | cancelled: "cancelled before it ran"        | a delivery |
//! | [`deadline_passed`]    | not terminal, past its deadline            | failed: `deadline_exceeded`                 | a delivery |
//! | [`attempts_exhausted`] | not terminal, every attempt used           | failed: `engine_failed`, dead letter        | a delivery |
//! | [`conclude`]           | running, owned by the concluding attempt   | completed, cancelled, retrying or failed    | the owner  |
//! | [`request_cancel`]     | queued or retrying                         | cancelled (as [`cancel_before_run`])        | the API    |
//! |                        | running                                    | running, `cancel_requested` (owner stops)   | the API    |
//!
//! [`apply_delivery`] picks among the first four by [`decide_delivery`]; [`conclude`] picks
//! retrying or failed by [`after_failure`]. What holds for every change (and is property-tested
//! below): a terminal record never changes (each change refuses it, [`Refused::Terminal`]);
//! only a claim moves `attempt`, up by one and never past `max_attempts`; an attempt that does
//! not own the record (not running, another attempt, another owner) never writes
//! ([`Refused::Fenced`]). Each change sets `updated_ms` to the `now_ms` it is given, so the
//! rules stay pure.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::protocol::JobState;
use crate::protocol::ParentRef;
use crate::protocol::{ApiError, Artifact, ErrorCode, InputValue, JobView, SubmitRequest};

/// Which node and slot own the current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Owner {
    pub node: String,
    pub slot: String,
}

/// A job as stored in KV. Every write after creation is a compare-and-set on the KV revision,
/// which is what fences a stale attempt: it holds an old revision and its write is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// Set by cancel while the job runs; the owner sees it at its next write and stops. Cleared
    /// by every ending: it means a cancel is pending, not that the job was cancelled.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub dead_letter: bool,
    /// Set on the children of a batch: the batch is told when this job reaches its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The client's labels, echoed on the view and on every event.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: crate::protocol::Labels,
    /// The stream sequence of its queue message (the enqueue's ack): where it stands in its
    /// queue, for its position while it waits. Absent in records of an older Kiln.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_seq: Option<u64>,
    /// The submit request's webhook, checked (`kiln.api.submit`'s `webhook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::protocol::WebhookSpec>,
    /// The W3C trace the job belongs to (`traceparent` of its submit's span, and the caller's
    /// `tracestate`): its node spans and its worker's are children of it. Absent in records of
    /// an older Kiln (their jobs start a trace of their own when they run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::TraceContext>,
}

impl JobRecord {
    /// A freshly submitted job: queued, no attempt yet. Callers fill in inputs and options.
    pub fn queued(job_id: &str, model: &str, max_attempts: u32, now_ms: u64) -> JobRecord {
        let request = SubmitRequest { model: model.to_string(), ..Default::default() };
        JobRecord::submitted(job_id.to_string(), request, max_attempts, now_ms)
    }

    /// The record of a job submitted as `req` (its params already checked, defaults filled
    /// in), queued. Every field the client set is taken here by one destructuring without
    /// `..`, and the record is one literal without `..`: a field added to [`SubmitRequest`]
    /// or to the record makes the compiler point at this function, the one place that decides
    /// whether the record keeps it. `max_attempts` is the request's, capped by the model's.
    pub fn submitted(job_id: String, req: SubmitRequest, model_max_attempts: u32, now_ms: u64) -> JobRecord {
        let SubmitRequest { model, inputs, params, priority, idempotency_key, deadline_ms, max_attempts, reuse: _, labels, webhook } = req;
        JobRecord {
            job_id,
            model,
            inputs,
            params,
            priority,
            max_attempts: max_attempts.map(|a| a.min(model_max_attempts)).unwrap_or(model_max_attempts),
            deadline_ms,
            idempotency_key,
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
            labels,
            queue_seq: None,
            webhook,
            // Set by the submit, from the span it runs in (see `kiln_core::telemetry`).
            trace: None,
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

/// Why a change was refused: there is nothing to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The job has ended; nothing changes a terminal record (a late or repeated writer must
    /// not turn `completed` into anything else).
    #[error("the job has ended")]
    Terminal,
    /// The writing attempt does not own the record: another attempt claimed it (this one went
    /// silent past the ack wait) or it is no longer running. Its outcome is dropped.
    #[error("another attempt owns the job")]
    Fenced,
    /// The delivery may not run the job; [`decide_delivery`] says what it does instead.
    #[error("the job may not run: {0:?}")]
    NotRunnable(DeliveryDecision),
}

/// The error of a job cancelled before any attempt ran it. One definition: the API's cancel of
/// a queued job and a delivery that finds a cancel request both write it.
pub fn cancelled_before_run_error() -> ApiError {
    ApiError::new(ErrorCode::Cancelled, "cancelled before it ran")
}

/// The record as it is about to change at `now_ms`; refused when it has ended.
fn touch(record: &JobRecord, now_ms: u64) -> Result<JobRecord, Refused> {
    if record.is_terminal() {
        return Err(Refused::Terminal);
    }
    Ok(JobRecord { updated_ms: now_ms, ..record.clone() })
}

/// The record ended at `now_ms` in `state` with `error`. A pending cancel request is settled by
/// the ending (`cancel_requested` means "asked for and not stopped yet", PROTOCOL's job view).
fn end(record: &JobRecord, state: JobState, error: ApiError, now_ms: u64) -> Result<JobRecord, Refused> {
    debug_assert!(state.is_terminal());
    let mut next = touch(record, now_ms)?;
    next.state = state;
    next.error = Some(error);
    next.finished_ms = Some(now_ms);
    next.cancel_requested = false;
    Ok(next)
}

/// What a delivery of the job's queue message writes, by [`decide_delivery`]: the claim of the
/// next attempt for `owner`, or one of the three endings before a run. `Refused::Terminal` for
/// a record that has ended (the delivery only republishes its ending and acks).
pub fn apply_delivery(record: &JobRecord, owner: &Owner, now_ms: u64) -> Result<JobRecord, Refused> {
    match decide_delivery(record, now_ms) {
        DeliveryDecision::AlreadyTerminal => Err(Refused::Terminal),
        DeliveryDecision::CancelBeforeRun => cancel_before_run(record, now_ms),
        DeliveryDecision::DeadlinePassed => deadline_passed(record, now_ms),
        DeliveryDecision::AttemptsExhausted => attempts_exhausted(record, now_ms),
        DeliveryDecision::Run { .. } => claim(record, owner, now_ms),
    }
}

/// Claims the next attempt for `owner`: running, `attempt + 1`, started now. Refused unless
/// [`decide_delivery`] says the job may run. A record found `running` is taken over: the
/// compare-and-set of this change is what fences the silent previous owner out. A cancel
/// request is cleared because one that arrived before the claim ended the job instead.
pub fn claim(record: &JobRecord, owner: &Owner, now_ms: u64) -> Result<JobRecord, Refused> {
    let attempt = match decide_delivery(record, now_ms) {
        DeliveryDecision::Run { attempt } => attempt,
        DeliveryDecision::AlreadyTerminal => return Err(Refused::Terminal),
        other => return Err(Refused::NotRunnable(other)),
    };
    let mut next = touch(record, now_ms)?;
    next.state = JobState::Running;
    next.attempt = attempt;
    next.owner = Some(owner.clone());
    next.started_ms = Some(now_ms);
    next.cancel_requested = false;
    Ok(next)
}

/// A cancel landed before any attempt ran the job (or while its last owner was gone): it ends
/// `cancelled` and never runs.
pub fn cancel_before_run(record: &JobRecord, now_ms: u64) -> Result<JobRecord, Refused> {
    end(record, JobState::Cancelled, cancelled_before_run_error(), now_ms)
}

/// The deadline passed before the job could start: a user error, so no retry.
pub fn deadline_passed(record: &JobRecord, now_ms: u64) -> Result<JobRecord, Refused> {
    end(record, JobState::Failed, ApiError::new(ErrorCode::DeadlineExceeded, "the deadline passed before the job could start"), now_ms)
}

/// Every attempt was used by deliveries that died without writing an outcome: the job fails
/// into the dead letters, quoting the last error seen.
pub fn attempts_exhausted(record: &JobRecord, now_ms: u64) -> Result<JobRecord, Refused> {
    let last = record.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| "its worker was lost".into());
    let error = ApiError::new(ErrorCode::EngineFailed, format!("all {} attempts failed; last: {last}", record.max_attempts));
    let mut next = end(record, JobState::Failed, error, now_ms)?;
    next.dead_letter = true;
    Ok(next)
}

/// True while attempt `attempt` of `owner` owns the record: it runs, and no later claim took
/// it over. Only the owner may write the record's outcome.
pub fn owned_by(record: &JobRecord, attempt: u32, owner: &Owner) -> bool {
    record.state == JobState::Running && record.attempt == attempt && record.owner.as_ref() == Some(owner)
}

/// What a running attempt makes of its record when its keep-alive re-reads it (every third of
/// the ack wait, and at once after this process stood still).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// The attempt still owns the job; `cancel_requested`: a client asked to stop it.
    Owned { cancel_requested: bool },
    /// The record shows this attempt's own outcome: its conclusion wrote it while the
    /// keep-alive still runs (it runs until the delivery is acked, so that the ack wait does
    /// not expire while the outcome write rides out NATS trouble). Nothing to stop.
    OwnOutcome,
    /// Another attempt owns the job, or it ended without this attempt's conclusion (another
    /// delivery found every attempt used): this attempt is fenced.
    Superseded,
}

/// [`Watched`] for attempt `attempt` of `owner`, reading `record`; `concluding`: the attempt's
/// conclusion has begun (it may have written its outcome), read *after* the record was.
/// Before this rule the keep-alive took any record that was not `running` for another
/// attempt's, and warned "another attempt owns the job now" 3 ms after a job's only attempt
/// completed it (issue 23 item 8; harmless, since the conclusion had checked the fence
/// before its write, but it named a takeover that never was).
pub fn watch(record: &JobRecord, attempt: u32, owner: &Owner, concluding: bool) -> Watched {
    if owned_by(record, attempt, owner) {
        return Watched::Owned { cancel_requested: record.cancel_requested };
    }
    // The same attempt number and owner: no claim came after this attempt's. Ended, then by
    // this attempt's own write once its conclusion has begun (an ending of the same attempt
    // by anyone else, attempts exhausted by another delivery, comes while it still runs).
    let same_attempt = record.attempt == attempt && record.owner.as_ref() == Some(owner);
    if same_attempt && concluding {
        Watched::OwnOutcome
    } else {
        Watched::Superseded
    }
}

/// How an attempt that ran ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It ran to the end; its artifacts are stored and announced.
    Completed { artifacts: Vec<Artifact> },
    /// It stopped on a cancel request while running.
    Cancelled,
    /// It failed; `kind` decides between another attempt and the end ([`after_failure`]).
    Failed { error: ApiError, kind: FailureKind },
}

/// The outcome of attempt `attempt` of `owner`: completed (with its artifacts), cancelled, or
/// after a failure retrying (back to the queue, not terminal) or failed (dead letter when the
/// last attempt failed for an infrastructure reason). Refused for a fenced attempt.
pub fn conclude(record: &JobRecord, attempt: u32, owner: &Owner, outcome: &Outcome, now_ms: u64) -> Result<JobRecord, Refused> {
    if record.is_terminal() {
        return Err(Refused::Terminal);
    }
    if !owned_by(record, attempt, owner) {
        return Err(Refused::Fenced);
    }
    let (state, error, dead_letter, artifacts) = match outcome {
        Outcome::Completed { artifacts } => (JobState::Completed, None, false, artifacts.clone()),
        Outcome::Cancelled => (JobState::Cancelled, Some(ApiError::new(ErrorCode::Cancelled, "cancelled while running")), false, vec![]),
        Outcome::Failed { error, kind } => match after_failure(*kind, attempt, record.max_attempts) {
            AfterFailure::Retry => (JobState::Retrying, Some(error.clone()), false, vec![]),
            AfterFailure::Fail { dead_letter } => (JobState::Failed, Some(error.clone()), dead_letter, vec![]),
        },
    };
    let mut next = touch(record, now_ms)?;
    next.state = state;
    next.error = error;
    next.dead_letter = dead_letter;
    next.artifacts = artifacts;
    if state.is_terminal() {
        next.finished_ms = Some(now_ms);
        // The request, if any, is settled by this ending (see `end`).
        next.cancel_requested = false;
    }
    Ok(next)
}

/// What a client's cancel writes.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelChange {
    /// The job has ended: nothing to write; the record answers the request as it is.
    Unchanged,
    /// It was not running (queued, or waiting to retry): cancelled at once, it never runs.
    /// Its queue message is still there; the delivery finds the record terminal and acks.
    Cancelled(JobRecord),
    /// It runs: flagged. The owner sees the flag (a notice, or its next read) and stops, then
    /// concludes `cancelled` itself.
    Requested(JobRecord),
}

pub fn request_cancel(record: &JobRecord, now_ms: u64) -> CancelChange {
    match record.state {
        JobState::Queued | JobState::Retrying => cancel_before_run(record, now_ms).map_or(CancelChange::Unchanged, CancelChange::Cancelled),
        JobState::Running => match touch(record, now_ms) {
            Ok(mut next) => {
                next.cancel_requested = true;
                CancelChange::Requested(next)
            }
            Err(_) => CancelChange::Unchanged,
        },
        JobState::Completed | JobState::Failed | JobState::Cancelled => CancelChange::Unchanged,
    }
}

/// The view of a record that clients read (`kiln.api.status`, `jobs`, events).
impl From<&JobRecord> for JobView {
    fn from(r: &JobRecord) -> Self {
        JobView {
            job_id: r.job_id.clone(),
            model: r.model.clone(),
            status: r.state,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            priority: r.priority,
            created_ms: r.created_ms,
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            node: r.owner.as_ref().map(|o| o.node.clone()),
            slot: r.owner.as_ref().map(|o| o.slot.clone()),
            error: r.error.clone(),
            artifacts: r.artifacts.clone(),
            // Records written before the ending settled the request could still carry it.
            cancel_requested: r.cancel_requested && !r.is_terminal(),
            dead_letter: r.dead_letter,
            batch: r.parent.clone(),
            inputs: r.inputs.clone(),
            params: r.params.clone(),
            labels: r.labels.clone(),
            stage: None,
            progress: None,
            pending: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;

    #[test]
    fn a_submitted_record_keeps_what_the_client_set_and_caps_its_attempts() {
        let req = SubmitRequest {
            model: "m".into(),
            params: serde_json::json!({"steps": 4}).as_object().cloned().unwrap(),
            priority: 3,
            idempotency_key: Some("k".into()),
            deadline_ms: Some(99),
            max_attempts: Some(9),
            labels: [("user_id".to_string(), "u1".to_string())].into(),
            ..Default::default()
        };
        let r = JobRecord::submitted("j".into(), req.clone(), 5, 7);
        assert_eq!((r.model.as_str(), r.priority, r.deadline_ms, r.max_attempts), ("m", 3, Some(99), 5));
        assert_eq!((r.idempotency_key.as_deref(), r.labels.get("user_id").map(String::as_str)), (Some("k"), Some("u1")));
        assert_eq!((r.state, r.attempt, r.created_ms, r.params["steps"].as_i64()), (JobState::Queued, 0, 7, Some(4)));
        let fewer = JobRecord::submitted("j".into(), SubmitRequest { max_attempts: Some(2), ..req.clone() }, 5, 7);
        assert_eq!(fewer.max_attempts, 2);
        let default = JobRecord::submitted("j".into(), SubmitRequest { max_attempts: None, ..req }, 5, 7);
        assert_eq!(default.max_attempts, 5);
    }

    #[test]
    fn a_running_view_shows_the_stage_of_its_attempts_newest_progress_only() {
        let mut record = JobRecord::queued("j", "m", 3, 0);
        (record.state, record.attempt) = (JobState::Running, 2);
        let tick = |attempt| Event::progress("j", attempt, Some("inference".into()), Some(44.0));
        let shown = |last: Option<&Event>, state| {
            let mut view = JobView { status: state, ..JobView::from(&record) };
            view.show_progress(last);
            (view.stage, view.progress)
        };
        assert_eq!(shown(Some(&tick(2)), JobState::Running), (Some("inference".into()), Some(44.0)));
        // An older, fenced attempt's tick, another kind of event, or a job that is not running.
        assert_eq!(shown(Some(&tick(1)), JobState::Running), (None, None));
        assert_eq!(shown(Some(&Event::message("j", 2, "hi".into())), JobState::Running), (None, None));
        assert_eq!(shown(Some(&tick(2)), JobState::Completed), (None, None));
        assert_eq!(shown(None, JobState::Running), (None, None));
    }

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

    fn owner(node: &str) -> Owner {
        Owner { node: node.into(), slot: "gpu0".into() }
    }

    #[test]
    fn the_keep_alive_of_a_job_its_only_attempt_completed_stops_nothing() {
        // The run of issue 23 item 8: one attempt, completed; its keep-alive ticked 3 ms later.
        let me = owner("n1");
        let running = claim(&record(JobState::Queued, 0), &me, 1).unwrap();
        let mut asked = running.clone();
        asked.cancel_requested = true;
        assert_eq!(watch(&asked, 1, &me, false), Watched::Owned { cancel_requested: true });
        let completed = conclude(&running, 1, &me, &Outcome::Completed { artifacts: vec![] }, 2).unwrap();
        assert_eq!(watch(&completed, 1, &me, true), Watched::OwnOutcome);
        // The record as the old rule read it (not running, or another attempt: fenced).
        assert!(completed.state != JobState::Running, "the old rule fenced this attempt");
        // Read before the conclusion began, the same record is not this attempt's doing.
        assert_eq!(watch(&completed, 1, &me, false), Watched::Superseded);
        let taken = claim(&running, &owner("n2"), 3).unwrap();
        assert_eq!(watch(&taken, 1, &me, false), Watched::Superseded);
    }

    #[test]
    fn a_delivery_writes_the_claim_or_one_of_the_three_endings_with_their_texts() {
        let me = owner("n1");
        let claimed = apply_delivery(&record(JobState::Retrying, 1), &me, 7).unwrap();
        assert_eq!(
            (claimed.state, claimed.attempt, claimed.owner.as_ref(), claimed.started_ms),
            (JobState::Running, 2, Some(&me), Some(7))
        );

        let mut r = record(JobState::Queued, 0);
        r.cancel_requested = true;
        let cancelled = apply_delivery(&r, &me, 7).unwrap();
        assert_eq!(
            (cancelled.state, cancelled.finished_ms, cancelled.error),
            (JobState::Cancelled, Some(7), Some(cancelled_before_run_error()))
        );

        let mut r = record(JobState::Queued, 0);
        r.deadline_ms = Some(5);
        let late = apply_delivery(&r, &me, 7).unwrap();
        assert_eq!(late.state, JobState::Failed);
        assert_eq!(late.error.unwrap().code, ErrorCode::DeadlineExceeded);

        let mut r = record(JobState::Running, 3);
        r.error = Some(ApiError::new(ErrorCode::EngineFailed, "worker died"));
        let exhausted = apply_delivery(&r, &me, 7).unwrap();
        assert!(exhausted.dead_letter);
        assert_eq!(exhausted.error.unwrap().message, "all 3 attempts failed; last: worker died");
        let exhausted = apply_delivery(&record(JobState::Running, 3), &me, 7).unwrap();
        assert_eq!(exhausted.error.unwrap().message, "all 3 attempts failed; last: its worker was lost");

        assert_eq!(apply_delivery(&record(JobState::Completed, 1), &me, 7), Err(Refused::Terminal));
    }

    #[test]
    fn the_owner_concludes_and_a_fenced_attempt_is_refused() {
        let (me, other) = (owner("n1"), owner("n2"));
        let running = claim(&record(JobState::Queued, 0), &me, 1).unwrap();
        let done = conclude(&running, 1, &me, &Outcome::Completed { artifacts: vec![] }, 9).unwrap();
        assert_eq!((done.state, done.finished_ms, done.updated_ms), (JobState::Completed, Some(9), 9));

        let infra = Outcome::Failed { error: ApiError::new(ErrorCode::EngineFailed, "oom"), kind: FailureKind::Infrastructure };
        let retrying = conclude(&running, 1, &me, &infra, 9).unwrap();
        assert_eq!((retrying.state, retrying.finished_ms, retrying.dead_letter), (JobState::Retrying, None, false));

        assert_eq!(conclude(&running, 1, &other, &infra, 9), Err(Refused::Fenced));
        assert_eq!(conclude(&running, 2, &me, &infra, 9), Err(Refused::Fenced));
        let taken_over = claim(&running, &other, 5).unwrap();
        assert_eq!(conclude(&taken_over, 1, &me, &infra, 9), Err(Refused::Fenced));
        assert_eq!(conclude(&done, 1, &me, &infra, 9), Err(Refused::Terminal));
    }

    #[test]
    fn a_cancel_ends_a_waiting_job_at_once_and_flags_a_running_one() {
        let CancelChange::Cancelled(c) = request_cancel(&record(JobState::Retrying, 1), 4) else { panic!("not cancelled") };
        assert_eq!(
            (c.state, c.cancel_requested, c.finished_ms, c.error),
            (JobState::Cancelled, false, Some(4), Some(cancelled_before_run_error()))
        );
        let CancelChange::Requested(r) = request_cancel(&record(JobState::Running, 1), 4) else { panic!("not requested") };
        assert_eq!((r.state, r.cancel_requested, r.finished_ms), (JobState::Running, true, None));
        assert_eq!(request_cancel(&record(JobState::Failed, 1), 4), CancelChange::Unchanged);
    }

    /// The property tests: arbitrary records (any state, attempt, limit, flags, owner) and
    /// arbitrary sequences of changes by arbitrary writers.
    mod properties {
        use super::*;
        use proptest::prelude::*;

        const OWNERS: [&str; 3] = ["n1", "n2", "n3"];

        fn any_state() -> impl Strategy<Value = JobState> {
            prop_oneof![
                Just(JobState::Queued),
                Just(JobState::Running),
                Just(JobState::Retrying),
                Just(JobState::Completed),
                Just(JobState::Failed),
                Just(JobState::Cancelled),
            ]
        }

        fn any_owner() -> impl Strategy<Value = Owner> {
            (0..OWNERS.len()).prop_map(|i| owner(OWNERS[i]))
        }

        fn any_record() -> impl Strategy<Value = JobRecord> {
            (
                any_state(),
                0u32..6,
                0u32..5,
                any::<bool>(),
                proptest::option::of(any_owner()),
                proptest::option::of(0u64..100),
                any::<bool>(),
            )
                .prop_map(|(state, attempt, max_attempts, cancel_requested, owner, deadline_ms, errored)| JobRecord {
                    state,
                    attempt,
                    owner,
                    cancel_requested,
                    deadline_ms,
                    error: errored.then(|| ApiError::new(ErrorCode::EngineFailed, "earlier")),
                    ..JobRecord::queued("j", "m", max_attempts, 0)
                })
        }

        fn any_kind() -> impl Strategy<Value = FailureKind> {
            prop_oneof![Just(FailureKind::User), Just(FailureKind::Infrastructure), Just(FailureKind::Permanent)]
        }

        fn any_outcome() -> impl Strategy<Value = Outcome> {
            prop_oneof![
                Just(Outcome::Completed { artifacts: vec![] }),
                Just(Outcome::Cancelled),
                any_kind().prop_map(|kind| Outcome::Failed { error: ApiError::new(ErrorCode::EngineFailed, "boom"), kind }),
            ]
        }

        /// One writer's change. A conclude names its attempt: the record's own (`None`, the
        /// common case of an owner finishing) or any other (a stale one).
        #[derive(Debug, Clone)]
        enum Op {
            Deliver(Owner),
            Claim(Owner),
            CancelBeforeRun,
            DeadlinePassed,
            AttemptsExhausted,
            Conclude(Option<u32>, Owner, Outcome),
            RequestCancel,
        }

        fn any_op() -> impl Strategy<Value = (Op, u64)> {
            let op = prop_oneof![
                any_owner().prop_map(Op::Deliver),
                any_owner().prop_map(Op::Claim),
                Just(Op::CancelBeforeRun),
                Just(Op::DeadlinePassed),
                Just(Op::AttemptsExhausted),
                (proptest::option::of(0u32..6), any_owner(), any_outcome()).prop_map(|(a, o, out)| Op::Conclude(a, o, out)),
                Just(Op::RequestCancel),
            ];
            (op, 0u64..200)
        }

        /// The record to write, or `None` for no write.
        fn apply(op: &Op, record: &JobRecord, now_ms: u64) -> Option<JobRecord> {
            match op {
                Op::Deliver(o) => apply_delivery(record, o, now_ms).ok(),
                Op::Claim(o) => claim(record, o, now_ms).ok(),
                Op::CancelBeforeRun => cancel_before_run(record, now_ms).ok(),
                Op::DeadlinePassed => deadline_passed(record, now_ms).ok(),
                Op::AttemptsExhausted => attempts_exhausted(record, now_ms).ok(),
                Op::Conclude(attempt, o, outcome) => conclude(record, attempt.unwrap_or(record.attempt), o, outcome, now_ms).ok(),
                Op::RequestCancel => match request_cancel(record, now_ms) {
                    CancelChange::Unchanged => None,
                    CancelChange::Cancelled(r) | CancelChange::Requested(r) => Some(r),
                },
            }
        }

        proptest! {
            /// Every rule, checked after every change of a run of changes from any record.
            #[test]
            fn every_change_keeps_the_rules_of_the_state_machine(start in any_record(), ops in proptest::collection::vec(any_op(), 1..40)) {
                let mut record = start;
                for (op, now_ms) in ops {
                    let next = apply(&op, &record, now_ms);
                    // No terminal state ever changes.
                    if record.is_terminal() {
                        prop_assert_eq!(&next, &None, "{:?} changed a terminal record", op);
                    }
                    // A fenced attempt (not running, or another attempt, or another owner) never writes.
                    if let Op::Conclude(attempt, o, _) = &op {
                        if !owned_by(&record, attempt.unwrap_or(record.attempt), o) {
                            prop_assert_eq!(&next, &None, "a fenced attempt wrote");
                        }
                    }
                    // Cancel of a job that is not running is terminal at once; of a running one, a flag.
                    if let Op::RequestCancel = op {
                        match record.state {
                            JobState::Queued | JobState::Retrying => {
                                let n = next.as_ref().expect("written");
                                prop_assert_eq!(n.state, JobState::Cancelled);
                                prop_assert_eq!(&n.error, &Some(cancelled_before_run_error()));
                            }
                            JobState::Running => prop_assert!(next.as_ref().is_some_and(|n| n.state == JobState::Running && n.cancel_requested)),
                            _ => {}
                        }
                    }
                    // A user error is never retried, and never dead-lettered.
                    if let (Op::Conclude(_, _, Outcome::Failed { kind: FailureKind::User, .. }), Some(n)) = (&op, &next) {
                        prop_assert_eq!((n.state, n.dead_letter), (JobState::Failed, false));
                    }
                    let Some(next) = next else { continue };
                    // Attempts only grow, by one and only through a claim, never past the limit.
                    prop_assert!(next.attempt >= record.attempt);
                    if next.attempt != record.attempt {
                        prop_assert_eq!(next.attempt, record.attempt + 1);
                        prop_assert_eq!(next.state, JobState::Running);
                        prop_assert!(next.attempt <= next.max_attempts);
                        prop_assert!(!next.cancel_requested);
                    }
                    if next.state == JobState::Running && record.state != JobState::Running {
                        prop_assert!(next.attempt > record.attempt, "running without a claim");
                    }
                    // What the job is never changes; an ending is stamped.
                    prop_assert_eq!((&next.job_id, next.max_attempts, next.created_ms), (&record.job_id, record.max_attempts, record.created_ms));
                    prop_assert_eq!(next.updated_ms, now_ms);
                    if next.is_terminal() {
                        prop_assert_eq!(next.finished_ms, Some(now_ms));
                        // PROTOCOL: `cancel_requested` is "asked for and not stopped yet".
                        prop_assert!(!next.cancel_requested, "an ended job still shows a pending cancel");
                        prop_assert!(next.error.is_some() || next.state == JobState::Completed);
                    }
                    record = next;
                }
            }

            /// A claim always leaves the record owned by the claiming attempt, within the limit.
            #[test]
            fn a_claim_is_owned_by_its_attempt_and_within_the_limit(r in any_record(), o in any_owner(), now_ms in 0u64..200) {
                if let Ok(next) = claim(&r, &o, now_ms) {
                    prop_assert!(owned_by(&next, next.attempt, &o));
                    prop_assert!(next.attempt >= 1 && next.attempt <= next.max_attempts);
                    prop_assert_eq!(decide_delivery(&r, now_ms), DeliveryDecision::Run { attempt: next.attempt });
                }
            }

            /// The keep-alive never takes an attempt's own outcome for a takeover, and always
            /// sees a later claim as one (issue 23 item 8).
            #[test]
            fn the_keep_alive_tells_its_own_outcome_from_a_takeover(
                r in any_record(), me in any_owner(), other in any_owner(), outcome in any_outcome(), now_ms in 0u64..200,
            ) {
                let Ok(mine) = claim(&r, &me, now_ms) else { return Ok(()) };
                prop_assert_eq!(watch(&mine, mine.attempt, &me, false), Watched::Owned { cancel_requested: false });
                let concluded = conclude(&mine, mine.attempt, &me, &outcome, now_ms).expect("the owner concludes");
                prop_assert_eq!(watch(&concluded, mine.attempt, &me, true), Watched::OwnOutcome);
                // A retry's next claim, by whichever node: the old attempt is superseded.
                if let Ok(theirs) = claim(&concluded, &other, now_ms) {
                    prop_assert_eq!(watch(&theirs, mine.attempt, &me, true), Watched::Superseded);
                }
                if let Ok(theirs) = claim(&mine, &other, now_ms) {
                    prop_assert_eq!(watch(&theirs, mine.attempt, &me, false), Watched::Superseded);
                }
                // Ended by another delivery while it still ran: fenced.
                if let Ok(ended) = attempts_exhausted(&mine, now_ms) {
                    prop_assert_eq!(watch(&ended, mine.attempt, &me, false), Watched::Superseded);
                }
            }

            /// After a takeover the old attempt can write nothing, whatever its outcome.
            #[test]
            fn an_attempt_taken_over_never_writes(r in any_record(), old in any_owner(), new in any_owner(), outcome in any_outcome(), now_ms in 0u64..200) {
                if let Ok(mine) = claim(&r, &old, now_ms) {
                    if let Ok(theirs) = claim(&mine, &new, now_ms) {
                        prop_assert_eq!(conclude(&theirs, mine.attempt, &old, &outcome, now_ms), Err(Refused::Fenced));
                    }
                }
            }
        }
    }
}
