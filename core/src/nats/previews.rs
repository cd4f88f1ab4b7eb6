//! Live previews (`kiln_contract::preview`): published on core NATS subject
//! `kiln.previews.<job_id>`, which the stream `KILN_PREVIEWS` captures keeping one message per
//! subject: followers subscribed to the subject see each preview as it comes, and a follower
//! that arrives late reads the newest one (the client's `Client::preview`), for
//! [`PREVIEW_MAX_AGE_S`]. Not the events stream: previews are not replayed, and a preview
//! never delays a job's events. The stream itself is made with the others, in `resources.rs`.

use super::{Resources, StoreError};
use crate::preview::{HEADER_ATTEMPT, HEADER_CONTENT_TYPE, HEADER_JOB_ID, HEADER_SEQ, HEADER_TS_MS};

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
