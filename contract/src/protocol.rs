//! The public wire protocol: JSON messages that any NATS client (nats-py, nats.js, the C
//! client) exchanges with Kiln over request/reply, plus the progress events.
//!
//! Every type here is part of the contract documented in `docs/PROTOCOL.md`; change both
//! together. Replies that fail carry `{"error": {"code": "...", "message": "..."}}` with a
//! stable [`ErrorCode`], never a Rust debug string.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest idempotency key of a submit or a batch, in bytes (`bad_request` beyond).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Longest error message in a reply, body and `Nats-Service-Error` header alike: messages
/// quote what the client sent (an unknown field, a wrong value), so a hostile request cannot
/// make its reply larger than this.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Longest text a worker can put in an event or a job record: a log line, a progress
/// message, an error message. Longer ones are cut (on a character boundary, with `…`).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4096;
/// Longest stage name a worker can report in a progress event; longer ones are cut.
pub const MAX_STAGE_BYTES: usize = 128;
/// Most labels one job may carry (`bad_request` beyond).
pub const MAX_LABELS: usize = 16;
/// Longest label name, in bytes: 1 to 64 letters, digits, `-`, `_` or `.`.
pub const MAX_LABEL_NAME_BYTES: usize = 64;
/// Longest label value, in bytes (any UTF-8).
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// The label a gateway with `[[http.api_keys]]` sets on every job it submits: the name of the
/// API key of the request (a client's own value replaced). Fair share, quotas and webhook
/// endpoints can select by it.
pub const API_KEY_LABEL: &str = "api_key";

/// A client's own names for a job (`user_id`, `session_id`, its own job id): echoed in the
/// job view, on every event of the job and in batch items, and filterable in `jobs`.
pub type Labels = BTreeMap<String, String>;

/// Why `labels` break the bounds of [`MAX_LABELS`], [`MAX_LABEL_NAME_BYTES`] and
/// [`MAX_LABEL_VALUE_BYTES`], if they do.
pub fn invalid_labels(labels: &Labels) -> Option<String> {
    if labels.len() > MAX_LABELS {
        return Some(format!("{} labels; at most {MAX_LABELS} are allowed", labels.len()));
    }
    for (name, value) in labels {
        let name_ok = !name.is_empty()
            && name.len() <= MAX_LABEL_NAME_BYTES
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Some(format!("label name {name:?} must be 1-{MAX_LABEL_NAME_BYTES} letters, digits, '-', '_' or '.'"));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Some(format!("label {name:?} is {} bytes; at most {MAX_LABEL_VALUE_BYTES}", value.len()));
        }
    }
    None
}

/// `s` cut to at most `max` bytes, a trailing `…` included when cut, on a character boundary.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    const MARK: char = '…';
    if s.len() > max {
        // The mark counts against the bound: "cut to 1 KiB" is at most 1,024 bytes, mark
        // included (it used to come on top: 1,027). Below the mark's own 3 bytes, no mark.
        let marked = max >= MARK.len_utf8();
        let mut cut = if marked { max - MARK.len_utf8() } else { max };
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        if marked {
            s.push(MARK);
        }
    }
    s
}

/// A stable, machine-readable error code. Clients branch on these; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (a field, an input, an id).
    BadRequest,
    /// The model named is not configured on this cluster.
    UnknownModel,
    /// The job or object named does not exist (or has expired).
    NotFound,
    /// The request or one of its parts is larger than the configured limit.
    PayloadTooLarge,
    /// Admission control: the queue for that model is full; retry later.
    Overloaded,
    /// A fair-share key's quota (`[quota]`): too many of its jobs queued, or submitted too
    /// fast; `retry_after_ms` says when to try again.
    QuotaExceeded,
    /// The job's deadline passed before it could run.
    DeadlineExceeded,
    /// The job was cancelled.
    Cancelled,
    /// The model or its worker failed while running the job.
    EngineFailed,
    /// Something inside Kiln or NATS failed; the request may be retried.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::EngineFailed => "engine_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An error as it travels on the wire and as it is stored in a job record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, schemars::JsonSchema)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// When trying again may succeed, in milliseconds from the reply: set by `quota_exceeded`
    /// (how it is estimated: docs/PROTOCOL.md, "Quotas").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None }
    }
    /// `quota_exceeded`, to be tried again after `retry_after_ms`.
    pub fn quota_exceeded(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self { retry_after_ms: Some(retry_after_ms), ..Self::new(ErrorCode::QuotaExceeded, message) }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// The envelope of a failed reply: `{"error": {...}}` and nothing else. `deny_unknown_fields`
/// matters: a failed job's `JobView` also has an `error` key, and must not read as one.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub error: ApiError,
}

/// One named input of a job: either an inline JSON value, or a reference to an object that the
/// client uploaded to the files bucket beforehand (the replacement for the seeds' temp-file API).
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum InputValue {
    /// `{"object": "name"}`, exactly that one key with a string: an object in the files bucket.
    Object { object: String },
    /// Anything else (`{"object": "x", "other": 1}` included): passed to the engine as is.
    Inline(serde_json::Value),
}

impl<'de> Deserialize<'de> for InputValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An untagged derive would take any object with an `object` string for a reference,
        // whatever else it holds; PROTOCOL says a reference has exactly the one key.
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match value {
            serde_json::Value::Object(ref map) if map.len() == 1 => match map.get("object") {
                Some(serde_json::Value::String(object)) => InputValue::Object { object: object.clone() },
                _ => InputValue::Inline(value),
            },
            other => InputValue::Inline(other),
        })
    }
}

/// The body of the requests that take no field (`kiln.api.models`, `kiln.api.cluster`): empty
/// or `{}`; any field is refused, as for every other request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

/// `kiln.api.submit`
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub model: String,
    #[serde(default)]
    pub inputs: BTreeMap<String, InputValue>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// 0 (default) is normal; anything above runs before normal jobs of the same model.
    #[serde(default)]
    pub priority: u8,
    /// Two submissions with the same key (for the same model) give one job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Unix time in milliseconds after which the job must not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Overrides the model's `max_attempts` (capped by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Reuse an earlier identical job (same model, same input contents by sha256, same
    /// params) that completed within its result TTL, or that is still queued or running,
    /// instead of running again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse: bool,
    /// The client's own names for the job, echoed back (see [`Labels`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Where to POST the job's events (signed, retried; `docs/PROTOCOL.md`, "Webhooks").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

/// A job's webhook, as submit takes it: `{"url": "https://..", "events": ["completed"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An `http` or `https` URL; a private, loopback or link-local address is refused unless
    /// `[webhooks] allow_loopback` is set.
    pub url: String,
    /// Which events to send; empty or absent: the terminal ones (completed, failed, cancelled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<WebhookEvent>,
}

/// An event a webhook can ask for; sent as `job.<name>` in the payload's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// An attempt started running (`running`).
    Started,
    /// The engine reported progress (throttled: at most one per `progress_interval_ms`).
    Progress,
    /// A live preview was published (throttled as progress is; the message names the preview,
    /// its bytes are at `GET /v1/jobs/{id}/preview`).
    Preview,
    Completed,
    Failed,
    Cancelled,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 6] = [
        WebhookEvent::Started,
        WebhookEvent::Progress,
        WebhookEvent::Preview,
        WebhookEvent::Completed,
        WebhookEvent::Failed,
        WebhookEvent::Cancelled,
    ];
    /// What a webhook gets when it names none.
    pub const TERMINAL: [WebhookEvent; 3] = [WebhookEvent::Completed, WebhookEvent::Failed, WebhookEvent::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Started => "started",
            WebhookEvent::Progress => "progress",
            WebhookEvent::Preview => "preview",
            WebhookEvent::Completed => "completed",
            WebhookEvent::Failed => "failed",
            WebhookEvent::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<WebhookEvent> {
        WebhookEvent::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

/// One message waiting for delivery, as the queue holds it. The secret is not in it: the
/// delivering node takes it from its own `[webhooks]` by `endpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookMessage {
    /// `webhook-id`: the same on every attempt.
    pub webhook_id: String,
    pub job_id: String,
    /// `job.completed`, ...
    pub kind: String,
    /// The `[[webhooks.endpoints]]` name, or `None` for the job's own webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub url: String,
    /// The JSON body, exactly as signed.
    pub body: String,
    /// When the event happened (unix ms): `retry_for_s` counts from here.
    pub event_ms: u64,
    /// Sent again by `webhooks_redeliver`.
    #[serde(default)]
    pub manual: bool,
}

/// One attempt to deliver a webhook message, as the delivery log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookAttempt {
    /// The message's `webhook-id` (the same on each attempt of one message).
    pub webhook_id: String,
    /// `job.completed`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    /// 1-based, per message.
    pub attempt: u32,
    /// When the request was sent (unix ms).
    pub ts_ms: u64,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    /// Why there is no status (`timeout`, `refused`, `connect`, `address_refused`, ...), or
    /// what the status means (`redirect` for a 3xx, which is not followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub latency_ms: u64,
    /// `delivered`, `retrying` (another attempt follows), or `gave_up`.
    pub outcome: String,
    /// Set on the attempts of a manual redelivery.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
}

/// `kiln.api.webhooks`: a job's delivery log, oldest attempt first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhooksReply {
    pub job_id: String,
    pub attempts: Vec<WebhookAttempt>,
}

/// `kiln.api.webhooks_redeliver`: how many messages were queued again (one per endpoint that
/// wants the job's last event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RedeliverReply {
    pub job_id: String,
    pub queued: u32,
}

/// Reply to submit, sent only once the job record and the queue message are durable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct SubmitReply {
    pub job_id: String,
    pub status: JobState,
    /// True when an idempotency key matched an earlier submission.
    #[serde(default)]
    pub duplicate: bool,
    /// True when `reuse` found an earlier identical job: `job_id` is that job.
    #[serde(default)]
    pub reused: bool,
}

/// `kiln.api.status`, `kiln.api.cancel` and `kiln.api.result` take a job id.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    pub job_id: String,
}

/// A stored result: an object in the results bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Artifact {
    /// The file name the engine gave it (`image.png`).
    pub name: String,
    /// The object store bucket that holds it.
    pub bucket: String,
    /// The object's name in that bucket (`<job_id>/<name>`).
    pub object: String,
    pub size: u64,
    pub content_type: String,
    /// Hex sha256 of the content, computed by Kiln when it stored the object.
    pub sha256: String,
}

/// Reply to status and cancel: the job as the client may see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct JobView {
    pub job_id: String,
    pub model: String,
    pub status: JobState,
    pub attempt: u32,
    pub max_attempts: u32,
    pub priority: u8,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// A cancel was asked for and the job has not stopped yet (false once it has ended).
    #[serde(default)]
    pub cancel_requested: bool,
    /// True when the job failed after its last attempt (the dead-letter list).
    #[serde(default)]
    pub dead_letter: bool,
    /// The batch this job is an item of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<ParentRef>,
    /// The job's inputs and params as submitted (what a console shows, and what a gateway's
    /// route templates may echo back: a seed client's own `session_id`).
    #[serde(default)]
    pub inputs: BTreeMap<String, InputValue>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The labels it was submitted with (always sent, empty or not, like every list).
    #[serde(default)]
    pub labels: Labels,
    /// While it runs: the stage and percentage of its newest event, when that is a
    /// `progress` event (a list shows where each running job is without following them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
    /// Why it has not started yet, where it stands and when it may start: while it is queued
    /// or waits to retry, or its node was lost (`kiln.api.status` only; absent elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

impl JobView {
    /// Shows where the running attempt is by the job's newest event (`last`),
    /// when that is a progress event of the current attempt. Pure.
    pub fn show_progress(&mut self, last: Option<&Event>) {
        if let Some(e) = last.filter(|e| self.status == JobState::Running && e.kind == EventKind::Progress && e.attempt == self.attempt) {
            self.stage = e.stage.clone();
            self.progress = e.progress;
        }
    }
}

/// Reply to `kiln.api.result`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResultReply {
    pub job_id: String,
    pub status: JobState,
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// `kiln.api.jobs`: list jobs, newest first, filtered.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListJobsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Only jobs that failed after their last attempt.
    #[serde(default)]
    pub dead_letter: bool,
    /// At most this many (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Only jobs carrying every one of these labels with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ListJobsReply {
    pub jobs: Vec<JobView>,
}

/// One model of the cluster, as `kiln.api.models` lists it: the definition the API validates
/// submits with (see [`crate::models`] for which one when nodes disagree) and where it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ModelInfo {
    pub name: String,
    pub engine: String,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    pub required_inputs: Vec<String>,
    /// Live nodes that declare it, sorted: a submit of it is accepted while this is not empty.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Two of those nodes declare it differently; the definition shown (and used) is that of
    /// the node that has been up longest.
    #[serde(default)]
    pub conflict: bool,
    /// GPU slots (cluster-wide, `node/slot`) that serve it and are alive.
    pub slots: Vec<String>,
    /// Slots where it is loaded now.
    pub warm_on: Vec<String>,
    /// The params it declares (type, range, default), checked at submit; empty when it
    /// declares none and takes any.
    #[serde(default)]
    pub params: Vec<crate::params::ParamDecl>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelsReply {
    pub models: Vec<ModelInfo>,
}

/// `kiln.api.queue`: each model's queue now (one model with `model`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueRequest {
    /// Only this model (`unknown_model` when the cluster has none of that name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The cluster's queues as the answering node measured them just now (docs/PROTOCOL.md says
/// how exact each figure is).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct QueueReply {
    /// Unix ms of the measurement.
    pub measured_ms: u64,
    /// The wait `desired_slots` is computed for: `autoscale.target_wait_s` of the answering node.
    pub target_wait_s: u64,
    /// One entry per model of the cluster, sorted by name.
    pub models: Vec<ModelQueue>,
}

/// One model's queue. Depth by fair-share key is not here yet: the queue has no key today
/// (one FIFO per model and lane), and a figure that is not measured is left out, not faked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ModelQueue {
    pub model: String,
    /// Jobs waiting to be delivered, both lanes (the consumers' `num_pending`).
    pub queued: u64,
    /// Each lane, `high` first.
    pub lanes: Vec<LaneQueue>,
    /// How long the oldest job never yet delivered has waited (from its enqueue, the stream's
    /// time of the message); absent when nothing waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_wait_ms: Option<u64>,
    /// Jobs delivered and not yet settled, both lanes (the consumers' `num_ack_pending`):
    /// running, or waiting out a retry's backoff, or held by a node that was lost.
    pub running: u64,
    /// Live slots (any node, not `dead`) whose models include this one.
    pub slots: u32,
    /// Of those, the ones `busy` now (on a slot that serves several models, possibly with
    /// another model's job).
    pub busy_slots: u32,
    /// Mean run time (start of the last attempt to the end) of its recent finished jobs, from
    /// the results feed; absent before any finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_service_ms: Option<u64>,
    /// How many finished jobs that mean is over.
    pub service_samples: u32,
    /// Slots that would start every queued job within `target_wait_s`, the running ones
    /// included (`kiln_core::autoscale::desired_slots`); each job of a model of `gpus` N
    /// counts N slots.
    pub desired_slots: u64,
}

/// Why a job waits (docs/PROTOCOL.md, "Why a job waits", says how each is decided).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PendingReason {
    /// No live slot serves its model.
    NoSlot,
    /// Every slot that serves its model is busy.
    SlotsBusy,
    /// Other users' jobs are taking their shares of the slots (`[fair_share]`).
    FairShare,
    /// Its key runs as many jobs as its quota allows (`[quota] max_running`).
    Quota,
    /// A slot that serves its model is loading it.
    ModelLoading,
    /// Its node was lost; the job is handed back to the queue and runs again.
    NodeLost,
    /// It failed and waits out the retry backoff before its next attempt.
    RetryBackoff,
    /// A slot is free for it: it starts as soon as a node takes it.
    Starting,
}

/// Where a waiting job stands ([`JobView::pending`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Pending {
    pub reason: PendingReason,
    /// The reason in words, with its figures.
    pub message: String,
    /// Jobs before it in its own queue (its lane, and its fair-share key's queue in it): exact
    /// at the instant read. Absent when not known (a record of an older Kiln, a retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Jobs of the model estimated to start before it, every queue counted by fair share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<u64>,
    /// Estimated wait until it starts, from `ahead`, the slots serving the model and their
    /// recent run time. Absent without slots or a recent run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

/// One lane of a model's queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct LaneQueue {
    /// `high` or `normal`.
    pub lane: String,
    /// Jobs waiting to be delivered (the lane consumer's `num_pending`).
    pub queued: u64,
    /// Jobs delivered and not yet settled (its `num_ack_pending`).
    pub running: u64,
    /// The lane by fair-share key (`[fair_share]`): the keys with jobs queued or running, most
    /// queued first. Absent when none has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyQueue>,
}

/// One fair-share key's queue in a lane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct KeyQueue {
    /// The key's label value (`h-` and 16 hex digits for a value that is not a plain name of
    /// letters, digits, `-` and `_`, at most 48); `null` for the jobs without the label.
    pub key: Option<String>,
    pub queued: u64,
    pub running: u64,
}

/// State of one GPU slot in the cluster registry (replaces the seeds' `gpu_status:{id}` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GpuState {
    Idle,
    Loading,
    Busy,
    Restarting,
    Draining,
    Dead,
}

impl GpuState {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuState::Idle => "idle",
            GpuState::Loading => "loading",
            GpuState::Busy => "busy",
            GpuState::Restarting => "restarting",
            GpuState::Draining => "draining",
            GpuState::Dead => "dead",
        }
    }
}

/// A registry entry for one GPU slot (KV bucket `kiln_gpus`, key `<node>.<slot-key>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuEntry {
    pub node: String,
    /// As configured: `cuda:0`, `cpu:1`.
    pub slot: String,
    pub state: GpuState,
    /// Models this slot may run.
    pub models: Vec<String>,
    /// Models loaded and resident now.
    pub warm_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    /// Restarts of its inference actor since the node started.
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix ms of the last write; an entry older than the registry TTL is a dead node's.
    pub heartbeat_ms: u64,
    /// While a model of several GPUs (`gpus`) holds this slot: every slot of its group, the
    /// primary (where the job runs, `current_job`) first, then the companions held for it
    /// (shown busy with the same job). Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<String>,
    /// The slot's memory budget (`node.slot_memory_bytes`): its resident models' bytes stay
    /// under it. 0 from a node older than this field.
    #[serde(default)]
    pub memory_budget_bytes: u64,
    /// The models resident now with the bytes the budget counts for each (those of
    /// `warm_models` that hold memory; a model counted for 0 bytes is left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resident: Vec<ResidentModel>,
}

/// One model resident on a slot, as the slot's memory budget counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResidentModel {
    pub model: String,
    /// The bytes counted: the declared `memory_bytes` when the model declares it, else the
    /// measured figure, else the estimate.
    pub bytes: u64,
    pub source: MemorySource,
    /// What was measured, also when a declared figure is what counts (to compare the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_bytes: Option<u64>,
    /// Kept loaded by the model's `min_warm`: never evicted to make room.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// Where a resident model's byte count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemorySource {
    /// The model's `memory_bytes`.
    Declared,
    /// Measured, a process worker's: on a `cpu:N` slot the resident set of its process group
    /// (from /proc), on a `cuda:N` slot its own `memory` report.
    Measured,
    /// Neither: a TorchScript model's file size, twice.
    Estimated,
}

impl MemorySource {
    pub fn as_str(self) -> &'static str {
        match self {
            MemorySource::Declared => "declared",
            MemorySource::Measured => "measured",
            MemorySource::Estimated => "estimated",
        }
    }
}

/// A registry entry for one node (KV bucket `kiln_nodes`, key `<node>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeEntry {
    pub node: String,
    pub version: String,
    pub slots: Vec<String>,
    /// Tells two lives of one node name apart.
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    /// Jobs running here, as of the last heartbeat.
    pub running_jobs: u32,
    /// Nodes this one has an authenticated actor-cluster session with.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The models this node declares (its `[[models]]`), as the API needs them to validate and
    /// list a submit of them on any node (the cluster's models are the union over live nodes).
    #[serde(default)]
    pub models: Vec<ModelDecl>,
}

/// What a node publishes of one model it serves: the part of its `[[models]]` entry that the
/// API of any node needs to list the model and validate a submit of it. Two nodes declare a
/// model the same way when these are equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ModelDecl {
    pub name: String,
    /// The engine kind (`process`, `torchscript`, `noop`).
    pub engine: String,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    /// Expiry of its results, resolved (the model's own, else `storage.result_ttl_s`).
    pub result_ttl_s: u64,
    #[serde(default)]
    pub required_inputs: Vec<String>,
    #[serde(default)]
    pub params: Vec<crate::params::ParamDecl>,
    /// Slots of one node each job of it holds at once (`gpus` in its `[[models]]`); left out
    /// when 1.
    #[serde(default = "one_gpu", skip_serializing_if = "is_one_gpu")]
    pub gpus: usize,
}

fn one_gpu() -> usize {
    1
}

fn is_one_gpu(gpus: &usize) -> bool {
    *gpus == 1
}

/// The deliveries one life of a node holds (KV bucket `kiln_held`, key `<node>`): when the
/// node is lost, a survivor NAKs them through their ack subjects so JetStream redelivers them
/// at once instead of after the ack wait. Kept out of the node entry, which every node watches:
/// this changes with every job, and nobody reads it but the one survivor that hands back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeldJobs {
    pub node: String,
    /// The node entry's `started_ms`: the life these deliveries belong to.
    pub started_ms: u64,
    pub jobs: Vec<HeldJob>,
}

/// A job delivery a node holds, with the JetStream ack subject of that delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeldJob {
    pub job_id: String,
    pub ack_subject: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClusterReply {
    pub nodes: Vec<NodeEntry>,
    pub gpus: Vec<GpuEntry>,
}

/// What kind of progress event this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `status` changed: queued, running, retrying, completed, failed, cancelled.
    Status,
    /// Attempt `attempt` is about to start (just before its `running`): `reason` says why the
    /// previous attempt did not finish the job, `message` says it for people.
    Retrying,
    /// The engine reported a stage and/or a percentage.
    Progress,
    /// A line the engine logged.
    Message,
    /// An artifact was stored.
    Artifact,
    /// On a batch's subject: an item completed (`item` names it and carries its artifacts).
    ItemCompleted,
    /// On a batch's subject: an item failed or was cancelled (`item.status`, `error`).
    ItemFailed,
    /// On a batch's subject, after an item's end is counted: `summary` holds the counts so
    /// far (done = completed + failed + cancelled, of `total`).
    BatchProgress,
    /// On a batch's subject, last: every item has ended; `summary` says how.
    BatchFinished,
}

/// One progress event on `kiln.events.<job_id>`, captured in the `KILN_EVENTS` stream so a
/// late subscriber replays the whole history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Event {
    pub job_id: String,
    /// Which attempt produced it (1-based); 0 for events written by the API (queued, cancel).
    pub attempt: u32,
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub ts_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobState>,
    /// Stage name the engine reports (`downloading`, `inference`, `encoding`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// `item_completed` / `item_failed`: which item, and its results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<BatchItemEvent>,
    /// `batch_finished`: the batch's final counts and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<BatchSummary>,
    /// The job's labels, on every event of a labelled job (left out when it has none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// `retrying`: why the previous attempt did not finish the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<RetryReason>,
}

/// The item an `item_completed` / `item_failed` event is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchItemEvent {
    pub index: u32,
    pub job_id: String,
    pub status: JobState,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

impl Event {
    pub fn status(job_id: &str, attempt: u32, status: JobState) -> Self {
        Event {
            job_id: job_id.to_string(),
            attempt,
            kind: EventKind::Status,
            ts_ms: crate::now_ms(),
            status: Some(status),
            stage: None,
            progress: None,
            message: None,
            artifact: None,
            error: None,
            item: None,
            summary: None,
            labels: Labels::new(),
            reason: None,
        }
    }

    /// Attempt `attempt` starts for `reason` (the rules are in the `retry_reason` module); `error` is the
    /// previous attempt's, when it wrote one.
    pub fn retrying(job_id: &str, attempt: u32, reason: RetryReason, message: String, error: Option<ApiError>) -> Self {
        Event {
            kind: EventKind::Retrying,
            status: None,
            reason: Some(reason),
            message: Some(message),
            error,
            ..Event::status(job_id, attempt, JobState::Running)
        }
    }

    /// This event, carrying `labels` (the job's).
    pub fn labelled(mut self, labels: &Labels) -> Self {
        self.labels = labels.clone();
        self
    }

    pub fn progress(job_id: &str, attempt: u32, stage: Option<String>, progress: Option<f32>) -> Self {
        Event { kind: EventKind::Progress, status: None, stage, progress, ..Event::status(job_id, attempt, JobState::Running) }
    }

    pub fn message(job_id: &str, attempt: u32, message: String) -> Self {
        Event { kind: EventKind::Message, status: None, message: Some(message), ..Event::status(job_id, attempt, JobState::Running) }
    }

    pub fn artifact(job_id: &str, attempt: u32, artifact: Artifact) -> Self {
        Event { kind: EventKind::Artifact, status: None, artifact: Some(artifact), ..Event::status(job_id, attempt, JobState::Running) }
    }

    pub fn with_error(mut self, error: ApiError) -> Self {
        self.message = Some(error.message.clone());
        self.error = Some(error);
        self
    }

    /// A batch's counts after one more item ended.
    pub fn batch_progress(batch_id: &str, summary: BatchSummary) -> Self {
        Event { kind: EventKind::BatchProgress, status: None, summary: Some(summary), ..Event::status(batch_id, 0, JobState::Running) }
    }

    /// The last event of a batch.
    pub fn batch_finished(batch_id: &str, summary: BatchSummary) -> Self {
        Event { kind: EventKind::BatchFinished, status: None, summary: Some(summary), ..Event::status(batch_id, 0, JobState::Running) }
    }

    /// True for the last event a job (a terminal status) or a batch (`batch_finished`) will
    /// ever get.
    pub fn is_terminal(&self) -> bool {
        (self.kind == EventKind::Status && self.status.map(JobState::is_terminal).unwrap_or(false)) || self.kind == EventKind::BatchFinished
    }
}

/// One item of `kiln.api.submit_batch`: its own inputs and params (merged over the batch's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItemRequest {
    #[serde(default)]
    pub inputs: BTreeMap<String, InputValue>,
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// This item's labels, merged over the batch's (an item's own value wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// `kiln.api.submit_batch`: N items of one model, run as N jobs in parallel across the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSubmitRequest {
    pub model: String,
    pub items: Vec<BatchItemRequest>,
    /// Params every item gets; an item's own params win over these.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub priority: u8,
    /// Two submissions with the same key (for the same model) give one batch; resubmitting
    /// after a lost reply also finishes a submission that died half way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Labels every item gets (`storyboard_id`); an item's own labels win over these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Identical items (same inputs, uploaded files by content; same params) run once: the
    /// later ones share the first one's job and end with it. Within this batch only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse: bool,
    /// At most this many of the batch's jobs queued or running at once; the other items wait
    /// (held, no job yet) and start as earlier ones end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Models tried in order after `model`: an item whose job failed on Kiln's side
    /// (`engine_failed`, or out of attempts on infrastructure errors) runs again on the next
    /// one, and items start on the first model that has a live slot at submit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_models: Vec<String>,
}

impl BatchSubmitRequest {
    /// An item of the batch as the submission it is: the batch's params and labels under the
    /// item's own, the batch's options. One literal without `..`: a field added to
    /// [`SubmitRequest`] makes the compiler ask here whether a batch's items carry it.
    pub fn item_submission(&self, item: &BatchItemRequest) -> SubmitRequest {
        let mut params = self.params.clone();
        params.extend(item.params.clone());
        let mut labels = self.labels.clone();
        labels.extend(item.labels.clone());
        SubmitRequest {
            model: self.model.clone(),
            inputs: item.inputs.clone(),
            params,
            priority: self.priority,
            idempotency_key: None,
            deadline_ms: self.deadline_ms,
            max_attempts: self.max_attempts,
            reuse: false,
            labels,
            // A batch's items have no webhook of their own (config endpoints match them by model).
            webhook: None,
        }
    }
}

/// `kiln.api.batch`, `kiln.api.cancel_batch` and `kiln.api.retry_batch` take a batch id.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRef {
    pub batch_id: String,
}

/// An item's job, as a batch reply lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchItemRef {
    pub index: u32,
    pub job_id: String,
}

/// Reply to submit_batch and retry_batch, sent once every item is durable in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchReply {
    pub batch_id: String,
    pub items: Vec<BatchItemRef>,
    /// True when an idempotency key (or an earlier retry request) matched an existing batch.
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

/// One item as `kiln.api.batch` shows it: its job's state, error and artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchItemView {
    pub index: u32,
    /// The item's job: its own, the one it shares with an identical item (`reuse`), or the
    /// last model's it moved to (`fallback_models`).
    pub job_id: String,
    /// The model of that job.
    pub model: String,
    /// No job yet: waiting for the batch's `max_concurrency` (or, ended, cancelled before it got one).
    #[serde(default)]
    pub held: bool,
    pub status: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub labels: Labels,
}

/// Reply to `kiln.api.batch` and `kiln.api.cancel_batch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchView {
    pub batch_id: String,
    pub model: String,
    pub status: BatchStatus,
    pub summary: BatchSummary,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    pub items: Vec<BatchItemView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_by: Option<String>,
    /// As submitted (a retry batch keeps its original's).
    #[serde(default)]
    pub fallback_models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub reuse: bool,
}

/// `kiln.api.control`: an operator's request for one node or GPU anywhere in the cluster. The
/// node that receives it forwards it through the actor cluster to the target's actor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Stop pulling, finish running jobs, leave the registry, exit.
    Drain { node: String },
    /// Restart one GPU slot's inference actor (its running job, if any, is retried).
    RestartGpu { node: String, slot: String },
    /// An actor call to the node's control actor and back.
    Ping { node: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ControlReply {
    /// The node (or `node/slot`) that acted.
    pub target: String,
    /// `draining`, `restarting`, `not_running`, `pong`.
    pub outcome: String,
    /// The node that received the request and forwarded it.
    pub via: String,
}

/// Reply to a cancel notice (`kiln.node.<node>.cancel`, body a [`JobRef`]): whether the job
/// was running on that node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CancelNoticeReply {
    pub node: String,
    pub was_running: bool,
}

/// `kiln.node.<from>.ping`: ask node `from` to time `count` round trips to `peer`, both as
/// actor calls through the actor cluster and as plain NATS requests, interleaved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PingRequest {
    pub peer: String,
    pub count: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct PingReport {
    pub from: String,
    pub peer: String,
    pub count: u32,
    /// Actor call to the peer's control actor and back, through the NATS tunnel.
    pub actor_p50_us: u64,
    pub actor_p99_us: u64,
    /// Plain NATS request/reply to the peer's echo subject: the floor.
    pub nats_p50_us: u64,
    pub nats_p99_us: u64,
}

/// Why the previous attempt did not finish the job: a stable code on the wire
/// (`retrying` events' `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetryReason {
    /// The node running it died or left (SIGKILL, a lost machine, a drain past its grace):
    /// its registry entry is gone, it restarted since, or a survivor handed its jobs back.
    NodeLost,
    /// Its node is still alive but stopped reporting on this job for longer than the ack wait
    /// (it stood still, lost its link to NATS): JetStream redelivered it.
    AckWaitExpired,
    /// The worker process died or broke its protocol.
    WorkerCrashed,
    /// The slot's inference actor stopped under the job (the slot restarted).
    SlotRestarted,
    /// The attempt ran past the model's `timeout_ms`.
    Timeout,
    /// The model could not be loaded.
    LoadFailed,
    /// The engine reported a retryable error (out of memory, `"retryable": true`, storage).
    EngineFailed,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::NodeLost => "node_lost",
            RetryReason::AckWaitExpired => "ack_wait_expired",
            RetryReason::WorkerCrashed => "worker_crashed",
            RetryReason::SlotRestarted => "slot_restarted",
            RetryReason::Timeout => "timeout",
            RetryReason::LoadFailed => "load_failed",
            RetryReason::EngineFailed => "engine_failed",
        }
    }
}

// ---- states and batch links, shared by the records (job.rs, batch.rs) and the wire ----

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

/// A child job's link to its batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ParentRef {
    pub batch_id: String,
    /// The item's index in the original request; a retry batch keeps the original indices, so
    /// frame 7 of a storyboard stays item 7 however often it is retried. A job that items share
    /// (`reuse`) names the first of them.
    pub index: u32,
}

/// Where a batch is: running until every item is terminal, then its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Running,
    /// Every item completed.
    Succeeded,
    /// Some items completed, some failed or were cancelled.
    Partial,
    /// No item completed.
    Failed,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Running => "running",
            BatchStatus::Succeeded => "succeeded",
            BatchStatus::Partial => "partial",
            BatchStatus::Failed => "failed",
        }
    }
}

/// Counts of a batch's items, and the status they add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BatchSummary {
    pub status: BatchStatus,
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
    pub cancelled: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_reference_is_exactly_one_object_key_with_a_string() {
        let parse = |s: &str| serde_json::from_str::<InputValue>(s).unwrap();
        assert_eq!(parse(r#"{"object": "uploads/x.png"}"#), InputValue::Object { object: "uploads/x.png".into() });
        for inline in [r#"{"object": "uploads/x.png", "other": 1}"#, r#"{"object": 7}"#, r#"{"objects": "x"}"#, r#""uploads/x.png""#, "[1]"]
        {
            assert_eq!(parse(inline), InputValue::Inline(serde_json::from_str(inline).unwrap()), "{inline}");
        }
        // What serializes comes back the same.
        for v in [InputValue::Object { object: "a/b".into() }, InputValue::Inline(serde_json::json!({"object": "a", "k": 1}))] {
            assert_eq!(parse(&serde_json::to_string(&v).unwrap()), v);
        }
    }
}
