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
use kiln_actors::gpu_supervisor::call_gpu;
use kiln_actors::node_control::call_node;
use kiln_actors::wire::{GpuControlReply, GpuControlRequest, NodeControlReply, NodeControlRequest};
use kiln_core::batch::{self, BatchRecord};
use kiln_core::config::ClusterConfig;
use kiln_core::ids;
use kiln_core::job::{self, CancelChange, JobRecord, JobState};
use kiln_core::metrics as m;
use kiln_core::nats::cas::{Step, Updated};
use kiln_core::nats::{CasError, RegistryCache, Resources, StoreError};
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
/// Longest error message in a reply: messages quote what the client sent (an unknown field,
/// a wrong value), so a hostile request cannot make its reply larger than this.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// How long a control call through the actor cluster may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
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
    fn validate_submit(&self, req: &SubmitRequest) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
        let limits = &self.config.limits;
        let Some(model) = self.config.model(&req.model) else {
            let known: Vec<&str> = self.config.models.iter().map(|m| m.name.as_str()).collect();
            return Err(ApiError::new(
                ErrorCode::UnknownModel,
                format!("model {:?} is not configured; known models: {}", req.model, known.join(", ")),
            ));
        };
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
        req.params = self.validate_submit(&req)?;
        let model = self.config.model(&req.model).expect("validated");
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

    /// Makes a new job durable: its `queued` event, its queue message, then its record.
    /// `Some(state)` when the record existed already (an idempotent resubmission).
    ///
    /// The record comes last so that a record never exists without its queue message: a
    /// record written first was stranded `queued` forever when the node or nats-server died
    /// before the enqueue (an outside storm: nats-server SIGTERMed in a flood of unkeyed
    /// submits). Now a death between the writes leaves, at worst, a queue message without a
    /// record: the job actor that gets it waits for the record, and drops the message once it
    /// is older than the queue's de-duplication window (nobody can complete that submission
    /// any more: a resubmission with the same key would be de-duplicated against it only
    /// within the window). A resubmission with the key within the window publishes the same
    /// event and message again (both de-duplicated) and writes the record, and the job runs.
    async fn launch_job(&self, record: &JobRecord) -> Result<Option<JobState>, ApiError> {
        if record.idempotency_key.is_some() || record.parent.is_some() {
            // Ids derived from a key (or a batch) may exist already: then nothing is sent
            // again (a second queue message after the window would run the job twice).
            if let Some(existing) = self.resources.get_job(&record.job_id).await.map_err(internal)? {
                return Ok(Some(existing.record.state));
            }
        }
        // The `queued` event is published before the queue message so that the history is
        // ordered even for a job that starts the instant it is enqueued; both acks are awaited
        // together (one round trip, not two). No node can publish an event for the job before
        // both are stored: it claims only once the record exists, written below.
        let queued = self.publish_queued_nowait(record).await?;
        let enqueued = self.resources.enqueue_nowait(&record.job_id, &record.model, record.priority).await.map_err(internal)?;
        let (queued, enqueued) = tokio::join!(std::future::IntoFuture::into_future(queued), std::future::IntoFuture::into_future(enqueued));
        queued.map_err(internal)?;
        enqueued.map_err(internal)?;
        kiln_core::fault::abort_at("abort_in_launch");
        match self.resources.create_job(record).await {
            Ok(_) => {}
            // A concurrent identical resubmission wrote it first.
            Err(StoreError::AlreadyExists) => {
                let existing = self.resources.get_job(&record.job_id).await.map_err(internal)?;
                return Ok(Some(existing.map(|v| v.record.state).unwrap_or(JobState::Queued)));
            }
            Err(e) => return Err(internal(e)),
        }
        metrics::counter!(m::JOBS_SUBMITTED, "model" => record.model.clone()).increment(1);
        Ok(None)
    }

    /// A job's first event, de-duplicated (a retried submission may publish it again),
    /// without waiting for its ack.
    async fn publish_queued_nowait(&self, record: &JobRecord) -> Result<async_nats::jetstream::context::PublishAckFuture, ApiError> {
        let id = format!("{}-queued", record.job_id);
        let event = Event::status(&record.job_id, 0, JobState::Queued).labelled(&record.labels);
        self.resources.publish_event_nowait_with_id(&event, &id).await.map_err(internal)
    }

    /// `submit_batch`: every item is validated like a submit before anything is written, so a
    /// bad item refuses the whole batch (with its index) and nothing runs.
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
        let batch_id = match &req.idempotency_key {
            Some(key) => batch::idempotent_batch_id(&req.model, key),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let now = kiln_core::now_ms();
        let mut children = Vec::with_capacity(req.items.len());
        if let Some(why) = invalid_labels(&req.labels) {
            return Err(ApiError::bad_request(why));
        }
        for (index, item) in req.items.into_iter().enumerate() {
            let mut params = req.params.clone();
            params.extend(item.params);
            let mut labels = req.labels.clone();
            labels.extend(item.labels);
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
            single.params = self.validate_submit(&single).map_err(at_item)?;
            self.input_digests(&single.inputs).await.map_err(at_item)?;
            let model = self.config.model(&single.model).expect("validated");
            let index = index as u32;
            children.push(JobRecord {
                inputs: single.inputs,
                params: single.params,
                priority: single.priority,
                deadline_ms: single.deadline_ms,
                labels: single.labels,
                ..batch::child_record(
                    &batch_id,
                    index,
                    &model.name,
                    single.max_attempts.map(|a| a.min(model.max_attempts)).unwrap_or(model.max_attempts),
                    now,
                )
            });
        }
        self.admit(&req.model, children.len() as u64).await?;
        let record = BatchRecord { idempotency_key: req.idempotency_key, ..BatchRecord::new(&batch_id, &req.model, &children, now) };
        self.launch_batch(record, children).await
    }

    /// Makes a batch durable: the parent record first, then every child. A resubmission
    /// (same idempotency key, or a repeated retry request) finds the parent and launches any
    /// child the first attempt did not get to: child ids derive from the batch id.
    async fn launch_batch(&self, record: BatchRecord, children: Vec<JobRecord>) -> Result<BatchReply, ApiError> {
        let (record, duplicate) = match self.resources.create_batch(&record).await {
            Ok(_) => (record, false),
            Err(StoreError::AlreadyExists) => {
                let existing = self.load_batch(&record.batch_id).await?.0;
                (existing, true)
            }
            Err(e) => return Err(internal(e)),
        };
        let listed: std::collections::HashSet<&str> = record.items.iter().map(|i| i.job_id.as_str()).collect();
        let launches: Vec<_> = children.iter().filter(|c| listed.contains(c.job_id.as_str())).map(|c| self.launch_job(c)).collect();
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

    async fn load_batch(&self, batch_id: &str) -> Result<(BatchRecord, u64), ApiError> {
        check_id("batch_id", batch_id)?;
        self.resources.get_batch(batch_id).await.map_err(internal)?.ok_or_else(|| batch_not_found(batch_id))
    }

    /// `batch`: the summary counts settled items; each item shows its job as it is now.
    async fn batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
        let (record, _) = self.load_batch(&req.batch_id).await?;
        let reads: Vec<_> = record
            .items
            .iter()
            .map(|item| async move {
                let job = self.resources.get_job(&item.job_id).await.map_err(internal)?;
                Ok::<_, ApiError>(match job {
                    Some(v) => BatchItemView {
                        index: item.index,
                        job_id: item.job_id.clone(),
                        status: v.record.state,
                        error: v.record.error,
                        artifacts: v.record.artifacts,
                        labels: v.record.labels,
                    },
                    // Not created yet (a submission still under way) or expired: the batch's own
                    // record is all there is.
                    None => BatchItemView {
                        index: item.index,
                        job_id: item.job_id.clone(),
                        status: item.state,
                        error: None,
                        artifacts: vec![],
                        labels: Default::default(),
                    },
                })
            })
            .collect();
        let items: Vec<Result<BatchItemView, ApiError>> = futures::stream::iter(reads).buffered(BATCH_CONCURRENCY).collect().await;
        let summary = record.summary();
        Ok(BatchView {
            batch_id: record.batch_id,
            model: record.model,
            status: summary.status,
            summary,
            created_ms: record.created_ms,
            finished_ms: record.finished_ms,
            items: items.into_iter().collect::<Result<_, _>>()?,
            retry_of: record.retry_of,
            retried_by: record.retried_by,
        })
    }

    /// `cancel_batch`: cancels every item that has not ended (queued ones at once, running
    /// ones through their owners), then shows the batch.
    async fn cancel_batch(&self, req: BatchRef) -> Result<BatchView, ApiError> {
        let (record, _) = self.load_batch(&req.batch_id).await?;
        let open: Vec<_> =
            record.items.iter().filter(|i| !i.state.is_terminal()).map(|i| self.cancel(JobRef { job_id: i.job_id.clone() })).collect();
        let cancelled: Vec<Result<JobView, ApiError>> = futures::stream::iter(open).buffer_unordered(BATCH_CONCURRENCY).collect().await;
        for result in cancelled {
            match result {
                Ok(_) => {}
                // An item whose submission never got that far has nothing to cancel.
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.batch(req).await
    }

    /// `retry_batch`: a new batch (`retry_of` this one) of this batch's failed and cancelled
    /// items, with their original inputs, params and indices. This batch stays as it ended.
    /// One retry per batch: asking again answers with the same retry batch (`duplicate`).
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
        let failed = old.unsuccessful_items();
        if failed.is_empty() {
            return Err(ApiError::bad_request(format!(
                "batch {:?} has no failed items to retry: all {} completed",
                old.batch_id,
                old.items.len()
            )));
        }
        let retry_id = batch::retry_batch_id(&old.batch_id);
        let now = kiln_core::now_ms();
        let mut children = Vec::with_capacity(failed.len());
        for item in &failed {
            let job = self.load(&item.job_id).await?.record;
            children.push(JobRecord {
                inputs: job.inputs,
                params: job.params,
                priority: job.priority,
                deadline_ms: job.deadline_ms,
                ..batch::child_record(&retry_id, item.index, &job.model, job.max_attempts, now)
            });
        }
        self.admit(&old.model, children.len() as u64).await?;
        let record = BatchRecord { retry_of: Some(old.batch_id.clone()), ..BatchRecord::new(&retry_id, &old.model, &children, now) };
        let reply = self.launch_batch(record, children).await?;
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

    /// The earlier job of an identical request, if it can stand for this one: completed with
    /// its results still inside the model's TTL, or still on its way. A failed, cancelled or
    /// expired one is not reused (the request runs again and takes the key over).
    async fn reusable(&self, key: &str, model: &kiln_core::config::ModelConfig) -> Result<Option<SubmitReply>, ApiError> {
        let Some(job_id) = self.resources.reuse_lookup(key).await.map_err(internal)? else { return Ok(None) };
        let Some(v) = self.resources.get_job(&job_id).await.map_err(internal)? else { return Ok(None) };
        let ttl_ms = self.config.result_ttl_s(model) * 1000;
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
    /// record and a notice broadcast; the owning node stops the worker and writes `cancelled`.
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
            let event = Event::status(&next.job_id, next.attempt, JobState::Cancelled)
                .labelled(&next.labels)
                .with_error(next.error.clone().unwrap_or_else(job::cancelled_before_run_error));
            self.resources.publish_end(&event, &next).await.map_err(internal)?;
            metrics::counter!(m::JOBS_FINISHED, "model" => next.model.clone(), "outcome" => "cancelled").increment(1);
            // The queue message is still there: if this fails, its delivery finds the job
            // cancelled and settles it into its batch then.
            if let Err(e) = self.resources.settle_batch_item(&next).await {
                tracing::warn!(job_id = %next.job_id, error = %e, "cannot settle the cancelled job into its batch now");
            }
        } else if let Some(owner) = &next.owner {
            // Stop it now through the actor cluster. If the owner cannot be reached, the flag
            // just written still stops it: its job actor re-reads the record with every
            // `in_progress`.
            let request = NodeControlRequest::CancelJob { job_id: next.job_id.clone() };
            if call_node(&owner.node, request, CONTROL_TIMEOUT).await.is_none() {
                tracing::info!(job_id = %next.job_id, node = %owner.node, "owner unreachable; the cancel flag will stop the job");
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
        Ok(ListJobsReply { jobs })
    }

    /// The live GPU entries, read from the registry's server (nodes do not watch them).
    async fn live_gpus(&self) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(None, false).await.map_err(internal)
    }

    async fn live_gpus_of(&self, node: &str) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(Some(node), false).await.map_err(internal)
    }

    async fn models(&self) -> Result<ModelsReply, ApiError> {
        let gpus = self.live_gpus().await?;
        let models = self
            .config
            .models
            .iter()
            .map(|m| {
                let serving = gpus.iter().filter(|g| g.state != GpuState::Dead && g.models.contains(&m.name));
                ModelInfo {
                    name: m.name.clone(),
                    engine: m.engine.kind().to_string(),
                    max_attempts: m.max_attempts,
                    timeout_ms: m.timeout_ms,
                    required_inputs: m.required_inputs.clone(),
                    slots: serving.clone().map(|g| format!("{}/{}", g.node, g.slot)).collect(),
                    warm_on: serving.filter(|g| g.warm_models.contains(&m.name)).map(|g| format!("{}/{}", g.node, g.slot)).collect(),
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
