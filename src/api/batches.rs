//! The batch endpoints: `submit_batch`, `batch`, `cancel_batch`, `retry_batch`. A batch is a
//! parent record and N ordinary jobs (see `kiln_core::batch` for its rules).

use futures::StreamExt;
use kiln_actors::finish::{finish_job, FinishError, Publish};
use kiln_core::policy::Patience;
use serde::Serialize;

use crate::api::reply::{batch_not_found, internal, max_payload};
use crate::api::validation;
use crate::api::ApiService;
use kiln_core::batch::{self, BatchPlan, BatchRecord, Launch, PlanItem, PlanModel};
use kiln_core::job::{self, CancelChange, JobRecord, JobState};
use kiln_core::keys::batch_reuse_keys;
use kiln_core::nats::cas::Step;
use kiln_core::nats::{CasError, StoreError};
use kiln_core::protocol::*;
use kiln_core::telemetry::TraceContext;

/// Children of a batch created (or cancelled, or read) at once.
const BATCH_CONCURRENCY: usize = 16;

impl ApiService {
    /// `submit_batch`: every item is validated like a submit, against every model it may run
    /// (`model`, then `fallback_models`), before anything is written, so a bad item refuses
    /// the whole batch (with its index) and nothing runs.
    /// `span` is the submit's own (`kiln.submit_batch`), `trace` the caller's from the headers:
    /// every item's job joins the span's trace, as a submit's job does (see
    /// [`kiln_core::telemetry::submitted_trace`]).
    pub(super) async fn submit_batch(
        &self,
        req: BatchSubmitRequest,
        span: &tracing::Span,
        trace: Option<TraceContext>,
    ) -> Result<BatchReply, ApiError> {
        validation::check_batch(&req, &self.config.limits)?;
        let (models, decls) = validation::batch_models(&self.cluster_models(), &req.model, &req.fallback_models, req.max_attempts)?;
        let batch_id = match &req.idempotency_key {
            Some(key) => batch::idempotent_batch_id(&req.model, key),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let mut plan = BatchPlan {
            models,
            params: req.params.clone(),
            labels: req.labels.clone(),
            priority: req.priority,
            deadline_ms: req.deadline_ms,
            items: Vec::with_capacity(req.items.len()),
            trace: Some(super::request_trace(span, trace)),
        };
        let mut digests = Vec::with_capacity(req.items.len());
        for (index, item) in req.items.iter().enumerate() {
            let mut single = req.item_submission(item);
            validation::validate_batch_item(&mut single, index, &decls, &self.config.limits, kiln_core::now_ms())?;
            digests.push(self.input_digests(&single.inputs).await.map_err(|e| validation::at_item(index, e))?);
            plan.items.push(PlanItem {
                index: index as u32,
                inputs: single.inputs,
                params: item.params.clone(),
                labels: item.labels.clone(),
            });
        }
        let keys = req.reuse.then(|| batch_reuse_keys(&plan, &digests));
        let start = self.first_live_model(&plan).await?;
        let now = kiln_core::now_ms();
        span.record("batch_id", batch_id.as_str());
        let record = BatchRecord {
            idempotency_key: req.idempotency_key,
            ..BatchRecord::from_plan(&batch_id, &plan, start, req.max_concurrency, keys.as_deref(), now)
        };
        let _quota = self.admit_quotas(self.jobs_by_key(&record, &plan)).await?;
        self.admit(record.model_at(start), record.launches().len() as u64).await?;
        self.launch_batch(record, plan).await
    }

    /// The jobs a batch queues now, per (model, fair-share key token), for its quotas: counted
    /// item by item (a held item is queued later, as its batch's `max_concurrency` lets it, and
    /// is not counted here).
    fn jobs_by_key(&self, record: &BatchRecord, plan: &BatchPlan) -> std::collections::BTreeMap<(String, String), u64> {
        let mut by_key = std::collections::BTreeMap::new();
        for launch in record.launches() {
            let labels = plan.item(launch.index).map(|item| plan.labels_of(item)).unwrap_or_default();
            if let Some(key) = kiln_core::fair::job_key(&self.config.fair_share, &labels) {
                *by_key.entry((record.model_at(launch.model).to_string(), key)).or_insert(0u64) += 1;
            }
        }
        by_key
    }

    /// Where a batch's items start: the first of its models that a live slot serves right now
    /// (a model without one falls back at submit). With none served, or one model, the first.
    async fn first_live_model(&self, plan: &BatchPlan) -> Result<u32, ApiError> {
        if plan.models.len() < 2 {
            return Ok(0);
        }
        let gpus = self.live_gpus().await?;
        let served = |model: &str| gpus.iter().any(|g| g.state != GpuState::Dead && g.models.iter().any(|m| m == model));
        Ok(plan.models.iter().position(|m| served(&m.name)).unwrap_or(0) as u32)
    }

    /// Makes a batch durable: its plan (if it keeps one), the parent record, then every job it
    /// launches now. A resubmission (same idempotency key, or a repeated retry request) finds
    /// the parent and launches any job the first attempt did not get to, from the stored plan:
    /// job ids derive from the batch id, so they are the same jobs.
    async fn launch_batch(&self, record: BatchRecord, plan: BatchPlan) -> Result<BatchReply, ApiError> {
        if record.has_plan() {
            self.check_storable("the batch's plan (its items' inputs and params)", &plan)?;
        }
        // Room for what settling adds to the record (a longer state, a `launched_by` per item).
        self.check_storable_with("the batch's record", &record, record.items.len() * 64)?;
        if record.has_plan() {
            self.resources.create_batch_plan(&record.batch_id, &plan).await.map_err(internal)?;
        }
        let (record, duplicate) = match self.resources.create_batch(&record).await {
            Ok(_) => (record, false),
            Err(StoreError::AlreadyExists) => {
                let existing = self.load_batch(&record.batch_id).await?.0;
                (existing, true)
            }
            Err(e) => return Err(internal(e)),
        };
        let plan = match duplicate && record.has_plan() {
            true => self.resources.get_batch_plan(&record.batch_id).await.map_err(internal)?.unwrap_or(plan),
            false => plan,
        };
        let now = kiln_core::now_ms();
        let children: Vec<JobRecord> =
            record.launches().iter().filter_map(|l| plan.child_record(&record.batch_id, l.index, l.model, now)).collect();
        let launches: Vec<_> = children.iter().map(|c| self.launch_job(c)).collect();
        let launched: Vec<Result<Option<JobState>, ApiError>> =
            futures::stream::iter(launches).buffer_unordered(BATCH_CONCURRENCY).collect().await;
        launched.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(BatchReply {
            batch_id: record.batch_id.clone(),
            items: record.items.iter().map(|i| BatchItemRef { index: i.index, job_id: i.job_id.clone() }).collect(),
            duplicate,
            retry_of: record.retry_of.clone(),
        })
    }

    /// `payload_too_large` when `value` would not fit in one KV value (the server's
    /// `max_payload`): a batch whose items share large params or labels (copied into each
    /// item's own) could outgrow it.
    fn check_storable(&self, what: &str, value: &impl Serialize) -> Result<(), ApiError> {
        self.check_storable_with(what, value, 0)
    }

    fn check_storable_with(&self, what: &str, value: &impl Serialize, room: usize) -> Result<(), ApiError> {
        let max = max_payload(self.resources.client.server_info().max_payload);
        let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
        validation::check_storable(what, size, room, max)
    }

    /// As a job's `load`: `batch_not_found` only once the stream's leader says so too.
    async fn load_batch(&self, batch_id: &str) -> Result<(BatchRecord, u64), ApiError> {
        validation::check_id("batch_id", batch_id)?;
        if let Some(found) = self.resources.get_batch(batch_id).await.map_err(internal)? {
            return Ok(found);
        }
        self.resources.get_batch_latest(batch_id).await.map_err(internal)?.ok_or_else(|| batch_not_found(batch_id))
    }

    /// `batch`: the summary counts settled items; each item shows its job as it is now (items
    /// sharing a job read it once); an item without a job yet (held) shows the record's state.
    pub(super) async fn batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
        let (record, _) = self.load_batch(&req.batch_id).await?;
        let mut job_ids: Vec<&str> = record.items.iter().filter(|i| !i.held).map(|i| i.job_id.as_str()).collect();
        job_ids.sort_unstable();
        job_ids.dedup();
        let reads: Vec<_> = job_ids
            .into_iter()
            .map(|job_id| async move {
                let job = self.resources.get_job(job_id).await.map_err(internal)?;
                Ok::<_, ApiError>((job_id, job.map(|v| v.record)))
            })
            .collect();
        let jobs: Vec<Result<(&str, Option<JobRecord>), ApiError>> =
            futures::stream::iter(reads).buffered(BATCH_CONCURRENCY).collect().await;
        let jobs: std::collections::HashMap<&str, Option<JobRecord>> = jobs.into_iter().collect::<Result<_, _>>()?;
        // Items without a job take their labels from the plan.
        let without_job = record.items.iter().any(|i| jobs.get(i.job_id.as_str()).is_none_or(Option::is_none));
        let plan = match without_job && record.has_plan() {
            true => self.resources.get_batch_plan(&record.batch_id).await.map_err(internal)?,
            false => None,
        };
        let items = record
            .items
            .iter()
            .map(|item| {
                let model = record.model_at(item.model).to_string();
                match jobs.get(item.job_id.as_str()) {
                    Some(Some(job)) => BatchItemView {
                        index: item.index,
                        job_id: item.job_id.clone(),
                        model,
                        held: item.held,
                        status: job.state,
                        error: job.error.clone(),
                        artifacts: job.artifacts.clone(),
                        labels: item.labels.clone().unwrap_or_else(|| job.labels.clone()),
                    },
                    // Held, not created yet (a submission or launch still under way), or
                    // expired: the batch's own record is all there is.
                    _ => BatchItemView {
                        index: item.index,
                        job_id: item.job_id.clone(),
                        model,
                        held: item.held,
                        status: item.state,
                        error: (item.state == JobState::Cancelled).then(job::cancelled_before_run_error),
                        artifacts: vec![],
                        labels: plan.as_ref().and_then(|p| Some(p.labels_of(p.item(item.index)?))).unwrap_or_default(),
                    },
                }
            })
            .collect();
        let summary = record.summary();
        Ok(BatchView {
            batch_id: record.batch_id,
            model: record.model,
            status: summary.status,
            summary,
            created_ms: record.created_ms,
            finished_ms: record.finished_ms,
            items,
            retry_of: record.retry_of,
            retried_by: record.retried_by,
            fallback_models: record.fallback_models,
            max_concurrency: record.max_concurrency,
            reuse: record.reuse,
        })
    }

    /// `cancel_batch`: stops every launch (held items, fallbacks) and ends the held items
    /// cancelled, then cancels every job that has not ended (queued ones at once, running ones
    /// through their owners), then shows the batch.
    pub(super) async fn cancel_batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
        let (record, _) = self.load_batch(&req.batch_id).await?;
        if record.is_finished() {
            return self.batch(req).await;
        }
        match self.resources.cancel_batch_launches(&record.batch_id).await {
            Ok(()) => {}
            Err(CasError::Missing { .. }) => return Err(batch_not_found(&record.batch_id)),
            Err(CasError::Contended { .. }) => return Err(ApiError::internal("the batch kept changing; try the cancel again")),
            Err(CasError::Store(e)) => return Err(internal(e)),
        }
        // Nothing is launched any more: the jobs open now are all there will be.
        let (record, _) = self.load_batch(&req.batch_id).await?;
        let launches = record.launches();
        let plan = match record.has_plan() && !launches.is_empty() {
            true => self.resources.get_batch_plan(&record.batch_id).await.map_err(internal)?,
            false => None,
        };
        let open: Vec<_> = launches.iter().map(|l| self.cancel_batch_job(&record, l, plan.as_ref())).collect();
        let cancelled: Vec<Result<(), ApiError>> = futures::stream::iter(open).buffer_unordered(BATCH_CONCURRENCY).collect().await;
        cancelled.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.batch(req).await
    }

    /// Cancels one open job of a batch being cancelled. A job its launcher has listed but not
    /// made yet (a settle between its write and the launch, or one that crashed there) is made
    /// now, already cancelled, with its queue message (whose delivery settles it again, as for
    /// any cancelled job): the launcher's own launch then finds it and does nothing, so it never
    /// runs.
    async fn cancel_batch_job(&self, record: &BatchRecord, launch: &Launch, plan: Option<&BatchPlan>) -> Result<(), ApiError> {
        match self.cancel(JobRef { job_id: launch.job_id.clone() }).await {
            Err(e) if e.code == ErrorCode::NotFound => {}
            other => return other.map(|_| ()),
        }
        // Without a plan (a plain batch) such an item is one its submission never got to:
        // resubmitting with the idempotency key makes it.
        let Some(child) = plan.and_then(|p| p.child_record(&record.batch_id, launch.index, launch.model, kiln_core::now_ms())) else {
            return Ok(());
        };
        let CancelChange::Cancelled(cancelled) = job::request_cancel(&child, kiln_core::now_ms()) else { return Ok(()) };
        if self.launch_job(&cancelled).await?.is_some() {
            // Its launcher made it meanwhile: cancel that one.
            return self.cancel(JobRef { job_id: launch.job_id.clone() }).await.map(|_| ());
        }
        finish_job(&self.resources, &cancelled, Publish::EndingAndFeed, Patience::ONCE)
            .await
            .or_else(FinishError::unless_settle)
            .map_err(internal)?;
        Ok(())
    }

    /// `retry_batch`: a new batch (`retry_of` this one) of this batch's failed and cancelled
    /// items, with their original inputs, params, labels and indices, and its options (the
    /// models in order from the first, `max_concurrency`, `reuse`). This batch stays as it
    /// ended. One retry per batch: asking again answers with the same retry batch (`duplicate`).
    /// Its jobs join the retry request's trace (`span`, `kiln.retry_batch`), not the first
    /// submit's: the retry is an operation of its own.
    pub(super) async fn retry_batch(
        &self,
        req: BatchRef,
        span: &tracing::Span,
        trace: Option<TraceContext>,
    ) -> Result<BatchReply, ApiError> {
        let (old, _) = self.load_batch(&req.batch_id).await?;
        if !old.is_finished() {
            let s = old.summary();
            return Err(ApiError::bad_request(format!(
                "batch {:?} is still running ({} of {} items ended); retry its failed items once it has finished",
                old.batch_id,
                s.completed + s.failed + s.cancelled,
                s.total
            )));
        }
        let failed: Vec<u32> = old.unsuccessful_items().iter().map(|i| i.index).collect();
        if failed.is_empty() {
            return Err(ApiError::bad_request(format!(
                "batch {:?} has no failed items to retry: all {} completed",
                old.batch_id,
                old.items.len()
            )));
        }
        let mut plan = match old.has_plan() {
            true => self
                .resources
                .get_batch_plan(&old.batch_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| ApiError::internal(format!("batch {:?} has lost its plan; submit its items again", old.batch_id)))?
                .subset(&failed),
            false => self.plan_from_jobs(&old, &failed).await?,
        };
        plan.trace = Some(super::request_trace(span, trace));
        let keys = match old.reuse {
            true => {
                let mut digests = Vec::with_capacity(plan.items.len());
                for item in &plan.items {
                    let index = item.index;
                    digests.push(self.input_digests(&item.inputs).await.map_err(|e| validation::at_item(index, e))?);
                }
                Some(batch_reuse_keys(&plan, &digests))
            }
            false => None,
        };
        let retry_id = batch::retry_batch_id(&old.batch_id);
        let start = self.first_live_model(&plan).await?;
        let record = BatchRecord {
            retry_of: Some(old.batch_id.clone()),
            ..BatchRecord::from_plan(&retry_id, &plan, start, old.max_concurrency, keys.as_deref(), kiln_core::now_ms())
        };
        let _quota = self.admit_quotas(self.jobs_by_key(&record, &plan)).await?;
        self.admit(record.model_at(start), record.launches().len() as u64).await?;
        let reply = self.launch_batch(record, plan).await?;
        // Point the old batch at its retry (after the retry exists, so the link never dangles).
        let linked = self.resources.update_batch_with(&old.batch_id, |current| match current.retried_by {
            Some(_) => Step::Stop(()),
            None => Step::Write(BatchRecord { retried_by: Some(retry_id.clone()), ..current.clone() }),
        });
        match linked.await {
            Ok(_) => {}
            Err(CasError::Missing { .. }) => return Err(batch_not_found(&old.batch_id)),
            // The retry exists and answers for itself; only the old batch's pointer to it is
            // missing (a repeated retry_batch still finds it by its derived id).
            Err(e @ CasError::Contended { .. }) => {
                tracing::warn!(batch_id = %old.batch_id, error = %e, "cannot link the batch to its retry");
            }
            Err(CasError::Store(e)) => return Err(internal(e)),
        }
        Ok(reply)
    }

    /// The plan of a batch that keeps none (one model, no options): its items as their jobs
    /// ran them (params already checked, defaults filled in).
    async fn plan_from_jobs(&self, old: &BatchRecord, indices: &[u32]) -> Result<BatchPlan, ApiError> {
        let mut plan = BatchPlan {
            models: vec![],
            params: Default::default(),
            labels: Default::default(),
            priority: 0,
            deadline_ms: None,
            items: Vec::with_capacity(indices.len()),
            trace: None,
        };
        for item in old.items.iter().filter(|i| indices.contains(&i.index)) {
            let job = self.load(&item.job_id).await?.record;
            if plan.models.is_empty() {
                plan.models.push(PlanModel { name: job.model.clone(), max_attempts: job.max_attempts, params: vec![] });
                (plan.priority, plan.deadline_ms) = (job.priority, job.deadline_ms);
            }
            plan.items.push(PlanItem { index: item.index, inputs: job.inputs, params: job.params, labels: job.labels });
        }
        Ok(plan)
    }
}
