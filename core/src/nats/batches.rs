//! Batch parent records in KV (`kiln_batches`), settling a child's end into its batch, and
//! making the jobs a batch launches after its submission (held items, fallbacks).
//!
//! Order matters for the event history of a batch (`kiln.events.<batch_id>`): a settler
//! publishes its `item_*` events *before* its compare-and-set on the parent, and the settler
//! whose write finishes the batch publishes `batch_finished` *after* it. The finishing write
//! can only happen once every item's write has, so every item event is stored before the
//! batch's last one. Events carry de-duplication ids (`<batch>-item-<index>`), so a settle
//! repeated after a crash does not show an item twice; one write may end several items (items
//! sharing a job), each with its own event. A settle that gives up (its batch kept changing,
//! or NATS failed) leaves the child's delivery unacked, and the redelivery settles it.
//!
//! Jobs a settle launches (the next held items, a fallback) are listed in the record by its
//! write and made after it, from the batch's plan (`<plan prefix><batch_id>` in the same
//! bucket) through [`Resources::launch_job`]. A crash in between leaves the child unacked; its
//! redelivery settles again, finds its end recorded ([`Settle::Already`]) and makes the jobs
//! that end launched, which a derived id and `launch_job`'s checks make at most once.

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_nats::jetstream::kv;

use super::cas::{self, CasError, Step, Updated};
use super::{Resources, StoreError};
use crate::batch::{BatchPlan, BatchRecord, ChildEnd, Launch, Settle, Settled};
use crate::job::{JobRecord, JobState};
use crate::protocol::{Event, EventKind};

/// Key prefix of batch plans in `kiln_batches` (batch ids are tokens without `.`, so a plan's
/// key never names a batch).
const PLAN_PREFIX: &str = "plan.";

/// A batch record as an update goes through it: the record, and, once decided, the change.
#[derive(Clone)]
struct Change {
    record: BatchRecord,
    settled: Option<Settled>,
}

/// Two changes are the same when they store the same record (what a read finds: a change read
/// back has no `settled`).
impl PartialEq for Change {
    fn eq(&self, other: &Change) -> bool {
        self.record == other.record
    }
}

/// Why an update wrote nothing.
enum NotWritten {
    /// The change was recorded before (a redelivery settling again), or there was nothing to
    /// change: the batch as it is, and the jobs to make again if missing.
    Already(Box<BatchRecord>, Vec<Launch>),
    /// The batch has no such item (a stale or forged parent reference).
    UnknownItem,
}

fn encode<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).expect("batch records and plans always serialize").into()
}

impl Resources {
    pub async fn create_batch(&self, record: &BatchRecord) -> Result<u64, StoreError> {
        match self.batches_kv.create(&record.batch_id, encode(record)).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(StoreError::AlreadyExists),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    pub async fn get_batch(&self, batch_id: &str) -> Result<Option<(BatchRecord, u64)>, StoreError> {
        match self.batches_kv.entry(batch_id).await.map_err(StoreError::nats)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode(err.to_string()))?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// [`Resources::get_batch`] from the bucket's stream leader (`jobs::latest_entry`): what a
    /// settle decides on, since a lagging replica's "no such batch" would leave an item
    /// unsettled for ever and its old record would lose compare-and-set rounds.
    pub async fn get_batch_latest(&self, batch_id: &str) -> Result<Option<(BatchRecord, u64)>, StoreError> {
        let Some((payload, revision)) = super::jobs::latest_entry(&self.batches_kv, batch_id).await? else { return Ok(None) };
        let record = serde_json::from_slice(&payload).map_err(|err| StoreError::Decode(err.to_string()))?;
        Ok(Some((record, revision)))
    }

    pub async fn update_batch(&self, record: &BatchRecord, revision: u64) -> Result<u64, StoreError> {
        match self.batches_kv.update(&record.batch_id, encode(record), revision).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    /// Stores a batch's plan (it never changes), before its record: a record that needs its
    /// plan always finds it. A plan stored already (a resubmission) stays as it is.
    pub async fn create_batch_plan(&self, batch_id: &str, plan: &BatchPlan) -> Result<(), StoreError> {
        match self.batches_kv.create(&format!("{PLAN_PREFIX}{batch_id}"), encode(plan)).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    pub async fn get_batch_plan(&self, batch_id: &str) -> Result<Option<BatchPlan>, StoreError> {
        match self.batches_kv.entry(format!("{PLAN_PREFIX}{batch_id}")).await.map_err(StoreError::nats)? {
            Some(e) if e.operation == kv::Operation::Put => {
                serde_json::from_slice(&e.value).map(Some).map_err(|err| StoreError::Decode(err.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Changes the batch's record by `decide` with compare-and-set, reading and deciding again
    /// when another writer got in between.
    pub async fn update_batch_with<R>(
        &self,
        batch_id: &str,
        decide: impl FnMut(&BatchRecord) -> Step<BatchRecord, R>,
    ) -> Result<Updated<BatchRecord, R>, CasError> {
        cas::update_with(
            batch_id,
            None,
            || self.get_batch_latest(batch_id),
            |next, revision| async move { self.update_batch(&next, revision).await },
            decide,
        )
        .await
    }

    /// Records a child job's terminal state in its batch (`BatchRecord::settle`): publishes
    /// the events of the items that ended with it, makes the jobs it launched (held items, a
    /// fallback) and, when it was the last, publishes the batch's end. Idempotent; a no-op for
    /// a job that is not a batch item or not terminal. Callers settle *before* acking the
    /// child's delivery and leave it unacked when this fails, so the redelivery settles again.
    pub async fn settle_batch_item(&self, child: &JobRecord) -> Result<(), CasError> {
        let (Some(parent), Some(end)) = (&child.parent, ChildEnd::of(child)) else { return Ok(()) };
        match self.change_batch(&parent.batch_id, Some(child), |batch| batch.settle(&end, crate::now_ms())).await {
            Err(CasError::Missing { .. }) => {
                tracing::warn!(job_id = %child.job_id, batch_id = %parent.batch_id, "the job's batch is gone (expired?); nothing to settle");
                Ok(())
            }
            other => other,
        }
    }

    /// `cancel_batch`'s part on the record: first a write that stops every launch (held
    /// items, fallbacks), then, on the record as that write left it, the held items end
    /// cancelled (each with its item event; they never got a job). The caller then cancels the
    /// jobs that are open. A settle that comes between ends the held items itself.
    pub async fn cancel_batch_launches(&self, batch_id: &str) -> Result<(), CasError> {
        let now = crate::now_ms();
        self.update_batch_with(batch_id, |batch| {
            let mut next = batch.clone();
            if next.request_cancel(now) {
                Step::Write(next)
            } else {
                Step::Stop(())
            }
        })
        .await?;
        self.change_batch(batch_id, None, |batch| match batch.end_held(now) {
            Some(settled) => Settle::Settled(settled),
            None => Settle::Already { launch: vec![], finished: batch.is_finished() },
        })
        .await
    }

    /// One change of a batch's record by `decide` (a rule of `crate::batch`), with everything
    /// around its write in order: item events before it; after it, the jobs it launched, the
    /// batch's progress and, once finished, its end. `child`: the job whose end this settles
    /// (the items that end with it get its outcome in their events).
    async fn change_batch(
        &self,
        batch_id: &str,
        child: Option<&JobRecord>,
        mut decide: impl FnMut(&mut BatchRecord) -> Settle,
    ) -> Result<(), CasError> {
        let plan = tokio::sync::OnceCell::new();
        let plan = &plan;
        // Item events already stored by an earlier round of this update (a repeat would be
        // de-duplicated anyway; this saves the round trip).
        let published = Mutex::new(BTreeSet::new());
        let published = &published;
        let changed = cas::update_with(
            batch_id,
            None,
            || async { Ok(self.get_batch_latest(batch_id).await?.map(|(record, rev)| (Change { record, settled: None }, rev))) },
            // The items' events go out before the write that counts them (see the module docs).
            |change: Change, revision| async move {
                if let Some(settled) = &change.settled {
                    self.publish_item_events(&change.record, settled, child, plan, published).await?;
                }
                self.update_batch(&change.record, revision).await
            },
            |change| {
                let mut next = change.record.clone();
                match decide(&mut next) {
                    Settle::Settled(settled) => Step::Write(Change { record: next, settled: Some(settled) }),
                    Settle::Already { launch, .. } => Step::Stop(NotWritten::Already(Box::new(next), launch)),
                    Settle::UnknownItem => Step::Stop(NotWritten::UnknownItem),
                }
            },
        )
        .await;
        match changed? {
            Updated::Written { value: Change { record, settled: Some(settled) }, .. } => {
                if !settled.launch.is_empty() {
                    crate::fault::abort_at("abort_before_batch_launch");
                }
                self.launch_for_batch(&record, &settled.launch, plan).await?;
                if !settled.ended.is_empty() || !settled.cancelled.is_empty() {
                    self.publish_batch_progress(&record).await?;
                }
                // The change that finished the batch ends its history.
                if record.is_finished() {
                    self.publish_batch_finished(&record).await?;
                }
            }
            Updated::Written { .. } => {}
            Updated::Stopped(NotWritten::Already(record, launch)) => {
                // A repeat after a crash: what the first one may not have got to.
                self.launch_for_batch(&record, &launch, plan).await?;
                if record.is_finished() {
                    self.publish_batch_finished(&record).await?;
                }
            }
            Updated::Stopped(NotWritten::UnknownItem) => {
                let job_id = child.map(|c| c.job_id.as_str()).unwrap_or_default();
                tracing::warn!(job_id, batch_id, "the batch lists no such item");
            }
        }
        Ok(())
    }

    /// The item events of one change: an item that ended with `child` gets the child's
    /// outcome (and its own labels); a held item that ended cancelled gets a cancelled end. The
    /// publishes overlap; this returns once all are stored.
    async fn publish_item_events(
        &self,
        batch: &BatchRecord,
        settled: &Settled,
        child: Option<&JobRecord>,
        plan: &tokio::sync::OnceCell<Option<BatchPlan>>,
        published: &Mutex<BTreeSet<u32>>,
    ) -> Result<(), StoreError> {
        let todo: Vec<u32> = {
            let done = published.lock().expect("not poisoned");
            settled.ended.iter().chain(&settled.cancelled).copied().filter(|i| !done.contains(i)).collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        let now = crate::now_ms();
        let mut acks = Vec::with_capacity(todo.len());
        for index in &todo {
            let Some(item) = batch.items.iter().find(|i| i.index == *index) else { continue };
            let ended_with_child = child.filter(|c| c.job_id == item.job_id && settled.ended.contains(index));
            let record = match ended_with_child {
                Some(c) => c.clone(),
                None => {
                    // A held item cancelled: the job it would have had, ended before it ran.
                    let first = batch.items.iter().find(|i| i.job_id == item.job_id).map_or(item.index, |i| i.index);
                    let planned = self.plan_of(batch, plan).await?.and_then(|p| p.child_record(&batch.batch_id, first, item.model, now));
                    let base = planned.unwrap_or_else(|| JobRecord::queued(&item.job_id, batch.model_at(item.model), 1, now));
                    JobRecord {
                        state: JobState::Cancelled,
                        error: Some(crate::job::cancelled_before_run_error()),
                        finished_ms: Some(now),
                        ..base
                    }
                }
            };
            let mut event = Event::batch_item(&batch.batch_id, *index, &record);
            if let (Some(labels), Some(e)) = (&item.labels, event.item.as_mut()) {
                e.labels = labels.clone();
            }
            let id = format!("{}-item-{index}", batch.batch_id);
            acks.push(self.publish_event_nowait_with_id(&event, &id).await?);
        }
        for ack in futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await {
            ack.map_err(StoreError::nats)?;
        }
        published.lock().expect("not poisoned").extend(todo);
        Ok(())
    }

    /// The batch's plan, read once per update (`None` for a batch that keeps none).
    async fn plan_of<'p>(
        &self,
        batch: &BatchRecord,
        plan: &'p tokio::sync::OnceCell<Option<BatchPlan>>,
    ) -> Result<Option<&'p BatchPlan>, StoreError> {
        if !batch.has_plan() {
            return Ok(None);
        }
        let plan = plan.get_or_try_init(|| self.get_batch_plan(&batch.batch_id)).await?;
        Ok(plan.as_ref())
    }

    /// Makes the jobs a change launched, from the batch's plan (each at most once, however
    /// often this runs: derived ids, see [`Resources::launch_job`]).
    async fn launch_for_batch(
        &self,
        batch: &BatchRecord,
        launches: &[Launch],
        plan: &tokio::sync::OnceCell<Option<BatchPlan>>,
    ) -> Result<(), StoreError> {
        if launches.is_empty() {
            return Ok(());
        }
        let Some(plan) = self.plan_of(batch, plan).await? else {
            // Stored before the record and kept as long: only a hand-deleted plan gets here.
            tracing::error!(batch_id = %batch.batch_id, "the batch has no plan; cannot launch its next jobs");
            return Ok(());
        };
        let now = crate::now_ms();
        for launch in launches {
            let Some(child) = plan.child_record(&batch.batch_id, launch.index, launch.model, now) else {
                tracing::error!(batch_id = %batch.batch_id, index = launch.index, model = launch.model, "the batch's plan cannot make this job");
                continue;
            };
            debug_assert_eq!(child.job_id, launch.job_id);
            self.launch_job(&child).await?;
        }
        Ok(())
    }

    /// A `batch_progress` event with the counts `batch` was written with, stored only while
    /// the batch's history has not ended (`Nats-Expected-Last-Subject-Sequence` on the last
    /// event read): a settle racing the one that finished the batch must not add anything after
    /// `batch_finished`. Two concurrent settles may store their counts out of order (a client
    /// keeps the largest); a settle repeated after a crash may be missing one (the next item's
    /// or `batch_finished` has the counts).
    async fn publish_batch_progress(&self, batch: &BatchRecord) -> Result<(), StoreError> {
        let event = Event::batch_progress(&batch.batch_id, batch.summary());
        for _ in 0..crate::policy::BATCH_PROGRESS_TRIES {
            let Some((seq, last)) = self.last_event_with_seq(&batch.batch_id).await? else { return Ok(()) };
            if last.is_terminal() || (last.kind == EventKind::BatchProgress && last.summary == event.summary) {
                return Ok(());
            }
            if self.publish_event_after(&event, seq).await?.is_some() {
                return Ok(());
            }
        }
        tracing::debug!(batch_id = %batch.batch_id, "batch_progress not stored: the batch's history kept moving");
        Ok(())
    }

    /// The `batch_finished` event, de-duplicated, and published only if it is not already
    /// the batch's last event (a settle repeated long after the de-duplication window).
    async fn publish_batch_finished(&self, batch: &BatchRecord) -> Result<(), StoreError> {
        if self.last_event(&batch.batch_id).await?.is_some_and(|e| e.is_terminal()) {
            return Ok(());
        }
        let id = format!("{}-finished", batch.batch_id);
        self.publish_event_with_id(&Event::batch_finished(&batch.batch_id, batch.summary()), Some(&id)).await
    }
}
