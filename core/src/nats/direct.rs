//! Batched direct gets (ADR-31, nats-server 2.11+): one request to a stream that allows direct
//! gets, answered by several messages and an end-of-batch. The registry reads the last value of
//! every key with one (`multi_last`); the queue counts a waiting job's position with one
//! (`next_by_subj`, `batch: 1`, whose `Nats-Num-Pending` counts the matching messages after it).

use std::time::Duration;

use futures::StreamExt;

use super::{Resources, StoreError};

/// Longest a batched direct get may take.
const DIRECT_BATCH_DEADLINE: Duration = Duration::from_secs(10);

impl Resources {
    /// Sends `request` to `stream`'s direct-get API and reads the messages it answers with
    /// until the end of the batch. `None` when the server refuses with `413 Too Many Results`
    /// (a `multi_last` over more than it answers at once); no message matching is an empty
    /// batch. `what` names the request in errors.
    pub(crate) async fn direct_batch(
        &self,
        stream: &str,
        request: &serde_json::Value,
        what: &str,
    ) -> Result<Option<Vec<async_nats::Message>>, StoreError> {
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.map_err(StoreError::nats)?;
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, serde_json::to_vec(request).expect("json").into())
            .await
            .map_err(StoreError::nats)?;
        let read = async {
            let mut messages = Vec::new();
            while let Some(message) = replies.next().await {
                match message.status.map(|s| s.as_u16()) {
                    Some(204) => return Ok(Some(messages)), // the end of the batch
                    Some(404) => return Ok(Some(messages)), // nothing matches
                    Some(413) => return Ok(None),
                    Some(code) if code >= 300 => {
                        let why = message.description.as_deref().unwrap_or("");
                        return Err(StoreError::Nats(format!("direct get of {what} in {stream}: {code} {why}")));
                    }
                    _ => messages.push(message),
                }
            }
            Err(StoreError::Nats("the direct get's replies ended before its end-of-batch".into()))
        };
        tokio::time::timeout(DIRECT_BATCH_DEADLINE, read)
            .await
            .map_err(|_| StoreError::Nats(format!("reading {what} in {stream} took over {DIRECT_BATCH_DEADLINE:?}")))?
    }

    /// How many messages on `subject` `stream` holds from sequence `from` on: the first one's
    /// `Nats-Num-Pending` (the matching messages after it) plus itself, one request.
    pub(crate) async fn count_from(&self, stream: &str, subject: &str, from: u64) -> Result<u64, StoreError> {
        let request = serde_json::json!({ "seq": from.max(1), "next_by_subj": subject, "batch": 1 });
        let first = self.direct_batch(stream, &request, subject).await?.unwrap_or_default();
        let Some(first) = first.first() else { return Ok(0) };
        let after = first.headers.as_ref().and_then(|h| h.get("Nats-Num-Pending")).and_then(|v| v.as_str().parse::<u64>().ok());
        after
            .map(|after| after + 1)
            .ok_or_else(|| StoreError::Nats(format!("the direct get of {subject} in {stream} has no Nats-Num-Pending")))
    }
}
