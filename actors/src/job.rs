//! JobActor: one per delivery of a queued job. It owns the attempt from claim to ack:
//!
//! ```text
//! read record ── terminal? ──────────────────────────────► republish terminal event, ack
//!      │        cancel requested / deadline / exhausted ─► terminal write, event, ack
//!      ▼
//! claim attempt n (compare-and-set) ── lost ──► re-read and decide again
//!      ▼
//! running event, registry busy, in_progress ticker
//!      ▼
//! fetch inputs ─► InferenceActor::Run (progress events stream out meanwhile)
//!      ▼
//! ok ─────────► store artifacts ─► terminal write `completed` ─► terminal event ─► ack
//! user error ─► terminal write `failed` ─► event ─► ack
//! infra error ► attempts left? write `retrying`, nak with backoff : write `failed` (dead letter), ack
//! cancelled ──► terminal write `cancelled` ─► event ─► ack
//! ```
//!
//! A batch item settles its end into the batch's record between its terminal event and its
//! ack (`settle_batch`); if that fails the delivery is left unacked and its redelivery, which
//! finds the record terminal, settles it.
//!
//! Every write after the claim is a compare-and-set on the revision this actor holds. When it
//! loses, it re-reads: if another attempt owns the job now it is *fenced* and stops without
//! acking (the newer attempt's delivery is the live one); if only a cancel request landed, it
//! folds that in and writes again. The ack always comes after the terminal write, so a crash in
//! between redelivers the job, which then finds the record terminal and only acks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use kiln_core::config::StageConfig;
use kiln_core::engine::{EngineError, EngineJob, EngineOutput, ProgressUpdate, ResolvedInput, PROGRESS_CHANNEL_BOUND};
use kiln_core::job::{after_failure, decide_delivery, AfterFailure, DeliveryDecision, JobRecord, JobState, Owner};
use kiln_core::metrics as m;
use kiln_core::nats::jobs::{QueueMessage, Versioned};
use kiln_core::nats::StoreError;
use kiln_core::policy::Backoff;
use kiln_core::protocol::{ApiError, Artifact, ErrorCode, Event, InputValue, MAX_EVENT_MESSAGE_BYTES, MAX_STAGE_BYTES};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::compression_pool::CompressionHandle;
use crate::context::NodeContext;
use crate::dispatcher::DispatcherMsg;
use crate::inference::InferenceMsg;

pub struct JobActor;

pub struct JobArgs {
    pub ctx: NodeContext,
    pub delivery: jetstream::Message,
    pub slot: String,
    pub inference: ActorRef<InferenceMsg>,
    /// Cancelled by the dispatcher when a cancel notice for this job arrives.
    pub cancel: CancellationToken,
    pub retry_backoff: Backoff,
    /// Told when the model is done and only post-processing stages remain, so the GPU slot
    /// takes its next job while this one is compressed.
    pub dispatcher: ActorRef<DispatcherMsg>,
    pub compression: CompressionHandle,
    /// Resolves once the node's registry entry lists this delivery (its ack subject): the
    /// job is claimed only after that, so a survivor that finds this node lost hands back
    /// every job that started here. `None` in tests that run a job actor alone.
    pub listed: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Longest wait for the registry listing before claiming anyway (the registry writer is
/// stuck: NATS is down, and the claim will tell).
const LISTING_WAIT: Duration = Duration::from_secs(5);

/// A queue message whose job record does not exist (yet): the API writes the record after
/// the enqueue, so a fast node may see the message first. These re-reads cover that race;
/// past them the delivery is handed back for [`NO_RECORD_RECHECK`].
const RECORD_RACE_WAITS_MS: [u64; 6] = [1, 2, 4, 8, 16, 32];
const NO_RECORD_RECHECK: Duration = Duration::from_secs(1);
const NO_RECORD_RECHECK_MAX: Duration = Duration::from_secs(10);
/// A message still without a record this long after it was enqueued is dropped: its
/// submission died between the enqueue and the record, and no resubmission can write the
/// record any more without also enqueueing a new message (the queue's de-duplication window
/// is over). The margin covers clock differences between the server and this node.
const ORPHAN_AFTER: Duration = Duration::from_secs(kiln_core::nats::resources::QUEUE_DEDUP_WINDOW.as_secs() + 30);

/// A job actor takes no messages: it runs its delivery in `post_start` and stops. Cancel
/// reaches it through the token, which works while it awaits the engine.
pub enum JobMsg {}

// Local only: never sent to another node (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for JobMsg {}

pub struct JobActorState {
    args: JobArgs,
    /// Acks of events published but not yet confirmed; all are awaited before the terminal
    /// write, so the history is durable before the outcome is visible.
    pending_events: Vec<PendingEvent>,
    /// Numbers this attempt's events for their de-duplication ids.
    events_sent: u32,
    job_id: String,
    /// Set once the attempt is claimed: the record as last written and its revision.
    current: Option<Versioned>,
    attempt: u32,
    /// Set by the ticker when, after this process stood still, the record shows that another
    /// attempt owns the job (or it ended): nothing more is written or published.
    fenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// An event published without waiting, kept until its ack is in so it can be sent again.
struct PendingEvent {
    event: Event,
    msg_id: String,
    ack: Option<async_nats::jetstream::context::PublishAckFuture>,
}

/// How the delivery ended, for the log and the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryEnd {
    Terminal(JobState),
    Retrying,
    /// Another attempt owns the job now; this one stopped without acking.
    Fenced,
    /// NATS failed under us; the message is left to redeliver after the ack wait.
    Abandoned,
}

enum WriteResult {
    Written,
    Fenced,
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobActorState;
    type Arguments = JobArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let job_id = serde_json::from_slice::<QueueMessage>(&args.delivery.payload).map(|q| q.job_id).unwrap_or_default();
        Ok(JobActorState { args, pending_events: vec![], events_sent: 0, job_id, current: None, attempt: 0, fenced: Default::default() })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let end = state.run().await;
        tracing::debug!(job_id = %state.job_id, attempt = state.attempt, end = ?end, "delivery done");
        myself.stop(Some(format!("{end:?}")));
        Ok(())
    }
}

impl JobActorState {
    fn ctx(&self) -> &NodeContext {
        &self.args.ctx
    }

    async fn ack(&self, kind: AckKind) {
        if let Err(e) = self.args.delivery.ack_with(kind).await {
            tracing::warn!(job_id = %self.job_id, error = %e, "ack failed; the job will be redelivered and found terminal");
        }
    }

    async fn event(&mut self, event: Event) {
        self.events_sent += 1;
        let msg_id = format!("{}-a{}-e{}", self.job_id, self.attempt, self.events_sent);
        let ack = self.ctx().resources.publish_event_nowait_with_id(&event, &msg_id).await.ok();
        self.pending_events.push(PendingEvent { event, msg_id, ack });
    }

    /// Waits until every event published so far is stored, publishing again (same
    /// de-duplication id) any whose ack failed: a nats-server restart in the middle of a job
    /// must not leave a hole in its history (`kiln chaos` found a completed job without its
    /// `running` event). Gives up on an event after about 10 s of NATS being unreachable.
    async fn flush_events(&mut self) {
        for pending in std::mem::take(&mut self.pending_events) {
            let stored = match pending.ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if stored {
                continue;
            }
            let mut tries = 0;
            loop {
                match self.ctx().resources.publish_event_with_id(&pending.event, Some(&pending.msg_id)).await {
                    Ok(()) => break,
                    Err(e) if tries >= 40 => {
                        tracing::warn!(job_id = %self.job_id, error = %e, "event not stored; its history has a gap");
                        break;
                    }
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
    }

    /// The last event of a job, de-duplicated so a redelivery may publish it again safely.
    ///
    /// False when it could not be stored: the caller must then not ack, so the redelivery
    /// (which finds the record terminal) publishes it. Acking anyway left a finished job with
    /// no ending in its history when a nats-server restart hit this moment (`kiln chaos`).
    async fn terminal_event(&self, record: &JobRecord) -> bool {
        let mut event = Event::status(&record.job_id, record.attempt, record.state);
        if let Some(e) = &record.error {
            event = event.with_error(e.clone());
        }
        let id = format!("{}-terminal", record.job_id);
        match self.ctx().resources.publish_event_with_id(&event, Some(&id)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "terminal event not stored; leaving the delivery for redelivery");
                false
            }
        }
    }

    async fn run(&mut self) -> DeliveryEnd {
        if self.job_id.is_empty() || !kiln_core::ids::is_valid_token(&self.job_id) {
            tracing::warn!(payload = ?String::from_utf8_lossy(&self.args.delivery.payload), "undecodable queue message; dropping it");
            self.ack(AckKind::Term).await;
            return DeliveryEnd::Abandoned;
        }
        match self.claim().await {
            Ok(Some(end)) => end,
            Ok(None) => self.execute().await,
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "cannot claim job; leaving it for redelivery");
                DeliveryEnd::Abandoned
            }
        }
    }

    /// Reads the record and either finishes the delivery (`Some`) or claims an attempt (`None`).
    async fn claim(&mut self) -> Result<Option<DeliveryEnd>, StoreError> {
        for _ in 0..8 {
            let Some(Versioned { record, revision }) = self.get_job_awaiting_record().await? else {
                return Ok(Some(self.without_record().await));
            };
            let mut next = record.clone();
            next.updated_ms = kiln_core::now_ms();
            match decide_delivery(&record, kiln_core::now_ms()) {
                DeliveryDecision::AlreadyTerminal => {
                    // A crash between the terminal write and its event or ack: publish the
                    // event only if it is missing, so the history never shows two endings.
                    let last = self.ctx().resources.last_event(&self.job_id).await?;
                    if !last.is_some_and(|e| e.is_terminal()) && !self.terminal_event(&record).await {
                        return Ok(Some(DeliveryEnd::Abandoned));
                    }
                    if !self.settle_batch(&record).await {
                        return Ok(Some(DeliveryEnd::Abandoned));
                    }
                    self.ack(AckKind::Ack).await;
                    return Ok(Some(DeliveryEnd::Terminal(record.state)));
                }
                DeliveryDecision::CancelBeforeRun => {
                    next.state = JobState::Cancelled;
                    next.finished_ms = Some(next.updated_ms);
                    next.error = Some(ApiError::new(ErrorCode::Cancelled, "cancelled before it ran"));
                }
                DeliveryDecision::DeadlinePassed => {
                    next.state = JobState::Failed;
                    next.finished_ms = Some(next.updated_ms);
                    next.error = Some(ApiError::new(ErrorCode::DeadlineExceeded, "the deadline passed before the job could start"));
                }
                DeliveryDecision::AttemptsExhausted => {
                    next.state = JobState::Failed;
                    next.finished_ms = Some(next.updated_ms);
                    next.dead_letter = true;
                    let last = record.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| "its worker was lost".into());
                    next.error =
                        Some(ApiError::new(ErrorCode::EngineFailed, format!("all {} attempts failed; last: {last}", record.max_attempts)));
                }
                DeliveryDecision::Run { attempt } => {
                    next.state = JobState::Running;
                    next.attempt = attempt;
                    next.owner = Some(Owner { node: self.ctx().node.clone(), slot: self.args.slot.clone() });
                    next.started_ms = Some(next.updated_ms);
                    next.cancel_requested = false;
                }
            }
            // The record was read while the listing was being written; the claim waits for it.
            self.await_listing().await;
            match self.ctx().resources.update_job(&next, revision).await {
                Ok(rev) if next.state == JobState::Running => {
                    self.attempt = next.attempt;
                    self.current = Some(Versioned { record: next, revision: rev });
                    return Ok(None);
                }
                Ok(_) => {
                    self.finish_metrics(&next);
                    if !self.terminal_event(&next).await || !self.settle_batch(&next).await {
                        return Ok(Some(DeliveryEnd::Abandoned));
                    }
                    self.ack(AckKind::Ack).await;
                    return Ok(Some(DeliveryEnd::Terminal(next.state)));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Nats("the record kept changing under the claim".into()))
    }

    /// Waits (once) until the node's registry entry lists this delivery: nothing is claimed or
    /// written before a survivor could hand it back.
    async fn await_listing(&mut self) {
        if let Some(listed) = self.args.listed.take() {
            if tokio::time::timeout(LISTING_WAIT, listed).await.is_err() {
                tracing::warn!(job_id = %self.job_id, "the registry does not list this delivery yet; claiming anyway");
            }
        }
    }

    /// The job's record, re-read a few times over ~60 ms when it is missing on a first
    /// delivery: the API writes it just after the enqueue, and this node may have been faster.
    /// A redelivered message was already waited for once: one read (an orphan's redeliveries,
    /// every second for 150 s, must not hold a slot for 60 ms each).
    async fn get_job_awaiting_record(&self) -> Result<Option<Versioned>, StoreError> {
        let redelivered = self.args.delivery.info().is_ok_and(|i| i.delivered > 1);
        let waits: &[u64] = if redelivered { &[] } else { &RECORD_RACE_WAITS_MS };
        for &wait_ms in waits {
            if let Some(v) = self.ctx().resources.get_job(&self.job_id).await? {
                return Ok(Some(v));
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        self.ctx().resources.get_job(&self.job_id).await
    }

    /// A queue message with no job record: its submission is still under way (hand it back
    /// and look again in a second), or it died between the enqueue and the record, long ago
    /// (drop the message: nobody was told of this job).
    async fn without_record(&self) -> DeliveryEnd {
        let age = self
            .args
            .delivery
            .info()
            .map(|i| {
                let published_ms = (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                Duration::from_millis(kiln_core::now_ms().saturating_sub(published_ms))
            })
            .unwrap_or_default();
        if age > ORPHAN_AFTER {
            tracing::warn!(job_id = %self.job_id, age_s = age.as_secs(), "queue message without a job record (its submission died, or the record expired); dropping it");
            self.ack(AckKind::Term).await;
        } else {
            // Look again in 1 s, then less often: 1, 2, 4, 8, then every 10 s.
            let delivered = self.args.delivery.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
            let delay = NO_RECORD_RECHECK.saturating_mul(1 << (delivered - 1).min(4)).min(NO_RECORD_RECHECK_MAX);
            tracing::debug!(job_id = %self.job_id, age_ms = age.as_millis() as u64, delay_ms = delay.as_millis() as u64, "no job record yet; looking again later");
            self.ack(AckKind::Nak(Some(delay))).await;
        }
        DeliveryEnd::Abandoned
    }

    /// Writes `mutate(record)` with compare-and-set, folding in a concurrent cancel request.
    async fn write(&mut self, mutate: impl Fn(&mut JobRecord)) -> Result<WriteResult, StoreError> {
        for _ in 0..8 {
            let current = self.current.as_ref().expect("claimed");
            let mut next = current.record.clone();
            mutate(&mut next);
            next.updated_ms = kiln_core::now_ms();
            match self.ctx().resources.update_job(&next, current.revision).await {
                Ok(revision) => {
                    self.current = Some(Versioned { record: next, revision });
                    return Ok(WriteResult::Written);
                }
                Err(StoreError::Conflict) => {
                    let Some(fresh) = self.ctx().resources.get_job(&self.job_id).await? else {
                        return Ok(WriteResult::Fenced);
                    };
                    let mine = fresh.record.attempt == self.attempt
                        && fresh.record.state == JobState::Running
                        && fresh.record.owner == current.record.owner;
                    if !mine {
                        return Ok(WriteResult::Fenced);
                    }
                    // Only a cancel request (from the API) can change our record under us.
                    if fresh.record.cancel_requested {
                        self.args.cancel.cancel();
                    }
                    self.current = Some(fresh);
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Nats("the record kept changing under the write".into()))
    }

    async fn execute(&mut self) -> DeliveryEnd {
        let record = self.current.as_ref().expect("claimed").record.clone();
        let started = Instant::now();
        if let Some(s) = record.started_ms {
            metrics::histogram!(m::QUEUE_WAIT_SECONDS, "model" => record.model.clone())
                .record(s.saturating_sub(record.created_ms) as f64 / 1000.0);
        }
        self.event(Event::status(&self.job_id, self.attempt, JobState::Running)).await;
        // Stored before the engine's progress starts, so every attempt's history begins with it.
        self.flush_events().await;

        // JetStream redelivers after ack_wait without news: tell it we are alive. Each tick
        // also re-reads the record, so a cancel whose core-NATS notice was lost still lands.
        //
        // It also watches for this process standing still (SIGSTOP, a paused VM): the job may
        // have been handed to another node meanwhile, so it re-reads the record at once, and
        // if another attempt owns the job (or it ended) this attempt stops without writing.
        let ticker = {
            let delivery = self.args.delivery.clone();
            let period = self.ctx().resources.ack_wait() / 3;
            let resources = self.ctx().resources.clone();
            let (job_id, cancel, attempt) = (self.job_id.clone(), self.args.cancel.clone(), self.attempt);
            let (stall, fenced) = (self.ctx().stall.clone(), self.fenced.clone());
            tokio::spawn(async move {
                let mut stall_seen = stall.generation();
                let mut next_progress = tokio::time::Instant::now() + period;
                loop {
                    tokio::time::sleep(STALL_CHECK.min(period)).await;
                    let stalled = stall.generation() != stall_seen;
                    if !stalled && tokio::time::Instant::now() < next_progress {
                        continue;
                    }
                    stall_seen = stall.generation();
                    if !stalled {
                        next_progress = tokio::time::Instant::now() + period;
                        let _ = delivery.ack_with(AckKind::Progress).await;
                    }
                    if let Ok(Some(v)) = resources.get_job(&job_id).await {
                        if v.record.attempt != attempt || v.record.state != JobState::Running {
                            tracing::warn!(job_id = %job_id, attempt, "this node stood still and another attempt owns the job now; stopping this one");
                            fenced.store(true, std::sync::atomic::Ordering::Release);
                            cancel.cancel();
                            return;
                        }
                        if v.record.cancel_requested {
                            cancel.cancel();
                        }
                    }
                }
            })
        };
        let outcome = self.run_engine(&record).await;
        let end = self.conclude(&record, outcome, started).await;
        ticker.abort();
        end
    }

    /// Fetches inputs, runs the engine through the inference actor, stores artifacts.
    async fn run_engine(&mut self, record: &JobRecord) -> Result<Vec<Artifact>, EngineError> {
        let dir = self.ctx().job_dir(&self.args.slot, &self.job_id);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let output_dir = dir.join("out");
        tokio::fs::create_dir_all(&output_dir)
            .await
            .map_err(|e| EngineError::Infra(format!("cannot create {}: {e}", output_dir.display())))?;
        let inputs = self.resolve_inputs(record, &dir.join("in")).await?;
        let job_inputs = inputs.clone();
        let job = EngineJob {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            model: record.model.clone(),
            inputs,
            params: record.params.clone(),
            output_dir,
        };

        let stages = self.ctx().config.model(&record.model).map(|m| m.stages.clone()).unwrap_or_default();
        let run_stage = self.ctx().config.model(&record.model).map(|m| m.run_stage.clone()).unwrap_or_default();
        // Progress spans the whole pipeline: the model takes the first MODEL_SHARE of it.
        let model_share = if stages.is_empty() { 1.0 } else { MODEL_SHARE };
        if !run_stage.is_empty() {
            self.event(Event::progress(&self.job_id, self.attempt, Some(run_stage), Some(0.0))).await;
        }
        let (tx, rx) = mpsc::channel(PROGRESS_CHANNEL_BOUND);
        let forwarder = tokio::spawn(forward_progress(self.ctx().clone(), self.job_id.clone(), self.attempt, model_share, rx));
        let cancel = self.args.cancel.clone();
        let model_timeout = self.ctx().config.model(&record.model).map(|m| m.timeout_ms).unwrap_or(600_000);
        // The inference actor enforces the model timeout itself; this outer bound only guards
        // against a reply that never comes.
        let call = self
            .args
            .inference
            .call(|reply| InferenceMsg::Run { job, progress: tx, cancel, reply }, Some(Duration::from_millis(model_timeout + 30_000)))
            .await;
        let _ = forwarder.await;
        let outputs = match call {
            Ok(ractor::rpc::CallResult::Success(result)) => result?,
            Ok(ractor::rpc::CallResult::Timeout) => return Err(EngineError::Timeout(model_timeout)),
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                return Err(EngineError::WorkerDied("the inference actor stopped while running the job".into()))
            }
        };
        let outputs = if stages.is_empty() {
            outputs
        } else {
            let _ = self.args.dispatcher.cast(DispatcherMsg::ModelDone { job_id: self.job_id.clone() });
            self.run_stages(record, &stages, &job_inputs, outputs, &dir).await?
        };
        // Stored under this attempt's own names; announced (and so made visible) only in
        // `conclude`, if this attempt still owns the job.
        let mut artifacts = Vec::with_capacity(outputs.len());
        for output in outputs {
            let artifact = self
                .ctx()
                .resources
                .store_artifact(&record.model, &self.job_id, self.attempt, &output.name, &output.path, output.content_type.as_deref())
                .await
                .map_err(|e| EngineError::Infra(format!("cannot store artifact {}: {e}", output.name)))?;
            artifacts.push(artifact);
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(artifacts)
    }

    /// Runs the model's post-processing stages in order, each with its own attempts; each
    /// stage's output replaces its input among the artifacts (or joins it, `keep_input`).
    async fn run_stages(
        &mut self,
        record: &JobRecord,
        stages: &[StageConfig],
        inputs: &BTreeMap<String, ResolvedInput>,
        mut outputs: Vec<EngineOutput>,
        dir: &Path,
    ) -> Result<Vec<EngineOutput>, EngineError> {
        let stage_dir = dir.join("stages");
        tokio::fs::create_dir_all(&stage_dir)
            .await
            .map_err(|e| EngineError::Infra(format!("cannot create {}: {e}", stage_dir.display())))?;
        for (i, stage) in stages.iter().enumerate() {
            let base = MODEL_SHARE * 100.0;
            let share = (1.0 - MODEL_SHARE) * 100.0 / stages.len() as f32;
            self.event(Event::progress(&self.job_id, self.attempt, Some(stage.name().to_string()), Some(base + share * i as f32))).await;
            let failed = |message: String| EngineError::Stage { stage: stage.name().to_string(), message };
            match stage {
                StageConfig::Command { name, command, input, output, keep_input, timeout_ms, max_attempts } => {
                    let Some(at) = outputs.iter().position(|o| &o.name == input) else {
                        return Err(failed(format!("the model produced no artifact {input:?}")));
                    };
                    let out_path = stage_dir.join(output);
                    let argv = kiln_core::stage::expand(command, &outputs[at].path, &out_path);
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        let _ = tokio::fs::remove_file(&out_path).await;
                        let ran = self.args.compression.run(argv.clone(), Duration::from_millis(*timeout_ms), &self.args.cancel).await;
                        let error = match ran {
                            Ok(_) if tokio::fs::metadata(&out_path).await.is_ok_and(|m| m.len() > 0) => break,
                            Ok(_) => format!("the command succeeded but wrote no {output:?}"),
                            Err(kiln_core::stage::StageError::Cancelled) => return Err(EngineError::Cancelled),
                            Err(e) => e.to_string(),
                        };
                        if self.args.cancel.is_cancelled() {
                            return Err(EngineError::Cancelled);
                        }
                        tracing::warn!(job_id = %self.job_id, stage = %name, attempt, error = %error, "stage attempt failed");
                        if attempt >= *max_attempts {
                            return Err(failed(format!("{error} (after {attempt} attempts)")));
                        }
                        let note = format!("stage {name} attempt {attempt} of {max_attempts} failed: {error}; retrying");
                        self.event(Event::message(&self.job_id, self.attempt, truncate(note, MAX_EVENT_MESSAGE_BYTES))).await;
                    }
                    let produced = EngineOutput { name: output.clone(), path: out_path, content_type: None };
                    if *keep_input {
                        outputs.push(produced);
                    } else {
                        outputs[at] = produced;
                    }
                }
                StageConfig::CameraMetadata { image_input, focal_param, default_focal, output, .. } => {
                    let Some(ResolvedInput::File(image)) = inputs.get(image_input) else {
                        return Err(failed(format!("input {image_input:?} is not an uploaded image")));
                    };
                    let image = image.clone();
                    let (w, h) = tokio::task::spawn_blocking(move || kiln_core::stage::image_size(&image))
                        .await
                        .map_err(|e| failed(e.to_string()))?
                        .map_err(|e| failed(e.to_string()))?;
                    let focal = record.params.get(focal_param).and_then(|v| v.as_f64()).unwrap_or(*default_focal);
                    let body = kiln_core::stage::camera_metadata(&self.job_id, w, h, focal);
                    let path = stage_dir.join(output);
                    tokio::fs::write(&path, serde_json::to_vec_pretty(&body).expect("json"))
                        .await
                        .map_err(|e| EngineError::Infra(format!("cannot write {}: {e}", path.display())))?;
                    outputs.push(EngineOutput { name: output.clone(), path, content_type: Some("application/json".into()) });
                }
            }
        }
        self.event(Event::progress(&self.job_id, self.attempt, None, Some(100.0))).await;
        Ok(outputs)
    }

    async fn resolve_inputs(&self, record: &JobRecord, dir: &Path) -> Result<BTreeMap<String, ResolvedInput>, EngineError> {
        let mut resolved = BTreeMap::new();
        for (name, value) in &record.inputs {
            let input = match value {
                InputValue::Inline(v) => ResolvedInput::Inline(v.clone()),
                InputValue::Object { object } => {
                    let base = object.rsplit('/').next().unwrap_or("input");
                    let dest = dir.join(name).join(base);
                    match self.ctx().resources.download_file(object, &dest).await {
                        Ok(_) => ResolvedInput::File(dest),
                        Err(StoreError::NotFound(_)) => {
                            return Err(EngineError::User(format!(
                                "input {name:?}: object {object:?} does not exist in the files bucket (expired?)"
                            )))
                        }
                        Err(e) => return Err(EngineError::Infra(format!("input {name:?}: cannot download {object:?}: {e}"))),
                    }
                }
            };
            resolved.insert(name.clone(), input);
        }
        Ok(resolved)
    }

    async fn conclude(&mut self, record: &JobRecord, outcome: Result<Vec<Artifact>, EngineError>, started: Instant) -> DeliveryEnd {
        if self.fenced.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok(artifacts) = &outcome {
                self.remove_artifacts(&record.model, artifacts).await;
            }
            return DeliveryEnd::Fenced;
        }
        let now = kiln_core::now_ms();
        metrics::histogram!(m::RUN_SECONDS, "model" => record.model.clone(), "outcome" => if outcome.is_ok() { "completed" } else { "error" }).record(started.elapsed().as_secs_f64());
        let (state, error, dead_letter, artifacts, retry) = match outcome {
            Ok(artifacts) => (JobState::Completed, None, false, artifacts, false),
            Err(EngineError::Cancelled) => {
                (JobState::Cancelled, Some(ApiError::new(ErrorCode::Cancelled, "cancelled while running")), false, vec![], false)
            }
            Err(e) => {
                let code = if matches!(e, EngineError::User(_)) { ErrorCode::BadRequest } else { ErrorCode::EngineFailed };
                let error = ApiError::new(code, truncate(e.to_string(), MAX_EVENT_MESSAGE_BYTES));
                tracing::info!(job_id = %self.job_id, attempt = self.attempt, error = %e, "attempt failed");
                match after_failure(e.failure_kind(), self.attempt, record.max_attempts) {
                    AfterFailure::Retry => (JobState::Retrying, Some(error), false, vec![], true),
                    AfterFailure::Fail { dead_letter } => (JobState::Failed, Some(error), dead_letter, vec![], false),
                }
            }
        };
        self.flush_events().await;
        if !artifacts.is_empty() {
            match self.announce_artifacts(&artifacts).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job_id = %self.job_id, attempt = self.attempt, "fenced: another attempt's events follow this one's; its artifacts are withdrawn");
                    self.remove_artifacts(&record.model, &artifacts).await;
                    return DeliveryEnd::Fenced;
                }
                Err(e) => {
                    tracing::warn!(job_id = %self.job_id, error = %e, "cannot announce the artifacts; leaving the job for redelivery");
                    return DeliveryEnd::Abandoned;
                }
            }
        }
        let written = self
            .write(|r| {
                r.state = state;
                r.error = error.clone();
                r.dead_letter = dead_letter;
                r.artifacts = artifacts.clone();
                if state.is_terminal() {
                    r.finished_ms = Some(now);
                }
            })
            .await;
        match written {
            Ok(WriteResult::Written) => {}
            Ok(WriteResult::Fenced) => {
                tracing::warn!(job_id = %self.job_id, attempt = self.attempt, "fenced: a newer attempt owns the job; dropping this outcome");
                self.remove_artifacts(&record.model, &artifacts).await;
                return DeliveryEnd::Fenced;
            }
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "cannot write the outcome; leaving the job for redelivery");
                return DeliveryEnd::Abandoned;
            }
        }
        let record = self.current.as_ref().expect("written").record.clone();
        if retry {
            metrics::counter!(m::JOB_RETRIES, "model" => record.model.clone()).increment(1);
            let mut event = Event::status(&self.job_id, self.attempt, JobState::Retrying);
            if let Some(e) = &record.error {
                event = event.with_error(e.clone());
            }
            self.event(event).await;
            self.flush_events().await;
            let delay = self.args.retry_backoff.delay(self.attempt);
            self.ack(AckKind::Nak(Some(delay))).await;
            return DeliveryEnd::Retrying;
        }
        kiln_core::fault::abort_at("abort_after_terminal_write");
        self.finish_metrics(&record);
        if !self.terminal_event(&record).await || !self.settle_batch(&record).await {
            return DeliveryEnd::Abandoned;
        }
        self.ack(AckKind::Ack).await;
        DeliveryEnd::Terminal(record.state)
    }

    /// Publishes one `artifact` event per artifact, each stored only if the job's last event is
    /// still one this attempt may follow (`Nats-Expected-Last-Subject-Sequence`): its own, the
    /// API's, or a late one of an older fenced attempt. A newer attempt's event or an ending
    /// in between means this attempt is fenced: false. So a fenced attempt that resumes after
    /// the job ended can add no artifact to its history (an outside storm saw two late
    /// artifact events after `completed`).
    async fn announce_artifacts(&self, artifacts: &[Artifact]) -> Result<bool, StoreError> {
        let resources = &self.ctx().resources;
        let may_follow = |e: &Event| !e.is_terminal() && e.attempt <= self.attempt;
        // The first artifact not known to be announced, and the sequence to chain after
        // (`None`: read the job's last event first). A NATS error (a server restart) re-reads
        // and goes on where the stored history says, for about 10 s of trying.
        let (mut next, mut after, mut failures) = (0usize, None::<u64>, 0u32);
        loop {
            let seq = match after {
                Some(seq) => seq,
                None => match resources.last_event_with_seq(&self.job_id).await {
                    Ok(Some((seq, last))) => {
                        if !may_follow(&last) {
                            return Ok(false);
                        }
                        // This attempt's own artifact event last: stored, though its ack was lost.
                        if last.attempt == self.attempt {
                            if let Some(j) = last.artifact.as_ref().and_then(|a| artifacts.iter().position(|x| x.object == a.object)) {
                                next = next.max(j + 1);
                            }
                        }
                        seq
                    }
                    Ok(None) => return Ok(false),
                    Err(e) => {
                        failures += 1;
                        if failures > 40 {
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                },
            };
            let Some(artifact) = artifacts.get(next) else { return Ok(true) };
            match resources.publish_event_after(&Event::artifact(&self.job_id, self.attempt, artifact.clone()), seq).await {
                Ok(Some(stored)) => {
                    after = Some(stored);
                    next += 1;
                }
                // Something was stored in between: re-read to tell this attempt's own lost
                // ack, a late event that may be followed, and a fence apart.
                Ok(None) => after = None,
                Err(e) => {
                    failures += 1;
                    if failures > 40 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    after = None;
                }
            }
        }
    }

    /// Deletes the objects a fenced attempt stored under its own names (nothing refers to
    /// them); they would expire with the bucket's TTL anyway.
    async fn remove_artifacts(&self, model: &str, artifacts: &[Artifact]) {
        for artifact in artifacts {
            if let Err(e) = self.ctx().resources.delete_artifact(model, artifact).await {
                tracing::debug!(job_id = %self.job_id, object = %artifact.object, error = %e, "cannot remove a fenced attempt's artifact");
            }
        }
    }

    /// Tells the job's batch (if it is a batch item) how it ended; must succeed before the
    /// ack. On failure the delivery stays unacked: JetStream redelivers it after the ack wait,
    /// and that delivery finds the job terminal and settles again.
    async fn settle_batch(&self, record: &JobRecord) -> bool {
        match self.ctx().resources.settle_batch_item(record).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "cannot settle the job into its batch; leaving it for redelivery");
                false
            }
        }
    }

    fn finish_metrics(&self, record: &JobRecord) {
        metrics::counter!(m::JOBS_FINISHED, "model" => record.model.clone(), "outcome" => record.state.as_str()).increment(1);
    }
}

/// How often a running job looks whether its process stood still (then it re-reads its record).
const STALL_CHECK: Duration = Duration::from_millis(250);

/// The part of a pipeline's progress the model takes; its post-processing stages share the rest.
const MODEL_SHARE: f32 = 0.8;

/// Most progress events whose acks may be outstanding at once: the forwarder overlaps acks
/// for throughput but waits once this many are in flight, which bounds its memory.
const MAX_UNACKED_PROGRESS: usize = 64;

/// Turns engine progress into events, in order, until the engine drops its sender; returns
/// once every one of them is stored.
async fn forward_progress(ctx: NodeContext, job_id: String, attempt: u32, share: f32, mut rx: mpsc::Receiver<ProgressUpdate>) {
    let mut unacked = std::collections::VecDeque::new();
    while let Some(update) = rx.recv().await {
        let event = match update {
            ProgressUpdate::Progress { stage, progress, message } => {
                let stage = stage.map(|s| truncate(s, MAX_STAGE_BYTES));
                let mut e = Event::progress(&job_id, attempt, stage, progress.map(|p| p * share));
                e.message = message.map(|m| truncate(m, MAX_EVENT_MESSAGE_BYTES));
                e
            }
            ProgressUpdate::Message(text) => Event::message(&job_id, attempt, truncate(text, MAX_EVENT_MESSAGE_BYTES)),
        };
        match ctx.resources.publish_event_nowait(&event).await {
            Ok(ack) => unacked.push_back(ack),
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "progress event publish failed"),
        }
        if unacked.len() >= MAX_UNACKED_PROGRESS {
            let _ = unacked.pop_front().expect("non-empty").await;
        }
    }
    for ack in unacked {
        if let Err(e) = ack.await {
            tracing::warn!(job_id = %job_id, error = %e, "progress event not stored");
        }
    }
}

/// Event messages, stage names and error messages are bounded so that what a worker prints
/// cannot approach the NATS payload limit in an event or a job record.
fn truncate(s: String, max: usize) -> String {
    kiln_core::protocol::truncate_utf8(s, max)
}
