//! Metric names, in one place so the dashboard and the code agree. Names carry their unit;
//! labels are few and bounded (model, outcome, slot, state), never a job id.

pub const JOBS_SUBMITTED: &str = "kiln_jobs_submitted_total";
/// Labels: model, outcome (completed, failed, cancelled).
pub const JOBS_FINISHED: &str = "kiln_jobs_finished_total";
/// Labels: model.
pub const JOB_RETRIES: &str = "kiln_job_retries_total";
/// Labels: model. From submit to the start of the attempt that ran.
pub const QUEUE_WAIT_SECONDS: &str = "kiln_queue_wait_seconds";
/// Labels: model, outcome.
pub const RUN_SECONDS: &str = "kiln_run_seconds";
/// Labels: slot, state. 1 for the slot's current state, 0 for the others.
pub const GPU_STATE: &str = "kiln_gpu_state";
/// Labels: slot.
pub const ACTOR_RESTARTS: &str = "kiln_actor_restarts_total";
/// Labels: slot.
pub const GPU_QUARANTINED: &str = "kiln_gpu_quarantined_total";
/// Nodes this node declared lost (and whose jobs it handed back).
pub const NODES_LOST: &str = "kiln_nodes_lost_total";
/// Labels: endpoint, code.
pub const API_ERRORS: &str = "kiln_api_errors_total";
/// Labels: endpoint.
pub const API_REQUESTS: &str = "kiln_api_requests_total";

// The queue gauges (`kiln::queue_gauges`): one node at a time exports them (the live node whose
// name sorts first), cluster-wide figures per model; dashboards and autoscalers take
// `max by (model)` (a node that stopped exporting leaves zeros).
/// Labels: model, lane. Jobs waiting to be delivered.
pub const QUEUE_DEPTH: &str = "kiln_queue_depth";
/// Labels: model. How long the oldest job never delivered has waited (0 when none waits).
pub const QUEUE_OLDEST_WAIT_SECONDS: &str = "kiln_queue_oldest_wait_seconds";
/// Labels: model. Jobs delivered and not yet settled (running, or in a retry's backoff).
pub const MODEL_RUNNING: &str = "kiln_model_running";
/// Labels: model. Live slots whose models include it.
pub const MODEL_SLOTS: &str = "kiln_model_slots";
/// Labels: model. Slots that would start every queued job within `autoscale.target_wait_s`.
pub const MODEL_DESIRED_SLOTS: &str = "kiln_model_desired_slots";

// Webhooks (`kiln_actors::webhook`).
/// Labels: outcome (delivered, retrying, gave_up). One per attempt.
pub const WEBHOOK_ATTEMPTS: &str = "kiln_webhook_attempts_total";
/// Labels: outcome (delivered, gave_up). From the event to the end of its message's delivery.
pub const WEBHOOK_DELIVERY_SECONDS: &str = "kiln_webhook_delivery_seconds";
/// One attempt's request, from send to the receiver's answer (or its failure).
pub const WEBHOOK_REQUEST_SECONDS: &str = "kiln_webhook_request_seconds";
