//! JobActor: one per delivery of a queued job. It owns the attempt from claim to ack, in two
//! halves kept in files of their own:
//!
//! - [`delivery`](crate::delivery): the delivery protocol. Claim (a compare-and-set on the
//!   record), fence, write, events, ack; the keep-alive while it runs.
//! - [`pipeline`](crate::pipeline): the work. Inputs, inference on the slot (holding the
//!   slot's lease only that long), post-processing stages, artifacts. It is given the slot
//!   lease, the cancel token and, for each run, the delivery as its
//!   [`AttemptEvents`](crate::attempt_events) sink: it calls nothing above it.
//!
//! ```text
//! claim ── ended before it ran / found ended ──► (the delivery wrote, published, acked)
//!   ▼ claimed attempt n
//! `running` event, keep-alive ─► pipeline ─► conclude (artifact events, outcome write,
//!                                            terminal event, ack)
//! ```
//!
//! The attempt runs in its span, `kiln.job`, a child of the job's trace (the record's `trace`);
//! the pipeline's spans are its children, and the conclusion is `kiln.terminal_write`
//! (`kiln_core::telemetry` draws the whole tree).

use std::time::{Instant, SystemTime};

use async_nats::jetstream;
use kiln_core::metrics as m;
use kiln_core::policy::Backoff;
use kiln_core::telemetry::{self, KeyValue};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::NodeContext;
use crate::delivery::Delivery;
pub use crate::delivery::DeliveryEnd;
use crate::inference::InferenceMsg;
use crate::lease::SlotLease;
use crate::pipeline::Pipeline;
use crate::stage_pool::StagePoolHandle;

pub struct JobActor;

pub struct JobArgs {
    pub ctx: NodeContext,
    pub delivery: jetstream::Message,
    /// The job's place on its slot; handed back when the model is done, so the slot takes its
    /// next job while this one's stages run and its outcome is written.
    pub lease: SlotLease,
    pub inference: ActorRef<InferenceMsg>,
    /// Cancelled by the dispatcher when a cancel notice for this job arrives.
    pub cancel: CancellationToken,
    pub retry_backoff: Backoff,
    pub stage_pool: StagePoolHandle,
    /// Resolves once the node's registry entry lists this delivery (its ack subject): the
    /// job is claimed only after that, so a survivor that finds this node lost hands back
    /// every job that started here. `None` in tests that run a job actor alone.
    pub listed: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// A job actor takes no messages: it runs its delivery in `post_start` and stops. Cancel
/// reaches it through the token, which works while it awaits the engine.
pub enum JobMsg {}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for JobMsg {}

pub struct JobActorState {
    delivery: Delivery,
    pipeline: Pipeline,
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobActorState;
    type Arguments = JobArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let slot = args.lease.slot().to_string();
        let pipeline = Pipeline {
            ctx: args.ctx.clone(),
            slot: slot.clone(),
            inference: args.inference,
            lease: Some(args.lease),
            stage_pool: args.stage_pool,
            cancel: args.cancel.clone(),
        };
        let delivery = Delivery::new(args.ctx, args.delivery, slot, args.cancel, args.retry_backoff, args.listed);
        Ok(JobActorState { delivery, pipeline })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let end = state.run().await;
        tracing::debug!(job_id = %state.delivery.job_id, attempt = state.delivery.attempt, end = ?end, "delivery done");
        myself.stop(Some(format!("{end:?}")));
        Ok(())
    }
}

impl JobActorState {
    async fn run(&mut self) -> DeliveryEnd {
        if self.delivery.drop_if_undecodable().await {
            return DeliveryEnd::Abandoned;
        }
        let claim_started = SystemTime::now();
        match self.delivery.claim().await {
            Ok(Some(end)) => end,
            Ok(None) => {
                let span = self.attempt_span(claim_started);
                self.execute().instrument(span).await
            }
            Err(e) => {
                tracing::warn!(job_id = %self.delivery.job_id, error = %e, "cannot claim job; leaving it for redelivery");
                DeliveryEnd::Abandoned
            }
        }
    }

    /// The attempt's span (`kiln.job`), a child of the job's trace (the record's, from its
    /// submit), and the spans already over by now: the queue wait (a first attempt's, from
    /// the submit) and the claim. A record without a trace (an older Kiln's) starts one here.
    fn attempt_span(&self, claim_started: SystemTime) -> tracing::Span {
        let record = self.delivery.record();
        let trace = record.trace.as_ref();
        let span = tracing::info_span!(
            "kiln.job",
            job_id = %record.job_id,
            attempt = record.attempt,
            model = %record.model,
            node = %self.delivery.ctx.node,
            trace_id = %telemetry::trace_id(trace),
        );
        telemetry::set_parent(&span, trace);
        if telemetry::exporting() {
            let job_id = KeyValue::new("job_id", record.job_id.clone());
            if record.attempt == 1 {
                let submit = trace.and_then(telemetry::remote_context).unwrap_or_default();
                let created = telemetry::at_ms(record.created_ms);
                telemetry::past_span("kiln.queue_wait", &submit, created, claim_started, vec![job_id.clone()]);
            }
            let parent = telemetry::otel_context(&span);
            telemetry::past_span("kiln.claim", &parent, claim_started, SystemTime::now(), vec![job_id]);
        }
        span
    }

    async fn execute(&mut self) -> DeliveryEnd {
        let record = self.delivery.record().clone();
        tracing::debug!("attempt claimed");
        let started = Instant::now();
        if let Some(s) = record.started_ms {
            metrics::histogram!(m::QUEUE_WAIT_SECONDS, "model" => record.model.clone())
                .record(s.saturating_sub(record.created_ms) as f64 / 1000.0);
        }
        self.delivery.publish_running().await;
        let keep_alive = self.delivery.keep_alive();
        let outcome = self.pipeline.run(&mut self.delivery, &record).await;
        if self.delivery.ctx.config.node.slot_prefetch > 0 {
            // However the pipeline ended, the slot takes its next job before this one's outcome
            // is written (a no-op if the model's end handed the lease back already).
            drop(self.pipeline.lease.take());
        }
        let end = self.delivery.conclude(&record, outcome, started).instrument(tracing::info_span!("kiln.terminal_write")).await;
        // A `JobKeepAlive`: stopped here, or with this actor however it ends.
        drop(keep_alive);
        // Otherwise the lease goes back here, once the outcome is settled.
        drop(self.pipeline.lease.take());
        end
    }
}
