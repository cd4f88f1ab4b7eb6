//! The job endpoints: `submit`, `status`, `cancel`, `result`, `jobs`; and what submitting shares
//! with batches (a model's admission, an input's digest, making a job durable).

use kiln_actors::finish::{finish_job, FinishError, Publish};
use kiln_core::policy::Patience;
use std::collections::BTreeMap;
use std::time::Instant;

use crate::api::quota;
use crate::api::reply::{internal, job_not_found};
use crate::api::validation::{self, Params};
use crate::api::ApiService;
use kiln_core::job::{self, CancelChange, JobRecord, JobState};
use kiln_core::keys::{idempotent_job_id, reuse_key};
use kiln_core::metrics as m;
use kiln_core::nats::cas::{Step, Updated};
use kiln_core::nats::{CasError, StoreError};
use kiln_core::protocol::*;
use kiln_core::telemetry::TraceContext;

/// Longest wait for the owner of a running job to take its cancel notice: it answers at once
/// (no responders when it is gone); the record's flag is the fallback.
const CANCEL_NOTICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl ApiService {
    /// `span` is the submit's own (`kiln.submit`), `trace` the caller's from the headers: the
    /// record keeps the span's context, or the caller's, or a fresh trace (see
    /// [`super::request_trace`]).
    pub(super) async fn submit(
        &self,
        mut req: SubmitRequest,
        span: &tracing::Span,
        trace: Option<TraceContext>,
    ) -> Result<SubmitReply, ApiError> {
        let (model, params) = self.validate_submit(&req)?;
        validation::check_webhook(req.webhook.as_ref(), &self.config.webhooks)?;
        req.params = params;
        let model = &model;
        let key = kiln_core::fair::job_key(&self.config.fair_share, &req.labels);
        // Held until the job is in its queue (or failed to get there): see `admit_quotas`.
        let _quota = self.admit_quotas(key.map(|key| ((model.name.clone(), key), 1)).into_iter().collect()).await?;
        let digests = self.input_digests(&req.inputs).await?;
        self.admit(&model.name, 1).await?;
        let reuse_key = req.reuse.then(|| reuse_key(&model.name, &req.inputs, &digests, &req.params));
        if let Some(key) = &reuse_key {
            if let Some(reply) = self.reusable(key, model).await? {
                return Ok(reply);
            }
        }
        let job_id = match &req.idempotency_key {
            Some(key) => idempotent_job_id(&model.name, key),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let mut record = JobRecord::submitted(
            job_id.clone(),
            SubmitRequest { model: model.name.clone(), ..req },
            model.max_attempts,
            kiln_core::now_ms(),
        );
        span.record("job_id", job_id.as_str());
        record.trace = Some(super::request_trace(span, trace));
        tracing::debug!(model = %record.model, "job submitted");
        if let Some(state) = self.launch_job(&record).await? {
            return Ok(SubmitReply { job_id, status: state, duplicate: true, reused: false });
        }
        if let Some(key) = &reuse_key {
            // Remembered at once: an identical request while this one still runs joins it.
            self.resources.reuse_remember(key, &job_id).await.map_err(internal)?;
        }
        Ok(SubmitReply { job_id, status: JobState::Queued, duplicate: false, reused: false })
    }

    /// Checks a submission (see [`validation::validate_submit`]); returns its model and its
    /// params checked against the model's declared ones, defaults filled in.
    /// The model's definition is the cluster's (see [`ApiService::cluster_model`]), so every
    /// node checks a submit the same way, whether it serves the model or not.
    fn validate_submit(&self, req: &SubmitRequest) -> Result<(ModelDecl, Params), ApiError> {
        let model = self.cluster_model(&req.model, "model")?;
        let params = validation::validate_submit(req, &model, &self.config.limits, kiln_core::now_ms())?;
        Ok((model, params))
    }

    /// Checks that every uploaded input exists, and returns each one's content digest.
    pub(super) async fn input_digests(&self, inputs: &BTreeMap<String, InputValue>) -> Result<BTreeMap<String, String>, ApiError> {
        let mut digests = BTreeMap::new();
        for (name, value) in inputs {
            if let InputValue::Object { object } = value {
                match self.resources.file_info(object).await {
                    Ok((_, digest)) => {
                        digests.insert(name.clone(), digest);
                    }
                    Err(StoreError::NotFound(_)) => {
                        return Err(ApiError::not_found(format!(
                            "input {name:?}: object {object:?} is not in the files bucket {} (upload it first; uploads expire)",
                            self.resources.names.files_bucket()
                        )))
                    }
                    Err(e) => return Err(internal(e)),
                }
            }
        }
        Ok(digests)
    }

    /// Re-measures a model's queue depth when the cached figure is stale (see
    /// [`crate::api::admission::QueueDepths::claim_measurement`]: one request re-measures, the others go on with the
    /// cached figure).
    async fn refresh_queue_depth(&self, model: &str) {
        if self.queue_depths.claim_measurement(model, Instant::now()) {
            // On error keep the last figure: admission control must not turn a NATS hiccup
            // into refusals.
            if let Ok(depth) = self.resources.queued_count(model).await {
                self.queue_depths.measured(model, depth, Instant::now());
            }
        }
    }

    /// Admission control: `overloaded` when `adding` more jobs would take the model's queue
    /// past its limit (see [`crate::api::admission`]).
    pub(super) async fn admit(&self, model: &str, adding: u64) -> Result<(), ApiError> {
        self.refresh_queue_depth(model).await;
        self.queue_depths.admit(model, adding, self.config.limits.max_queued_per_model, Instant::now())
    }

    /// `[quota]` for the jobs about to be queued, `adding` per (model, fair-share key token)
    /// (see [`crate::api::quota`]): each key's submit rate (one token per key, whatever it
    /// adds), then its queued jobs, all keys' at once. All or nothing: a refusal gives back the
    /// tokens taken. The admission returned counts the jobs as being admitted on this node until
    /// it is dropped, which the caller does once they are in their queue.
    pub(super) async fn admit_quotas(&self, adding: BTreeMap<(String, String), u64>) -> Result<QuotaAdmission, ApiError> {
        let mut admission = QuotaAdmission { quotas: self.quotas.clone(), counted: vec![] };
        let quota = &self.config.quota;
        if !quota.is_on() || adding.is_empty() {
            return Ok(admission);
        }
        let now = Instant::now();
        let live_nodes = self.registry.nodes().len();
        let limits: Vec<_> = adding.iter().map(|((model, key), n)| (model, key, *n, kiln_core::fair::quota_of(quota, key))).collect();
        let mut taken = vec![];
        for (model, key, _, limits) in &limits {
            if limits.submits_per_s <= 0.0 {
                continue;
            }
            let (rate, burst) = quota::node_share(limits, live_nodes);
            if let Err(wait) = self.quotas.take(model, key, rate, burst, now) {
                for (model, key, burst) in taken {
                    self.quotas.give_back(model, key, burst);
                }
                return Err(quota::rate_exceeded(kiln_core::fair::shown_key(key), model, limits, wait));
            }
            taken.push((model.as_str(), key.as_str(), burst));
        }
        let checked: Vec<_> = limits.iter().filter(|(_, _, _, limits)| limits.max_queued > 0).collect();
        for (model, key, n, _) in &checked {
            admission.counted.push(((*model).clone(), (*key).clone(), *n));
        }
        let admitting: Vec<u64> = checked.iter().map(|(model, key, n, _)| self.quotas.start_admitting(model, key, *n)).collect();
        let queues = futures::future::join_all(checked.iter().map(|(model, key, _, _)| self.resources.key_queue(model, key))).await;
        for (((model, key, n, limits), admitting), queue) in checked.iter().zip(admitting).zip(queues) {
            // On a NATS error the quota lets the jobs through: a hiccup must not refuse them
            // (putting them in their queue fails anyway if NATS is away).
            let queue = queue.unwrap_or_default();
            let queued = queue.queued + (admitting - n);
            let retry_after_ms = || quota::queued_retry_after_ms(self.recent_service_ms(model), queue.running);
            if let Err(e) = quota::admit_queued(kiln_core::fair::shown_key(key), model, queued, *n, limits.max_queued, retry_after_ms) {
                for (model, key, burst) in taken {
                    self.quotas.give_back(model, key, burst);
                }
                return Err(e);
            }
        }
        Ok(admission)
    }

    /// `model`'s recent mean run time as this node last read it (for a quota's
    /// `retry_after_ms`); a stale figure is read again in the background, so a refusal never
    /// waits for the results feed.
    fn recent_service_ms(&self, model: &str) -> Option<f64> {
        let (mean, stale) = self.quotas.service_ms(model, Instant::now());
        if stale {
            let (resources, quotas, model) = (self.resources.clone(), self.quotas.clone(), model.to_string());
            // Ends on its own (the read has its deadline); nobody waits for it, so its guard
            // is let go: dropping a `Reply` task's guard does not stop it.
            drop(kiln_core::task::spawn(kiln_core::task::TaskKind::Reply, "quota: a model's recent run time", async move {
                // A failed read keeps the last figure until the next try.
                if let Ok((mean, _)) = resources.recent_service_ms(&model).await {
                    quotas.measured_service(&model, mean, Instant::now());
                }
            }));
        }
        mean
    }

    /// Makes a new job durable (see `Resources::launch_job`: event, queue message, then the
    /// record, never a record without its message). `Some(state)` when it existed already.
    pub(super) async fn launch_job(&self, record: &JobRecord) -> Result<Option<JobState>, ApiError> {
        self.resources.launch_job(record).await.map_err(internal)
    }

    /// The earlier job of an identical request, if it can stand for this one: completed with
    /// its results still inside the model's TTL, or still on its way. A failed, cancelled or
    /// expired one is not reused (the request runs again and takes the key over).
    async fn reusable(&self, key: &str, model: &ModelDecl) -> Result<Option<SubmitReply>, ApiError> {
        let Some(job_id) = self.resources.reuse_lookup(key).await.map_err(internal)? else { return Ok(None) };
        let Some(v) = self.resources.get_job(&job_id).await.map_err(internal)? else { return Ok(None) };
        if !can_stand_for_a_new_request(&v.record, model.result_ttl_s, kiln_core::now_ms()) {
            return Ok(None);
        }
        metrics::counter!(m::RESULTS_REUSED, "model" => model.name.clone()).increment(1);
        Ok(Some(SubmitReply { job_id, status: v.record.state, duplicate: false, reused: true }))
    }

    /// The job's record, read from any replica; `job_not_found` only once the stream's leader
    /// says so too: a replica that lags may not have a job just submitted, and its client, told
    /// 201 a moment ago, must not be told 404.
    pub(super) async fn load(&self, job_id: &str) -> Result<kiln_core::nats::jobs::Versioned, ApiError> {
        validation::check_id("job_id", job_id)?;
        if let Some(v) = self.resources.get_job(job_id).await.map_err(internal)? {
            return Ok(v);
        }
        self.resources.get_job_latest(job_id).await.map_err(internal)?.ok_or_else(|| job_not_found(job_id))
    }

    pub(super) async fn status(&self, req: JobRef) -> Result<JobView, ApiError> {
        let record = self.load(&req.job_id).await?.record;
        let mut view = JobView::from(&record);
        view.pending = self.pending_of(&record).await;
        Ok(view)
    }

    /// Why a waiting job waits, its position and estimated start ([`kiln_core::pending`]);
    /// `None` for a job that does not wait, or when the figures cannot be read now (the status
    /// is answered without them rather than refused).
    async fn pending_of(&self, record: &JobRecord) -> Option<Pending> {
        let owner_alive = record.owner.as_ref().is_none_or(|o| self.registry.node(&o.node).is_some());
        if !kiln_core::pending::waits(record, owner_alive) {
            return None;
        }
        let facts = async {
            let snapshot =
                self.wait_snapshots.get(&self.resources, &record.model, kiln_core::nats::Lane::of_priority(record.priority)).await?;
            let facts = self.resources.wait_facts(record, &snapshot, owner_alive).await?;
            Ok::<_, StoreError>(kiln_core::pending::pending(record, &facts))
        };
        match facts.await {
            // The model's GPUs are read only when no slot serves it (the cluster's models are
            // made from the node entries each time).
            Ok(pending) if pending.reason == PendingReason::NoSlot => {
                let gpus = self.cluster_models().get(&record.model).map_or(1, |m| m.decl.gpus);
                Some(kiln_core::pending::for_model_of_gpus(pending, gpus))
            }
            Ok(pending) => Some(pending),
            Err(e) => {
                tracing::debug!(job_id = %record.job_id, error = %e, "cannot read why the job waits");
                None
            }
        }
    }

    /// `webhooks`: the job's delivery log (`kiln_core::nats::webhooks`).
    pub(super) async fn webhooks(&self, req: JobRef) -> Result<WebhooksReply, ApiError> {
        let record = self.load(&req.job_id).await?.record;
        let attempts = self.resources.webhook_log(&record.job_id).await.map_err(internal)?;
        Ok(WebhooksReply { job_id: record.job_id, attempts })
    }

    /// `webhooks_redeliver`: the job's last event queued again for each target that wants it,
    /// with the same `webhook-id` as the first time (a receiver that de-duplicates by it sees
    /// one message) and `retry_for_s` counted from now.
    pub(super) async fn webhooks_redeliver(&self, req: JobRef) -> Result<RedeliverReply, ApiError> {
        let record = self.load(&req.job_id).await?.record;
        let Some((seq, event)) = self.resources.last_event_with_seq(&record.job_id).await.map_err(internal)? else {
            return Err(ApiError::bad_request(format!("job {:?} has no event to send yet", record.job_id)));
        };
        let Some(kind) = kiln_core::webhook::event_of(&event) else {
            return Err(ApiError::bad_request(format!(
                "job {:?}'s last event ({:?}) is not one a webhook sends; redeliver once it has started or ended",
                record.job_id, event.kind
            )));
        };
        let targets = kiln_core::webhook::targets(&record, &self.config.webhooks, kind);
        if targets.is_empty() {
            return Err(ApiError::bad_request(format!(
                "job {:?} has no webhook that wants its last event (job.{})",
                record.job_id,
                kind.as_str()
            )));
        }
        let now = kiln_core::now_ms();
        let messages = kiln_core::webhook::messages(&record, &event, seq, kind, &targets, true);
        for message in &messages {
            let dedup = format!("{}-manual-{now}", message.webhook_id);
            self.resources.enqueue_webhook(message, &dedup).await.map_err(internal)?;
        }
        Ok(RedeliverReply { job_id: record.job_id, queued: messages.len() as u32 })
    }

    pub(super) async fn result(&self, req: JobRef) -> Result<ResultReply, ApiError> {
        let r = self.load(&req.job_id).await?.record;
        Ok(ResultReply { job_id: r.job_id, status: r.state, artifacts: r.artifacts, error: r.error })
    }

    /// Queued (or waiting to retry): cancelled at once, it never runs. Running: flagged in the
    /// record and a notice sent to the owner on core NATS; the owning node stops the worker
    /// and writes `cancelled`.
    pub(super) async fn cancel(&self, req: JobRef) -> Result<JobView, ApiError> {
        validation::check_id("job_id", &req.job_id)?;
        let changed = self
            .resources
            .update_job_with(&req.job_id, None, |record| match job::request_cancel(record, kiln_core::now_ms()) {
                CancelChange::Unchanged => Step::Stop(JobView::from(record)),
                CancelChange::Cancelled(next) | CancelChange::Requested(next) => Step::Write(next),
            })
            .await;
        let next = match changed {
            Ok(Updated::Written { value, .. }) => value,
            // It has ended: the reply shows how.
            Ok(Updated::Stopped(view)) => return Ok(view),
            Err(CasError::Missing { .. }) => return Err(job_not_found(&req.job_id)),
            Err(CasError::Contended { .. }) => return Err(ApiError::internal("the job kept changing; try the cancel again")),
            Err(CasError::Store(e)) => return Err(internal(e)),
        };
        if next.state == JobState::Cancelled {
            // The queue message is still there: if the settle fails, its delivery finds the job
            // cancelled and settles it into its batch then.
            finish_job(&self.resources, &next, Publish::EndingAndFeed, Patience::ONCE)
                .await
                .or_else(FinishError::unless_settle)
                .map_err(internal)?;
            metrics::counter!(m::JOBS_FINISHED, "model" => next.model.clone(), "outcome" => m::Outcome::Cancelled.as_str()).increment(1);
        } else if let Some(owner) = &next.owner {
            // Stop it now: a notice on core NATS, which the owner's dispatcher serves whatever
            // the actor cluster's state. (Through the actor cluster, a cancel to an owner this
            // node had no session with, one that had just restarted, waited 5 s for a session
            // and then for the flag: a 3 s job completed instead, issue 23 item 9.) If the
            // notice is lost, the flag just written still stops the job: its job actor re-reads
            // the record with every `in_progress`.
            let subject = self.resources.names.node_cancel(&owner.node);
            let body = serde_json::to_vec(&JobRef { job_id: next.job_id.clone() }).expect("json");
            let notice = tokio::time::timeout(CANCEL_NOTICE_TIMEOUT, self.resources.client.request(subject, body.into())).await;
            if !matches!(notice, Ok(Ok(_))) {
                tracing::info!(job_id = %next.job_id, node = %owner.node, "owner did not take the cancel notice; the cancel flag will stop the job");
            }
        }
        Ok(JobView::from(&next))
    }

    pub(super) async fn jobs(&self, req: ListJobsRequest) -> Result<ListJobsReply, ApiError> {
        let limit = req.limit.unwrap_or(100).min(1000);
        let ids = self.resources.job_ids().await.map_err(internal)?;
        let mut jobs = Vec::new();
        for id in ids {
            let Some(v) = self.resources.get_job(&id).await.map_err(internal)? else { continue };
            if is_listed(&req, &v.record) {
                jobs.push(JobView::from(&v.record));
            }
        }
        jobs.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then_with(|| a.job_id.cmp(&b.job_id)));
        jobs.truncate(limit);
        // Where each running job is: one read of its newest event (running jobs are few, at
        // most the cluster's slots). A failed read only leaves the stage out.
        for view in jobs.iter_mut().filter(|v| v.status == JobState::Running) {
            let last = self.resources.last_event(&view.job_id).await.ok().flatten();
            view.show_progress(last.as_ref());
        }
        Ok(ListJobsReply { jobs })
    }
}

/// Jobs admitted by [`ApiService::admit_quotas`] and still on their way to their queue: counted
/// against their key's `max_queued` on this node until dropped.
pub(super) struct QuotaAdmission {
    quotas: std::sync::Arc<quota::Quotas>,
    /// (model, key token, jobs).
    counted: Vec<(String, String, u64)>,
}

impl Drop for QuotaAdmission {
    fn drop(&mut self) {
        for (model, key, n) in &self.counted {
            self.quotas.done_admitting(model, key, *n);
        }
    }
}

/// Whether the earlier job `record` of an identical request can stand for a new one at
/// `now_ms`: still on its way, or completed with its results more than a minute inside the
/// model's result TTL (`result_ttl_s`), so they are still there when the client downloads them.
pub fn can_stand_for_a_new_request(record: &JobRecord, result_ttl_s: u64, now_ms: u64) -> bool {
    match record.state {
        JobState::Completed => record.finished_ms.is_some_and(|f| f + result_ttl_s * 1000 > now_ms + 60_000),
        JobState::Queued | JobState::Running | JobState::Retrying => true,
        _ => false,
    }
}

/// Whether `jobs` lists `record` for the request `req`: each filter given must match.
pub fn is_listed(req: &ListJobsRequest, record: &JobRecord) -> bool {
    req.status.is_none_or(|s| record.state == s)
        && req.model.as_ref().is_none_or(|m| &record.model == m)
        && (!req.dead_letter || record.dead_letter)
        && req.labels.iter().all(|(name, value)| record.labels.get(name) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn job(state: JobState, finished_ms: Option<u64>) -> JobRecord {
        JobRecord { state, finished_ms, ..JobRecord::queued("j", "demo", 3, NOW - 10_000) }
    }

    #[test]
    fn a_job_stands_for_a_new_request_while_its_results_will_last() {
        for state in [JobState::Queued, JobState::Running, JobState::Retrying] {
            assert!(can_stand_for_a_new_request(&job(state, None), 60, NOW), "{state:?}");
        }
        for state in [JobState::Failed, JobState::Cancelled] {
            assert!(!can_stand_for_a_new_request(&job(state, Some(NOW)), 3600, NOW), "{state:?} runs again");
        }
        // Completed: its results must outlast the next minute.
        let ttl_s = 3600;
        let edge = NOW + 60_000 - ttl_s * 1000;
        assert!(can_stand_for_a_new_request(&job(JobState::Completed, Some(edge + 1)), ttl_s, NOW));
        assert!(!can_stand_for_a_new_request(&job(JobState::Completed, Some(edge)), ttl_s, NOW));
        assert!(!can_stand_for_a_new_request(&job(JobState::Completed, None), ttl_s, NOW), "no end time: not trusted");
    }

    #[test]
    fn every_filter_of_a_listing_must_match() {
        let mut record = job(JobState::Failed, Some(NOW));
        record.dead_letter = true;
        record.labels = [("user".to_string(), "u1".to_string()), ("run".to_string(), "7".to_string())].into();
        let listed = |json: serde_json::Value| is_listed(&serde_json::from_value(json).expect("a request"), &record);
        assert!(listed(serde_json::json!({})));
        assert!(listed(serde_json::json!({"status": "failed", "model": "demo", "dead_letter": true, "labels": {"user": "u1"}})));
        assert!(!listed(serde_json::json!({"status": "completed"})));
        assert!(!listed(serde_json::json!({"model": "other"})));
        assert!(!listed(serde_json::json!({"labels": {"user": "u2"}})));
        assert!(!listed(serde_json::json!({"labels": {"user": "u1", "team": "x"}})), "every label");
        record.dead_letter = false;
        assert!(!is_listed(&serde_json::from_value(serde_json::json!({"dead_letter": true})).unwrap(), &record));
    }
}
