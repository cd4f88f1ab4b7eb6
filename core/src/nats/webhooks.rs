//! Webhooks in NATS: the `KILN_WEBHOOKS` work queue of messages waiting for delivery (one
//! subject per job, de-duplicated by `webhook-id`), the two durable consumers that every node
//! shares (the fan-out of job events into messages, the delivery of messages), and each job's
//! delivery log, `KILN_WEBHOOK_LOG` (an attempt per message on `kiln.webhooklog.<job>`, kept
//! as long as results are). `kiln_actors::webhook` drives them.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};

use super::resources::{creation_error, settle_stream, MAX_CONSUMERS_PER_STREAM};
use super::{Resources, StoreError};
use crate::config::ClusterConfig;
use crate::protocol::WebhookAttempt;
pub use crate::protocol::WebhookMessage;

/// The durable consumer of `KILN_EVENTS` that turns job events into webhook messages.
pub const FANOUT_CONSUMER: &str = "webhooks-fanout";
/// The durable consumer of `KILN_PREVIEWS` that turns live previews into `job.preview` messages.
pub const PREVIEWS_CONSUMER: &str = "webhooks-previews";
/// The durable consumer of `KILN_WEBHOOKS` that delivers them.
pub const DELIVERY_CONSUMER: &str = "webhooks-delivery";
/// Most attempts a job's log keeps (a message retried for a day at the longest backoff makes
/// about 150; the log is for people, and a flood of progress messages must not grow it
/// without bound).
pub const MAX_LOG_ENTRIES_PER_JOB: i64 = 1_000;
/// How long the queue de-duplicates a message id: a fan-out read again after a crash within it
/// queues nothing twice.
const WEBHOOK_DEDUP_WINDOW: Duration = Duration::from_secs(600);

impl Resources {
    /// Makes the webhook queue and log streams (idempotent).
    pub(crate) async fn ensure_webhook_streams(js: &async_nats::jetstream::Context, config: &ClusterConfig) -> Result<(), StoreError> {
        let names = super::Names::new(&config.nats.prefix);
        let replicas = config.nats.replicas;
        js.get_or_create_stream(stream::Config {
            name: names.webhooks_stream(),
            description: Some("kiln webhook messages waiting for delivery".into()),
            subjects: vec![names.webhooks_subject_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: WEBHOOK_DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| creation_error(&names.webhooks_stream(), replicas, e))?;
        settle_stream(js, &names.webhooks_stream(), replicas, false).await?;
        let longest_result_ttl = config.models.iter().map(|m| config.result_ttl_s(m)).max().unwrap_or(config.storage.result_ttl_s);
        js.get_or_create_stream(stream::Config {
            name: names.webhook_log_stream(),
            description: Some("kiln webhook delivery log: each attempt, per job".into()),
            subjects: vec![names.webhook_log_subject_all()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(longest_result_ttl),
            max_messages_per_subject: MAX_LOG_ENTRIES_PER_JOB,
            max_consumers: MAX_CONSUMERS_PER_STREAM,
            // A job's log is read with one batched direct get.
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| creation_error(&names.webhook_log_stream(), replicas, e))?;
        settle_stream(js, &names.webhook_log_stream(), replicas, true).await?;
        Ok(())
    }

    /// The fan-out consumer: every job event, from those stored after it was first made (a
    /// cluster that gains webhooks does not call back for its past).
    pub async fn webhook_fanout_consumer(&self) -> Result<consumer::PullConsumer, StoreError> {
        let config = fanout_config(FANOUT_CONSUMER, self.names.events_subject_all());
        self.events.get_or_create_consumer(FANOUT_CONSUMER, config).await.map_err(StoreError::nats)
    }

    /// The previews' fan-out consumer: each live preview stored after it was first made (the
    /// stream keeps only the newest per job, so one that a newer replaced before it was read is
    /// never sent: the latest wins).
    pub async fn webhook_previews_consumer(&self) -> Result<consumer::PullConsumer, StoreError> {
        let stream = self.js.get_stream(self.names.previews_stream()).await.map_err(StoreError::nats)?;
        let config = fanout_config(PREVIEWS_CONSUMER, self.names.previews_subject_all());
        stream.get_or_create_consumer(PREVIEWS_CONSUMER, config).await.map_err(StoreError::nats)
    }

    /// The delivery consumer: a message is this node's until it acks it (delivered or given
    /// up), naks it with the backoff, or goes silent for `ack_wait` (a crash: another node
    /// takes it). An attempt lasts at most `timeout`, so the ack wait is that and a margin.
    pub async fn webhook_delivery_consumer(&self, timeout: Duration) -> Result<consumer::PullConsumer, StoreError> {
        let stream = self.js.get_stream(self.names.webhooks_stream()).await.map_err(StoreError::nats)?;
        let config = consumer::pull::Config {
            durable_name: Some(DELIVERY_CONSUMER.into()),
            filter_subject: self.names.webhooks_subject_all(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: timeout + Duration::from_secs(10),
            max_deliver: -1,
            max_ack_pending: 10_000,
            ..Default::default()
        };
        stream.get_or_create_consumer(DELIVERY_CONSUMER, config).await.map_err(StoreError::nats)
    }

    /// Queues a message for delivery; `dedup` (its `Nats-Msg-Id`) keeps a second fan-out of
    /// the same event from queueing it twice.
    pub async fn enqueue_webhook(&self, message: &WebhookMessage, dedup: &str) -> Result<(), StoreError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, dedup);
        let body = serde_json::to_vec(message).expect("messages serialize");
        let ack = self
            .js
            .publish_with_headers(self.names.webhooks_subject(&message.job_id), headers, body.into())
            .await
            .map_err(StoreError::nats)?;
        ack.await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// Adds one attempt to its job's delivery log.
    pub async fn log_webhook_attempt(&self, job_id: &str, attempt: &WebhookAttempt) -> Result<(), StoreError> {
        let body = serde_json::to_vec(attempt).expect("attempts serialize");
        let ack = self.js.publish(self.names.webhook_log_subject(job_id), body.into()).await.map_err(StoreError::nats)?;
        ack.await.map_err(StoreError::nats)?;
        Ok(())
    }

    /// A job's delivery log, oldest attempt first (one batched direct get).
    pub async fn webhook_log(&self, job_id: &str) -> Result<Vec<WebhookAttempt>, StoreError> {
        let subject = self.names.webhook_log_subject(job_id);
        let request = serde_json::json!({ "seq": 1, "next_by_subj": subject, "batch": MAX_LOG_ENTRIES_PER_JOB });
        let messages = self.direct_batch(&self.names.webhook_log_stream(), &request, &subject).await?.unwrap_or_default();
        messages.iter().map(|m| serde_json::from_slice(&m.payload).map_err(|e| StoreError::Decode(e.to_string()))).collect()
    }
}

/// A fan-out consumer's config (events or previews into the webhook queue): shared by every
/// node under `name`, from what is stored after it was first made, each message acked once its
/// webhook messages are queued.
fn fanout_config(name: &str, filter_subject: String) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        filter_subject,
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}
