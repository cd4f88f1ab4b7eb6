//! The job record in KV (`kiln_jobs`) and the durable queue (`KILN_JOBS`).
//!
//! The record is the source of truth. After creation every write is a compare-and-set on the
//! revision the writer read, which is how a stale attempt is fenced: its revision is old, its
//! write is refused, and it stops without acking. Writers change a record with
//! [`Resources::update_job_with`] (`crate::store`: the same update over any job store), or
//! [`super::cas::update_with`] directly when the read or the write needs more, deciding by the
//! pure changes of [`crate::job`].

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;

use super::{Lane, Resources, StoreError};
use crate::job::{JobRecord, JobState};
use crate::protocol::Event;

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

/// The header a KV bucket's stream marks a deleted or purged key with (`DEL`, `PURGE`).
const KV_OPERATION: &str = "KV-Operation";
/// The header of the marker a stream leaves where it removed a key's value itself (its
/// `MaxAge`, a `Purge`, a `Remove`): no value either.
const NATS_MARKER_REASON: &str = "Nats-Marker-Reason";

/// A KV key's value and revision as the bucket's stream leader has them: a stream message get
/// (`$JS.API.STREAM.MSG.GET`, which only the leader answers), not the direct get a KV read
/// takes, which any replica answers, one that lags behind too (a server rejoining after a
/// partition answered with a job record from before its claim). `None` for a key never
/// written, deleted or purged. A client whose server cannot reach the leader gets an error,
/// never an old copy.
pub(crate) async fn latest_entry(bucket: &kv::Store, key: &str) -> Result<Option<(bytes::Bytes, u64)>, StoreError> {
    let subject = format!("{}{}", bucket.prefix, key);
    match bucket.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => {
            let removed = message.headers.get(KV_OPERATION).is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
                || message.headers.get(NATS_MARKER_REASON).is_some();
            Ok((!removed).then_some((message.payload, message.sequence)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(StoreError::nats(e)),
    }
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

    /// The record as the bucket's stream leader has it ([`latest_entry`]), where
    /// [`Resources::get_job`] takes a direct get that any replica may answer, a lagging one
    /// too. For the decisions that must not act on an old record (see
    /// `JobStore::get_job_latest`).
    pub async fn get_job_latest(&self, job_id: &str) -> Result<Option<Versioned>, StoreError> {
        let Some((payload, revision)) = latest_entry(&self.jobs_kv, job_id).await? else { return Ok(None) };
        let record = serde_json::from_slice(&payload).map_err(|err| StoreError::Decode(err.to_string()))?;
        Ok(Some(Versioned { record, revision }))
    }

    /// Compare-and-set: writes `record` only if the stored revision is still `revision`.
    pub async fn update_job(&self, record: &JobRecord, revision: u64) -> Result<u64, StoreError> {
        match self.jobs_kv.update(&record.job_id, encode(record), revision).await {
            Ok(_) if crate::fault::fires_at("lose_record_write_answer") => {
                Err(StoreError::Nats("timed out: didn't receive ack in time (fault injected: lose_record_write_answer)".into()))
            }
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(StoreError::Conflict),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    /// Makes a new job durable: its `queued` event, its queue message, then its record.
    /// `Some(state)` when the record existed already (an idempotent resubmission). The API's
    /// submissions and a batch's later jobs (a held item's, a fallback's, made on the settle
    /// path) all come through here.
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
    pub async fn launch_job(&self, record: &JobRecord) -> Result<Option<JobState>, StoreError> {
        if record.idempotency_key.is_some() || record.parent.is_some() {
            // Ids derived from a key (or a batch) may exist already: then nothing is sent
            // again (a second queue message after the window would run the job twice).
            if let Some(existing) = self.get_job(&record.job_id).await? {
                return Ok(Some(existing.record.state));
            }
        }
        // The `queued` event is published before the queue message so that the history is
        // ordered even for a job that starts the instant it is enqueued; both acks are awaited
        // together (one round trip, not two). No node can publish an event for the job before
        // both are stored: it claims only once the record exists, written below. The event is
        // de-duplicated: a retried submission may publish it again.
        let event = Event::status(&record.job_id, 0, JobState::Queued).labelled(&record.labels);
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        let queue_seq = loop {
            match self.publish_queued_and_enqueue(&event, record).await {
                Err(e) if in_process_elsewhere(&e) => {
                    tries += 1;
                    let Some(pause) = crate::policy::Patience::SUBMIT_RECORD.pause(tries, started.elapsed()) else { return Err(e) };
                    tokio::time::sleep(pause).await;
                }
                other => break other?,
            }
        };
        // Where its message stands in the queue: its position while it waits.
        let record = &JobRecord { queue_seq: Some(queue_seq), ..record.clone() };
        crate::fault::abort_at("abort_in_launch");
        let created =
            super::patience::ride_out(crate::policy::Patience::SUBMIT_RECORD, &record.job_id, "writing a new job's record", || {
                self.create_job(record)
            })
            .await;
        match created {
            Ok(_) => {}
            // A concurrent identical resubmission wrote it first, or this one's earlier try
            // whose answer was lost.
            Err(StoreError::AlreadyExists) => {
                let existing = self.get_job(&record.job_id).await?;
                return Ok(Some(existing.map(|v| v.record.state).unwrap_or(JobState::Queued)));
            }
            Err(e) => return Err(e),
        }
        metrics::counter!(crate::metrics::JOBS_SUBMITTED, "model" => record.model.clone()).increment(1);
        Ok(None)
    }

    /// The job's `queued` event and its queue message, both acks awaited together; the queue
    /// message's stream sequence.
    async fn publish_queued_and_enqueue(&self, event: &Event, record: &JobRecord) -> Result<u64, StoreError> {
        let queued = self.publish_event_nowait_with_id(event, &format!("{}-queued", record.job_id)).await?;
        let enqueued = self.enqueue_nowait(record).await?;
        let (queued, enqueued) = tokio::join!(std::future::IntoFuture::into_future(queued), std::future::IntoFuture::into_future(enqueued));
        queued.map_err(StoreError::nats)?;
        Ok(enqueued.map_err(StoreError::nats)?.sequence)
    }

    /// Every job id in the bucket (for listing; O(jobs), bounded by the record TTL).
    pub async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let keys = self.jobs_kv.keys().await.map_err(StoreError::nats)?;
        keys.try_collect().await.map_err(StoreError::nats)
    }

    /// Publishes the job to its queue and waits for the stream's ack, so the job is durable
    /// when this returns. `Nats-Msg-Id` = job id: a second publish within the de-duplication
    /// window is dropped by the server.
    pub async fn enqueue(&self, record: &JobRecord) -> Result<(), StoreError> {
        self.enqueue_nowait(record).await?.await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// As [`enqueue`](Self::enqueue), without waiting for the ack: the job is durable once the
    /// returned future resolves. The queue: the lane of its priority, and in it the queue of its
    /// fair-share key ([`crate::fair::job_key`]) or, without one, the lane's shared queue.
    pub async fn enqueue_nowait(&self, record: &JobRecord) -> Result<async_nats::jetstream::context::PublishAckFuture, StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, record.job_id.as_str());
        let body = serde_json::to_vec(&QueueMessage { job_id: record.job_id.clone() }).expect("serializes");
        let lane = Lane::of_priority(record.priority);
        let subject = match crate::fair::job_key(&self.fair_share, &record.labels) {
            Some(key) => {
                self.ensure_keyed_consumer(&record.model, lane, &key).await?;
                self.names.job_subject_keyed(&record.model, lane, &key)
            }
            None => self.names.job_subject(&record.model, lane),
        };
        self.js.publish_with_headers(subject, headers, body.into()).await.map_err(StoreError::nats)
    }
}

/// JetStream refuses a publish whose message id another publish is storing at that moment
/// (409, "duplicate message id is in process"): a client's retry of a submit whose first try
/// is still under way on another node (seen in tests/nats_cluster.rs while a stream's leader
/// was killed, where the API answered it `internal`). Once that one is stored, the same
/// publish is a duplicate, answered at once: it is sent again after a pause.
pub fn in_process_elsewhere(error: &StoreError) -> bool {
    matches!(error, StoreError::Nats(m) if m.contains("in process"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_duplicate_in_process_is_sent_again() {
        let refused = StoreError::Nats("publish failed: duplicate message id is in process (code 409, error code 10158)".into());
        assert!(in_process_elsewhere(&refused));
        assert!(!in_process_elsewhere(&StoreError::Nats("timed out: didn't receive ack in time".into())));
        assert!(!in_process_elsewhere(&StoreError::Conflict));
    }
}
