//! Metric names, in one place so the dashboard and the code agree. Names carry their unit;
//! labels are few and bounded (model, outcome, slot, state, route), never a job id.
//!
//! Every name is a constant here and a row of [`ALL`] (its kind, unit, labels and help text);
//! [`describe`] hands the rows to the process's recorder once, at start-up, so `/metrics`
//! carries `# HELP` for each. docs/HTTP.md ("Metrics") lists the same rows (a test compares
//! them), and deploy/grafana/kiln.json queries only names of this list (tests/dashboard.rs).

use metrics::Unit;

use crate::job::JobState;

pub const JOBS_SUBMITTED: &str = "kiln_jobs_submitted_total";
/// Labels: model, outcome ([`Outcome`]).
pub const JOBS_FINISHED: &str = "kiln_jobs_finished_total";
/// Labels: model.
pub const JOB_RETRIES: &str = "kiln_job_retries_total";
/// Labels: model. From submit to the start of the attempt that ran.
pub const QUEUE_WAIT_SECONDS: &str = "kiln_queue_wait_seconds";
/// Labels: model, outcome ([`Outcome`] of the attempt).
pub const RUN_SECONDS: &str = "kiln_run_seconds";
/// Labels: slot, state. 1 for the slot's current state, 0 for the others.
pub const GPU_STATE: &str = "kiln_gpu_state";
/// Labels: slot. The slot's memory budget (`node.slot_memory_bytes`; 0: none).
pub const GPU_MEMORY_BUDGET_BYTES: &str = "kiln_gpu_memory_budget_bytes";
/// Labels: slot. The bytes its resident models count for against the budget.
pub const GPU_MEMORY_RESIDENT_BYTES: &str = "kiln_gpu_memory_resident_bytes";
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
/// Labels: model. Submits answered with an earlier job's results (`reuse`).
pub const RESULTS_REUSED: &str = "kiln_results_reused_total";
/// Actor-cluster tunnels closed (either side, any reason).
pub const TUNNEL_CLOSED: &str = "kiln_tunnel_closed_total";
// The stage pool (`actors::stage_pool`): named from when it ran only compression, a contract
// with operators kept as it was.
pub const COMPRESSION_WORKER_RESTARTS: &str = "kiln_compression_worker_restarts_total";
/// Stage commands running now.
pub const COMPRESSION_ACTIVE: &str = "kiln_compression_active";
/// Stage commands waiting for a worker.
pub const COMPRESSION_QUEUED: &str = "kiln_compression_queued";

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
/// Labels: verdict (delivered, retrying, gave_up; not `outcome`, which names a job's end). One per attempt.
pub const WEBHOOK_ATTEMPTS: &str = "kiln_webhook_attempts_total";
/// Labels: verdict (delivered, gave_up). From the event to the end of its message's delivery.
pub const WEBHOOK_DELIVERY_SECONDS: &str = "kiln_webhook_delivery_seconds";
/// One attempt's request, from send to the receiver's answer (or its failure).
pub const WEBHOOK_REQUEST_SECONDS: &str = "kiln_webhook_request_seconds";

// The HTTP gateway's own (`kiln::gateway`), per process that serves HTTP.
/// Labels: route (the matched route template, `unmatched` for none), method, status.
pub const HTTP_REQUESTS: &str = "kiln_http_requests_total";
/// Labels: route, method. Until the response's head (an event stream's first byte, not its end).
pub const HTTP_REQUEST_SECONDS: &str = "kiln_http_request_duration_seconds";
/// SSE streams open now.
pub const HTTP_SSE_CLIENTS: &str = "kiln_http_sse_clients";

/// Labels: version, commit, profile. Always 1: the labels are the information.
pub const BUILD_INFO: &str = "kiln_build_info";

/// How a job (`kiln_jobs_finished_total`) or one attempt (`kiln_run_seconds`) ended: one
/// vocabulary for every `outcome` label, the terminal job states' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Completed, Outcome::Failed, Outcome::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a job in `state`; `None` while it has none (not terminal).
    pub fn of_state(state: JobState) -> Option<Outcome> {
        match state {
            JobState::Completed => Some(Outcome::Completed),
            JobState::Failed => Some(Outcome::Failed),
            JobState::Cancelled => Some(Outcome::Cancelled),
            JobState::Queued | JobState::Running | JobState::Retrying => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric: what `describe` tells the recorder and docs/HTTP.md lists.
#[derive(Debug, Clone, Copy)]
pub struct Described {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn d(name: &'static str, kind: Kind, unit: Unit, labels: &'static [&'static str], help: &'static str) -> Described {
    Described { name, kind, unit, labels, help }
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric a Kiln process exports.
pub const ALL: &[Described] = &[
    d(BUILD_INFO, Gauge, Unit::Count, &["version", "commit", "profile"], "Always 1; the labels say which build runs"),
    d(JOBS_SUBMITTED, Counter, Unit::Count, &["model"], "Jobs accepted by this node's API (a duplicate or reused submit is not counted)"),
    d(JOBS_FINISHED, Counter, Unit::Count, &["model", "outcome"], "Jobs that reached a terminal state: completed, failed or cancelled"),
    d(JOB_RETRIES, Counter, Unit::Count, &["model"], "Attempts that failed and were retried"),
    d(QUEUE_WAIT_SECONDS, Histogram, Unit::Seconds, &["model"], "From submit to the start of the attempt that ran"),
    d(
        RUN_SECONDS,
        Histogram,
        Unit::Seconds,
        &["model", "outcome"],
        "One attempt's run on its slot; outcome completed, failed or cancelled",
    ),
    d(
        GPU_STATE,
        Gauge,
        Unit::Count,
        &["slot", "state"],
        "1 for the slot's current state (idle, loading, busy, restarting, draining, dead), 0 for the others",
    ),
    d(GPU_MEMORY_BUDGET_BYTES, Gauge, Unit::Bytes, &["slot"], "The slot's memory budget (node.slot_memory_bytes; 0: none)"),
    d(GPU_MEMORY_RESIDENT_BYTES, Gauge, Unit::Bytes, &["slot"], "Bytes the slot's resident models count for against its budget"),
    d(ACTOR_RESTARTS, Counter, Unit::Count, &["slot"], "Restarts of a slot's inference actor"),
    d(GPU_QUARANTINED, Counter, Unit::Count, &["slot"], "Times a slot was quarantined after too many restarts"),
    d(NODES_LOST, Counter, Unit::Count, &[], "Nodes this node declared lost (and whose jobs it handed back)"),
    d(API_REQUESTS, Counter, Unit::Count, &["endpoint"], "Requests to the NATS API (kiln.api.*) this node answered"),
    d(API_ERRORS, Counter, Unit::Count, &["endpoint", "code"], "NATS API requests answered with an error, by its code"),
    d(RESULTS_REUSED, Counter, Unit::Count, &["model"], "Submits answered with an earlier identical job's results (reuse)"),
    d(TUNNEL_CLOSED, Counter, Unit::Count, &[], "Actor-cluster tunnels closed"),
    d(COMPRESSION_WORKER_RESTARTS, Counter, Unit::Count, &[], "Stage pool workers restarted after they died"),
    d(COMPRESSION_ACTIVE, Gauge, Unit::Count, &[], "Stage commands running now"),
    d(COMPRESSION_QUEUED, Gauge, Unit::Count, &[], "Stage commands waiting for a worker"),
    d(QUEUE_DEPTH, Gauge, Unit::Count, &["model", "lane"], "Jobs waiting to be delivered (one node exports it; take max by model)"),
    d(
        QUEUE_OLDEST_WAIT_SECONDS,
        Gauge,
        Unit::Seconds,
        &["model"],
        "How long the oldest job never delivered has waited (0 when none waits)",
    ),
    d(MODEL_RUNNING, Gauge, Unit::Count, &["model"], "Jobs delivered and not yet settled (running, or in a retry's backoff)"),
    d(MODEL_SLOTS, Gauge, Unit::Count, &["model"], "Live slots whose models include the model"),
    d(MODEL_DESIRED_SLOTS, Gauge, Unit::Count, &["model"], "Slots that would start every queued job within autoscale.target_wait_s"),
    d(
        HTTP_REQUESTS,
        Counter,
        Unit::Count,
        &["route", "method", "status"],
        "HTTP requests the gateway answered, by route template and status",
    ),
    d(
        HTTP_REQUEST_SECONDS,
        Histogram,
        Unit::Seconds,
        &["route", "method"],
        "HTTP request latency until the response's head (an event stream's start)",
    ),
    d(HTTP_SSE_CLIENTS, Gauge, Unit::Count, &[], "Server-sent event streams open now"),
    d(
        WEBHOOK_ATTEMPTS,
        Counter,
        Unit::Count,
        &["verdict"],
        "Webhook delivery attempts, by what the answer decided: delivered, retrying, gave_up",
    ),
    d(
        WEBHOOK_DELIVERY_SECONDS,
        Histogram,
        Unit::Seconds,
        &["verdict"],
        "From a job's event to the end of its webhook message's delivery (delivered or gave_up)",
    ),
    d(
        WEBHOOK_REQUEST_SECONDS,
        Histogram,
        Unit::Seconds,
        &[],
        "One webhook attempt's request, from send to the receiver's answer or failure",
    ),
];

/// Describes every metric of [`ALL`] to the installed recorder: call once, after installing it.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.unit, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.unit, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.unit, m.help),
        }
    }
}

/// The unit as a metric name ends with it (`None`: a plain count, whose name says what it counts).
pub fn name_suffix(unit: Unit) -> Option<&'static str> {
    match unit {
        Unit::Count => None,
        Unit::Seconds => Some("_seconds"),
        Unit::Bytes => Some("_bytes"),
        _ => Some("_unsupported_unit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_their_unit_and_kind() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a name twice");
        for m in ALL {
            assert!(m.name.starts_with("kiln_"), "{}", m.name);
            assert!(m.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{}", m.name);
            let base = m.name.strip_suffix("_total").unwrap_or(m.name);
            assert_eq!(m.kind == Counter, base != m.name, "{}: counters and only counters end in _total", m.name);
            if let Some(suffix) = name_suffix(m.unit) {
                assert!(base.ends_with(suffix), "{} does not end with its unit {suffix}", m.name);
            }
            assert!(!m.help.is_empty() && !m.labels.contains(&"job_id"), "{}", m.name);
        }
    }

    #[test]
    fn outcomes_are_the_terminal_states() {
        for state in [JobState::Queued, JobState::Running, JobState::Retrying, JobState::Completed, JobState::Failed, JobState::Cancelled] {
            assert_eq!(Outcome::of_state(state).is_some(), state.is_terminal(), "{state:?}");
            if let Some(o) = Outcome::of_state(state) {
                assert_eq!(o.as_str(), state.as_str());
            }
        }
    }

    /// docs/HTTP.md's table of metrics has one row per metric, with its kind and labels.
    #[test]
    fn the_docs_list_every_metric() {
        let docs = include_str!("../../docs/HTTP.md");
        let section = docs.split("\n## Metrics\n").nth(1).expect("docs/HTTP.md has a `## Metrics` section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| `kiln_")).collect();
        let documented: Vec<&str> = rows.iter().filter_map(|r| r.split('`').nth(1)).collect();
        let mut listed: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        let mut documented_sorted = documented.clone();
        listed.sort();
        documented_sorted.sort();
        assert_eq!(documented_sorted, listed, "docs/HTTP.md's Metrics table and kiln_core::metrics::ALL differ");
        for (m, row) in ALL.iter().filter_map(|m| rows.iter().find(|r| r.split('`').nth(1) == Some(m.name)).map(|r| (m, r))) {
            assert!(row.contains(m.kind.as_str()), "{}: the row does not say {}: {row}", m.name, m.kind.as_str());
            for label in m.labels {
                assert!(row.contains(label), "{}: the row does not name label {label}: {row}", m.name);
            }
        }
    }
}
