//! The delivery protocol of one queued job: claim, fence, write, ack. The
//! [`JobActor`](crate::job) drives it around the [`pipeline`](crate::pipeline) that runs the
//! job; this file owns everything that touches the job's record, its events and its queue
//! message.
//!
//! ```text
//! read record ── terminal? ──► republish the ending if the history lacks it, the feed entry, ack
//!      │        cancel requested / deadline / exhausted ─► terminal write, event, ack
//!      ▼
//! claim attempt n (compare-and-set) ── lost ──► re-read and decide again
//!      ▼
//! n > 1: `retrying` event (its reason from the record the claim replaced), stored first
//!      ▼
//! `running` event (its ack awaited before any later event, not before the engine starts),
//! in_progress ticker
//!      ▼ ... the pipeline runs ...
//! ok ─────────► artifact events (fenced on the last event) ─► terminal write `completed` ─► event ─► ack
//! user error ─► terminal write `failed` ─► event ─► ack
//! infra error ► attempts left? write `retrying`, nak with backoff : write `failed` (dead letter), ack
//! cancelled ──► terminal write `cancelled` ─► event ─► ack
//! ```
//!
//! Every record change is a pure function of `kiln_core::job`, written through the one
//! compare-and-set helper (`kiln_core::nats::cas`) on the job store (`kiln_core::store`: NATS
//! in a node, in memory in the tests, `delivery/tests.rs`; the queue message and the registry
//! stay NATS). The steps that touch the store are free functions over `&dyn JobStore`
//! (`claim_record`, `write_as_owner`, `AttemptWatch::look`, `announce_artifacts`,
//! `read_record_awaiting`), so the tests run them in-process with paused time. When a write
//! loses, it re-reads: if another attempt owns the job now this one is *fenced* and stops
//! without acking (the newer attempt's delivery is the live one); if only a cancel request
//! landed, the change applies on top of it.
//! The ack always comes after the terminal write and its event, so a crash in between
//! redelivers the job, which then finds the record terminal and only acks.
//!
//! A batch item settles its end into the batch's record between its terminal event and its
//! ack ([`finish_job`], shared with the API's cancel); if that fails the delivery is left unacked and its redelivery, which
//! finds the record terminal, settles it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_core::engine::EngineError;
use kiln_core::job::{self, JobRecord, JobState, Outcome, Owner, Refused};
use kiln_core::metrics as m;
use kiln_core::nats::cas::{self, Step, Updated};
use kiln_core::nats::jobs::{QueueMessage, Versioned};
use kiln_core::nats::{ride_out, Transient};
use kiln_core::nats::{CasError, StoreError};
use kiln_core::policy::{Backoff, Nak, NakLadder, Patience, RECORD_RACE_WAITS};
use kiln_core::protocol::{ApiError, Artifact, ErrorCode, Event, MAX_EVENT_MESSAGE_BYTES};
use kiln_core::retry_reason::{self, OwnerLife};
use kiln_core::store::{self, EventAck, JobStore};
use kiln_core::task::{self, TaskGuard, TaskKind};
use tokio_util::sync::CancellationToken;

use crate::attempt_events::{AttemptEvents, ProgressOrder};
use crate::context::NodeContext;
use crate::finish::{finish_job, FinishError, Publish};

/// What a delivery that finds its job ended publishes again before it acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndToRepublish {
    /// The ending is missing from the history: it and the feed entry ([`Publish::EndingAndFeed`]).
    EndingAndFeed,
    /// The ending is stored: only the feed entry, which may not have been (its stream had no
    /// leader for longer than the patience of the write that stored the ending).
    FeedOnly,
}

/// Decides from the job's last stored event. The ending is published only if it is missing,
/// so the history never shows two (its de-duplication id holds only for the stream's
/// duplicate window); the feed entry always, since nothing tells whether it was stored, and
/// the feed is at least once, de-duplicated by its id and by its readers per job.
fn end_to_republish(last: Option<&Event>) -> EndToRepublish {
    match last {
        Some(e) if e.is_terminal() => EndToRepublish::FeedOnly,
        _ => EndToRepublish::EndingAndFeed,
    }
}

/// Longest wait for the registry listing before claiming anyway (the registry writer is
/// stuck: NATS is down, and the claim will tell).
const LISTING_WAIT: Duration = Duration::from_secs(5);

/// A message still without a record this long after it was enqueued is dropped: its
/// submission died between the enqueue and the record, and no resubmission can write the
/// record any more without also enqueueing a new message (the queue's de-duplication window
/// is over). The margin covers clock differences between the server and this node.
const ORPHAN_AFTER: Duration = Duration::from_secs(kiln_core::nats::resources::QUEUE_DEDUP_WINDOW.as_secs() + 30);

/// How often a running job looks whether its process stood still (then it re-reads its record).
const STALL_CHECK: Duration = Duration::from_millis(250);

/// One delivery of a queued job and the attempt it claims.
pub(crate) struct Delivery {
    pub(crate) ctx: NodeContext,
    message: jetstream::Message,
    /// The slot the attempt runs on (written into the record as its owner).
    slot: String,
    /// Cancelled by the dispatcher when a cancel notice for this job arrives, or by this
    /// delivery when the record asks for it.
    pub(crate) cancel: CancellationToken,
    retry_backoff: Backoff,
    /// Resolves once the node's registry entry lists this delivery (its ack subject): the
    /// job is claimed only after that, so a survivor that finds this node lost hands back
    /// every job that started here. `None` in tests that run a job actor alone.
    listed: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Acks of events published but not yet confirmed; all are awaited before the terminal
    /// write, so the history is durable before the outcome is visible.
    pending_events: Vec<PendingEvent>,
    /// Resolves once the `running` event is stored: every later event of the attempt waits
    /// for it (so the history begins with it even when its first publish failed), but the
    /// engine does not.
    running_stored: Option<Shared<BoxFuture<'static, ()>>>,
    /// Numbers this attempt's events for their de-duplication ids.
    events_sent: u32,
    pub(crate) job_id: String,
    /// Set once the attempt is claimed: the record as last written and its revision.
    current: Option<Versioned>,
    pub(crate) attempt: u32,
    /// Set by the ticker when the record shows that another attempt owns the job (or it ended
    /// without this attempt): nothing more is written or published.
    fenced: Arc<AtomicBool>,
    /// Set once [`conclude`](Self::conclude) begins: from then on the record may show this
    /// attempt's own outcome, which the ticker must not take for a takeover.
    concluding: Arc<AtomicBool>,
    /// The stream sequence of this attempt's newest stored event (0: none yet). The artifact
    /// events chain onto it without reading the job's last event first.
    last_seq: Arc<AtomicU64>,
}

/// An event published without waiting, kept until its ack is in so it can be sent again.
struct PendingEvent {
    event: Event,
    msg_id: String,
    ack: Option<EventAck>,
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

#[derive(Debug)]
enum WriteResult {
    /// Stored: the record as written and its revision.
    Written(Box<Versioned>),
    Fenced,
}

/// Waits until `pending` is stored, publishing it again (same de-duplication id) if its ack
/// failed: a nats-server restart in the middle of a job must not leave a hole in its history
/// (`kiln chaos` found a completed job without its `running` event). Gives up when NATS
/// trouble outlasts [`Patience::NATS_TROUBLE`]. Records the event's sequence in `last_seq`.
async fn ensure_stored(store: Arc<dyn JobStore>, job_id: &str, pending: PendingEvent, last_seq: &AtomicU64) {
    if let Some(ack) = pending.ack {
        if let Ok(seq) = ack.await {
            last_seq.fetch_max(seq, Ordering::AcqRel);
            return;
        }
    }
    let (event, msg_id) = (&pending.event, pending.msg_id.as_str());
    match ride_out(Patience::NATS_TROUBLE, job_id, "storing an event", || store.publish_event_stored(event, Some(msg_id))).await {
        Ok(seq) => {
            last_seq.fetch_max(seq, Ordering::AcqRel);
        }
        Err(e) => tracing::warn!(job_id = %job_id, error = %e, "event not stored; its history has a gap"),
    }
}

impl Delivery {
    pub(crate) fn new(
        ctx: NodeContext,
        message: jetstream::Message,
        slot: String,
        cancel: CancellationToken,
        retry_backoff: Backoff,
        listed: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Delivery {
        let job_id = serde_json::from_slice::<QueueMessage>(&message.payload).map(|q| q.job_id).unwrap_or_default();
        Delivery {
            ctx,
            message,
            slot,
            cancel,
            retry_backoff,
            listed,
            pending_events: vec![],
            running_stored: None,
            events_sent: 0,
            job_id,
            current: None,
            attempt: 0,
            fenced: Default::default(),
            concluding: Default::default(),
            last_seq: Default::default(),
        }
    }

    /// The claimed record (after [`claim`](Self::claim) returned `None`).
    pub(crate) fn record(&self) -> &JobRecord {
        &self.current.as_ref().expect("claimed").record
    }

    /// The newest stored event's sequence, shared with the progress forwarder.
    pub(crate) fn last_seq(&self) -> Arc<AtomicU64> {
        self.last_seq.clone()
    }

    /// Resolves once the attempt's `running` event is stored (at once before it is published).
    pub(crate) fn running_stored(&self) -> Shared<BoxFuture<'static, ()>> {
        self.running_stored.clone().unwrap_or_else(|| futures::future::ready(()).boxed().shared())
    }

    /// Whether the queue message names a job at all; an undecodable one is dropped.
    pub(crate) async fn drop_if_undecodable(&self) -> bool {
        if !self.job_id.is_empty() && kiln_core::ids::is_valid_token(&self.job_id) {
            return false;
        }
        tracing::warn!(payload = ?String::from_utf8_lossy(&self.message.payload), "undecodable queue message; dropping it");
        self.ack(AckKind::Term).await;
        true
    }

    pub(crate) async fn ack(&self, kind: AckKind) {
        if let Err(e) = self.message.ack_with(kind).await {
            tracing::warn!(job_id = %self.job_id, error = %e, "ack failed; the job will be redelivered and found terminal");
        }
    }

    pub(crate) async fn event(&mut self, mut event: Event) {
        if let Some(current) = &self.current {
            event.labels = current.record.labels.clone();
            // A stage shows under the name the model's clients know (`stage_names`).
            if let Some(model) = self.ctx.config.model(&current.record.model) {
                event.stage = event.stage.take().and_then(|stage| model.stage_shown(&stage));
            }
        }
        // Stored after the `running` event, whatever happened to its first publish.
        if let Some(running) = &self.running_stored {
            running.clone().await;
        }
        self.events_sent += 1;
        let msg_id = format!("{}-a{}-e{}", self.job_id, self.attempt, self.events_sent);
        let ack = self.ctx.store.publish_event_nowait(&event, Some(&msg_id)).await.ok();
        self.pending_events.push(PendingEvent { event, msg_id, ack });
    }

    /// Publishes the attempt's `running` event without waiting for it: the engine starts at
    /// once (that wait was a round trip on every job's critical path), while every later event
    /// of the attempt, its own or the engine's progress, waits until it is stored
    /// ([`running_stored`](Self::running_stored)), so the history still begins with it.
    pub(crate) async fn publish_running(&mut self) {
        self.events_sent += 1;
        let labels = self.current.as_ref().map(|c| c.record.labels.clone()).unwrap_or_default();
        let event = Event::status(&self.job_id, self.attempt, JobState::Running).labelled(&labels);
        let msg_id = format!("{}-a{}-e{}", self.job_id, self.attempt, self.events_sent);
        let ack = self.ctx.store.publish_event_nowait(&event, Some(&msg_id)).await.ok();
        let pending = PendingEvent { event, msg_id, ack };
        let (store, job_id, last_seq) = (self.ctx.store.clone(), self.job_id.clone(), self.last_seq.clone());
        self.running_stored = Some(async move { ensure_stored(store, &job_id, pending, &last_seq).await }.boxed().shared());
    }

    /// Waits until every event published so far is stored (see [`ensure_stored`]).
    pub(crate) async fn flush_events(&mut self) {
        if let Some(running) = &self.running_stored {
            running.clone().await;
        }
        for pending in std::mem::take(&mut self.pending_events) {
            ensure_stored(self.ctx.store.clone(), &self.job_id, pending, &self.last_seq).await;
        }
    }

    /// Finishes the ended job `record` ([`finish_job`]: its ending or feed entry as `publish`
    /// says, then its batch settle), riding out NATS trouble.
    ///
    /// False when a step failed: the caller must then not ack, so the redelivery (which finds
    /// the record terminal) does it again. Acking anyway left a finished job with no ending in
    /// its history when a nats-server restart hit this moment (`kiln chaos`), or the feed
    /// without the job, or its batch never settled.
    async fn finish(&self, record: &JobRecord, publish: Publish) -> bool {
        match finish_job(&*self.ctx.store, record, publish, Patience::NATS_TROUBLE).await {
            Ok(()) => true,
            Err(FinishError::Publish(e)) if publish == Publish::EndingAndFeed => {
                tracing::warn!(job_id = %self.job_id, error = %e, "terminal event not stored; leaving the delivery for redelivery");
                false
            }
            Err(FinishError::Publish(e)) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "results feed entry not stored; leaving the delivery for redelivery");
                false
            }
            Err(FinishError::Settle { error, .. }) => {
                tracing::warn!(job_id = %self.job_id, error = %error, "cannot settle the job into its batch; leaving it for redelivery");
                false
            }
        }
    }

    /// Reads the record and either finishes the delivery (`Some`) or claims an attempt (`None`).
    pub(crate) async fn claim(&mut self) -> Result<Option<DeliveryEnd>, CasError> {
        let Some(first) = self.get_job_awaiting_record().await? else {
            return Ok(Some(self.without_record().await));
        };
        // The record was read while the listing was being written; anything this delivery
        // writes waits for it (a redelivery that finds the job ended writes nothing).
        if !first.record.is_terminal() {
            self.await_listing().await;
        }
        let owner = Owner { node: self.ctx.node.clone(), slot: self.slot.clone() };
        let delivered = claim_record(&*self.ctx.store, &self.job_id, first, &owner, Patience::claim(self.ctx.resources.ack_wait())).await;
        let (next, revision, replaced) = match delivered {
            Ok(Claimed::Written { record, revision, replaced }) => (*record, revision, replaced),
            Ok(Claimed::Ended(record)) => {
                let last = store::last_event(&*self.ctx.store, &self.job_id).await?;
                let publish = match end_to_republish(last.as_ref()) {
                    EndToRepublish::EndingAndFeed => Publish::EndingAndFeed,
                    EndToRepublish::FeedOnly => Publish::FeedOnly,
                };
                if !self.finish(&record, publish).await {
                    return Ok(Some(DeliveryEnd::Abandoned));
                }
                self.ack(AckKind::Ack).await;
                return Ok(Some(DeliveryEnd::Terminal(record.state)));
            }
            Err(CasError::Missing { .. }) => return Ok(Some(self.without_record().await)),
            Err(e) => return Err(e),
        };
        if next.state == JobState::Running {
            self.attempt = next.attempt;
            self.current = Some(Versioned { record: next, revision });
            if let Some(previous) = replaced {
                self.announce_retry(&previous).await;
            }
            return Ok(None);
        }
        // Ended before it ran: cancelled, past its deadline, or out of attempts.
        self.finish_metrics(&next);
        if !self.finish(&next, Publish::EndingAndFeed).await {
            return Ok(Some(DeliveryEnd::Abandoned));
        }
        self.ack(AckKind::Ack).await;
        Ok(Some(DeliveryEnd::Terminal(next.state)))
    }

    /// Publishes this attempt's `retrying` event (when it is not the first) and waits until it
    /// is stored, so the history says why the attempt runs before its `running` does. Only
    /// retried attempts pay the round trip. Where the previous attempt was still `running`,
    /// its owner's registry entry tells a lost node from a live one that went silent.
    async fn announce_retry(&mut self, previous: &JobRecord) {
        let life = match (&previous.state, &previous.owner) {
            (JobState::Running, Some(owner)) => self.owner_life(previous, &owner.node).await,
            _ => OwnerLife::Unknown,
        };
        let Some((reason, message)) = retry_reason::why_next_attempt(previous, life) else { return };
        tracing::info!(job_id = %self.job_id, attempt = self.attempt, reason = reason.as_str(), %message, "retrying");
        let error = if previous.state == JobState::Retrying { previous.error.clone() } else { None };
        let event = Event::retrying(&self.job_id, self.attempt, reason, message, error).labelled(&previous.labels);
        self.events_sent += 1;
        let msg_id = format!("{}-a{}-e{}", self.job_id, self.attempt, self.events_sent);
        ensure_stored(self.ctx.store.clone(), &self.job_id, PendingEvent { event, msg_id, ack: None }, &self.last_seq).await;
    }

    /// What the registry (read from the server, not the cache) says about the life of `node`,
    /// which owned the `previous` attempt.
    async fn owner_life(&self, previous: &JobRecord, node: &str) -> OwnerLife {
        let entry = match self.ctx.resources.node_entry_fresh(node).await {
            Ok(entry) => entry,
            Err(_) => return OwnerLife::Unknown,
        };
        let handed_back = match &entry {
            Some(e) => self.ctx.resources.claim_exists(&kiln_core::nats::lost_claim_key(node, e.started_ms)).await.unwrap_or(false),
            None => false,
        };
        retry_reason::owner_life(previous.started_ms, entry.map(|e| e.started_ms), handed_back)
    }

    /// Waits (once) until the node's registry entry lists this delivery: nothing is claimed or
    /// written before a survivor could hand it back.
    async fn await_listing(&mut self) {
        if let Some(listed) = self.listed.take() {
            if tokio::time::timeout(LISTING_WAIT, listed).await.is_err() {
                tracing::warn!(job_id = %self.job_id, "the registry does not list this delivery yet; claiming anyway");
            }
        }
    }

    /// The job's record ([`read_record_awaiting`]).
    async fn get_job_awaiting_record(&self) -> Result<Option<Versioned>, StoreError> {
        read_record_awaiting(&*self.ctx.store, &self.job_id, self.redelivered()).await
    }

    /// Whether JetStream delivered this message before.
    fn redelivered(&self) -> bool {
        self.message.info().is_ok_and(|i| i.delivered > 1)
    }

    /// A queue message with no job record: its submission is still under way (hand it back
    /// and look again in a second), or it died between the enqueue and the record, long ago
    /// (drop the message: nobody was told of this job).
    async fn without_record(&self) -> DeliveryEnd {
        let age = self
            .message
            .info()
            .map(|i| {
                let published_ms = (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                Duration::from_millis(kiln_core::now_ms().saturating_sub(published_ms))
            })
            .unwrap_or_default();
        let delivered = self.message.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let ack = without_record_ack(&NakLadder::new(self.retry_backoff), age, delivered);
        match ack {
            AckKind::Term => {
                tracing::warn!(job_id = %self.job_id, age_s = age.as_secs(), "queue message without a job record (its submission died, or the record expired); dropping it")
            }
            AckKind::Nak(delay) => {
                let delay_ms = delay.unwrap_or_default().as_millis() as u64;
                tracing::debug!(job_id = %self.job_id, age_ms = age.as_millis() as u64, delay_ms, "no job record yet; looking again later");
            }
            _ => {}
        }
        self.ack(ack).await;
        DeliveryEnd::Abandoned
    }

    /// Writes `change(record)` with compare-and-set, starting from the record this attempt
    /// holds. When it loses, it re-reads: if this attempt no longer owns the job it is fenced
    /// and writes nothing; if only a cancel request landed (the only change the API makes to a
    /// running job), the change applies on top of it and the cancel reaches the engine's token.
    async fn write(&mut self, change: impl Fn(&JobRecord) -> Result<JobRecord, Refused>) -> Result<WriteResult, CasError> {
        let held = self.current.clone().expect("claimed");
        let written = write_as_owner(&*self.ctx.store, &self.job_id, held, self.attempt, &self.cancel, change).await?;
        if let WriteResult::Written(v) = &written {
            self.current = Some(Versioned::clone(v));
        }
        Ok(written)
    }

    /// Keeps the delivery alive while the attempt runs, and watches for this process having
    /// stood still. JetStream redelivers after ack_wait without news: this tells it we are
    /// alive. Each tick also re-reads the record, so a cancel whose core-NATS notice was lost
    /// still lands.
    ///
    /// After this process stood still (SIGSTOP, a paused VM) the job may have been handed to
    /// another node meanwhile: it re-reads the record at once, and if another attempt owns
    /// the job (or it ended without this one) this attempt is fenced and stops without
    /// writing. It runs until the delivery is acked, through the conclusion (whose writes may
    /// ride out an election for seconds), where the record may show this attempt's own
    /// outcome: [`job::watch`] tells the two apart.
    pub(crate) fn keep_alive(&self) -> TaskGuard<()> {
        let delivery = self.message.clone();
        let period = self.ctx.resources.ack_wait() / 3;
        let store = self.ctx.store.clone();
        let watch = AttemptWatch {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            owner: Owner { node: self.ctx.node.clone(), slot: self.slot.clone() },
            cancel: self.cancel.clone(),
            fenced: self.fenced.clone(),
            concluding: self.concluding.clone(),
        };
        let stall = self.ctx.stall.clone();
        task::spawn(TaskKind::JobKeepAlive, "keep-alive", async move {
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
                if watch.look(&*store, stalled).await == Looked::Superseded {
                    return;
                }
            }
        })
    }

    pub(crate) async fn conclude(
        &mut self,
        record: &JobRecord,
        outcome: Result<Vec<Artifact>, EngineError>,
        started: Instant,
    ) -> DeliveryEnd {
        // Set before the fence is checked: a ticker that reads the record after this sees
        // either this attempt still running or its own outcome, never a takeover that is not.
        self.concluding.store(true, Ordering::Release);
        if self.fenced.load(Ordering::Acquire) {
            if let Ok(artifacts) = &outcome {
                self.remove_artifacts(&record.model, artifacts).await;
            }
            return DeliveryEnd::Fenced;
        }
        let attempt_outcome = match &outcome {
            Ok(_) => m::Outcome::Completed,
            Err(EngineError::Cancelled) => m::Outcome::Cancelled,
            Err(_) => m::Outcome::Failed,
        };
        metrics::histogram!(m::RUN_SECONDS, "model" => record.model.clone(), "outcome" => attempt_outcome.as_str())
            .record(started.elapsed().as_secs_f64());
        let outcome = match outcome {
            Ok(artifacts) => Outcome::Completed { artifacts },
            Err(EngineError::Cancelled) => Outcome::Cancelled,
            Err(e) => {
                let code = if matches!(e, EngineError::User(_)) { ErrorCode::BadRequest } else { ErrorCode::EngineFailed };
                let error = ApiError::new(code, truncate(self.ctx.without_node_paths(&e.to_string()), MAX_EVENT_MESSAGE_BYTES));
                tracing::info!(job_id = %self.job_id, attempt = self.attempt, error = %e, "attempt failed");
                Outcome::Failed { error, kind: e.failure_kind() }
            }
        };
        let artifacts = match &outcome {
            Outcome::Completed { artifacts } => artifacts.clone(),
            _ => vec![],
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
        let (attempt, owner) = (self.attempt, Owner { node: self.ctx.node.clone(), slot: self.slot.clone() });
        let written = self.write(|r| job::conclude(r, attempt, &owner, &outcome, kiln_core::now_ms())).await;
        match written {
            Ok(WriteResult::Written(_)) => {}
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
        if record.state == JobState::Retrying {
            metrics::counter!(m::JOB_RETRIES, "model" => record.model.clone()).increment(1);
            let mut event = Event::status(&self.job_id, self.attempt, JobState::Retrying);
            if let Some(e) = &record.error {
                event = event.with_error(e.clone());
            }
            self.event(event).await;
            self.flush_events().await;
            let delay = NakLadder::new(self.retry_backoff).delay(Nak::Retry { attempt: self.attempt });
            self.ack(AckKind::Nak(Some(delay))).await;
            return DeliveryEnd::Retrying;
        }
        kiln_core::fault::abort_at("abort_after_terminal_write");
        self.finish_metrics(&record);
        if !self.finish(&record, Publish::EndingAndFeed).await {
            return DeliveryEnd::Abandoned;
        }
        self.ack(AckKind::Ack).await;
        DeliveryEnd::Terminal(record.state)
    }

    /// Publishes one `artifact` event per artifact, fenced on the job's last event
    /// ([`announce_artifacts`]).
    async fn announce_artifacts(&self, artifacts: &[Artifact]) -> Result<bool, StoreError> {
        let labels = self.current.as_ref().map(|c| &c.record.labels).cloned().unwrap_or_default();
        let own = self.last_seq.load(Ordering::Acquire);
        announce_artifacts(&*self.ctx.store, &self.job_id, self.attempt, own, &labels, artifacts).await
    }

    /// Deletes the objects a fenced attempt stored under its own names (nothing refers to
    /// them); they would expire with the bucket's TTL anyway.
    async fn remove_artifacts(&self, model: &str, artifacts: &[Artifact]) {
        for artifact in artifacts {
            if let Err(e) = self.ctx.store.delete_artifact(model, artifact).await {
                tracing::debug!(job_id = %self.job_id, object = %artifact.object, error = %e, "cannot remove a fenced attempt's artifact");
            }
        }
    }

    fn finish_metrics(&self, record: &JobRecord) {
        if let Some(outcome) = m::Outcome::of_state(record.state) {
            metrics::counter!(m::JOBS_FINISHED, "model" => record.model.clone(), "outcome" => outcome.as_str()).increment(1);
        }
    }
}

/// The pipeline's events go into the attempt's history like the delivery's own.
impl AttemptEvents for Delivery {
    async fn event(&mut self, event: Event) {
        Delivery::event(self, event).await
    }

    fn progress_order(&self) -> ProgressOrder {
        ProgressOrder { store: self.ctx.store.clone(), running_stored: self.running_stored(), last_seq: self.last_seq() }
    }
}

/// How a claim ended ([`claim_record`]).
#[derive(Debug)]
enum Claimed {
    /// This delivery's change is stored at `revision`: the claim of the next attempt, or an
    /// ending before a run (cancelled, past its deadline, out of attempts). `replaced`: the
    /// record it replaced, whose previous attempt is the reason of this one.
    Written { record: Box<JobRecord>, revision: u64, replaced: Option<Box<JobRecord>> },
    /// The record had ended already (a crash came between its terminal write and its event
    /// or ack): nothing written.
    Ended(Box<JobRecord>),
}

/// Claims the job for `owner` by [`job::apply_delivery`], with compare-and-set from `first`
/// (the record as read); a lost round re-reads (from the leader) and decides again. NATS
/// trouble is ridden out within `patience` ([`Patience::claim`]): a claim whose answer was
/// lost is found landed by the re-read and is this delivery's.
/// `CasError::Missing` when the record is gone.
async fn claim_record(
    store: &dyn JobStore,
    job_id: &str,
    first: Versioned,
    owner: &Owner,
    patience: Patience,
) -> Result<Claimed, CasError> {
    // The record the winning claim replaced: what it says about the previous attempt is the
    // reason of this one (its `retrying` event).
    let replaced = std::sync::Mutex::new(None::<JobRecord>);
    let delivered = cas::update_patiently(
        job_id,
        Some(first.into_pair()),
        patience,
        // A lost round's re-read is the leader's: see `JobStore::get_job_latest`.
        || async { Ok(store.get_job_latest(job_id).await?.map(Versioned::into_pair)) },
        |next, revision| async move { store.update_job(&next, revision).await },
        |record| match job::apply_delivery(record, owner, kiln_core::now_ms()) {
            Ok(next) => {
                *replaced.lock().expect("not poisoned") = Some(record.clone());
                Step::Write(next)
            }
            // Only an ended record is refused.
            Err(_) => Step::Stop(record.clone()),
        },
    )
    .await?;
    Ok(match delivered {
        Updated::Written { value, revision } => {
            Claimed::Written { record: Box::new(value), revision, replaced: replaced.into_inner().expect("not poisoned").map(Box::new) }
        }
        Updated::Stopped(record) => Claimed::Ended(Box::new(record)),
    })
}

/// The job's record, re-read after each of [`RECORD_RACE_WAITS`] when it is missing on a first
/// delivery: the API writes it just after the enqueue, and this node may have been faster. A
/// redelivered message was already waited for once: one read (an orphan's redeliveries must
/// not hold a slot for 63 ms each).
async fn read_record_awaiting(store: &dyn JobStore, job_id: &str, redelivered: bool) -> Result<Option<Versioned>, StoreError> {
    let waits: &[Duration] = if redelivered { &[] } else { &RECORD_RACE_WAITS };
    for &wait in waits {
        if let Some(v) = store.get_job(job_id).await? {
            return Ok(Some(v));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    store.get_job(job_id).await
}

/// What becomes of a queue message without a job record, `age` after it was enqueued, at its
/// delivery number `delivered`: its submission may still be under way (hand it back for the
/// ladder's [`Nak::NoRecordYet`] delay), or it died between the enqueue and the record, long
/// ago (older than [`ORPHAN_AFTER`]: drop it, nobody was told of this job).
fn without_record_ack(ladder: &NakLadder, age: Duration, delivered: u32) -> AckKind {
    if age > ORPHAN_AFTER {
        AckKind::Term
    } else {
        AckKind::Nak(Some(ladder.delay(Nak::NoRecordYet { delivered })))
    }
}

/// Writes `change(record)` with compare-and-set as attempt `attempt`, starting from `held`
/// (the record it last wrote). When it loses, it re-reads: if the attempt no longer owns the
/// job it is fenced and writes nothing; if only a cancel request landed (the only change the
/// API makes to a running job), the change applies on top of it and `cancel` is cancelled.
/// Rides out a leaderless `KV_kiln_jobs` ([`Patience::NATS_TROUBLE`]): giving up left the job
/// for redelivery, and its model ran again (an outside storm). Each retry decides again on the
/// record as it is; a write whose reply was lost is recognised as its own when read back.
async fn write_as_owner(
    store: &dyn JobStore,
    job_id: &str,
    held: Versioned,
    attempt: u32,
    cancel: &CancellationToken,
    change: impl Fn(&JobRecord) -> Result<JobRecord, Refused>,
) -> Result<WriteResult, CasError> {
    let Some(owner) = held.record.owner.clone() else { return Ok(WriteResult::Fenced) };
    let written = store::update_job_patiently(store, job_id, Some(held), Patience::NATS_TROUBLE, |record| {
        if !job::owned_by(record, attempt, &owner) {
            return Step::Stop(());
        }
        change(record).map_or(Step::Stop(()), Step::Write)
    })
    .await;
    match written {
        Ok(Updated::Written { value, revision }) => {
            if value.cancel_requested {
                cancel.cancel();
            }
            Ok(WriteResult::Written(Box::new(Versioned { record: value, revision })))
        }
        Ok(Updated::Stopped(())) | Err(CasError::Missing { .. }) => Ok(WriteResult::Fenced),
        Err(e) => Err(e),
    }
}

/// What the keep-alive knows of the attempt it keeps alive, to look at its record.
struct AttemptWatch {
    job_id: String,
    attempt: u32,
    owner: Owner,
    /// Cancelled on a cancel request, or when another attempt owns the job.
    cancel: CancellationToken,
    /// Set when another attempt owns the job (the delivery's `fenced`).
    fenced: Arc<AtomicBool>,
    /// The delivery's `concluding`: its own outcome may be in the record.
    concluding: Arc<AtomicBool>,
}

/// What a look at the record found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Looked {
    /// The attempt still owns the job (or the record shows its own outcome, or it could not
    /// be read): keep going.
    Running,
    /// Another attempt owns the job, or it ended without this one: fenced, cancelled, stop.
    Superseded,
}

impl AttemptWatch {
    /// Re-reads the record and acts on [`job::watch`]: a cancel request cancels the attempt's
    /// token (so a cancel whose core-NATS notice was lost still lands); a takeover fences it.
    /// `stalled`: the look comes after this process stood still (for the log).
    async fn look(&self, store: &dyn JobStore, stalled: bool) -> Looked {
        // From the leader: a lagging replica's record from before this attempt's claim would
        // read as a takeover and stop a running attempt.
        let Ok(Some(v)) = store.get_job_latest(&self.job_id).await else { return Looked::Running };
        // Read after the record: an outcome this attempt wrote is seen with the flag set.
        match job::watch(&v.record, self.attempt, &self.owner, self.concluding.load(Ordering::Acquire)) {
            job::Watched::Owned { cancel_requested } => {
                if cancel_requested {
                    self.cancel.cancel();
                }
                Looked::Running
            }
            job::Watched::OwnOutcome => Looked::Running,
            job::Watched::Superseded => {
                tracing::warn!(
                    job_id = %self.job_id,
                    attempt = self.attempt,
                    stalled,
                    record_attempt = v.record.attempt,
                    record_state = v.record.state.as_str(),
                    "the job's record moved on without this attempt (another attempt owns it, or it ended); stopping this one"
                );
                self.fenced.store(true, Ordering::Release);
                self.cancel.cancel();
                Looked::Superseded
            }
        }
    }
}

/// Publishes one `artifact` event per artifact of attempt `attempt`, each stored only if the job's last event is
/// still one this attempt may follow (`Nats-Expected-Last-Subject-Sequence`): its own, the
/// API's, or a late one of an older fenced attempt. A newer attempt's event or an ending
/// in between means this attempt is fenced: false. So a fenced attempt that resumes after
/// the job ended can add no artifact to its history (an outside storm saw two late
/// artifact events after `completed`).
/// `own`: the sequence of the attempt's own newest stored event (0: unknown).
async fn announce_artifacts(
    store: &dyn JobStore,
    job_id: &str,
    attempt: u32,
    own: u64,
    labels: &kiln_core::protocol::Labels,
    artifacts: &[Artifact],
) -> Result<bool, StoreError> {
    let may_follow = |e: &Event| !e.is_terminal() && e.attempt <= attempt;
    // The first artifact not known to be announced, and the sequence to chain after
    // (`None`: read the job's last event first). A NATS error (a server restart) re-reads
    // and goes on where the stored history says, as long as `Patience::NATS_TROUBLE` allows.
    // Chained onto this attempt's own newest event when its sequence is known (every event
    // is flushed by now): no read on the critical path. A mismatch re-reads as below.
    let (mut next, mut after, mut failures) = (0usize, (own > 0).then_some(own), 0u32);
    let started = tokio::time::Instant::now();
    let patience = Patience::NATS_TROUBLE;
    loop {
        let seq = match after {
            Some(seq) => seq,
            None => match store.last_event_with_seq(job_id).await {
                Ok(Some((seq, last))) => {
                    if !may_follow(&last) {
                        return Ok(false);
                    }
                    // This attempt's own artifact event last: stored, though its ack was lost.
                    if last.attempt == attempt {
                        if let Some(j) = last.artifact.as_ref().and_then(|a| artifacts.iter().position(|x| x.object == a.object)) {
                            next = next.max(j + 1);
                        }
                    }
                    seq
                }
                Ok(None) => return Ok(false),
                Err(e) => {
                    failures += 1;
                    match patience.pause(failures, started.elapsed()) {
                        Some(pause) if e.is_transient() => tokio::time::sleep(pause).await,
                        _ => return Err(e),
                    }
                    continue;
                }
            },
        };
        let Some(artifact) = artifacts.get(next) else { return Ok(true) };
        let event = Event::artifact(job_id, attempt, artifact.clone()).labelled(labels);
        match store.publish_event_after(&event, seq).await {
            Ok(Some(stored)) => {
                after = Some(stored);
                next += 1;
            }
            // Something was stored in between: re-read to tell this attempt's own lost
            // ack, a late event that may be followed, and a fence apart.
            Ok(None) => after = None,
            Err(e) => {
                failures += 1;
                match patience.pause(failures, started.elapsed()) {
                    Some(pause) if e.is_transient() => tokio::time::sleep(pause).await,
                    _ => return Err(e),
                }
                after = None;
            }
        }
    }
}

/// Event messages and error messages are bounded so that what a worker prints cannot
/// approach the NATS payload limit in an event or a job record.
pub(crate) fn truncate(s: String, max: usize) -> String {
    kiln_core::protocol::truncate_utf8(s, max)
}

// In-process tests of the above on the in-memory job store, with paused time: fencing, the
// NAK ladder, cancel (`delivery/tests.rs`).
#[cfg(test)]
mod tests;
