//! [`Client`]: typed requests to the `kiln.api.*` endpoints, event replay, uploads and
//! verified downloads.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::{Stream, StreamExt};
use kiln_contract::endpoint::Endpoint;
use kiln_contract::keys::sha256_hex;
use kiln_contract::names::Names;
use kiln_contract::protocol::*;

use crate::connect::{self, NatsConfig};
use crate::error::StoreError;
use crate::objects::{content_type_for, put_stream};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Kiln answered with a coded error.
    #[error("{}: {}", .0.code.as_str(), .0.message)]
    Api(ApiError),
    #[error(
        "no Kiln node answered {0} (is a node running on this NATS? `kiln up` starts one here, `kiln node --nats URL` joins one to it)"
    )]
    NoResponders(String),
    #[error("{0} timed out")]
    Timeout(String),
    #[error("nats: {0}")]
    Nats(String),
    #[error("cannot decode the reply: {0}")]
    Decode(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// How long Kiln asked to wait before trying again (`quota_exceeded`'s `retry_after_ms`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Api(e) => e.retry_after_ms.map(Duration::from_millis),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    timeout: Duration,
}

impl Client {
    /// Connects to a server that needs no credentials nor TLS.
    pub async fn connect(url: &str, prefix: &str) -> Result<Client, ClientError> {
        Self::connect_with(&NatsConfig { prefix: prefix.to_string(), ..NatsConfig::for_url(url) }).await
    }

    /// Connects as `nats` says: URL, prefix, credentials and TLS (the same connection
    /// options as a node's, see docs/SECURITY.md).
    pub async fn connect_with(nats: &NatsConfig) -> Result<Client, ClientError> {
        let client = connect::connect(nats, "kiln-client").await.map_err(|e| ClientError::Nats(e.to_string().replacen("nats: ", "", 1)))?;
        Ok(Self::from_nats(client, &nats.prefix))
    }

    pub fn from_nats(nats: async_nats::Client, prefix: &str) -> Client {
        Client { js: jetstream::new(nats.clone()), nats, names: Names::new(prefix), timeout: Duration::from_secs(30) }
    }

    /// How long one request waits for its reply (default 30 s). A request that was in flight
    /// to a node that died is lost and times out: retry it (submit with an idempotency key is
    /// safe to retry).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The JetStream context of this connection (the object stores, the events stream).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The subject and bucket names of this connection's prefix.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Sends raw bytes to an endpoint and returns the raw reply (for tests of bad input).
    pub async fn request_raw(&self, endpoint: &str, body: Vec<u8>) -> Result<bytes::Bytes, ClientError> {
        self.request_raw_with(endpoint, body, None).await
    }

    /// [`Client::request_raw`] with headers.
    pub async fn request_raw_with(
        &self,
        endpoint: &str,
        body: Vec<u8>,
        headers: Option<async_nats::HeaderMap>,
    ) -> Result<bytes::Bytes, ClientError> {
        let subject = self.names.api(endpoint);
        let mut request = async_nats::Request::new().payload(body.into()).timeout(Some(self.timeout));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        let reply = tokio::time::timeout(self.timeout + Duration::from_secs(1), self.nats.send_request(subject.clone(), request))
            .await
            .map_err(|_| ClientError::Timeout(subject.clone()))?;
        match reply {
            Ok(msg) => Ok(msg.payload),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(ClientError::NoResponders(subject)),
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => Err(ClientError::Timeout(subject)),
            Err(e) => Err(ClientError::Nats(e.to_string())),
        }
    }

    /// [`Client::submit`] in the caller's W3C trace: `trace` goes in the request's
    /// `traceparent` and `tracestate` headers, and the job's spans join that trace.
    pub async fn submit_traced(
        &self,
        req: &SubmitRequest,
        trace: Option<&kiln_contract::trace::TraceContext>,
    ) -> Result<SubmitReply, ClientError> {
        self.request_traced(Endpoint::Submit.name(), req, trace).await
    }

    /// [`Client::submit_batch`] in the caller's W3C trace: every item's job joins it.
    pub async fn submit_batch_traced(
        &self,
        req: &BatchSubmitRequest,
        trace: Option<&kiln_contract::trace::TraceContext>,
    ) -> Result<BatchReply, ClientError> {
        self.request_traced(Endpoint::SubmitBatch.name(), req, trace).await
    }

    /// [`Client::request`] with `trace` in the `traceparent` and `tracestate` headers.
    pub async fn request_traced<T: Serialize, R: DeserializeOwned>(
        &self,
        endpoint: &str,
        body: &T,
        trace: Option<&kiln_contract::trace::TraceContext>,
    ) -> Result<R, ClientError> {
        let headers = trace.map(|t| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(kiln_contract::trace::TRACEPARENT, t.traceparent.as_str());
            if let Some(state) = &t.tracestate {
                headers.insert(kiln_contract::trace::TRACESTATE, state.as_str());
            }
            headers
        });
        let payload = self.request_raw_with(endpoint, serde_json::to_vec(body).expect("requests serialize"), headers).await?;
        decode_reply(&payload)
    }

    pub async fn request<T: Serialize, R: DeserializeOwned>(&self, endpoint: &str, body: &T) -> Result<R, ClientError> {
        let payload = self.request_raw(endpoint, serde_json::to_vec(body).expect("requests serialize")).await?;
        decode_reply(&payload)
    }

    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitReply, ClientError> {
        self.request(Endpoint::Submit.name(), req).await
    }
    pub async fn status(&self, job_id: &str) -> Result<JobView, ClientError> {
        self.request(Endpoint::Status.name(), &JobRef { job_id: job_id.into() }).await
    }
    pub async fn cancel(&self, job_id: &str) -> Result<JobView, ClientError> {
        self.request(Endpoint::Cancel.name(), &JobRef { job_id: job_id.into() }).await
    }
    pub async fn result(&self, job_id: &str) -> Result<ResultReply, ClientError> {
        self.request(Endpoint::Result.name(), &JobRef { job_id: job_id.into() }).await
    }
    /// A job's webhook delivery log (`kiln.api.webhooks`).
    pub async fn webhooks(&self, job_id: &str) -> Result<WebhooksReply, ClientError> {
        self.request(Endpoint::Webhooks.name(), &JobRef { job_id: job_id.into() }).await
    }
    /// Sends a job's last event to its webhooks again (`kiln.api.webhooks_redeliver`).
    pub async fn redeliver_webhooks(&self, job_id: &str) -> Result<RedeliverReply, ClientError> {
        self.request(Endpoint::WebhooksRedeliver.name(), &JobRef { job_id: job_id.into() }).await
    }
    pub async fn jobs(&self, req: &ListJobsRequest) -> Result<ListJobsReply, ClientError> {
        self.request(Endpoint::Jobs.name(), req).await
    }
    pub async fn models(&self) -> Result<ModelsReply, ClientError> {
        self.request(Endpoint::Models.name(), &serde_json::json!({})).await
    }
    pub async fn cluster(&self) -> Result<ClusterReply, ClientError> {
        self.request(Endpoint::Cluster.name(), &serde_json::json!({})).await
    }
    /// Each model's queue now (`kiln.api.queue`), or one model's.
    pub async fn queue(&self, req: &QueueRequest) -> Result<QueueReply, ClientError> {
        self.request(Endpoint::Queue.name(), req).await
    }

    /// Submits N items as one batch: N jobs in parallel, one summary.
    pub async fn submit_batch(&self, req: &BatchSubmitRequest) -> Result<BatchReply, ClientError> {
        self.request(Endpoint::SubmitBatch.name(), req).await
    }
    pub async fn batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.request(Endpoint::Batch.name(), &BatchRef { batch_id: batch_id.into() }).await
    }
    pub async fn cancel_batch(&self, batch_id: &str) -> Result<BatchView, ClientError> {
        self.request(Endpoint::CancelBatch.name(), &BatchRef { batch_id: batch_id.into() }).await
    }
    /// A new batch of the failed and cancelled items of a finished batch.
    pub async fn retry_batch(&self, batch_id: &str) -> Result<BatchReply, ClientError> {
        self.retry_batch_traced(batch_id, None).await
    }
    /// [`Client::retry_batch`] in the caller's W3C trace: the retry's jobs join it.
    pub async fn retry_batch_traced(
        &self,
        batch_id: &str,
        trace: Option<&kiln_contract::trace::TraceContext>,
    ) -> Result<BatchReply, ClientError> {
        self.request_traced(Endpoint::RetryBatch.name(), &BatchRef { batch_id: batch_id.into() }, trace).await
    }

    /// Follows a batch's events (`item_completed`, `item_failed`, then `batch_finished`) until
    /// it ends, then returns it.
    pub async fn wait_batch(&self, batch_id: &str, timeout: Duration, on_event: impl FnMut(&Event)) -> Result<BatchView, ClientError> {
        self.follow(batch_id, "batch", timeout, on_event).await?;
        self.batch(batch_id).await
    }

    /// Operator control of any node or GPU; forwarded through the actor cluster.
    pub async fn control(&self, req: &ControlRequest) -> Result<ControlReply, ClientError> {
        self.request(Endpoint::Control.name(), req).await
    }

    /// Asks node `from` to time actor calls and NATS requests to `peer` (`kiln ping`).
    pub async fn ping(&self, from: &str, peer: &str, count: u32) -> Result<PingReport, ClientError> {
        let subject = self.names.node_diag(from, "ping");
        let body = serde_json::to_vec(&PingRequest { peer: peer.into(), count }).expect("json");
        let wait = Duration::from_secs(30) + Duration::from_millis(10 * count as u64);
        match tokio::time::timeout(wait, self.nats.request(subject.clone(), body.into())).await {
            Ok(Ok(msg)) => decode_reply(&msg.payload),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Err(ClientError::NoResponders(subject)),
            Ok(Err(e)) => Err(ClientError::Nats(e.to_string())),
            Err(_) => Err(ClientError::Timeout(subject)),
        }
    }

    /// Uploads an input to the files bucket; pass `InputValue::Object { object: name }`.
    pub async fn upload(&self, name: &str, data: &[u8]) -> Result<(), ClientError> {
        let mut reader = data;
        match put_stream(&self.js, &self.names.files_bucket(), name, content_type_for(name), &mut reader).await {
            Ok(_) => Ok(()),
            Err(StoreError::Decode(m)) => Err(ClientError::Api(ApiError::bad_request(m))),
            Err(e) => Err(ClientError::Nats(e.to_string().replacen("nats: ", "", 1))),
        }
    }

    /// Downloads an artifact and checks its sha256 against the one Kiln recorded.
    pub async fn download(&self, artifact: &Artifact, dest: &Path) -> Result<(), ClientError> {
        // Bounded by the client's timeout without data, not overall (a large result may take
        // long): an object whose chunks never come (lost with a server's disk, purged) used to
        // hang its caller for ever.
        let stalled = || ClientError::Timeout(format!("download of {} (no data for {:?})", artifact.object, self.timeout));
        let opened = async {
            let store = self.js.get_object_store(&artifact.bucket).await.map_err(|e| ClientError::Nats(e.to_string()))?;
            store.get(&artifact.object).await.map_err(|e| ClientError::Nats(e.to_string()))
        };
        let mut object = tokio::time::timeout(self.timeout, opened).await.map_err(|_| stalled())??;
        let mut data = Vec::with_capacity(artifact.size as usize);
        loop {
            let read = tokio::time::timeout(self.timeout, tokio::io::AsyncReadExt::read_buf(&mut object, &mut data));
            match read.await.map_err(|_| stalled())? {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let sha = sha256_hex(&data);
        if sha != artifact.sha256 {
            return Err(ClientError::Decode(format!("{}: sha256 {sha} does not match the recorded {}", artifact.object, artifact.sha256)));
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(dest, data).await?;
        Ok(())
    }

    /// Every event of a job (or a batch) from the first, then live ones, ending after the
    /// terminal event.
    /// Works however late it is called: the history is replayed from the events stream.
    pub async fn events(&self, job_id: &str) -> Result<impl Stream<Item = Event> + use<>, ClientError> {
        let stream = self.js.get_stream(self.names.events_stream()).await.map_err(|e| ClientError::Nats(e.to_string()))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.names.events_subject(job_id),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| ClientError::Nats(e.to_string()))?;
        let events = messages.filter_map(|m| async move { m.ok().and_then(|m| serde_json::from_slice::<Event>(&m.payload).ok()) }).boxed();
        // Ends right after the terminal event, without waiting for another message.
        let events = futures::stream::unfold((events, false), |(mut events, done)| async move {
            if done {
                return None;
            }
            let e = events.next().await?;
            let done = e.is_terminal();
            Some((e, (events, done)))
        });
        Ok(events)
    }

    /// Follows a job's events until it ends (calling `on_event` for each), then returns it.
    pub async fn wait(&self, job_id: &str, timeout: Duration, on_event: impl FnMut(&Event)) -> Result<JobView, ClientError> {
        self.follow(job_id, "job", timeout, on_event).await?;
        self.status(job_id).await
    }

    /// Calls `on_event` for every event of a job or batch until its terminal one.
    async fn follow(&self, id: &str, what: &str, timeout: Duration, mut on_event: impl FnMut(&Event)) -> Result<(), ClientError> {
        let events = self.events(id).await?;
        tokio::pin!(events);
        let followed = tokio::time::timeout(timeout, async {
            while let Some(e) = events.next().await {
                on_event(&e);
            }
        })
        .await;
        followed.map_err(|_| ClientError::Timeout(format!("waiting for {what} {id}")))
    }
}

/// A live preview of a running job (`kiln_contract::preview`), as published on
/// `kiln.previews.<job_id>`: the image, and what its headers say.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub job_id: String,
    pub attempt: u32,
    pub seq: u64,
    pub content_type: String,
    pub ts_ms: u64,
    pub data: bytes::Bytes,
}

impl Preview {
    /// A preview from a message's headers and body; `None` when it names no job (not Kiln's).
    pub fn from_parts(headers: Option<&async_nats::HeaderMap>, data: bytes::Bytes) -> Option<Preview> {
        use kiln_contract::preview::*;
        let headers = headers?;
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some(Preview {
            job_id: get(HEADER_JOB_ID)?,
            attempt: number(HEADER_ATTEMPT) as u32,
            seq: number(HEADER_SEQ),
            content_type: get(HEADER_CONTENT_TYPE).unwrap_or_else(|| "application/octet-stream".into()),
            ts_ms: number(HEADER_TS_MS),
            data,
        })
    }

    /// As an SSE `preview` event carries it: the bytes in base64.
    pub fn view(&self) -> kiln_contract::preview::PreviewView {
        use base64::Engine as _;
        kiln_contract::preview::PreviewView {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            seq: self.seq,
            content_type: self.content_type.clone(),
            ts_ms: self.ts_ms,
            data_base64: base64::engine::general_purpose::STANDARD.encode(&self.data),
        }
    }
}

impl Client {
    /// The newest preview of a job, while its stream keeps it (`PREVIEW_MAX_AGE_S` after it
    /// was sent); `None` when there is none (no job, a model that sends none, expired).
    pub async fn preview(&self, job_id: &str) -> Result<Option<Preview>, ClientError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        one_job(job_id)?;
        let stream = self.js.get_stream_no_info(self.names.previews_stream()).await.map_err(|e| ClientError::Nats(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(&self.names.previews_subject(job_id)).await {
            Ok(m) => Ok(Preview::from_parts(Some(&m.headers), m.payload)),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) => Err(ClientError::Nats(e.to_string())),
        }
    }

    /// The previews of a job from now on, live (a core NATS subscription: none is replayed,
    /// and one sent while the subscriber is away is not seen). Never ends by itself: stop
    /// reading at the job's terminal event.
    pub async fn previews(&self, job_id: &str) -> Result<impl Stream<Item = Preview> + use<>, ClientError> {
        one_job(job_id)?;
        let sub = self.nats.subscribe(self.names.previews_subject(job_id)).await.map_err(|e| ClientError::Nats(e.to_string()))?;
        Ok(sub.filter_map(|m| async move { Preview::from_parts(m.headers.as_ref(), m.payload) }))
    }
}

/// A job id that is one subject token: `*` or `>` would follow every job's previews.
fn one_job(job_id: &str) -> Result<(), ClientError> {
    if kiln_contract::ids::is_valid_token(job_id) {
        Ok(())
    } else {
        Err(ClientError::Api(ApiError::not_found(format!("no job {job_id:?}: a job id is one token of letters, digits, '-' and '_'"))))
    }
}

/// A reply is either the expected value or `{"error": {...}}`.
pub fn decode_reply<R: DeserializeOwned>(payload: &[u8]) -> Result<R, ClientError> {
    if let Ok(err) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(ClientError::Api(err.error));
    }
    serde_json::from_slice(payload)
        .map_err(|e| ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&payload[..payload.len().min(200)]))))
}
