//! WebhookDelivery: this node's share of the cluster's webhook work, in two durable steps so
//! that a node crash loses no message.
//!
//! 1. **Fan-out.** A durable consumer of `KILN_EVENTS` that every node shares
//!    (`webhooks-fanout`) reads each job event once; for one a webhook wants
//!    ([`kiln_core::webhook::event_of`], [`kiln_core::webhook::targets`]) it queues one message
//!    per target into `KILN_WEBHOOKS`, de-duplicated by its `webhook-id` (the event's stream
//!    sequence and the target: reading the event again after a crash queues nothing twice), then
//!    acks the event. Progress is throttled here: at most one per job per
//!    `progress_interval_ms`; one that comes sooner is handed back until the interval ends and
//!    dropped then if a later one came meanwhile (the latest wins). Live previews come the same
//!    way from `KILN_PREVIEWS` (`webhooks-previews`) as `job.preview` messages that name them.
//! 2. **Delivery.** A durable consumer of `KILN_WEBHOOKS` (`webhooks-delivery`) hands each
//!    message to one node, which signs it (Standard Webhooks), POSTs it without following
//!    redirects, to an address it checked (see [`CheckedResolver`]), writes the attempt into the
//!    job's delivery log, and then acks it (delivered, or given up by
//!    [`kiln_core::policy::webhook_verdict`] or after `retry_for_s`) or naks it with
//!    [`kiln_core::policy::webhook_backoff`]. A node that dies mid-attempt never acks: the
//!    message comes back to another node after the ack wait.
//!
//! The actor itself takes no messages: it owns the two loops, and stopping it stops them. A
//! node without `[webhooks]` (no secret, no endpoint) runs neither: every job would pay for
//! reading its events, and none can have a webhook.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use dashmap::DashMap;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use kiln_core::config::WebhooksConfig;
use kiln_core::metrics as m;
use kiln_core::nats::webhooks::WebhookMessage;
use kiln_core::nats::Resources;
use kiln_core::policy::{webhook_backoff, webhook_verdict, WebhookAnswer, WebhookVerdict};
use kiln_core::protocol::{Event, WebhookAttempt, WebhookEvent};
use kiln_core::task::{self, TaskGuard, TaskKind};
use kiln_core::webhook;

use crate::context::NodeContext;

/// Messages this node delivers at once: a slow receiver holds one each, not the whole node.
const MAX_CONCURRENT_DELIVERIES: usize = 64;
/// The pause before a consumer's stream is opened again after it failed (NATS away).
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// Jobs whose last progress time the throttle remembers; past it the map is cleared (a job
/// forgotten may send one progress message early, nothing worse).
const THROTTLE_MEMORY: usize = 10_000;

pub struct WebhookDelivery;

/// It takes none: the loops it owns do the work.
pub enum WebhookDeliveryMsg {}

// Local only (ractor's `cluster` feature needs the impl spelled out).
impl ractor::Message for WebhookDeliveryMsg {}

pub struct WebhookDeliveryState {
    /// Both `None` on a node without `[webhooks]` configured (see `pre_start`).
    _fanout: Option<TaskGuard<()>>,
    _previews: Option<TaskGuard<()>>,
    _delivery: Option<TaskGuard<()>>,
}

impl Actor for WebhookDelivery {
    type Msg = WebhookDeliveryMsg;
    type State = WebhookDeliveryState;
    type Arguments = NodeContext;

    async fn pre_start(&self, _myself: ActorRef<WebhookDeliveryMsg>, ctx: NodeContext) -> Result<Self::State, ActorProcessingErr> {
        let config = Arc::new(ctx.config.webhooks.clone());
        if config.secret.is_empty() && config.endpoints.is_empty() {
            // No job can have a webhook here (submit refuses one without a secret) and no
            // endpoint wants any event: reading every job event would cost each job two NATS
            // messages per event for nothing.
            return Ok(WebhookDeliveryState { _fanout: None, _previews: None, _delivery: None });
        }
        let fanout = ctx.resources.webhook_fanout_consumer().await?;
        let previews = ctx.resources.webhook_previews_consumer().await?;
        let delivery = ctx.resources.webhook_delivery_consumer(Duration::from_millis(config.timeout_ms)).await?;
        let http = http_client(&config)?;
        let fan = Arc::new(FanOut { resources: ctx.resources.clone(), config: config.clone(), throttle: Default::default() });
        let sender = Sender { resources: ctx.resources.clone(), config, http };
        Ok(WebhookDeliveryState {
            _fanout: Some(task::spawn(TaskKind::OwnerLoop, "webhooks: fan-out of job events", fan.clone().run(fanout, false))),
            _previews: Some(task::spawn(TaskKind::OwnerLoop, "webhooks: fan-out of live previews", fan.run(previews, true))),
            _delivery: Some(task::spawn(TaskKind::OwnerLoop, "webhooks: delivery", sender.run(delivery))),
        })
    }
}

/// The outbound client: no redirects (a 3xx is recorded as the attempt's answer), one
/// attempt's whole time bounded, every host resolved through [`CheckedResolver`].
fn http_client(config: &WebhooksConfig) -> Result<reqwest::Client, ActorProcessingErr> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(config.timeout_ms))
        .connect_timeout(Duration::from_millis(config.timeout_ms))
        .user_agent(concat!("kiln-webhooks/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(CheckedResolver { allow_private: config.allow_loopback }))
        .build()?)
}

/// Resolves a webhook's host and keeps only the addresses it may reach: the connection is made
/// to an address checked here, so a name that resolves to a public address for a check and a
/// private one for the connection (DNS rebinding) cannot reach inside. A name with no address
/// left fails with [`ADDRESS_REFUSED`] in its error. (An IP literal is never resolved: the
/// attempt checks it itself.)
struct CheckedResolver {
    allow_private: bool,
}

const ADDRESS_REFUSED: &str = "resolves only to private, loopback or link-local addresses";

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found.into_iter().filter(|a| allow_private || !webhook::is_forbidden(a.ip())).collect();
            if kept.is_empty() {
                return Err(format!("{host} {ADDRESS_REFUSED}").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Step 1: job events into messages.
struct FanOut {
    resources: Resources,
    config: Arc<WebhooksConfig>,
    /// Per job (and `<job>#preview`): when its last progress (preview) message was queued, and
    /// the newest one's stream sequence seen (the throttle's memory on this node).
    throttle: DashMap<String, (Option<Instant>, u64)>,
}

/// What the throttle says of a progress (or preview) message.
enum Throttle {
    Send,
    /// Too soon after the last one: look again after this.
    Later(Duration),
    /// A later one came meanwhile: the latest wins.
    Drop,
}

impl FanOut {
    /// Reads `consumer` for as long as the actor lives: job events, or (`previews`) live
    /// previews.
    async fn run(self: Arc<Self>, consumer: jetstream::consumer::PullConsumer, previews: bool) {
        loop {
            match consumer.messages().await {
                Ok(mut messages) => {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(message) if previews => self.handle_preview(message).await,
                            Ok(message) => self.handle(message).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "webhooks fan-out: pull failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "webhooks fan-out: cannot read the events"),
            }
            tokio::time::sleep(REOPEN_PAUSE).await;
        }
    }

    /// Settles a message after its fan-out: acked, handed back to be looked at later, or (on a
    /// NATS error) handed back to be read again (and de-duplicated) soon.
    async fn settle(message: jetstream::Message, job_id: &str, outcome: Result<Option<Duration>, kiln_core::nats::StoreError>) {
        let settled = match outcome {
            Ok(None) => message.ack().await,
            Ok(Some(later)) => message.ack_with(AckKind::Nak(Some(later))).await,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "webhooks fan-out failed; the message is read again");
                message.ack_with(AckKind::Nak(Some(REOPEN_PAUSE))).await
            }
        };
        if let Err(e) = settled {
            tracing::debug!(error = %e, "webhooks fan-out: not settled; it comes back after the ack wait");
        }
    }

    async fn handle(&self, message: jetstream::Message) {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
            let _ = message.ack().await;
            return;
        };
        let Some(kind) = webhook::event_of(&event) else {
            let _ = message.ack().await;
            return;
        };
        let outcome = self.fan_out(&event, seq, kind).await;
        Self::settle(message, &event.job_id, outcome).await;
    }

    /// At most one message per `key` per `progress_interval_ms`, the latest (by `seq`) winning.
    fn throttle(&self, key: String, seq: u64) -> Throttle {
        let interval = Duration::from_millis(self.config.progress_interval_ms);
        if self.throttle.len() > THROTTLE_MEMORY {
            self.throttle.clear();
        }
        let mut entry = self.throttle.entry(key).or_insert((None, 0));
        let (last_sent, newest) = *entry;
        if newest > seq {
            return Throttle::Drop;
        }
        if let Some(since) = last_sent.map(|t| t.elapsed()).filter(|since| *since < interval) {
            entry.1 = seq;
            return Throttle::Later(interval - since);
        }
        *entry = (Some(Instant::now()), seq);
        Throttle::Send
    }

    /// The job's record for an event's messages. A replica that lags may answer a plain read
    /// with an older record, or none: a terminal event's payload (status, artifacts) must come
    /// from the record as it is now, so it is read from the leader; another event's targets
    /// are the same in any version of the record, and only "none" is read again there (a
    /// message skipped for a lagging replica's "no such job" would be lost).
    async fn record_of(&self, job_id: &str, terminal: bool) -> Result<Option<kiln_core::job::JobRecord>, kiln_core::nats::StoreError> {
        let read = if terminal { None } else { self.resources.get_job(job_id).await? };
        let versioned = match read {
            Some(v) => Some(v),
            None => self.resources.get_job_latest(job_id).await?,
        };
        Ok(versioned.map(|v| v.record))
    }

    /// Queues the messages of one event; `Some(wait)` when a throttled progress event is to be
    /// looked at again after `wait`.
    async fn fan_out(&self, event: &Event, seq: u64, kind: WebhookEvent) -> Result<Option<Duration>, kiln_core::nats::StoreError> {
        let Some(record) = self.record_of(&event.job_id, WebhookEvent::TERMINAL.contains(&kind)).await? else { return Ok(None) };
        let targets = webhook::targets(&record, &self.config, kind);
        if targets.is_empty() {
            return Ok(None);
        }
        if kind == WebhookEvent::Progress {
            if record.is_terminal() {
                return Ok(None); // its end is on its way; a late progress message would mislead
            }
            match self.throttle(event.job_id.clone(), seq) {
                Throttle::Send => {}
                Throttle::Later(wait) => return Ok(Some(wait)),
                Throttle::Drop => return Ok(None),
            }
        }
        for message in webhook::messages(&record, event, seq, kind, &targets, false) {
            self.resources.enqueue_webhook(&message, &message.webhook_id).await?;
        }
        Ok(None)
    }

    /// A live preview into `job.preview` messages: its bytes stay in `KILN_PREVIEWS` (the
    /// message names them), throttled as progress is.
    async fn handle_preview(&self, message: jetstream::Message) {
        let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
        let Some(job_id) = header(kiln_core::preview::HEADER_JOB_ID) else {
            let _ = message.ack().await;
            return;
        };
        let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let preview = webhook::PreviewRef {
            content_type: header(kiln_core::preview::HEADER_CONTENT_TYPE).unwrap_or_default(),
            size: message.payload.len() as u64,
            seq: number(kiln_core::preview::HEADER_SEQ),
        };
        let (attempt, ts_ms) = (number(kiln_core::preview::HEADER_ATTEMPT) as u32, number(kiln_core::preview::HEADER_TS_MS));
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let outcome = async {
            let Some(record) = self.record_of(&job_id, false).await? else { return Ok(None) };
            let targets = webhook::targets(&record, &self.config, WebhookEvent::Preview);
            if targets.is_empty() || record.is_terminal() {
                return Ok(None);
            }
            match self.throttle(format!("{job_id}#preview"), seq) {
                Throttle::Send => {}
                Throttle::Later(wait) => return Ok(Some(wait)),
                Throttle::Drop => return Ok(None),
            }
            for m in webhook::preview_messages(&record, preview, attempt, ts_ms, seq, &targets) {
                self.resources.enqueue_webhook(&m, &m.webhook_id).await?;
            }
            Ok(None)
        }
        .await;
        Self::settle(message, &job_id, outcome).await;
    }
}

/// Step 2: messages to their receivers.
#[derive(Clone)]
struct Sender {
    resources: Resources,
    config: Arc<WebhooksConfig>,
    http: reqwest::Client,
}

impl Sender {
    async fn run(self, consumer: jetstream::consumer::PullConsumer) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_DELIVERIES));
        loop {
            match consumer.messages().await {
                Ok(mut messages) => {
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(message) => {
                                let permit = slots.clone().acquire_owned().await.expect("never closed");
                                let sender = self.clone();
                                // Ends by itself: one attempt, bounded by `timeout_ms`.
                                drop(task::spawn(TaskKind::Reply, "webhooks: one attempt", async move {
                                    sender.attempt(message).await;
                                    drop(permit);
                                }));
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "webhooks delivery: pull failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "webhooks delivery: cannot read the queue"),
            }
            tokio::time::sleep(REOPEN_PAUSE).await;
        }
    }

    async fn attempt(&self, message: jetstream::Message) {
        let Ok(msg) = serde_json::from_slice::<WebhookMessage>(&message.payload) else {
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let attempt = message.info().map(|i| i.delivered as u32).unwrap_or(1).max(1);
        let started_ms = kiln_core::now_ms();
        let started = Instant::now();
        let (answer, error) = self.send(&msg).await;
        let latency = started.elapsed();
        let verdict = webhook_verdict(answer);
        let retry_until_ms = msg.event_ms.saturating_add(self.config.retry_for_s.saturating_mul(1000));
        let pause = webhook_backoff(
            attempt,
            Duration::from_millis(self.config.backoff_initial_ms),
            Duration::from_millis(self.config.backoff_max_ms),
            rand_unit(),
        );
        let outcome = match verdict {
            WebhookVerdict::Delivered => "delivered",
            WebhookVerdict::GiveUp => "gave_up",
            WebhookVerdict::Retry if kiln_core::now_ms() + pause.as_millis() as u64 > retry_until_ms => "gave_up",
            WebhookVerdict::Retry => "retrying",
        };
        let status_code = match answer {
            WebhookAnswer::Status(s) => Some(s),
            _ => None,
        };
        let entry = WebhookAttempt {
            webhook_id: msg.webhook_id.clone(),
            kind: msg.kind.clone(),
            url: msg.url.clone(),
            attempt,
            ts_ms: started_ms,
            status_code,
            error,
            latency_ms: latency.as_millis() as u64,
            outcome: outcome.to_string(),
            manual: msg.manual,
        };
        metrics::counter!(m::WEBHOOK_ATTEMPTS, "verdict" => outcome).increment(1);
        metrics::histogram!(m::WEBHOOK_REQUEST_SECONDS).record(latency.as_secs_f64());
        if outcome != "retrying" {
            let since_event = kiln_core::now_ms().saturating_sub(msg.event_ms) as f64 / 1000.0;
            metrics::histogram!(m::WEBHOOK_DELIVERY_SECONDS, "verdict" => outcome).record(since_event);
        }
        if let Err(e) = self.resources.log_webhook_attempt(&msg.job_id, &entry).await {
            // The attempt happened: its end stands even if the log missed it.
            tracing::warn!(job_id = %msg.job_id, error = %e, "cannot write a webhook attempt into the log");
        }
        tracing::debug!(job_id = %msg.job_id, webhook_id = %msg.webhook_id, attempt, outcome, ?status_code, "webhook attempt");
        let settled = match outcome {
            "retrying" => message.ack_with(AckKind::Nak(Some(pause))).await,
            _ => message.double_ack().await,
        };
        if let Err(e) = settled {
            tracing::debug!(error = %e, "webhook message not settled; it comes back after the ack wait");
        }
    }

    /// One POST: the answer, and the error text the log shows (`redirect` for a 3xx).
    async fn send(&self, msg: &WebhookMessage) -> (WebhookAnswer, Option<String>) {
        let Some(key) = self.config.secret_of(msg.endpoint.as_deref()).and_then(webhook::decode_secret) else {
            return (WebhookAnswer::AddressRefused, Some("no_secret: this node has no secret for the endpoint".into()));
        };
        match url::Url::parse(&msg.url).ok().and_then(|u| u.host().map(|h| h.to_owned())) {
            Some(url::Host::Ipv4(ip)) if !self.config.allow_loopback && webhook::is_forbidden(IpAddr::V4(ip)) => {
                return (WebhookAnswer::AddressRefused, Some(format!("address_refused: {ip} is private, loopback or link-local")))
            }
            Some(url::Host::Ipv6(ip)) if !self.config.allow_loopback && webhook::is_forbidden(IpAddr::V6(ip)) => {
                return (WebhookAnswer::AddressRefused, Some(format!("address_refused: {ip} is private, loopback or link-local")))
            }
            _ => {}
        }
        let timestamp = kiln_core::now_ms() / 1000;
        let signature = webhook::sign(&key, &msg.webhook_id, timestamp, msg.body.as_bytes());
        let sent = self
            .http
            .post(&msg.url)
            .header("content-type", "application/json")
            .header("webhook-id", &msg.webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(msg.body.clone())
            .send()
            .await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let error = match status {
                    300..=399 => Some(format!(
                        "redirect: not followed (to {})",
                        response.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or("?")
                    )),
                    413 => Some("payload_too_large: the receiver refused the body's size".into()),
                    _ => None,
                };
                (WebhookAnswer::Status(status), error)
            }
            Err(e) => {
                let chain = error_chain(&e);
                if chain.contains(ADDRESS_REFUSED) {
                    (WebhookAnswer::AddressRefused, Some(format!("address_refused: {chain}")))
                } else if e.is_timeout() {
                    (WebhookAnswer::Timeout, Some("timeout".into()))
                } else if e.is_connect() {
                    (WebhookAnswer::Unreachable, Some(format!("connect: {chain}")))
                } else {
                    (WebhookAnswer::Unreachable, Some(format!("request: {chain}")))
                }
            }
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A number in [0, 1) for the backoff's jitter: it only needs to differ between messages and
/// nodes, not to be unpredictable.
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
