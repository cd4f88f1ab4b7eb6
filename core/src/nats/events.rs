//! Progress events, published into the `KILN_EVENTS` stream on `kiln.events.<job_id>`.
//!
//! Core NATS subscribers to that subject see them live; the stream keeps them (for the result
//! TTL) so a subscriber that arrives late replays the whole history with an ordered consumer.

use super::{Resources, StoreError};
use crate::protocol::Event;

impl Resources {
    /// Publishes and waits for the stream's ack (the event is durable when this returns).
    pub async fn publish_event(&self, event: &Event) -> Result<(), StoreError> {
        self.publish_event_with_id(event, None).await
    }

    /// Publishes without waiting for the stream's ack; the caller awaits the returned future
    /// later. Publishes on one connection are stored in the order they were sent, so a job's
    /// events stay ordered while their acks overlap.
    pub async fn publish_event_nowait(&self, event: &Event) -> Result<async_nats::jetstream::context::PublishAckFuture, StoreError> {
        let body = serde_json::to_vec(event).expect("events serialize");
        self.js.publish(self.names.events_subject(&event.job_id), body.into()).await.map_err(StoreError::nats)
    }

    /// As [`publish_event_nowait`](Self::publish_event_nowait), with a de-duplication id, so
    /// that publishing it again after a lost ack cannot store it twice.
    pub async fn publish_event_nowait_with_id(
        &self,
        event: &Event,
        msg_id: &str,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, StoreError> {
        let body = serde_json::to_vec(event).expect("events serialize");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        self.js.publish_with_headers(self.names.events_subject(&event.job_id), headers, body.into()).await.map_err(StoreError::nats)
    }

    /// As [`publish_event`](Self::publish_event), de-duplicated by `msg_id`: used for the
    /// terminal event, which a redelivery after a crash may publish a second time.
    pub async fn publish_event_with_id(&self, event: &Event, msg_id: Option<&str>) -> Result<(), StoreError> {
        self.publish_event_stored(event, msg_id).await.map(|_| ())
    }

    /// As [`publish_event_with_id`](Self::publish_event_with_id); returns the event's stream
    /// sequence (the first one's, when the de-duplication id was stored before).
    pub async fn publish_event_stored(&self, event: &Event, msg_id: Option<&str>) -> Result<u64, StoreError> {
        let body = serde_json::to_vec(event).expect("events serialize");
        let subject = self.names.events_subject(&event.job_id);
        let ack = match msg_id {
            Some(id) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
                self.js.publish_with_headers(subject, headers, body.into()).await
            }
            None => self.js.publish(subject, body.into()).await,
        };
        Ok(ack.map_err(StoreError::nats)?.await.map_err(StoreError::nats)?.sequence)
    }

    /// Publishes a job's end on the results feed (`kiln.finished.<model>`) and its terminal
    /// `event` on the job's subject, both de-duplicated (a redelivery publishes them again),
    /// and waits for both acks at once: one round trip on the job's path, not two.
    pub async fn publish_end(&self, event: &Event, record: &crate::job::JobRecord) -> Result<(), StoreError> {
        let finished = self.publish_finished_nowait(record).await?;
        let terminal_id = format!("{}-terminal", record.job_id);
        let terminal = self.publish_event_stored(event, Some(&terminal_id));
        let (finished, terminal) = tokio::join!(std::future::IntoFuture::into_future(finished), terminal);
        finished.map_err(StoreError::nats)?;
        terminal.map(|_| ())
    }

    /// Publishes a job's end on the results feed only, de-duplicated by the same id as
    /// [`publish_end`](Self::publish_end)'s, and waits for its ack: for a redelivery that finds
    /// the job's ending already in its history but cannot know whether the feed entry was
    /// stored with it.
    pub async fn publish_finished(&self, record: &crate::job::JobRecord) -> Result<(), StoreError> {
        self.publish_finished_nowait(record).await?.await.map(|_| ()).map_err(StoreError::nats)
    }

    async fn publish_finished_nowait(
        &self,
        record: &crate::job::JobRecord,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{}-finished", record.job_id).as_str());
        let feed = serde_json::to_vec(&crate::protocol::JobView::from(record)).expect("views serialize");
        self.js.publish_with_headers(self.names.finished_subject(&record.model), headers, feed.into()).await.map_err(StoreError::nats)
    }

    /// The last event stored for a job (one request to the stream's leader), if any.
    pub async fn last_event(&self, job_id: &str) -> Result<Option<Event>, StoreError> {
        Ok(self.last_event_with_seq(job_id).await?.map(|(_, e)| e))
    }

    /// The last event stored for a job with its stream sequence, if any.
    pub async fn last_event_with_seq(&self, job_id: &str) -> Result<Option<(u64, Event)>, StoreError> {
        match self.events.get_last_raw_message_by_subject(&self.names.events_subject(job_id)).await {
            Ok(m) => serde_json::from_slice(&m.payload).map(|e| Some((m.sequence, e))).map_err(|e| StoreError::Decode(e.to_string())),
            Err(e) if matches!(e.kind(), async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(StoreError::nats(e)),
        }
    }

    /// Publishes `event` only if the last event stored for its job is still the one with
    /// sequence `after` (`Nats-Expected-Last-Subject-Sequence`): `Some(seq)` once stored,
    /// `None` when another event was stored in between (another attempt's, or this one's own
    /// publish whose ack was lost: the caller re-reads the last event to tell which).
    pub async fn publish_event_after(&self, event: &Event, after: u64) -> Result<Option<u64>, StoreError> {
        let body = serde_json::to_vec(event).expect("events serialize");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, after.to_string().as_str());
        let ack =
            self.js.publish_with_headers(self.names.events_subject(&event.job_id), headers, body.into()).await.map_err(StoreError::nats)?;
        match ack.await {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(StoreError::nats(e)),
        }
    }
}
