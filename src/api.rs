//! ApiService: the client-facing NATS service (`kiln-api`, the micro/services API, so
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` discovery work). Every node runs it in one queue
//! group, so any node answers any request. Endpoints under `kiln.api.`: submit, status, cancel,
//! result, jobs, models, cluster, control, and for batches submit_batch, batch, cancel_batch,
//! retry_batch. See `docs/PROTOCOL.md`.
//!
//! Every reply is JSON; a failure is `{"error": {"code", "message"}}` with a stable code. No
//! request can make the service panic or block: bodies are size-checked before parsing, nested
//! values depth-checked, names syntax-checked, and at most [`MAX_IN_FLIGHT`] requests are
//! handled at once (the rest are answered `overloaded`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::service::{self, ServiceRequest, ServiceSpec};
use bytes::Bytes;
use dashmap::DashMap;
use futures::{FutureExt, StreamExt};
use kiln_actors::finish::{finish_job, FinishError, Publish};
use kiln_actors::gpu_supervisor::call_gpu;
use kiln_actors::node_control::call_node;
use kiln_actors::wire::{GpuControlReply, GpuControlRequest, NodeControlReply, NodeControlRequest};
use kiln_core::batch::{self, BatchPlan, BatchRecord, Launch, PlanItem, PlanModel};
use kiln_core::config::ClusterConfig;
use kiln_core::ids;
use kiln_core::job::{self, CancelChange, JobRecord, JobState};
use kiln_core::metrics as m;
use kiln_core::models::ClusterModel;
use kiln_core::nats::cas::{Step, Updated};
use kiln_core::nats::{CasError, RegistryCache, Resources, StoreError};
use kiln_core::policy::Patience;
use kiln_core::protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

/// Requests handled concurrently by one node; beyond it, `overloaded` at once instead of
/// queueing without bound.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Request bytes held by the requests in flight on one node; beyond it, `overloaded` too. With
/// [`MAX_IN_FLIGHT`] this bounds the memory that requests being served hold (1024 requests of
/// the largest size would be 256 MiB).
pub const MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;
/// Longest error message in a reply (defined with the wire types: the service's error headers
/// use it too).
pub use kiln_core::protocol::MAX_ERROR_MESSAGE_BYTES;
/// How long a control call through the actor cluster may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the owner of a running job to take its cancel notice: it answers at once
/// (no responders when it is gone); the record's flag is the fallback.
const CANCEL_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);
/// How stale the queue depth used by admission control may be.
const QUEUE_DEPTH_TTL: Duration = Duration::from_millis(250);
/// The content key of a request for result reuse: the model, each input (inline values as
/// canonical JSON, uploaded files by their content digest, so a re-upload under another name
/// still matches) and the params, hashed.
fn reuse_key(
    model: &str,
    inputs: &BTreeMap<String, InputValue>,
    digests: &BTreeMap<String, String>,
    params: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let inputs: BTreeMap<&String, serde_json::Value> = inputs
        .iter()
        .map(|(name, v)| {
            let v = match v {
                InputValue::Inline(v) => serde_json::json!({ "inline": v }),
                InputValue::Object { .. } => serde_json::json!({ "content": digests.get(name) }),
            };
            (name, v)
        })
        .collect();
    // serde_json's maps are ordered by key, so this is canonical.
    let body = serde_json::json!({ "model": model, "inputs": inputs, "params": params });
    kiln_core::nats::objects::sha256_hex(body.to_string().as_bytes())
}

/// The content keys of a batch's items for `reuse` within the batch: each item's inputs
/// (uploaded files by content, `digests[i]` for item `i` of the plan) and its params for every
/// model it may run, so two items share a job only if they would be the same job on each.
fn batch_reuse_keys(plan: &BatchPlan, digests: &[BTreeMap<String, String>]) -> Vec<String> {
    let models: Vec<&str> = plan.models.iter().map(|m| m.name.as_str()).collect();
    plan.items
        .iter()
        .zip(digests)
        .map(|(item, digests)| {
            let params: serde_json::Map<String, serde_json::Value> = (0..plan.models.len())
                .map(|pos| {
                    let params = plan.params_for(item, pos).map(serde_json::Value::Object).unwrap_or_default();
                    (pos.to_string(), params)
                })
                .collect();
            reuse_key(&models.join(","), &item.inputs, digests, &params)
        })
        .collect()
}

/// Namespace of job ids derived from idempotency keys (uuid v5).
const IDEMPOTENCY_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b696c6e_6964_656d_706f_74656e637921);

pub const ENDPOINTS: [&str; 12] = [
    "submit",
    "status",
    "cancel",
    "result",
    "jobs",
    "models",
    "cluster",
    "control",
    "submit_batch",
    "batch",
    "cancel_batch",
    "retry_batch",
];
/// Children of a batch created (or cancelled, or read) at once.
const BATCH_CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct ApiService {
    resources: Resources,
    config: Arc<ClusterConfig>,
    registry: RegistryCache,
    /// model -> (waiting jobs, when measured): admission control without a request per submit.
    queue_depth: Arc<DashMap<String, (u64, Instant)>>,
    /// Tells the request loop that this process stood still: the requests it buffered
    /// meanwhile are stale (see [`ApiService::start`]).
    stall: kiln_core::stall::StallWatch,
}

type Reply = Result<Vec<u8>, ApiError>;

impl ApiService {
    pub fn new(resources: Resources, config: Arc<ClusterConfig>, registry: RegistryCache, stall: kiln_core::stall::StallWatch) -> Self {
        ApiService { resources, config, registry, queue_depth: Arc::new(DashMap::new()), stall }
    }

    /// Registers the service and serves until the returned task is aborted.
    pub async fn start(self) -> Result<tokio::task::JoinHandle<()>, StoreError> {
        let names = self.resources.names.clone();
        let spec = ServiceSpec {
            name: names.service_name(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            description: format!("Kiln job API: {}", ENDPOINTS.join(", ")),
            queue_group: format!("{}-api", names.prefix()),
            endpoints: ENDPOINTS.iter().map(|name| (*name, format!("{}.{name}", names.api_group()))).collect(),
        };
        let (service, mut requests) = service::start(&self.resources.client, spec).await.map_err(StoreError::nats)?;
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let in_flight_bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
        let max_reply = match self.resources.client.server_info().max_payload {
            0 => 1024 * 1024, // not announced: the server's default
            n => n,
        };
        Ok(tokio::spawn(async move {
            let _service = service; // dropping it would unregister the endpoints
            let mut stall_seen = self.stall.generation();
            // This loop does O(1) work per request and never waits on one being served, so it
            // drains the endpoints' subscriptions (async-nats buffers 64Ki messages per
            // subscription and drops what comes past that: such a request times out at its
            // client instead of growing this node's memory).
            while let Some(request) = requests.next().await {
                let endpoint = request.endpoint;
                metrics::counter!(m::API_REQUESTS, "endpoint" => endpoint).increment(1);
                if self.stall.generation() != stall_seen {
                    stall_seen = self.refuse_stale_requests(&mut requests, request, max_reply).await;
                    continue;
                }
                let size = request.message.payload.len();
                if size > self.config.limits.max_request_bytes {
                    // Refused before it takes a slot (handle() says why).
                    let reply = self.handle(endpoint, &request.message.payload).await;
                    respond(&request, endpoint, reply, max_reply).await;
                    continue;
                }
                let permits = (in_flight.clone().try_acquire_owned(), in_flight_bytes.clone().try_acquire_many_owned(size.max(1) as u32));
                let (Ok(permit), Ok(bytes_permit)) = permits else {
                    let err = ApiError::new(ErrorCode::Overloaded, "too many requests in flight on this node; retry later");
                    respond(&request, endpoint, Err(err), max_reply).await;
                    continue;
                };
                let api = self.clone();
                tokio::spawn(async move {
                    let reply = api.handle(endpoint, &request.message.payload).await;
                    respond(&request, endpoint, reply, max_reply).await;
                    drop((permit, bytes_permit));
                });
            }
        }))
    }

    /// This process stood still (SIGSTOP, a paused VM, a starved runtime) for longer than the
    /// stall threshold: every request it buffered meanwhile was sent at least that long ago,
    /// and its client has most likely given up and retried elsewhere. Answering them would
    /// create jobs nobody knows of (an outside storm counted 9 to 26 per run), so each is
    /// refused `overloaded` (retryable: a client still waiting just asks again). Which requests
    /// were buffered: the one in hand, and every one the server sent before a PING that this
    /// node sends now; its PONG comes after them on the connection, so once `flush` returns they
    /// are all in the endpoints' channels. Returns the stall generation now handled.
    async fn refuse_stale_requests(
        &self,
        requests: &mut (impl futures::Stream<Item = ServiceRequest> + Unpin),
        request: ServiceRequest,
        max_reply: usize,
    ) -> u64 {
        let generation = self.stall.generation();
        let stalled_ms = self.stall.last_stall_ms().max(self.stall.threshold().as_millis() as u64);
        let stale = || {
            Err(ApiError::new(
                ErrorCode::Overloaded,
                format!("this node stood still for about {stalled_ms} ms and refuses the requests it held meanwhile; retry"),
            ))
        };
        respond(&request, request.endpoint, stale(), max_reply).await;
        let mut refused = 1;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.resources.client.flush()).await;
        while let Some(Some(request)) = requests.next().now_or_never() {
            respond(&request, request.endpoint, stale(), max_reply).await;
            refused += 1;
        }
        tracing::warn!(refused, stalled_ms, "refused the requests held while this node stood still");
        generation
    }

    /// Dispatches one request body to its handler. Public so tests can drive it directly.
    /// An error's message is cut to [`MAX_ERROR_MESSAGE_BYTES`].
    pub async fn handle(&self, endpoint: &str, body: &[u8]) -> Reply {
        self.dispatch(endpoint, body).await.map_err(|mut e| {
            e.message = kiln_core::protocol::truncate_utf8(e.message, MAX_ERROR_MESSAGE_BYTES);
            e
        })
    }

    async fn dispatch(&self, endpoint: &str, body: &[u8]) -> Reply {
        if body.len() > self.config.limits.max_request_bytes {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "request is {} bytes; the limit is {} (upload large inputs to the files bucket)",
                    body.len(),
                    self.config.limits.max_request_bytes
                ),
            ));
        }
        match endpoint {
            "submit" => encode(self.submit(parse(body)?).await?),
            "status" => encode(self.status(parse(body)?).await?),
            "cancel" => encode(self.cancel(parse(body)?).await?),
            "result" => encode(self.result(parse(body)?).await?),
            "jobs" => encode(self.jobs(parse_or_default(body)?).await?),
            "models" => {
                parse_or_default::<NoFields>(body)?;
                encode(self.models().await?)
            }
            "cluster" => {
                parse_or_default::<NoFields>(body)?;
                encode(ClusterReply { nodes: self.registry.nodes(), gpus: self.live_gpus().await? })
            }
            "control" => encode(self.control(parse(body)?).await?),
            "submit_batch" => encode(self.submit_batch(parse(body)?).await?),
            "batch" => encode(self.batch(parse(body)?).await?),
            "cancel_batch" => encode(self.cancel_batch(parse(body)?).await?),
            "retry_batch" => encode(self.retry_batch(parse(body)?).await?),
            other => Err(ApiError::bad_request(format!("unknown endpoint {other:?}"))),
        }
    }

    /// Checks a submission; returns its params checked against the model's declared ones,
    /// defaults filled in (see `kiln_core::params`).
    /// The model's definition is the cluster's (see [`ApiService::cluster_model`]), so every
    /// node checks a submit the same way, whether it serves the model or not.
    fn validate_submit(&self, req: &SubmitRequest) -> Result<(ModelDecl, serde_json::Map<String, serde_json::Value>), ApiError> {
        let model = self.cluster_model(&req.model, "model")?;
        let params = self.validate_submit_with(req, &model)?;
        Ok((model, params))
    }

    fn validate_submit_with(&self, req: &SubmitRequest, model: &ModelDecl) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
        let limits = &self.config.limits;
        if req.inputs.len() > limits.max_inputs {
            return Err(ApiError::bad_request(format!("{} inputs; at most {} are allowed", req.inputs.len(), limits.max_inputs)));
        }
        for (name, value) in &req.inputs {
            if !ids::is_valid_input_name(name) {
                return Err(ApiError::bad_request(format!("input name {name:?} must be 1-64 letters, digits, '-' or '_'")));
            }
            match value {
                InputValue::Object { object } if !ids::is_valid_object_name(object) => {
                    return Err(ApiError::bad_request(format!("input {name:?}: object name {object:?} is invalid (letters, digits, '-', '_', '.', '/' separators; no '..' or empty segments)")));
                }
                InputValue::Inline(v) if ids::json_depth(v) > limits.max_params_depth => {
                    return Err(ApiError::bad_request(format!("input {name:?} nests deeper than {} levels", limits.max_params_depth)));
                }
                _ => {}
            }
        }
        for required in &model.required_inputs {
            if !req.inputs.contains_key(required) {
                return Err(ApiError::bad_request(format!("model {:?} needs input {required:?}", model.name)));
            }
        }
        let depth = req.params.values().map(ids::json_depth).max().unwrap_or(0) + 1;
        if depth > limits.max_params_depth {
            return Err(ApiError::bad_request(format!("params nest deeper than {} levels", limits.max_params_depth)));
        }
        if let Some(why) = invalid_labels(&req.labels) {
            return Err(ApiError::bad_request(why));
        }
        if let Some(key) = &req.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::bad_request(format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes")));
            }
        }
        if req.max_attempts == Some(0) {
            return Err(ApiError::bad_request("max_attempts must be at least 1"));
        }
        if req.deadline_ms.is_some_and(|d| d <= kiln_core::now_ms()) {
            return Err(ApiError::new(ErrorCode::DeadlineExceeded, "deadline_ms is already in the past"));
        }
        kiln_core::params::check_params(&model.params, &req.params)
            .map_err(|why| ApiError::bad_request(format!("model {:?}: {why}", model.name)))
    }

    /// Re-measures a model's queue depth when the cached figure is older than
    /// [`QUEUE_DEPTH_TTL`]. One request re-measures (it claims the entry first); the others go
    /// on with the cached figure, so a burst of submits makes one JetStream call, not one each.
    async fn refresh_queue_depth(&self, model: &str) {
        let claimed = match self.queue_depth.get_mut(model) {
            Some(mut e) if e.1.elapsed() >= QUEUE_DEPTH_TTL => {
                e.1 = Instant::now();
                true
            }
            Some(_) => false,
            None => {
                self.queue_depth.insert(model.to_string(), (0, Instant::now()));
                true
            }
        };
        if claimed {
            // On error keep the last figure: admission control must not turn a NATS hiccup
            // into refusals.
            if let Ok(depth) = self.resources.queued_count(model).await {
                self.queue_depth.insert(model.to_string(), (depth, Instant::now()));
            }
        }
    }

    async fn submit(&self, mut req: SubmitRequest) -> Result<SubmitReply, ApiError> {
        let (model, params) = self.validate_submit(&req)?;
        req.params = params;
        let model = &model;
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
        let record = JobRecord {
            inputs: req.inputs,
            params: req.params,
            priority: req.priority,
            deadline_ms: req.deadline_ms,
            idempotency_key: req.idempotency_key,
            labels: req.labels,
            ..JobRecord::queued(
                &job_id,
                &model.name,
                req.max_attempts.map(|a| a.min(model.max_attempts)).unwrap_or(model.max_attempts),
                kiln_core::now_ms(),
            )
        };
        if let Some(state) = self.launch_job(&record).await? {
            return Ok(SubmitReply { job_id, status: state, duplicate: true, reused: false });
        }
        if let Some(key) = &reuse_key {
            // Remembered at once: an identical request while this one still runs joins it.
            self.resources.reuse_remember(key, &job_id).await.map_err(internal)?;
        }
        Ok(SubmitReply { job_id, status: JobState::Queued, duplicate: false, reused: false })
    }

    /// Checks that every uploaded input exists, and returns each one's content digest.
    async fn input_digests(&self, inputs: &BTreeMap<String, InputValue>) -> Result<BTreeMap<String, String>, ApiError> {
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

    /// Admission control: `overloaded` when `adding` more jobs would take the model's queue
    /// past its limit.
    /// The jobs admitted are added to the cached depth at once, so a burst within one
    /// measurement cannot overshoot the limit on this node.
    async fn admit(&self, model: &str, adding: u64) -> Result<(), ApiError> {
        let limit = self.config.limits.max_queued_per_model;
        self.refresh_queue_depth(model).await;
        let mut entry = self.queue_depth.entry(model.to_string()).or_insert((0, Instant::now()));
        if entry.0.saturating_add(adding) > limit {
            return Err(ApiError::new(
                ErrorCode::Overloaded,
                format!("model {model:?} would have more than {limit} jobs waiting; retry later"),
            ));
        }
        entry.0 += adding;
        Ok(())
    }

    /// Makes a new job durable (see `Resources::launch_job`: event, queue message, then the
    /// record, never a record without its message). `Some(state)` when it existed already.
    async fn launch_job(&self, record: &JobRecord) -> Result<Option<JobState>, ApiError> {
        self.resources.launch_job(record).await.map_err(internal)
    }

    /// `submit_batch`: every item is validated like a submit, against every model it may run
    /// (`model`, then `fallback_models`), before anything is written, so a bad item refuses
    /// the whole batch (with its index) and nothing runs.
    async fn submit_batch(&self, req: BatchSubmitRequest) -> Result<BatchReply, ApiError> {
        let limit = self.config.limits.max_batch_items;
        if req.items.is_empty() {
            return Err(ApiError::bad_request("a batch needs at least one item"));
        }
        if req.items.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{} items; a batch holds at most {limit} (split it)", req.items.len()),
            ));
        }
        if let Some(key) = &req.idempotency_key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(ApiError::bad_request(format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes")));
            }
        }
        if req.max_concurrency == Some(0) {
            return Err(ApiError::bad_request("max_concurrency must be at least 1"));
        }
        if let Some(why) = invalid_labels(&req.labels) {
            return Err(ApiError::bad_request(why));
        }
        let (models, decls) = self.batch_models(&req.model, &req.fallback_models, req.max_attempts)?;
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
        };
        let mut digests = Vec::with_capacity(req.items.len());
        for (index, item) in req.items.into_iter().enumerate() {
            let mut params = req.params.clone();
            params.extend(item.params.clone());
            let mut labels = req.labels.clone();
            labels.extend(item.labels.clone());
            let mut single = SubmitRequest {
                model: req.model.clone(),
                inputs: item.inputs,
                params,
                priority: req.priority,
                idempotency_key: None,
                deadline_ms: req.deadline_ms,
                max_attempts: req.max_attempts,
                reuse: false,
                labels,
            };
            let at_item = move |e: ApiError| ApiError::new(e.code, format!("item {index}: {}", e.message));
            for model in &decls {
                single.model = model.name.clone();
                self.validate_submit_with(&single, model).map_err(at_item)?;
            }
            digests.push(self.input_digests(&single.inputs).await.map_err(at_item)?);
            plan.items.push(PlanItem { index: index as u32, inputs: single.inputs, params: item.params, labels: item.labels });
        }
        let keys = req.reuse.then(|| batch_reuse_keys(&plan, &digests));
        let start = self.first_live_model(&plan).await?;
        let now = kiln_core::now_ms();
        let record = BatchRecord {
            idempotency_key: req.idempotency_key,
            ..BatchRecord::from_plan(&batch_id, &plan, start, req.max_concurrency, keys.as_deref(), now)
        };
        self.admit(record.model_at(start), record.launches().len() as u64).await?;
        self.launch_batch(record, plan).await
    }

    /// The models a batch's items may run, in order, each the cluster's (else
    /// `unknown_model`) and named once, with the batch's `max_attempts` capped by each model's;
    /// and their definitions, to validate the items with.
    fn batch_models(
        &self,
        model: &str,
        fallbacks: &[String],
        max_attempts: Option<u32>,
    ) -> Result<(Vec<PlanModel>, Vec<ModelDecl>), ApiError> {
        let mut models: Vec<PlanModel> = Vec::with_capacity(1 + fallbacks.len());
        let mut decls = Vec::with_capacity(1 + fallbacks.len());
        for (pos, name) in std::iter::once(model).chain(fallbacks.iter().map(String::as_str)).enumerate() {
            let what = if pos == 0 { "model".to_string() } else { format!("fallback_models[{}]: model", pos - 1) };
            let config = self.cluster_model(name, &what)?;
            if models.iter().any(|m| m.name == name) {
                return Err(ApiError::bad_request(format!("model {name:?} is listed twice in model and fallback_models")));
            }
            models.push(PlanModel {
                name: config.name.clone(),
                max_attempts: max_attempts.map(|a| a.min(config.max_attempts)).unwrap_or(config.max_attempts),
                params: config.params.clone(),
            });
            decls.push(config);
        }
        Ok((models, decls))
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
        let max = match self.resources.client.server_info().max_payload {
            0 => 1024 * 1024,
            n => n,
        };
        let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX).saturating_add(room);
        if size > max {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} would take {size} bytes, over the server's limit of {max} for one stored value; split the batch"),
            ));
        }
        Ok(())
    }

    async fn load_batch(&self, batch_id: &str) -> Result<(BatchRecord, u64), ApiError> {
        check_id("batch_id", batch_id)?;
        self.resources.get_batch(batch_id).await.map_err(internal)?.ok_or_else(|| batch_not_found(batch_id))
    }

    /// `batch`: the summary counts settled items; each item shows its job as it is now (items
    /// sharing a job read it once); an item without a job yet (held) shows the record's state.
    async fn batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
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
    async fn cancel_batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
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
    async fn retry_batch(&self, req: BatchRef) -> Result<BatchReply, ApiError> {
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
        let plan = match old.has_plan() {
            true => self
                .resources
                .get_batch_plan(&old.batch_id)
                .await
                .map_err(internal)?
                .ok_or_else(|| ApiError::internal(format!("batch {:?} has lost its plan; submit its items again", old.batch_id)))?
                .subset(&failed),
            false => self.plan_from_jobs(&old, &failed).await?,
        };
        let keys = match old.reuse {
            true => {
                let mut digests = Vec::with_capacity(plan.items.len());
                for item in &plan.items {
                    let index = item.index;
                    digests.push(
                        self.input_digests(&item.inputs)
                            .await
                            .map_err(|e| ApiError::new(e.code, format!("item {index}: {}", e.message)))?,
                    );
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

    /// The earlier job of an identical request, if it can stand for this one: completed with
    /// its results still inside the model's TTL, or still on its way. A failed, cancelled or
    /// expired one is not reused (the request runs again and takes the key over).
    async fn reusable(&self, key: &str, model: &ModelDecl) -> Result<Option<SubmitReply>, ApiError> {
        let Some(job_id) = self.resources.reuse_lookup(key).await.map_err(internal)? else { return Ok(None) };
        let Some(v) = self.resources.get_job(&job_id).await.map_err(internal)? else { return Ok(None) };
        let ttl_ms = model.result_ttl_s * 1000;
        let usable = match v.record.state {
            JobState::Completed => v.record.finished_ms.is_some_and(|f| f + ttl_ms > kiln_core::now_ms() + 60_000),
            JobState::Queued | JobState::Running | JobState::Retrying => true,
            _ => false,
        };
        if !usable {
            return Ok(None);
        }
        metrics::counter!("kiln_results_reused_total", "model" => model.name.clone()).increment(1);
        Ok(Some(SubmitReply { job_id, status: v.record.state, duplicate: false, reused: true }))
    }

    async fn load(&self, job_id: &str) -> Result<kiln_core::nats::jobs::Versioned, ApiError> {
        check_id("job_id", job_id)?;
        self.resources.get_job(job_id).await.map_err(internal)?.ok_or_else(|| job_not_found(job_id))
    }

    async fn status(&self, req: JobRef) -> Result<JobView, ApiError> {
        Ok(JobView::from(&self.load(&req.job_id).await?.record))
    }

    async fn result(&self, req: JobRef) -> Result<ResultReply, ApiError> {
        let r = self.load(&req.job_id).await?.record;
        Ok(ResultReply { job_id: r.job_id, status: r.state, artifacts: r.artifacts, error: r.error })
    }

    /// Queued (or waiting to retry): cancelled at once, it never runs. Running: flagged in the
    /// record and a notice sent to the owner on core NATS; the owning node stops the worker
    /// and writes `cancelled`.
    async fn cancel(&self, req: JobRef) -> Result<JobView, ApiError> {
        check_id("job_id", &req.job_id)?;
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
            metrics::counter!(m::JOBS_FINISHED, "model" => next.model.clone(), "outcome" => "cancelled").increment(1);
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

    async fn control(&self, req: ControlRequest) -> Result<ControlReply, ApiError> {
        let node = match &req {
            ControlRequest::Drain { node } | ControlRequest::RestartGpu { node, .. } | ControlRequest::Ping { node } => node.clone(),
        };
        if !ids::is_valid_token(&node) {
            return Err(ApiError::bad_request(format!("{node:?} is not a node name")));
        }
        if self.registry.node(&node).is_none() {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no live node named {node:?}")));
        }
        let via = self.config.node.name.clone();
        let unreachable = || ApiError::internal(format!("no actor-cluster session with {node:?} right now; retry"));
        let reply = match req {
            ControlRequest::Drain { node } => match call_node(&node, NodeControlRequest::Drain, CONTROL_TIMEOUT).await {
                Some(NodeControlReply::Draining { node }) => ControlReply { target: node, outcome: "draining".into(), via },
                _ => return Err(unreachable()),
            },
            ControlRequest::Ping { node } => match call_node(&node, NodeControlRequest::Ping, CONTROL_TIMEOUT).await {
                Some(NodeControlReply::Pong { node }) => ControlReply { target: node, outcome: "pong".into(), via },
                _ => return Err(unreachable()),
            },
            ControlRequest::RestartGpu { node, slot } => {
                if !self.live_gpus_of(&node).await?.iter().any(|g| g.slot == slot) {
                    return Err(ApiError::new(ErrorCode::NotFound, format!("node {node:?} has no slot {slot:?}")));
                }
                match call_gpu(&node, &slot, GpuControlRequest::Restart, CONTROL_TIMEOUT).await {
                    Some(GpuControlReply::Restarting { node, slot }) => {
                        ControlReply { target: format!("{node}/{slot}"), outcome: "restarting".into(), via }
                    }
                    Some(GpuControlReply::NotRunning { node, slot }) => {
                        ControlReply { target: format!("{node}/{slot}"), outcome: "not_running".into(), via }
                    }
                    None => return Err(unreachable()),
                }
            }
        };
        Ok(reply)
    }

    async fn jobs(&self, req: ListJobsRequest) -> Result<ListJobsReply, ApiError> {
        let limit = req.limit.unwrap_or(100).min(1000);
        let ids = self.resources.job_ids().await.map_err(internal)?;
        let mut jobs = Vec::new();
        for id in ids {
            let Some(v) = self.resources.get_job(&id).await.map_err(internal)? else { continue };
            let r = &v.record;
            let keep = req.status.is_none_or(|s| r.state == s)
                && req.model.as_ref().is_none_or(|m| &r.model == m)
                && (!req.dead_letter || r.dead_letter)
                && req.labels.iter().all(|(name, value)| r.labels.get(name) == Some(value));
            if keep {
                jobs.push(JobView::from(r));
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

    /// The live GPU entries, read from the registry's server (nodes do not watch them).
    async fn live_gpus(&self) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(None, false).await.map_err(internal)
    }

    async fn live_gpus_of(&self, node: &str) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(Some(node), false).await.map_err(internal)
    }

    /// The cluster's models (see [`kiln_core::models`]): those the live nodes of the registry
    /// declare. This node's own config stands in for its entry until that entry is in the
    /// cache (right after start), so a node always accepts the models it serves itself.
    fn cluster_models(&self) -> BTreeMap<String, ClusterModel> {
        let mut nodes = self.registry.nodes();
        let me = &self.config.node.name;
        if !nodes.iter().any(|n| &n.node == me) {
            nodes.push(NodeEntry {
                node: me.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                slots: self.config.node.slots.clone(),
                // Youngest: it does not decide a conflict before its entry is written.
                started_ms: u64::MAX,
                heartbeat_ms: kiln_core::now_ms(),
                running_jobs: 0,
                peers: vec![],
                models: self.config.model_decls(),
            });
        }
        kiln_core::models::cluster_models(&nodes)
    }

    /// The definition of one of the cluster's models; `unknown_model` naming `what` (the
    /// request's field) and listing the cluster's models when no live node declares it.
    fn cluster_model(&self, name: &str, what: &str) -> Result<ModelDecl, ApiError> {
        let mut models = self.cluster_models();
        if let Some(model) = models.remove(name) {
            return Ok(model.decl);
        }
        let known: Vec<&str> = models.keys().map(String::as_str).collect();
        Err(ApiError::new(
            ErrorCode::UnknownModel,
            format!("{what} {name:?} is served by no live node of the cluster; known models: {}", known.join(", ")),
        ))
    }

    async fn models(&self) -> Result<ModelsReply, ApiError> {
        let gpus = self.live_gpus().await?;
        let models = self
            .cluster_models()
            .into_values()
            .map(|ClusterModel { decl: m, nodes, conflict }| {
                let serving = gpus.iter().filter(|g| g.state != GpuState::Dead && g.models.contains(&m.name));
                ModelInfo {
                    slots: serving.clone().map(|g| format!("{}/{}", g.node, g.slot)).collect(),
                    warm_on: serving.filter(|g| g.warm_models.contains(&m.name)).map(|g| format!("{}/{}", g.node, g.slot)).collect(),
                    name: m.name,
                    engine: m.engine,
                    max_attempts: m.max_attempts,
                    timeout_ms: m.timeout_ms,
                    required_inputs: m.required_inputs,
                    nodes,
                    conflict,
                    params: m.params,
                }
            })
            .collect();
        Ok(ModelsReply { models })
    }
}

/// The job id a submission with an idempotency key gets: the same key (for the same model)
/// always maps to the same id, which is what makes the second submission find the first.
pub fn idempotent_job_id(model: &str, key: &str) -> String {
    uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("{model}\0{key}").as_bytes()).to_string()
}

/// Ids end up in KV keys and subjects: a token, or `bad_request` naming the field.
fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if ids::is_valid_token(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{field} {id:?} must be 1-64 letters, digits, '-' or '_'")))
    }
}

fn job_not_found(job_id: &str) -> ApiError {
    ApiError::not_found(format!("no job {job_id:?} (never submitted, or expired)"))
}

fn batch_not_found(batch_id: &str) -> ApiError {
    ApiError::not_found(format!("no batch {batch_id:?} (never submitted, or expired)"))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "internal error serving a request");
    ApiError::internal(format!("internal error: {e}"))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde_json's recursion limit (128) bounds the parse of hostile nesting; deeper is refused.
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed request: {e}")))
}

fn parse_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body)
}

fn encode<T: Serialize>(value: T) -> Reply {
    Ok(serde_json::to_vec(&value).expect("replies serialize"))
}

/// Sends a reply. One larger than the server's `max_payload` (a listing of many big records)
/// could not be delivered, so the client gets `payload_too_large` instead of a timeout.
async fn respond(request: &ServiceRequest, endpoint: &'static str, reply: Reply, max_reply: usize) {
    let reply = match reply {
        Ok(body) if body.len() > max_reply => Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the reply would be {} bytes, over the server's limit of {max_reply}; ask for less (a smaller limit)", body.len()),
        )),
        other => other,
    };
    // An error keeps its JSON body, and gets the services convention's headers and a count in
    // `$SRV.STATS` too (see `crate::service`).
    let sent = match reply {
        Ok(body) => request.respond(Bytes::from(body), None).await,
        Err(error) => {
            metrics::counter!(m::API_ERRORS, "endpoint" => endpoint, "code" => error.code.as_str()).increment(1);
            let body = serde_json::to_vec(&ErrorReply { error: error.clone() }).expect("errors serialize");
            request.respond(Bytes::from(body), Some(&error)).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send reply (client gone?)");
    }
}
