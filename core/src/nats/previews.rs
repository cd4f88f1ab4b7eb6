//! Live previews (`kiln_contract::preview`): published on core NATS subject
//! `kiln.previews.<job_id>`, which the stream `KILN_PREVIEWS` captures keeping one message per
//! subject: followers subscribed to the subject see each preview as it comes, and a follower
//! that arrives late reads the newest one (the client's `Client::preview`), for
//! [`PREVIEW_MAX_AGE_S`]. Not the events stream: previews are not replayed, and a preview
//! never delays a job's events.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::{Names, Resources, StoreError};
use crate::preview::{HEADER_ATTEMPT, HEADER_CONTENT_TYPE, HEADER_JOB_ID, HEADER_SEQ, HEADER_TS_MS, MAX_PREVIEW_BYTES, PREVIEW_MAX_AGE_S};

/// Most bytes the previews stream holds: the newest preview of 1,000 jobs at the size limit.
/// Past it the oldest go first (previews of jobs that ended long ago).
const MAX_PREVIEW_STREAM_BYTES: i64 = 1000 * MAX_PREVIEW_BYTES as i64;

/// The stream's settings: the newest message of each job, in memory (a preview is worth less
/// than a disk write, and a nats-server restart losing one costs nothing a job needs).
pub(crate) fn previews_stream_config(names: &Names, replicas: usize) -> stream::Config {
    stream::Config {
        name: names.previews_stream(),
        description: Some("kiln live previews: the newest of each job".into()),
        subjects: vec![names.previews_subject_all()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::Memory,
        max_messages_per_subject: 1,
        max_age: Duration::from_secs(PREVIEW_MAX_AGE_S),
        max_bytes: MAX_PREVIEW_STREAM_BYTES,
        // Headers and all: a preview at the limit fits.
        max_message_size: MAX_PREVIEW_BYTES as i32 + 4096,
        discard: stream::DiscardPolicy::Old,
        max_consumers: super::resources::MAX_CONSUMERS_PER_STREAM,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// One preview as the node publishes it.
pub struct PreviewOut<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    /// Its number among the attempt's previews that were let through, from 1.
    pub seq: u64,
    pub content_type: &'a str,
    pub data: bytes::Bytes,
    /// When the engine let it through, Unix ms.
    pub ts_ms: u64,
}

impl Resources {
    /// Publishes a preview without waiting for the stream's ack: it is shown live whether or
    /// not the stream stored it, and the next one replaces it anyway.
    pub async fn publish_preview(&self, preview: PreviewOut<'_>) -> Result<(), StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_JOB_ID, preview.job_id);
        headers.insert(HEADER_ATTEMPT, preview.attempt.to_string().as_str());
        headers.insert(HEADER_SEQ, preview.seq.to_string().as_str());
        headers.insert(HEADER_TS_MS, preview.ts_ms.to_string().as_str());
        headers.insert(HEADER_CONTENT_TYPE, preview.content_type);
        let subject = self.names.previews_subject(preview.job_id);
        self.js.publish_with_headers(subject, headers, preview.data).await.map_err(StoreError::nats).map(drop)
    }
}

/// Makes the previews stream (idempotent), or brings an existing one to `replicas`.
pub(crate) async fn ensure_previews_stream(js: &jetstream::Context, names: &Names, replicas: usize) -> Result<(), StoreError> {
    let config = previews_stream_config(names, replicas);
    js.get_or_create_stream(config).await.map_err(|e| super::resources::creation_error(&names.previews_stream(), replicas, e))?;
    super::resources::settle_stream(js, &names.previews_stream(), replicas, true).await
}
