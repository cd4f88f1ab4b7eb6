//! ApiService: the client-facing NATS service (`kiln-api`, the micro/services API, so
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` discovery work). Every node runs it in one queue
//! group, so any node answers any request. Its endpoints under `kiln.api.` are the variants of
//! [`Endpoint`] (kiln-contract's `endpoint`: listed once, with the wire types; ids and reuse keys
//! are its `keys`); see `docs/PROTOCOL.md`.
//!
//! Every reply is JSON; a failure is `{"error": {"code", "message"}}` with a stable code. No
//! request can make the service panic or block: bodies are size-checked before parsing, nested
//! values depth-checked, names syntax-checked, and at most [`MAX_IN_FLIGHT`] requests are
//! handled at once (the rest are answered `overloaded`).
//!
//! # Layout
//!
//! | file            | what                                                                  |
//! |-----------------|-----------------------------------------------------------------------|
//! | `mod.rs`        | [`ApiService`]: the service loop (subscriptions from [`Endpoint::ALL`], admission of each request, stale requests after a stall) and the dispatch to the handlers |
//! | `jobs.rs`       | submit, status, cancel, result, jobs, webhooks (a job's delivery log), webhooks_redeliver |
//! | `batches.rs`    | submit_batch, batch, cancel_batch, retry_batch                        |
//! | `control.rs`    | models, cluster, queue, control (drain, restart a GPU, ping), the cluster's models |
//! | `admission.rs`  | `overloaded`: requests in flight per node, jobs waiting per model (pure rule, cached depths) |
//! | `wait_snapshots.rs` | the lanes' wait snapshots a waiting job's `pending` is judged by, kept 500 ms |
//! | `quota.rs`      | `quota_exceeded`: each fair-share key's submit rate (token buckets) and queued jobs (pure rules, this node's state) |
//! | `validation.rs` | every check of a request that needs no store, as pure functions       |
//! | `reply.rs`      | parsing bodies, encoding replies, the shared errors                   |
//!
//! A handler's file adds its methods to [`ApiService`]; the service loop only knows the enum.

pub mod admission;
mod batches;
mod control;
mod jobs;
pub mod quota;
mod reply;
pub mod validation;
mod wait_snapshots;

use std::sync::Arc;
use std::time::Duration;

use crate::api::admission::{InFlight, QueueDepths};
use crate::api::reply::{bound_reply, encode, max_payload, parse, parse_or_default, Reply};
use crate::service::{self, ServiceRequest, ServiceSpec};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use kiln_core::config::ClusterConfig;
use kiln_core::metrics as m;
use kiln_core::nats::{Names, RegistryCache, Resources, StoreError};
use kiln_core::protocol::*;
use kiln_core::task::{self, TaskGuard, TaskKind};
use kiln_core::telemetry::{self, TraceContext};
use tracing::Instrument;

pub use crate::api::admission::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
pub use kiln_core::endpoint::{Endpoint, Family, ENDPOINTS};
pub use kiln_core::keys::idempotent_job_id;
/// Longest error message in a reply (defined with the wire types: the service's error headers
/// use it too).
pub use kiln_core::protocol::MAX_ERROR_MESSAGE_BYTES;

#[derive(Clone)]
pub struct ApiService {
    resources: Resources,
    config: Arc<ClusterConfig>,
    registry: RegistryCache,
    /// Each model's waiting jobs, as last measured: admission control without a request per
    /// submit.
    queue_depths: Arc<QueueDepths>,
    /// Each fair-share key's submit-rate bucket and jobs being admitted on this node (`[quota]`).
    quotas: Arc<quota::Quotas>,
    /// The lanes' snapshots a waiting job's `pending` is judged by, kept for a moment.
    wait_snapshots: Arc<wait_snapshots::WaitSnapshots>,
    /// Tells the request loop that this process stood still: the requests it buffered
    /// meanwhile are stale (see [`ApiService::start`]).
    stall: kiln_core::stall::StallWatch,
}

/// What `$SRV.INFO` says of the service, and where each endpoint listens: every [`Endpoint`]
/// on its subject in `names`' API group.
pub fn service_spec(names: &Names) -> ServiceSpec<Endpoint> {
    let group = names.api_group();
    ServiceSpec {
        name: names.service_name(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        description: format!("Kiln job API: {}", ENDPOINTS.join(", ")),
        queue_group: format!("{}-api", names.prefix()),
        endpoints: Endpoint::ALL.iter().map(|e| (*e, e.subject(&group))).collect(),
    }
}

impl service::EndpointName for Endpoint {
    fn name(self) -> &'static str {
        Endpoint::name(self)
    }
}

impl ApiService {
    pub fn new(resources: Resources, config: Arc<ClusterConfig>, registry: RegistryCache, stall: kiln_core::stall::StallWatch) -> Self {
        ApiService {
            resources,
            config,
            registry,
            queue_depths: Arc::new(QueueDepths::default()),
            quotas: Default::default(),
            wait_snapshots: Default::default(),
            stall,
        }
    }

    /// Registers the service and serves until the returned task is aborted.
    pub async fn start(self) -> Result<TaskGuard<()>, StoreError> {
        let spec = service_spec(&self.resources.names);
        let (service, mut requests) = service::start(&self.resources.client, spec).await.map_err(StoreError::nats)?;
        let in_flight = InFlight::new(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES);
        let max_reply = max_payload(self.resources.client.server_info().max_payload);
        Ok(task::spawn(TaskKind::OwnerLoop, "api service loop", async move {
            let _service = service; // dropping it would unregister the endpoints
            let mut stall_seen = self.stall.generation();
            // This loop does O(1) work per request and never waits on one being served, so it
            // drains the endpoints' subscriptions (async-nats buffers 64Ki messages per
            // subscription and drops what comes past that: such a request times out at its
            // client instead of growing this node's memory).
            while let Some(request) = requests.next().await {
                let endpoint = request.endpoint;
                metrics::counter!(m::API_REQUESTS, "endpoint" => endpoint.name()).increment(1);
                if self.stall.generation() != stall_seen {
                    stall_seen = self.refuse_stale_requests(&mut requests, request, max_reply).await;
                    continue;
                }
                let size = request.message.payload.len();
                if size > self.config.limits.max_request_bytes {
                    // Refused before it takes a slot (handle() says why).
                    let reply = self.handle(endpoint, &request.message.payload).await;
                    respond(&request, reply, max_reply).await;
                    continue;
                }
                let permit = match in_flight.try_admit(size) {
                    Ok(permit) => permit,
                    Err(overloaded) => {
                        respond(&request, Err(overloaded), max_reply).await;
                        continue;
                    }
                };
                let api = self.clone();
                let trace = incoming_trace(&request.message);
                task::spawn(TaskKind::Reply, "api request", async move {
                    let reply = api.handle_traced(endpoint, &request.message.payload, trace).await;
                    respond(&request, reply, max_reply).await;
                    drop(permit);
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
        requests: &mut (impl futures::Stream<Item = ServiceRequest<Endpoint>> + Unpin),
        request: ServiceRequest<Endpoint>,
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
        respond(&request, stale(), max_reply).await;
        let mut refused = 1;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.resources.client.flush()).await;
        while let Some(Some(request)) = requests.next().now_or_never() {
            respond(&request, stale(), max_reply).await;
            refused += 1;
        }
        tracing::warn!(refused, stalled_ms, "refused the requests held while this node stood still");
        generation
    }

    /// Answers one request body to `endpoint`. Public so tests can drive it directly.
    /// An error's message is cut to [`MAX_ERROR_MESSAGE_BYTES`].
    pub async fn handle(&self, endpoint: Endpoint, body: &[u8]) -> Reply {
        self.handle_traced(endpoint, body, None).await
    }

    /// [`ApiService::handle`] of a request that came with a W3C trace context in its headers
    /// (a submit's job joins that trace).
    pub async fn handle_traced(&self, endpoint: Endpoint, body: &[u8], trace: Option<TraceContext>) -> Reply {
        self.dispatch(endpoint, body, trace).await.map_err(|mut e| {
            e.message = kiln_core::protocol::truncate_utf8(e.message, MAX_ERROR_MESSAGE_BYTES);
            e
        })
    }

    /// The one place an endpoint meets its handler: the match is exhaustive, so an endpoint
    /// added to [`Endpoint`] does not build until it is served.
    async fn dispatch(&self, endpoint: Endpoint, body: &[u8], trace: Option<TraceContext>) -> Reply {
        validation::check_request_size(body.len(), &self.config.limits)?;
        match endpoint {
            Endpoint::Submit => {
                // The submit's span: a child of the caller's (its headers), else a new trace's
                // root; the record keeps its context (see `kiln_core::telemetry`).
                let span = tracing::info_span!("kiln.submit", job_id = tracing::field::Empty, trace_id = tracing::field::Empty);
                telemetry::set_parent(&span, trace.as_ref());
                encode(self.submit(parse(body)?, &span, trace).instrument(span.clone()).await?)
            }
            Endpoint::Status => encode(self.status(parse(body)?).await?),
            Endpoint::Cancel => encode(self.cancel(parse(body)?).await?),
            Endpoint::Result => encode(self.result(parse(body)?).await?),
            Endpoint::Jobs => encode(self.jobs(parse_or_default(body)?).await?),
            Endpoint::Models => {
                parse_or_default::<NoFields>(body)?;
                encode(self.models().await?)
            }
            Endpoint::Cluster => {
                parse_or_default::<NoFields>(body)?;
                encode(self.cluster().await?)
            }
            Endpoint::Control => encode(self.control(parse(body)?).await?),
            Endpoint::SubmitBatch => {
                // As a submit's: every item's job is a child of this span (see `submit_batch`).
                let span = tracing::info_span!("kiln.submit_batch", batch_id = tracing::field::Empty, trace_id = tracing::field::Empty);
                telemetry::set_parent(&span, trace.as_ref());
                encode(self.submit_batch(parse(body)?, &span, trace).instrument(span.clone()).await?)
            }
            Endpoint::Batch => encode(self.batch(parse(body)?).await?),
            Endpoint::CancelBatch => encode(self.cancel_batch(parse(body)?).await?),
            Endpoint::RetryBatch => {
                let span = tracing::info_span!("kiln.retry_batch", trace_id = tracing::field::Empty);
                telemetry::set_parent(&span, trace.as_ref());
                encode(self.retry_batch(parse(body)?, &span, trace).instrument(span.clone()).await?)
            }
            Endpoint::Queue => encode(self.queue(parse_or_default(body)?).await?),
            Endpoint::Webhooks => encode(self.webhooks(parse(body)?).await?),
            Endpoint::WebhooksRedeliver => encode(self.webhooks_redeliver(parse(body)?).await?),
        }
    }
}

/// The trace a submitted job joins (a batch's jobs too): its request span's, else the caller's,
/// else a fresh one ([`telemetry::submitted_trace`]), with the span's `trace_id` field filled in.
fn request_trace(span: &tracing::Span, incoming: Option<TraceContext>) -> TraceContext {
    let trace = telemetry::submitted_trace(span, incoming);
    span.record("trace_id", telemetry::trace_id(Some(&trace)));
    trace
}

/// The W3C trace context of a request's NATS headers (`traceparent`, `tracestate`), if valid.
fn incoming_trace(message: &async_nats::Message) -> Option<TraceContext> {
    let headers = message.headers.as_ref()?;
    let get = |name: &str| headers.get(name).map(|v| v.as_str());
    TraceContext::from_headers(get(telemetry::TRACEPARENT), get(telemetry::TRACESTATE))
}

/// Sends a reply, bounded by the server's `max_payload` (see [`bound_reply`]).
async fn respond(request: &ServiceRequest<Endpoint>, reply: Reply, max_reply: usize) {
    // An error keeps its JSON body, and gets the services convention's headers and a count in
    // `$SRV.STATS` too (see `crate::service`).
    let sent = match bound_reply(reply, max_reply) {
        Ok(body) => request.respond(Bytes::from(body), None).await,
        Err(error) => {
            metrics::counter!(m::API_ERRORS, "endpoint" => request.endpoint.name(), "code" => error.code.as_str()).increment(1);
            let body = serde_json::to_vec(&ErrorReply { error: error.clone() }).expect("errors serialize");
            request.respond(Bytes::from(body), Some(&error)).await
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send reply (client gone?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_listens_on_every_endpoint_in_the_api_group() {
        let spec = service_spec(&Names::new("kiln"));
        assert_eq!(spec.name, "kiln-api");
        assert_eq!(spec.queue_group, "kiln-api");
        let subjects: Vec<&str> = spec.endpoints.iter().map(|(_, s)| s.as_str()).collect();
        let expected: Vec<String> = ENDPOINTS.iter().map(|n| format!("kiln.api.{n}")).collect();
        assert_eq!(subjects, expected);
        assert_eq!(spec.endpoints.iter().map(|(e, _)| *e).collect::<Vec<_>>(), Endpoint::ALL);
        assert_eq!(spec.description, format!("Kiln job API: {}", ENDPOINTS.join(", ")));
        let other = service_spec(&Names::new("staging"));
        assert_eq!(other.endpoints[0].1, "staging.api.submit");
    }

    #[test]
    fn a_reply_over_the_servers_limit_becomes_payload_too_large() {
        assert_eq!(bound_reply(Ok(vec![b'x'; 10]), 10), Ok(vec![b'x'; 10]));
        let e = bound_reply(Ok(vec![b'x'; 11]), 10).expect_err("too large");
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        let kept = ApiError::not_found("x");
        assert_eq!(bound_reply(Err(kept.clone()), 0), Err(kept));
        assert_eq!(max_payload(0), 1024 * 1024);
        assert_eq!(max_payload(8 * 1024 * 1024), 8 * 1024 * 1024);
    }
}
