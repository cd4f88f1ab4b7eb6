//! The NATS protocol's JSON Schema (`docs/schema/protocol.json`, generated from the types by
//! `kiln schema`) against the messages of a real session: a real nats-server, a real node, a
//! client that submits jobs (one completes and is delivered to a webhook receiver, then redelivered, one fails, one is cancelled, a batch with a failed
//! item is retried and cancelled), lists, asks for the cluster, the queue, the models, and makes
//! mistakes. A second, raw NATS connection taps every subject of the prefix, every KV bucket and
//! every reply inbox; each message it saw is validated against the schema its subject maps to
//! (a reply against its request's reply schema), and a message whose subject maps to none fails.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kiln_core::job::JobState;
use kiln_core::protocol::{
    BatchItemRequest, BatchSubmitRequest, ControlRequest, InputValue, ListJobsRequest, QueueRequest, WebhookEvent, WebhookSpec,
};
use serde_json::{json, Value};

/// One message as the tap saw it.
#[derive(Debug, Clone)]
struct Seen {
    subject: String,
    reply: Option<String>,
    kv_operation: Option<String>,
    headers: String,
    payload: bytes::Bytes,
}

/// Subscribes to everything Kiln's protocol carries and keeps what it sees: the prefix's
/// subjects, the KV buckets' subjects and the reply inboxes (JetStream's own API, `$JS.>`, and
/// the object stores' chunks, `$O.>`, are NATS's protocol, not Kiln's).
async fn tap(url: &str) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let nats = async_nats::connect(url).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut subs = futures::stream::select_all(vec![
        nats.subscribe("kiln.>").await.unwrap(),
        nats.subscribe("$KV.>").await.unwrap(),
        nats.subscribe("_INBOX.>").await.unwrap(),
    ]);
    nats.flush().await.unwrap();
    let keep = seen.clone();
    let task = tokio::spawn(async move {
        let _nats = nats;
        while let Some(m) = subs.next().await {
            let kv_operation = m.headers.as_ref().and_then(|h| h.get("KV-Operation")).map(|v| v.to_string());
            let headers = format!("{:?}", m.headers);
            let reply = m.reply.map(|r| r.to_string());
            keep.lock().unwrap().push(Seen { subject: m.subject.to_string(), reply, kv_operation, headers, payload: m.payload });
        }
    });
    (seen, task)
}

/// The schema file and a validator for each schema in it, made once.
struct Schemas {
    doc: Value,
    validators: HashMap<String, jsonschema::Validator>,
}

impl Schemas {
    fn load() -> Schemas {
        let text =
            std::fs::read_to_string(repo().join("docs/schema/protocol.json")).expect("docs/schema/protocol.json (kiln schema --write it)");
        Schemas { doc: serde_json::from_str(&text).unwrap(), validators: HashMap::new() }
    }

    /// The first subject entry whose pattern matches.
    fn entry(&self, subject: &str) -> Option<Value> {
        self.doc["x-kiln-subjects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| kiln_contract::schema::subject_matches(e["subject"].as_str().unwrap(), subject))
            .cloned()
    }

    /// Validates `body` against `schema` (a `$ref` into the document's `$defs`, or `anyOf`).
    fn check(&mut self, schema: &Value, body: &Value) -> Result<(), String> {
        let key = schema.to_string();
        if !self.validators.contains_key(&key) {
            let mut root = json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": self.doc["$defs"].clone()});
            for (k, v) in schema.as_object().unwrap() {
                root[k] = v.clone();
            }
            let validator = jsonschema::draft202012::new(&root).map_err(|e| format!("schema {key} does not compile: {e}"))?;
            self.validators.insert(key.clone(), validator);
        }
        let errors: Vec<String> = self.validators[&key].iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path)).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messages_of_a_real_session_match_the_protocol_schema() {
    let mut cluster = TestCluster::new();
    // A webhook receiver on loopback that answers 200: the session's webhook messages, their
    // delivery log and a redelivery are on the wire too.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_url = format!("http://{}/hook", receiver.local_addr().unwrap());
    let receiver_task = tokio::spawn(async move {
        axum::serve(receiver, axum::Router::new().fallback(|| async { "ok" })).await.unwrap();
    });
    let webhooks = "\n[webhooks]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nallow_loopback = true\n";
    let models = format!("{}{webhooks}", demo_model("demo", &[], 1, 60_000));
    cluster.add_node("n1", &config_toml(&cluster.url(), &["cpu:0"], 10_000, &models));
    cluster.wait_node_ready("n1", 1).await;
    // The tap starts once the node serves its API: a subscriber on `kiln.>` is a responder in
    // the server's eyes, so a request sent before the node subscribed would wait out its timeout
    // instead of failing at once with "no responders" (wait_node_ready's first tries did). The
    // registry's heartbeats rewrite its entries after this.
    let (seen, tap_task) = tap(&cluster.url()).await;
    let client = cluster.client().await;

    // A session of every endpoint, with errors among them.
    client.models().await.unwrap();
    client.cluster().await.unwrap();
    client.queue(&QueueRequest::default()).await.unwrap();
    let mut with_webhook = prompt_request("demo", "a fox", json!({"steps": 2, "step_ms": 20}));
    with_webhook.webhook = Some(WebhookSpec { url: receiver_url, events: vec![WebhookEvent::Started, WebhookEvent::Completed] });
    let done = client.submit(&with_webhook).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &done, Duration::from_secs(60)).await.status, JobState::Completed);
    let delivered = |reply: &kiln_core::protocol::WebhooksReply| reply.attempts.iter().filter(|a| a.outcome == "delivered").count();
    assert!(
        eventually(Duration::from_secs(30), || async { delivered(&client.webhooks(&done).await.unwrap()) == 2 }).await,
        "both webhook messages delivered: {:?}",
        client.webhooks(&done).await
    );
    client.redeliver_webhooks(&done).await.unwrap();
    assert!(eventually(Duration::from_secs(30), || async { delivered(&client.webhooks(&done).await.unwrap()) == 3 }).await, "redelivered");
    let failed = client.submit(&prompt_request("demo", "a bad fox", json!({"steps": 1, "fail": "fatal"}))).await.unwrap().job_id;
    assert_eq!(wait_terminal(&client, &failed, Duration::from_secs(60)).await.status, JobState::Failed);
    let long = client.submit(&prompt_request("demo", "a slow fox", json!({"steps": 100, "step_ms": 100}))).await.unwrap().job_id;
    assert!(eventually(Duration::from_secs(30), || async { client.status(&long).await.unwrap().status == JobState::Running }).await);
    client.cancel(&long).await.unwrap();
    assert_eq!(wait_terminal(&client, &long, Duration::from_secs(30)).await.status, JobState::Cancelled);
    client.result(&done).await.unwrap();
    client.result(&failed).await.unwrap();
    client.jobs(&ListJobsRequest::default()).await.unwrap();
    assert!(client.status("no-such-job").await.is_err());
    assert!(client.submit(&prompt_request("no-such-model", "x", json!({}))).await.is_err());
    let item = |prompt: &str, p: Value| BatchItemRequest {
        inputs: BTreeMap::from([("prompt".to_string(), InputValue::Inline(json!(prompt)))]),
        params: params(p),
        ..Default::default()
    };
    let batch = BatchSubmitRequest {
        model: "demo".into(),
        items: vec![item("one", json!({"steps": 1, "step_ms": 10})), item("two", json!({"steps": 1, "fail": "fatal"}))],
        // One at a time: the second item's job is made later, from the batch's plan.
        max_concurrency: Some(1),
        ..Default::default()
    };
    let batch_id = client.submit_batch(&batch).await.unwrap().batch_id;
    let view = client.wait_batch(&batch_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!((view.summary.completed, view.summary.failed), (1, 1), "{view:?}");
    client.batch(&batch_id).await.unwrap();
    let retry = client.retry_batch(&batch_id).await.unwrap().batch_id;
    client.cancel_batch(&retry).await.unwrap();
    client.control(&ControlRequest::Ping { node: "n1".into() }).await.unwrap();
    // The registry's heartbeats and the last events settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tap_task.abort();
    receiver_task.abort();
    let seen = seen.lock().unwrap().clone();

    let mut schemas = Schemas::load();
    // Replies go to the inbox their request named: the request's entry says what they are.
    let mut replies: HashMap<String, (String, Value)> = HashMap::new();
    let (mut unmapped, mut invalid, mut not_json) = (vec![], vec![], vec![]);
    // JetStream consumers' deliveries (the client's event replay, KV watches) reach the tap
    // through their inboxes under the stored message's own subject: copies of messages Kiln
    // published, validated like them.
    let mut patterns: BTreeMap<String, usize> = BTreeMap::new();
    let mut replies_checked: BTreeMap<String, usize> = BTreeMap::new();
    let (mut skipped_inbox, mut headers_only) = (0, 0);
    for m in &seen {
        let (pattern, body_spec, request) = if m.subject.starts_with("_INBOX.") {
            match replies.get(&m.subject) {
                Some((pattern, spec)) => {
                    *replies_checked.entry(pattern.clone()).or_default() += 1;
                    (pattern.clone(), spec.clone(), false)
                }
                // JetStream's acks and deliveries, KV watches: NATS's protocol, not Kiln's.
                None => {
                    skipped_inbox += 1;
                    continue;
                }
            }
        } else {
            if m.kv_operation.is_some() && m.payload.is_empty() {
                continue; // a KV delete or purge marker, as the entry's description says
            }
            // A headers-only delivery of a KV entry (the body's size in `Nats-Msg-Size`): the
            // `jobs` listing reads the bucket's keys with a headers-only consumer, and JetStream
            // delivers to the reply inbox the tap also hears, under the entry's own subject.
            // Not a message Kiln wrote; counted, not validated.
            if m.payload.is_empty() && m.subject.starts_with("$KV.") && m.headers.contains("Nats-Msg-Size") {
                headers_only += 1;
                continue;
            }
            let Some(entry) = schemas.entry(&m.subject) else {
                unmapped.push(m.subject.clone());
                continue;
            };
            let pattern = entry["subject"].as_str().unwrap().to_string();
            if let (Some(reply), Some(reply_spec)) = (&m.reply, entry.get("reply")) {
                replies.insert(reply.clone(), (format!("{pattern} (reply)"), reply_spec.clone()));
            }
            (pattern, entry["message"].clone(), entry["kind"] == "request")
        };
        *patterns.entry(pattern.clone()).or_default() += 1;
        let Some(schema) = body_spec.get("schema") else {
            assert_eq!(body_spec["content_type"], "application/octet-stream", "{pattern}: {body_spec}");
            continue;
        };
        // A request of the endpoints that take no field may be empty (docs/PROTOCOL.md).
        let text: &[u8] = if m.payload.is_empty() && request { b"{}" } else { &m.payload };
        let body: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => {
                not_json.push(format!("{} ({pattern}): {e}: {:?}, headers {}", m.subject, String::from_utf8_lossy(&m.payload), m.headers));
                continue;
            }
        };
        if let Err(e) = schemas.check(schema, &body) {
            invalid.push(format!("{} ({pattern}): {e}\n  {body}", m.subject));
        }
    }
    println!(
        "{} messages tapped, {skipped_inbox} inbox messages of NATS's own protocol skipped, {headers_only} headers-only KV copies skipped",
        seen.len()
    );
    for (p, n) in &patterns {
        println!("  {n:>5}  {p}");
    }
    assert!(unmapped.is_empty(), "subjects that map to no schema:\n{}", unmapped.join("\n"));
    assert!(not_json.is_empty(), "JSON subjects that carried something else:\n{}", not_json.join("\n"));
    assert!(invalid.is_empty(), "{} messages do not match their schema:\n{}", invalid.len(), invalid.join("\n"));

    // The session covered the protocol: every endpoint's request and reply, the events, the
    // results feed, the queue, the registry, the records, the cancel notice.
    let mut expected: BTreeSet<String> = kiln_core::endpoint::Endpoint::ALL.iter().map(|e| format!("kiln.api.{}", e.name())).collect();
    expected.extend(
        [
            "kiln.events.*",
            "kiln.finished.*",
            "kiln.jobs.>",
            "kiln.node.*.cancel",
            "$KV.kiln_gpus.>",
            "$KV.kiln_nodes.*",
            "$KV.kiln_jobs.*",
            "$KV.kiln_batches.*",
            "$KV.kiln_batches.plan.*",
            "kiln.webhooks.*",
            "kiln.webhooklog.*",
        ]
        .map(String::from),
    );
    let missing: Vec<&String> = expected.iter().filter(|p| !patterns.contains_key(*p)).collect();
    assert!(missing.is_empty(), "the session never used {missing:?}");
    for e in kiln_core::endpoint::Endpoint::ALL {
        let reply = format!("kiln.api.{} (reply)", e.name());
        assert!(replies_checked.get(&reply).copied().unwrap_or(0) > 0, "no reply of {} was checked", e.name());
    }

    // The validators can fail: a message with a wrong field does not pass.
    let event = schemas.entry("kiln.events.j1").unwrap();
    let bad = json!({"job_id": "j1", "attempt": 1, "type": "exploded", "ts_ms": 1});
    assert!(schemas.check(&event["message"]["schema"], &bad).is_err());
    let submit = schemas.entry("kiln.api.submit").unwrap();
    assert!(schemas.check(&submit["message"]["schema"], &json!({"model": "demo", "prioirty": 1})).is_err());
}
