//! Webhooks, the pure part: which events a webhook gets, the message it gets (payload and
//! Standard Webhooks signature), which URLs and addresses it may reach. The delivery itself
//! (queue, HTTP, log) is `kiln_actors::webhook`; when to retry is [`crate::policy`]'s
//! `webhook_verdict` and `webhook_backoff`.
//!
//! Signing follows <https://www.standardwebhooks.com/>: the secret is `whsec_<base64>`, the
//! signed content is `"{webhook-id}.{webhook-timestamp}.{body}"`, and `webhook-signature` is
//! `v1,<base64 of its HMAC-SHA256>`.

use std::net::IpAddr;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::job::{JobRecord, JobState};
use crate::protocol::{ApiError, Artifact, Event, EventKind, Labels, WebhookEvent, WebhookSpec};

/// Secrets shorter than this are refused: a guessable key signs nothing.
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// The key bytes of a `whsec_<base64>` secret, or `None` if it is not one.
pub fn decode_secret(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix("whsec_")?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()).then_some(key)
}

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`: the value of `webhook-signature`.
pub fn sign(key: &[u8], id: &str, timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A receiver's check: one of the space-separated signatures in `header` is `body`'s (in
/// constant time, as the spec asks). The timestamp's tolerance is the receiver's own call.
pub fn verify(key: &[u8], id: &str, timestamp_s: u64, body: &[u8], header: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp_s}.").as_bytes());
    mac.update(body);
    header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| base64::engine::general_purpose::STANDARD.decode(sig).is_ok_and(|sig| mac.clone().verify_slice(&sig).is_ok()))
}

/// The webhook event a job event is, if any: `running` is `started`, a progress report is
/// `progress`, each ending is itself. Everything else (queued, retrying, messages,
/// artifacts, batch events) is not sent.
pub fn event_of(event: &Event) -> Option<WebhookEvent> {
    match (event.kind, event.status) {
        (EventKind::Status, Some(JobState::Running)) => Some(WebhookEvent::Started),
        (EventKind::Status, Some(JobState::Completed)) => Some(WebhookEvent::Completed),
        (EventKind::Status, Some(JobState::Failed)) => Some(WebhookEvent::Failed),
        (EventKind::Status, Some(JobState::Cancelled)) => Some(WebhookEvent::Cancelled),
        (EventKind::Progress, _) => Some(WebhookEvent::Progress),
        _ => None,
    }
}

/// Whether a webhook that asked for `events` gets `event` (none asked: the terminal ones).
pub fn wants(events: &[WebhookEvent], event: WebhookEvent) -> bool {
    if events.is_empty() {
        WebhookEvent::TERMINAL.contains(&event)
    } else {
        events.contains(&event)
    }
}

/// Where one event of a job goes: the job's own webhook (`endpoint: None`), then each
/// configured endpoint whose models and API keys include the job's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub endpoint: Option<String>,
    pub url: String,
}

/// Every target of `event` for the job `record` under `config`, in a fixed order (the order
/// makes each target's `webhook-id` stable when the event is read again).
pub fn targets(record: &JobRecord, config: &crate::config::WebhooksConfig, event: WebhookEvent) -> Vec<Target> {
    let mut out = vec![];
    if let Some(WebhookSpec { url, events }) = &record.webhook {
        if wants(events, event) {
            out.push(Target { endpoint: None, url: url.clone() });
        }
    }
    let api_key = record.labels.get(crate::protocol::API_KEY_LABEL);
    for e in &config.endpoints {
        let of_model = e.models.is_empty() || e.models.contains(&record.model);
        let of_key = e.api_keys.is_empty() || api_key.is_some_and(|k| e.api_keys.contains(k));
        if of_model && of_key && wants(&e.events, event) {
            out.push(Target { endpoint: Some(e.name.clone()), url: e.url.clone() });
        }
    }
    out
}

/// The `webhook-id` of the message for the event stored at `event_seq` to the target named
/// `endpoint`: the same each time the event is read (so a second fan-out after a crash is
/// de-duplicated), different for each event and endpoint.
pub fn message_id(job_id: &str, event_seq: u64, endpoint: Option<&str>) -> String {
    format!("msg_{job_id}_{event_seq}_{}", endpoint.unwrap_or("job"))
}

/// The messages of one event (stored at `event_seq`) for its `targets`, bodies made once.
/// `manual`: a redelivery (same `webhook-id`, its `retry_for_s` counted from now).
pub fn messages(
    record: &JobRecord,
    event: &Event,
    event_seq: u64,
    kind: WebhookEvent,
    targets: &[Target],
    manual: bool,
) -> Vec<crate::nats::webhooks::WebhookMessage> {
    let body = payload(record, event, kind);
    let ids = |endpoint: Option<&str>| message_id(&record.job_id, event_seq, endpoint);
    messages_of(record, &body, &ids, event.ts_ms, targets, manual)
}

/// A live preview's messages (`job.preview`): `preview_seq` is its sequence in the previews
/// stream, which its `webhook-id` carries as `p<seq>` (the events stream's sequences are
/// another count).
pub fn preview_messages(
    record: &JobRecord,
    preview: PreviewRef,
    attempt: u32,
    ts_ms: u64,
    preview_seq: u64,
    targets: &[Target],
) -> Vec<crate::nats::webhooks::WebhookMessage> {
    let mut event = Event::status(&record.job_id, attempt, record.state);
    event.ts_ms = ts_ms;
    let mut body = payload(record, &event, WebhookEvent::Preview);
    body.data.preview = Some(preview);
    let ids = |endpoint: Option<&str>| format!("msg_{}_p{preview_seq}_{}", record.job_id, endpoint.unwrap_or("job"));
    messages_of(record, &body, &ids, ts_ms, targets, false)
}

fn messages_of(
    record: &JobRecord,
    body: &Payload,
    ids: &dyn Fn(Option<&str>) -> String,
    event_ms: u64,
    targets: &[Target],
    manual: bool,
) -> Vec<crate::nats::webhooks::WebhookMessage> {
    let kind = body.kind.clone();
    let body = serde_json::to_string(body).expect("payloads serialize");
    targets
        .iter()
        .map(|t| crate::nats::webhooks::WebhookMessage {
            webhook_id: ids(t.endpoint.as_deref()),
            job_id: record.job_id.clone(),
            kind: kind.clone(),
            endpoint: t.endpoint.clone(),
            url: t.url.clone(),
            body: body.clone(),
            event_ms: if manual { crate::now_ms() } else { event_ms },
            manual,
        })
        .collect()
}

/// The JSON body of a message: `{"type": "job.completed", "timestamp": .., "data": {..}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339, UTC, of the event.
    pub timestamp: String,
    pub data: PayloadData,
}

/// The job as the message tells it; `service_name`, `flag`, `result` and `feedback` say it as
/// seed 000's result messages did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadData {
    pub job_id: String,
    pub model: String,
    pub status: JobState,
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
    /// The stored results (fetch them with `kiln.api.result` or `GET /v1/jobs/{id}/artifacts/{name}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// `job.preview`: what the live preview is; its bytes are at `GET /v1/jobs/{id}/preview`
    /// (or `kiln.previews.<job_id>`) for 10 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewRef>,
    /// Seed 000's names: the model, success as a flag, the artifacts, the error message.
    pub service_name: String,
    pub flag: bool,
    pub result: Vec<Artifact>,
    pub feedback: String,
}

/// A live preview as a `job.preview` message names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewRef {
    pub content_type: String,
    pub size: u64,
    /// Its number among the attempt's previews.
    pub seq: u64,
}

/// The message for `event` (of kind `kind`) of the job `record` (as read when the event is
/// fanned out: an ending's artifacts and error are in it).
pub fn payload(record: &JobRecord, event: &Event, kind: WebhookEvent) -> Payload {
    let status = event.status.unwrap_or(record.state);
    let terminal = WebhookEvent::TERMINAL.contains(&kind);
    let artifacts = if terminal { record.artifacts.clone() } else { vec![] };
    let error = if terminal { event.error.clone().or_else(|| record.error.clone()) } else { None };
    Payload {
        kind: format!("job.{}", kind.as_str()),
        timestamp: rfc3339_ms(event.ts_ms),
        data: PayloadData {
            job_id: record.job_id.clone(),
            model: record.model.clone(),
            status,
            attempt: event.attempt,
            stage: event.stage.clone(),
            progress: event.progress,
            artifacts: artifacts.clone(),
            error: error.clone(),
            labels: record.labels.clone(),
            preview: None,
            service_name: record.model.clone(),
            flag: status == JobState::Completed,
            result: artifacts,
            feedback: error.map(|e| e.message).unwrap_or_default(),
        },
    }
}

fn rfc3339_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A webhook URL as submit and the config take it: `http` or `https`, a host, no credentials.
/// With `allow_private` false a host that is a private, loopback or link-local address, or
/// `localhost`, is refused here; a name that resolves to one is refused on each attempt.
pub fn check_url(url: &str, allow_private: bool) -> Result<url::Url, String> {
    if url.len() > 2048 {
        return Err("must be at most 2048 bytes".into());
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("must be http or https, not {:?}", parsed.scheme()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials (the signature authenticates the sender)".into());
    }
    let host = match parsed.host() {
        Some(host) => host,
        None => return Err("has no host".into()),
    };
    if !allow_private {
        let refused = match host {
            url::Host::Ipv4(ip) => is_forbidden(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => is_forbidden(IpAddr::V6(ip)),
            url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost"),
        };
        if refused {
            return Err("names a private, loopback or link-local address, which this cluster refuses ([webhooks] allow_loopback)".into());
        }
    }
    Ok(parsed)
}

/// Whether an address is one a webhook must not reach unless allowed: loopback, private
/// (RFC 1918, unique local), link-local (the cloud metadata service lives there), shared
/// address space (CGNAT), unspecified, multicast, broadcast; IPv4-mapped IPv6 as its IPv4.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || a == 0
                || a >= 240 // reserved (and the broadcast address)
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn the_signature_is_the_standard_webhooks_example() {
        // The example of the Standard Webhooks reference libraries.
        let key = decode_secret(SECRET).expect("a secret");
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body, &format!("v1,bm90IGl0 {sig}")));
        assert!(!verify(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body, &sig));
    }

    #[test]
    fn secrets_are_whsec_and_long_enough() {
        assert!(decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        assert!(decode_secret("whsec_c2hvcnQ=").is_none());
        assert!(decode_secret("whsec_!!").is_none());
    }

    #[test]
    fn urls_are_http_with_a_host_and_private_ones_refused_unless_allowed() {
        assert!(check_url("https://example.com/hook", false).is_ok());
        assert!(check_url("ftp://example.com/hook", true).is_err());
        assert!(check_url("https://user:pw@example.com/", true).is_err());
        assert!(check_url("not a url", true).is_err());
        for private in ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/", "http://[::1]/", "http://169.254.169.254/latest"]
        {
            assert!(check_url(private, false).is_err(), "{private}");
            assert!(check_url(private, true).is_ok(), "{private}");
        }
    }

    #[test]
    fn the_terminal_events_are_the_default() {
        assert!(wants(&[], WebhookEvent::Completed) && wants(&[], WebhookEvent::Cancelled));
        assert!(!wants(&[], WebhookEvent::Progress) && !wants(&[], WebhookEvent::Started));
        assert!(wants(&[WebhookEvent::Progress], WebhookEvent::Progress));
        assert!(!wants(&[WebhookEvent::Progress], WebhookEvent::Completed));
    }

    #[test]
    fn endpoints_select_jobs_by_model_and_by_the_api_key_label() {
        let endpoint = |name: &str, models: &[&str], api_keys: &[&str]| crate::config::WebhookEndpoint {
            name: name.into(),
            url: format!("https://example.com/{name}"),
            models: models.iter().map(|m| m.to_string()).collect(),
            api_keys: api_keys.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        let config = crate::config::WebhooksConfig {
            endpoints: vec![
                endpoint("all", &[], &[]),
                endpoint("demo", &["demo"], &[]),
                endpoint("team-a", &[], &["team-a"]),
                endpoint("team-a-demo", &["demo"], &["team-a"]),
            ],
            ..Default::default()
        };
        let names = |model: &str, key: Option<&str>| {
            let mut record = JobRecord::queued("j", model, 1, 0);
            if let Some(k) = key {
                record.labels.insert(crate::protocol::API_KEY_LABEL.into(), k.into());
            }
            targets(&record, &config, WebhookEvent::Completed).into_iter().map(|t| t.endpoint.unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(names("demo", Some("team-a")), ["all", "demo", "team-a", "team-a-demo"]);
        assert_eq!(names("demo", Some("team-b")), ["all", "demo"]);
        assert_eq!(names("demo", None), ["all", "demo"], "a job without the label is no key's");
        assert_eq!(names("other", Some("team-a")), ["all", "team-a"]);
    }

    proptest! {
        /// A signature verifies for exactly its own id, timestamp and body.
        #[test]
        fn a_signature_verifies_only_its_own_message(
            key in proptest::collection::vec(any::<u8>(), 24..64),
            id in "[a-z0-9_]{1,30}", ts in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..200), flip in any::<usize>(),
        ) {
            let sig = sign(&key, &id, ts as u64, &body);
            prop_assert!(verify(&key, &id, ts as u64, &body, &sig));
            prop_assert!(!verify(&key, &id, ts as u64 + 1, &body, &sig));
            let mut other = body.clone();
            if other.is_empty() { other.push(0) } else { let i = flip % other.len(); other[i] ^= 1 }
            prop_assert!(!verify(&key, &id, ts as u64, &other, &sig));
        }

        /// No private, loopback or link-local IPv4 address passes, whether as itself or mapped
        /// into IPv6; public ones do.
        #[test]
        fn private_addresses_are_refused_in_both_families(a in any::<u8>(), b in any::<u8>(), c in any::<u8>(), d in any::<u8>()) {
            let v4 = std::net::Ipv4Addr::new(a, b, c, d);
            let private = a == 10 || a == 127 || a == 0 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168)
                || (a == 169 && b == 254) || a >= 224 || (a == 100 && (64..128).contains(&b));
            prop_assert_eq!(is_forbidden(IpAddr::V4(v4)), private);
            prop_assert_eq!(is_forbidden(IpAddr::V6(v4.to_ipv6_mapped())), private);
        }
    }
}
