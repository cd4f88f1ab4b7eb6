//! The NATS services protocol (micro, ADR-32) for `kiln-api`, answered by Kiln itself:
//! discovery on `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (each also `.<name>` and
//! `.<name>.<id>`), and one queue subscription per endpoint. The endpoints are the caller's
//! (`kiln-api`'s: every `crate::api::Endpoint`), and each request comes tagged with its own.
//!
//! Why not async-nats's `service` module: its error reply has an empty body (the error lives
//! in the `Nats-Service-Error` headers only), and its stats count an error only through that
//! reply. Kiln's clients read `{"error": {"code", "message"}}` from the body, as PROTOCOL
//! documents, while services tooling reads the headers and `$SRV.STATS`; an outside client saw
//! `num_errors` stay 0 after about 40 error replies. So an error reply here carries both: the
//! JSON body and the `Nats-Service-Error` / `Nats-Service-Error-Code` headers, and counts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use kiln_core::protocol::{ApiError, ErrorCode};
use kiln_core::task::{self, TaskGuard, TaskKind};
use serde::Serialize;

/// Header naming an error reply's description, per the services convention.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// Header with an error reply's numeric (HTTP-like) status.
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// The HTTP-like status that services tooling expects: the one the HTTP gateway answers with.
pub fn status_code(code: ErrorCode) -> u16 {
    crate::gateway::error::http_status(code).as_u16()
}

/// An endpoint of a service, as the requests to it are tagged (`kiln-api`'s is
/// `crate::api::Endpoint`): its name in `$SRV.INFO` and `$SRV.STATS`.
pub trait EndpointName: Copy + Send + Sync + 'static {
    fn name(self) -> &'static str;
}

/// What `$SRV.INFO` and `$SRV.PING` say about this instance.
#[derive(Debug, Clone)]
pub struct ServiceSpec<E> {
    pub name: String,
    pub version: String,
    pub description: String,
    pub queue_group: String,
    /// (endpoint, subject), in the order INFO lists them.
    pub endpoints: Vec<(E, String)>,
}

/// Counters of one endpoint, as `$SRV.STATS` reports them.
#[derive(Debug, Clone, Default)]
struct EndpointStats {
    requests: u64,
    errors: u64,
    processing_ns: u128,
    last_error: String,
}

type Stats = Arc<Mutex<BTreeMap<&'static str, EndpointStats>>>;

/// One request to an endpoint; answer it with [`respond`](Self::respond).
pub struct ServiceRequest<E> {
    pub endpoint: E,
    pub message: Message,
    issued: Instant,
    client: Client,
    stats: Stats,
}

impl<E: EndpointName> ServiceRequest<E> {
    /// Sends `body`; an `error` adds the services error headers and counts in `$SRV.STATS`.
    pub async fn respond(&self, body: Bytes, error: Option<&ApiError>) -> Result<(), async_nats::PublishError> {
        let result = match &self.message.reply {
            None => Ok(()), // a publish without a reply subject: nobody to answer
            Some(reply) => match error {
                None => self.client.publish(reply.clone(), body).await,
                Some(error) => {
                    let mut headers = HeaderMap::new();
                    headers.insert(SERVICE_ERROR, header_safe(&error.message).as_str());
                    headers.insert(SERVICE_ERROR_CODE, status_code(error.code).to_string().as_str());
                    self.client.publish_with_headers(reply.clone(), headers, body).await
                }
            },
        };
        let mut stats = self.stats.lock().expect("stats lock");
        let entry = stats.entry(self.endpoint.name()).or_default();
        entry.requests += 1;
        entry.processing_ns += self.issued.elapsed().as_nanos();
        if let Some(error) = error {
            entry.errors += 1;
            entry.last_error = format!("{}: {}", status_code(error.code), header_safe(&error.message));
        }
        result
    }
}

/// A header value holds no line breaks. The message keeps the body's bound
/// ([`kiln_core::protocol::MAX_ERROR_MESSAGE_BYTES`]), so header and body say the same (issue 23: the
/// header was cut at 512 bytes while the body went to 1,024).
fn header_safe(message: &str) -> String {
    let one_line: String = message.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    kiln_core::protocol::truncate_utf8(one_line, kiln_core::protocol::MAX_ERROR_MESSAGE_BYTES)
}

/// A running service instance: dropping it stops answering discovery (the endpoint
/// subscriptions live in the request stream).
pub struct Service {
    discovery: TaskGuard<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.discovery.abort();
    }
}

/// What every discovery reply starts with (`type` says which reply it is).
#[derive(Serialize, Clone, Copy)]
struct Identity<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
struct InfoEndpoint<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
}

#[derive(Serialize)]
struct InfoReply<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    description: &'a str,
    endpoints: Vec<InfoEndpoint<'a>>,
}

#[derive(Serialize)]
struct StatsEndpoint<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: u64,
    num_errors: u64,
    /// Nanoseconds, as the convention has it.
    processing_time: u128,
    average_processing_time: u128,
    last_error: String,
}

#[derive(Serialize)]
struct StatsReply<'a> {
    #[serde(flatten)]
    identity: Identity<'a>,
    started: &'a str,
    endpoints: Vec<StatsEndpoint<'a>>,
}

/// Subscribes the endpoints (in `spec.queue_group`) and the discovery subjects, and returns
/// the instance with the stream of endpoint requests.
pub async fn start<E: EndpointName>(
    client: &Client,
    spec: ServiceSpec<E>,
) -> Result<(Service, futures::stream::BoxStream<'static, ServiceRequest<E>>), async_nats::SubscribeError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let started = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let stats: Stats = Arc::new(Mutex::new(spec.endpoints.iter().map(|(e, _)| (e.name(), EndpointStats::default())).collect()));

    let mut endpoint_streams = Vec::new();
    for (endpoint, subject) in &spec.endpoints {
        let subscription = client.queue_subscribe(subject.clone(), spec.queue_group.clone()).await?;
        let (endpoint, client, stats) = (*endpoint, client.clone(), stats.clone());
        endpoint_streams.push(
            subscription
                .map(move |message| ServiceRequest {
                    endpoint,
                    message,
                    issued: Instant::now(),
                    client: client.clone(),
                    stats: stats.clone(),
                })
                .boxed(),
        );
    }

    let mut discovery_subs = Vec::new();
    for verb in ["PING", "INFO", "STATS"] {
        for subject in [format!("$SRV.{verb}"), format!("$SRV.{verb}.{}", spec.name), format!("$SRV.{verb}.{}.{id}", spec.name)] {
            discovery_subs.push(client.subscribe(subject).await?.map(move |m| (verb, m)).boxed());
        }
    }
    let mut discovery_requests = futures::stream::select_all(discovery_subs);
    let (client, answer_stats) = (client.clone(), stats.clone());
    let discovery = task::spawn(TaskKind::OwnerLoop, "service discovery", async move {
        let metadata = BTreeMap::new();
        let identity = |kind| Identity { kind, name: &spec.name, id: &id, version: &spec.version, metadata: &metadata };
        while let Some((verb, message)) = discovery_requests.next().await {
            let Some(reply) = message.reply else { continue };
            let body = match verb {
                "PING" => serde_json::to_vec(&identity("io.nats.micro.v1.ping_response")),
                "INFO" => serde_json::to_vec(&InfoReply {
                    identity: identity("io.nats.micro.v1.info_response"),
                    description: &spec.description,
                    endpoints: spec
                        .endpoints
                        .iter()
                        .map(|(e, subject)| InfoEndpoint { name: e.name(), subject, queue_group: &spec.queue_group })
                        .collect(),
                }),
                _ => {
                    let stats = answer_stats.lock().expect("stats lock").clone();
                    serde_json::to_vec(&StatsReply {
                        identity: identity("io.nats.micro.v1.stats_response"),
                        started: &started,
                        endpoints: spec
                            .endpoints
                            .iter()
                            .map(|(e, subject)| {
                                let s = stats.get(e.name()).cloned().unwrap_or_default();
                                StatsEndpoint {
                                    name: e.name(),
                                    subject,
                                    queue_group: &spec.queue_group,
                                    num_requests: s.requests,
                                    num_errors: s.errors,
                                    processing_time: s.processing_ns,
                                    average_processing_time: s.processing_ns.checked_div(s.requests as u128).unwrap_or(0),
                                    last_error: s.last_error,
                                }
                            })
                            .collect(),
                    })
                }
            };
            if let Err(e) = client.publish(reply, body.expect("service replies serialize").into()).await {
                tracing::debug!(error = %e, "cannot answer a service discovery request");
            }
        }
    });
    Ok((Service { discovery }, futures::stream::select_all(endpoint_streams).boxed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_an_error_status() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::UnknownModel,
            ErrorCode::NotFound,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Overloaded,
            ErrorCode::QuotaExceeded,
            ErrorCode::DeadlineExceeded,
            ErrorCode::Cancelled,
            ErrorCode::EngineFailed,
            ErrorCode::Internal,
        ] {
            assert!((400..600).contains(&status_code(code)), "{code:?}");
        }
    }

    #[test]
    fn header_values_are_one_line_and_bounded() {
        let v = header_safe(&format!("a\r\nb{}", "x".repeat(2000)));
        assert!(!v.contains('\r') && !v.contains('\n') && v.len() <= kiln_core::protocol::MAX_ERROR_MESSAGE_BYTES);
        assert!(v.len() > 512, "cut to the body's bound, not shorter");
    }
}
