//! Batch parent records in KV (`kiln_batches`) and settling a child's end into its batch.
//!
//! Order matters for the event history of a batch (`kiln.events.<batch_id>`): a settler
//! publishes its `item_*` event *before* its compare-and-set on the parent, and the settler
//! whose write finishes the batch publishes `batch_finished` *after* it. The finishing write
//! can only happen once every item's write has, so every item event is stored before the
//! batch's last one. Events carry de-duplication ids, so a settle repeated after a crash
//! does not show an item twice.

use std::time::Duration;

use async_nats::jetstream::kv;

use super::{Resources, StoreError};
use crate::batch::{BatchRecord, Settle};
use crate::job::JobRecord;
use crate::protocol::Event;

/// Compare-and-set rounds before settling gives up (and the child's delivery is left unacked,
/// to be settled by its redelivery). Items of one batch finish on many slots at once.
const SETTLE_ROUNDS: usize = 64;

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

    /// Records a child job's terminal state in its batch, publishing the item's event and, when
    /// it was the last item, the batch's. Idempotent; a no-op for a job that is not a batch
    /// item or not terminal. Callers settle *before* acking the child's delivery and leave it
    /// unacked when this fails, so the redelivery settles again.
    pub async fn settle_batch_item(&self, child: &JobRecord) -> Result<(), StoreError> {
        let Some(parent) = &child.parent else { return Ok(()) };
        if !child.is_terminal() {
            return Ok(());
        }
        let mut item_event_published = false;
        for round in 0..SETTLE_ROUNDS {
            let Some((mut batch, revision)) = self.get_batch(&parent.batch_id).await? else {
                tracing::warn!(job_id = %child.job_id, batch_id = %parent.batch_id, "the job's batch is gone (expired?); nothing to settle");
                return Ok(());
            };
            match batch.settle(parent.index, &child.job_id, child.state, crate::now_ms()) {
                Settle::UnknownItem => {
                    tracing::warn!(job_id = %child.job_id, batch_id = %parent.batch_id, index = parent.index, "the batch lists no such item");
                    return Ok(());
                }
                Settle::Already { finished } => {
                    if finished {
                        self.publish_batch_finished(&batch).await?;
                    }
                    return Ok(());
                }
                Settle::Settled { finished } => {
                    if !item_event_published {
                        let event = Event::batch_item(&batch.batch_id, parent.index, child);
                        let id = format!("{}-item-{}", batch.batch_id, parent.index);
                        self.publish_event_with_id(&event, Some(&id)).await?;
                        item_event_published = true;
                    }
                    match self.update_batch(&batch, revision).await {
                        Ok(_) => {
                            if finished {
                                self.publish_batch_finished(&batch).await?;
                            }
                            return Ok(());
                        }
                        Err(StoreError::Conflict) => {
                            // Another item settled at the same moment: re-read and try again,
                            // after a short pause that grows and is spread by the round.
                            let pause = 1 + (round as u64 % 8) + (crate::now_ms() % 5);
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(StoreError::Nats(format!("batch {} kept changing while settling an item", parent.batch_id)))
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
