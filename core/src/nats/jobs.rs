//! The job record in KV (`kiln_jobs`) and the durable queue (`KILN_JOBS`).
//!
//! The record is the source of truth. After creation every write is a compare-and-set on the
//! revision the writer read, which is how a stale attempt is fenced: its revision is old, its
//! write is refused, and it stops without acking. Writers change a record with
//! [`Resources::update_job_with`] (or [`super::cas::update_with`] directly when the read or
//! the write needs more), deciding by the pure changes of [`crate::job`].

use async_nats::jetstream::kv;

use super::cas::{self, CasError, Step, Updated};
use super::{Lane, Resources, StoreError};
use crate::job::JobRecord;

/// A record and the KV revision it was read at (the token for the next compare-and-set).
#[derive(Debug, Clone)]
pub struct Versioned {
    pub record: JobRecord,
    pub revision: u64,
}

impl Versioned {
    /// The record and its revision, as [`cas::update_with`] takes and reads them.
    pub fn into_pair(self) -> (JobRecord, u64) {
        (self.record, self.revision)
    }
}

/// The queue message: only the id. The record holds the rest, so a retry never runs a stale copy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QueueMessage {
    pub job_id: String,
}

fn encode(record: &JobRecord) -> bytes::Bytes {
    serde_json::to_vec(record).expect("a job record always serializes").into()
}

impl Resources {
    /// Creates a record that must not exist yet; `AlreadyExists` when it does (idempotency).
    pub async fn create_job(&self, record: &JobRecord) -> Result<u64, StoreError> {
        match self.jobs_kv.create(&record.job_id, encode(record)).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(StoreError::AlreadyExists),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    pub async fn get_job(&self, job_id: &str) -> Result<Option<Versioned>, StoreError> {
        let entry = self.jobs_kv.entry(job_id).await.map_err(StoreError::nats)?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value).map_err(|err| StoreError::Decode(err.to_string()))?;
                Ok(Some(Versioned { record, revision: e.revision }))
            }
            _ => Ok(None),
        }
    }

    /// Compare-and-set: writes `record` only if the stored revision is still `revision`.
    pub async fn update_job(&self, record: &JobRecord, revision: u64) -> Result<u64, StoreError> {
        match self.jobs_kv.update(&record.job_id, encode(record), revision).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    /// Changes the job's record by `decide` (a pure change of [`crate::job`]) with
    /// compare-and-set, reading and deciding again when another writer got in between.
    /// `held`: the record and revision the caller already has, decided on without a read.
    pub async fn update_job_with<R>(
        &self,
        job_id: &str,
        held: Option<Versioned>,
        decide: impl FnMut(&JobRecord) -> Step<JobRecord, R>,
    ) -> Result<Updated<JobRecord, R>, CasError> {
        cas::update_with(
            job_id,
            held.map(Versioned::into_pair),
            || async { Ok(self.get_job(job_id).await?.map(Versioned::into_pair)) },
            |next, revision| async move { self.update_job(&next, revision).await },
            decide,
        )
        .await
    }

    /// Every job id in the bucket (for listing; O(jobs), bounded by the record TTL).
    pub async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let keys = self.jobs_kv.keys().await.map_err(StoreError::nats)?;
        keys.try_collect().await.map_err(StoreError::nats)
    }

    /// Publishes the job to its model's queue lane and waits for the stream's ack, so the job is
    /// durable when this returns. `Nats-Msg-Id` = job id: a second publish within the
    /// de-duplication window is dropped by the server.
    pub async fn enqueue(&self, job_id: &str, model: &str, priority: u8) -> Result<(), StoreError> {
        self.enqueue_nowait(job_id, model, priority).await?.await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// As [`enqueue`](Self::enqueue), without waiting for the ack: the job is durable once the
    /// returned future resolves.
    pub async fn enqueue_nowait(
        &self,
        job_id: &str,
        model: &str,
        priority: u8,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, job_id);
        let body = serde_json::to_vec(&QueueMessage { job_id: job_id.to_string() }).expect("serializes");
        self.js
            .publish_with_headers(self.names.job_subject(model, Lane::of_priority(priority)), headers, body.into())
            .await
            .map_err(StoreError::nats)
    }
}
