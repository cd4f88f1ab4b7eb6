//! Batch parent records in KV (`kiln_batches`) and settling a child's end into its batch.
//!
//! Order matters for the event history of a batch (`kiln.events.<batch_id>`): a settler
//! publishes its `item_*` event *before* its compare-and-set on the parent, and the settler
//! whose write finishes the batch publishes `batch_finished` *after* it. The finishing write
//! can only happen once every item's write has, so every item event is stored before the
//! batch's last one. Events carry de-duplication ids, so a settle repeated after a crash
//! does not show an item twice. A settle that gives up (its batch kept changing, or NATS
//! failed) leaves the child's delivery unacked, and the redelivery settles it.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::kv;

use super::cas::{self, CasError, Step, Updated};
use super::{Resources, StoreError};
use crate::batch::{BatchRecord, Settle};
use crate::job::JobRecord;
use crate::protocol::{Event, EventKind};

/// Why settling wrote nothing.
enum NotSettled {
    /// The item was settled before (a redelivery settling again): the batch as it is.
    Already(BatchRecord),
    /// The batch has no such item (a stale or forged parent reference).
    UnknownItem,
}

fn encode(record: &BatchRecord) -> bytes::Bytes {
    serde_json::to_vec(record).expect("a batch record always serializes").into()
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

    pub async fn update_batch(&self, record: &BatchRecord, revision: u64) -> Result<u64, StoreError> {
        match self.batches_kv.update(&record.batch_id, encode(record), revision).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::nats(e)),
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
            || self.get_batch(batch_id),
            |next, revision| async move { self.update_batch(&next, revision).await },
            decide,
        )
        .await
    }

    /// Records a child job's terminal state in its batch, publishing the item's event and, when
    /// it was the last item, the batch's. Idempotent; a no-op for a job that is not a batch
    /// item or not terminal. Callers settle *before* acking the child's delivery and leave it
    /// unacked when this fails, so the redelivery settles again.
    pub async fn settle_batch_item(&self, child: &JobRecord) -> Result<(), CasError> {
        let Some(parent) = &child.parent else { return Ok(()) };
        if !child.is_terminal() {
            return Ok(());
        }
        let item_event_published = AtomicBool::new(false);
        let item_event_published = &item_event_published;
        let settled = cas::update_with(
            &parent.batch_id,
            None,
            || self.get_batch(&parent.batch_id),
            // The item's event goes out before the write that counts the item (see the module
            // docs), once however many rounds the write takes.
            |batch, revision| async move {
                if !item_event_published.load(Ordering::Relaxed) {
                    let event = Event::batch_item(&batch.batch_id, parent.index, child);
                    let id = format!("{}-item-{}", batch.batch_id, parent.index);
                    self.publish_event_with_id(&event, Some(&id)).await?;
                    item_event_published.store(true, Ordering::Relaxed);
                }
                self.update_batch(&batch, revision).await
            },
            |batch| {
                let mut next = batch.clone();
                match next.settle(parent.index, &child.job_id, child.state, crate::now_ms()) {
                    Settle::Settled { .. } => Step::Write(next),
                    Settle::Already { .. } => Step::Stop(NotSettled::Already(next)),
                    Settle::UnknownItem => Step::Stop(NotSettled::UnknownItem),
                }
            },
        )
        .await;
        match settled {
            // The settle that finished the batch, or a repeat of it after a crash, ends the
            // batch's history.
            Ok(Updated::Written { value: batch, .. }) => {
                self.publish_batch_progress(&batch, parent.index).await?;
                if batch.is_finished() {
                    self.publish_batch_finished(&batch).await?;
                }
            }
            Ok(Updated::Stopped(NotSettled::Already(batch))) => {
                if batch.is_finished() {
                    self.publish_batch_finished(&batch).await?;
                }
            }
            Ok(Updated::Stopped(NotSettled::UnknownItem)) => {
                tracing::warn!(job_id = %child.job_id, batch_id = %parent.batch_id, index = parent.index, "the batch lists no such item");
            }
            Err(CasError::Missing { .. }) => {
                tracing::warn!(job_id = %child.job_id, batch_id = %parent.batch_id, "the job's batch is gone (expired?); nothing to settle");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// A `batch_progress` event with the counts `batch` was written with, stored only while
    /// the batch's history has not ended (`Nats-Expected-Last-Subject-Sequence` on the last
    /// event read): a settle racing the one that finished the batch must not add anything after
    /// `batch_finished`. Two concurrent settles may store their counts out of order (a client
    /// keeps the largest); a settle repeated after a crash may be missing one (the next item's
    /// or `batch_finished` has the counts).
    async fn publish_batch_progress(&self, batch: &BatchRecord, index: u32) -> Result<(), StoreError> {
        let event = Event::batch_progress(&batch.batch_id, batch.summary());
        for _ in 0..5 {
            let Some((seq, last)) = self.last_event_with_seq(&batch.batch_id).await? else { return Ok(()) };
            if last.is_terminal() || (last.kind == EventKind::BatchProgress && last.summary == event.summary) {
                return Ok(());
            }
            if self.publish_event_after(&event, seq).await?.is_some() {
                return Ok(());
            }
        }
        tracing::debug!(batch_id = %batch.batch_id, index, "batch_progress not stored: the batch's history kept moving");
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
