//! The NATS protocol as one JSON Schema document (draft 2020-12): every message's schema under
//! `$defs`, generated from the types of this crate by schemars, and the subjects they travel
//! on under `x-kiln-subjects` (a NATS wildcard pattern each, in match order: the first pattern
//! that matches a subject says what its messages are).
//!
//! `kiln schema` prints [`document`]; `docs/schema/protocol.json` is its output for the
//! default prefix, kept equal to it by a test (`KILN_BLESS=1 cargo test -p kiln-contract
//! schema` or `kiln schema --write docs/schema/protocol.json` writes it again), and
//! `tests/protocol_schema.rs` validates the messages of a real session against that file.
//! [`asyncapi`] is the same as an AsyncAPI 3.0 document (`docs/asyncapi.json`, `kiln schema
//! --asyncapi`), for the tools that read AsyncAPI.
//! Nothing here is written by hand but the subject list: a field added to a type appears in the
//! document by itself.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::batch::{BatchPlan, BatchRecord};
use crate::endpoint::Endpoint;
use crate::job::JobRecord;
use crate::names::Names;
use crate::protocol::*;

/// What travels on the subjects of one pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A JSON message of this schema (a `$ref` into `$defs`, or `anyOf` of them).
    Json(Value),
    /// Not JSON: bytes of the encoding named (`postcard`, `image`, `text`...), described.
    Bytes { encoding: &'static str, description: &'static str },
}

/// One subject pattern and what travels on it.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectSpec {
    /// A NATS subject pattern (`*` one token, `>` the rest).
    pub subject: String,
    /// `request` (request/reply: `message` is the request, `reply` the answer), `event` (a
    /// publish, kept by a stream when `stream` is set), `kv` (a KV entry's value).
    pub kind: &'static str,
    pub message: Body,
    pub reply: Option<Body>,
    /// Who reads or writes it: `clients`, `operators`, `nodes`.
    pub audience: &'static str,
    pub description: String,
    /// The stream or bucket that keeps its messages, if any.
    pub kept_by: Option<String>,
}

fn reference<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    serde_json::to_value(generator.subschema_for::<T>()).expect("schemas serialize")
}

/// A reply that is `ok` on success and an [`ErrorReply`] on failure.
fn or_error(ok: Value, generator: &mut SchemaGenerator) -> Body {
    Body::Json(json!({"anyOf": [ok, reference::<ErrorReply>(generator)]}))
}

/// Every subject pattern of the protocol under `names`, in match order, with their schemas
/// registered in `generator`.
pub fn subjects(names: &Names, generator: &mut SchemaGenerator) -> Vec<SubjectSpec> {
    let p = names.prefix();
    let mut out = Vec::new();
    for e in Endpoint::ALL {
        let request = serde_json::to_value(e.request_schema(generator)).expect("schemas serialize");
        let reply = serde_json::to_value(e.reply_schema(generator)).expect("schemas serialize");
        out.push(SubjectSpec {
            subject: e.subject(&names.api_group()),
            kind: "request",
            message: Body::Json(request),
            reply: Some(or_error(reply, generator)),
            audience: if e == Endpoint::Control { "operators" } else { "clients" },
            description: format!("{} (service `{}`)", e.description(), names.service_name()),
            kept_by: None,
        });
    }
    let event = |subject: String, message: Body, audience, description: &str, kept_by: Option<String>| SubjectSpec {
        subject,
        kind: "event",
        message,
        reply: None,
        audience,
        description: description.to_string(),
        kept_by,
    };
    out.push(event(
        format!("{p}.events.*"),
        Body::Json(reference::<Event>(generator)),
        "clients",
        "Progress events of one job (`<prefix>.events.<job_id>`), or item events of one batch (`<prefix>.events.<batch_id>`)",
        Some(names.events_stream()),
    ));
    out.push(event(
        format!("{p}.finished.*"),
        Body::Json(reference::<JobView>(generator)),
        "clients",
        "The results feed: every job's end, once, as its view (`<prefix>.finished.<model>`)",
        Some(names.finished_stream()),
    ));
    out.push(event(
        format!("{p}.previews.*"),
        Body::Bytes {
            encoding: "image",
            description: "A live preview of a running job: the image bytes; headers `Content-Type`, `Kiln-Attempt`, `Kiln-Seq` and the others of docs/PROTOCOL.md, \"Live previews\"",
        },
        "clients",
        "Live previews of one job (`<prefix>.previews.<job_id>`)",
        Some(names.previews_stream()),
    ));
    out.push(event(
        format!("{p}.jobs.>"),
        // The queue message is `kiln_core::nats::jobs::QueueMessage`, `{"job_id": ..}`: the
        // same JSON as a JobRef (tests/protocol_schema.rs holds it to that on real messages).
        Body::Json(reference::<JobRef>(generator)),
        "nodes",
        "The durable job queue: one message per job to run (`<prefix>.jobs.<model>.<high|normal>[.<key>]`), only its id",
        Some(names.jobs_stream()),
    ));
    out.push(event(
        format!("{p}.webhooks.*"),
        Body::Json(reference::<WebhookMessage>(generator)),
        "nodes",
        "Webhook messages waiting for delivery, one per event and endpoint (`<prefix>.webhooks.<job_id>`), de-duplicated by `webhook_id`",
        Some(names.webhooks_stream()),
    ));
    out.push(event(
        format!("{p}.webhooklog.*"),
        Body::Json(reference::<WebhookAttempt>(generator)),
        "clients",
        "The webhook delivery log of one job (`<prefix>.webhooklog.<job_id>`): an entry per attempt; read it with `kiln.api.webhooks`",
        Some(names.webhook_log_stream()),
    ));
    let node_request = |subject: String, message: Body, reply: Body, audience, description: &str| SubjectSpec {
        subject,
        kind: "request",
        message,
        reply: Some(reply),
        audience,
        description: description.to_string(),
        kept_by: None,
    };
    out.push(node_request(
        format!("{p}.node.*.cancel"),
        Body::Json(reference::<JobRef>(generator)),
        Body::Json(reference::<CancelNoticeReply>(generator)),
        "nodes",
        "A cancel notice to the node that runs a job (`<prefix>.node.<node>.cancel`)",
    ));
    let ping_reply = reference::<PingReport>(generator);
    out.push(node_request(
        format!("{p}.node.*.ping"),
        Body::Json(reference::<PingRequest>(generator)),
        or_error(ping_reply, generator),
        "operators",
        "Diagnostics: node `<node>` times actor calls and NATS requests to a peer (`kiln ping`)",
    ));
    let opaque = Body::Bytes { encoding: "bytes", description: "Any bytes, answered with the same bytes" };
    out.push(node_request(format!("{p}.node.*.echo"), opaque.clone(), opaque, "nodes", "Diagnostics: the NATS floor of `ping`"));
    let postcard = |description| Body::Bytes { encoding: "postcard", description };
    out.push(node_request(
        format!("{p}.tunnel.open.*"),
        postcard("kiln_actors::wire::OpenRequest behind wire version 2 (postcard), not JSON"),
        postcard("kiln_actors::wire::OpenReply behind wire version 2 (postcard), not JSON"),
        "nodes",
        "Opens an actor-cluster tunnel to node `<node>` (docs/ARCHITECTURE.md)",
    ));
    out.push(event(
        format!("{p}.tunnel.want.*"),
        Body::Bytes { encoding: "text", description: "The asking node's name, UTF-8" },
        "nodes",
        "Asks node `<node>` to dial the asker",
        None,
    ));
    out.push(event(
        format!("{p}.tunnel.*.*"),
        postcard("kiln_actors::wire::Frame behind wire version 2 (postcard), not JSON"),
        "nodes",
        "The frames of one tunnel session towards one side (`<prefix>.tunnel.<session>.<dialer|acceptor>`)",
        None,
    ));
    let kv = |bucket: String, key: &str, message: Body, audience, description: &str| SubjectSpec {
        subject: format!("$KV.{bucket}.{key}"),
        kind: "kv",
        message,
        reply: None,
        audience,
        description: format!("{description}; a delete or purge is an empty message with header `KV-Operation`"),
        kept_by: Some(bucket),
    };
    out.push(kv(
        names.gpus_bucket(),
        ">",
        Body::Json(reference::<GpuEntry>(generator)),
        "clients",
        "The registry: one entry per GPU slot, key `<node>.<slot-key>`",
    ));
    out.push(kv(
        names.nodes_bucket(),
        "*",
        Body::Json(reference::<NodeEntry>(generator)),
        "clients",
        "The registry: one entry per node, key `<node>`",
    ));
    out.push(kv(
        names.held_bucket(),
        "*",
        Body::Json(reference::<HeldJobs>(generator)),
        "nodes",
        "The job deliveries one node holds, key `<node>`",
    ));
    out.push(kv(
        names.jobs_bucket(),
        "*",
        Body::Json(reference::<JobRecord>(generator)),
        "nodes",
        "Job records, the source of truth, key `<job_id>`",
    ));
    out.push(kv(
        names.batches_bucket(),
        "plan.*",
        Body::Json(reference::<BatchPlan>(generator)),
        "nodes",
        "What a batch needs to make its later jobs, key `plan.<batch_id>`",
    ));
    out.push(kv(names.batches_bucket(), "*", Body::Json(reference::<BatchRecord>(generator)), "nodes", "Batch records, key `<batch_id>`"));
    out.push(kv(
        names.reuse_bucket(),
        ">",
        Body::Bytes { encoding: "text", description: "A job id, UTF-8" },
        "nodes",
        "Result reuse: a request's content key to the job that ran it",
    ));
    out
}

fn body_json(body: &Body) -> Value {
    match body {
        Body::Json(schema) => json!({"content_type": "application/json", "schema": schema}),
        Body::Bytes { encoding, description } => {
            json!({"content_type": "application/octet-stream", "encoding": encoding, "description": description})
        }
    }
}

/// The whole document for the deployment of prefix `names`.
pub fn document(names: &Names) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let specs = subjects(names, &mut generator);
    let list: Vec<Value> = specs
        .iter()
        .map(|s| {
            let mut entry = Map::new();
            entry.insert("subject".into(), json!(s.subject));
            entry.insert("kind".into(), json!(s.kind));
            entry.insert("audience".into(), json!(s.audience));
            entry.insert("description".into(), json!(s.description));
            if let Some(k) = &s.kept_by {
                entry.insert("kept_by".into(), json!(k));
            }
            entry.insert("message".into(), body_json(&s.message));
            if let Some(r) = &s.reply {
                entry.insert("reply".into(), body_json(r));
            }
            Value::Object(entry)
        })
        .collect();
    let defs = generator.take_definitions(true);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Kiln NATS protocol",
        "description": format!(
            "Every JSON message of Kiln's NATS protocol (prefix `{}`), generated from the Rust types by `kiln schema`; do not edit. \
             `x-kiln-subjects` maps each subject pattern (NATS wildcards, first match wins) to its message schema, and for a request \
             to its reply's; each schema is a `$ref` into `$defs`. docs/PROTOCOL.md says what each message means.",
            names.prefix()
        ),
        "x-kiln-prefix": names.prefix(),
        "x-kiln-subjects": list,
        "$defs": defs,
    })
}

/// The document as it is written to `docs/schema/protocol.json`: pretty, with a final newline.
pub fn document_text(names: &Names) -> String {
    let mut text = serde_json::to_string_pretty(&document(names)).expect("json");
    text.push('\n');
    text
}

/// The same protocol as an AsyncAPI 3.0 document (`docs/asyncapi.json`): a channel per subject
/// pattern (`*` tokens and a trailing `>` as address parameters), an operation per channel
/// (`receive` where Kiln's nodes take the messages, `send` where they publish them; a request's
/// operation has its reply on a dynamic inbox channel), the messages' payloads as the same
/// JSON Schemas (draft 2020-12) under `components.schemas`.
pub fn asyncapi(names: &Names) -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let specs = subjects(names, &mut generator);
    let format = "application/schema+json;version=draft-2020-12";
    let payload = |body: &Body| match body {
        Body::Json(schema) => json!({"contentType": "application/json", "payload": {"schemaFormat": format, "schema": schema}}),
        Body::Bytes { encoding, description } => json!({
            "contentType": "application/octet-stream",
            "description": format!("{encoding}: {description}"),
            "payload": {"schemaFormat": format, "schema": {"type": "string", "contentEncoding": "binary"}},
        }),
    };
    let (mut channels, mut operations, mut messages) = (Map::new(), Map::new(), Map::new());
    for spec in &specs {
        let id = channel_id(&spec.subject);
        let mut parameters = Map::new();
        let address: Vec<String> = spec
            .subject
            .split('.')
            .enumerate()
            .map(|(i, token)| match token {
                "*" => {
                    parameters.insert(format!("t{i}"), json!({"description": format!("token {i} of the subject (one token)")}));
                    format!("{{t{i}}}")
                }
                ">" => {
                    parameters.insert("rest".into(), json!({"description": "the rest of the subject (one or more tokens)"}));
                    "{rest}".into()
                }
                literal => literal.to_string(),
            })
            .collect();
        let mut message = payload(&spec.message);
        message["name"] = json!(id);
        message["summary"] = json!(spec.description);
        messages.insert(id.clone(), message);
        let mut channel = json!({
            "address": address.join("."),
            "description": spec.description,
            "messages": {"message": {"$ref": format!("#/components/messages/{id}")}},
        });
        if !parameters.is_empty() {
            channel["parameters"] = Value::Object(parameters);
        }
        // Who sends: clients and operators send requests to Kiln, nodes publish the rest.
        let action = if spec.kind == "request" { "receive" } else { "send" };
        let mut operation = json!({
            "action": action,
            "channel": {"$ref": format!("#/channels/{id}")},
            "summary": spec.description,
            "x-kiln-audience": spec.audience,
        });
        if let Some(kept_by) = &spec.kept_by {
            channel["x-kiln-kept-by"] = json!(kept_by);
        }
        channels.insert(id.clone(), channel);
        if let Some(reply) = &spec.reply {
            let reply_id = format!("{id}.reply");
            let mut message = payload(reply);
            message["name"] = json!(reply_id);
            messages.insert(reply_id.clone(), message);
            channels.insert(
                reply_id.clone(),
                json!({
                    "address": null,
                    "description": "The request's reply inbox (its NATS reply subject)",
                    "messages": {"message": {"$ref": format!("#/components/messages/{reply_id}")}},
                }),
            );
            operation["reply"] = json!({"channel": {"$ref": format!("#/channels/{reply_id}")}});
        }
        operations.insert(id, operation);
    }
    let schemas = Value::Object(generator.take_definitions(true));
    let doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Kiln NATS protocol",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Kiln's NATS protocol (prefix `{}`), generated from the Rust types by `kiln schema --asyncapi`; do not edit. \
                 docs/PROTOCOL.md says what each message means; docs/schema/protocol.json is the same as one JSON Schema.",
                names.prefix()
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    });
    // The schemas refer to each other as `#/$defs/<name>`; here they live in components.
    serde_json::from_str(&doc.to_string().replace("\"#/$defs/", "\"#/components/schemas/")).expect("json")
}

/// A channel's id: its subject pattern with the wildcards named (AsyncAPI's component keys
/// are letters, digits, `.`, `-` and `_`).
fn channel_id(pattern: &str) -> String {
    pattern.replace('*', "token").replace('>', "rest").replace('$', "")
}

/// The AsyncAPI document as written to `docs/asyncapi.json`.
pub fn asyncapi_text(names: &Names) -> String {
    let mut text = serde_json::to_string_pretty(&asyncapi(names)).expect("json");
    text.push('\n');
    text
}

/// Whether NATS subject `subject` matches pattern `pattern` (`*` one token, `>` one or more
/// trailing tokens). Pure.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wildcards_match_as_nats_does() {
        assert!(subject_matches("kiln.events.*", "kiln.events.j1"));
        assert!(!subject_matches("kiln.events.*", "kiln.events.j1.x"));
        assert!(!subject_matches("kiln.events.*", "kiln.events"));
        assert!(subject_matches("kiln.jobs.>", "kiln.jobs.m.high.u-a"));
        assert!(!subject_matches("kiln.jobs.>", "kiln.jobs"));
        assert!(subject_matches("$KV.kiln_batches.plan.*", "$KV.kiln_batches.plan.b1"));
        assert!(!subject_matches("$KV.kiln_batches.*", "$KV.kiln_batches.plan.b1"));
        assert!(subject_matches("kiln.api.submit", "kiln.api.submit"));
        assert!(!subject_matches("kiln.api.submit", "kiln.api.submit_batch"));
    }

    proptest! {
        /// A pattern without wildcards matches exactly itself; `>` in place of any tail matches.
        #[test]
        fn literal_and_tail_patterns(tokens in proptest::collection::vec("[a-z0-9_-]{1,6}", 1..6), cut in 0usize..6) {
            let subject = tokens.join(".");
            prop_assert!(subject_matches(&subject, &subject));
            let cut = cut.min(tokens.len() - 1);
            let tail = format!("{}{}>", tokens[..cut].join("."), if cut == 0 { "" } else { "." });
            prop_assert!(subject_matches(&tail, &subject));
            let longer = format!("{subject}.x");
            prop_assert!(!subject_matches(&longer, &subject));
        }
    }

    /// Every subject the names of a deployment make maps to exactly the intended pattern.
    #[test]
    fn every_subject_of_the_names_maps_to_a_pattern() {
        let names = Names::new("kiln");
        let mut generator = SchemaSettings::draft2020_12().into_generator();
        let specs = subjects(&names, &mut generator);
        let first = |subject: &str| specs.iter().find(|s| subject_matches(&s.subject, subject)).map(|s| s.subject.clone());
        let lane = crate::names::Lane::High;
        for (subject, pattern) in [
            (names.api("submit"), "kiln.api.submit"),
            (names.api("submit_batch"), "kiln.api.submit_batch"),
            (names.events_subject("j1"), "kiln.events.*"),
            (names.finished_subject("demo"), "kiln.finished.*"),
            (names.previews_subject("j1"), "kiln.previews.*"),
            (names.job_subject("demo", lane), "kiln.jobs.>"),
            (names.job_subject_keyed("demo", lane, "u-a"), "kiln.jobs.>"),
            (names.node_cancel("n1"), "kiln.node.*.cancel"),
            (names.node_diag("n1", "ping"), "kiln.node.*.ping"),
            (names.node_diag("n1", "echo"), "kiln.node.*.echo"),
            (names.tunnel_open("n1"), "kiln.tunnel.open.*"),
            (names.tunnel_want("n1"), "kiln.tunnel.want.*"),
            (names.tunnel_frames("s1", "dialer"), "kiln.tunnel.*.*"),
            ("$KV.kiln_gpus.n1.cpu-0".into(), "$KV.kiln_gpus.>"),
            ("$KV.kiln_batches.plan.b1".into(), "$KV.kiln_batches.plan.*"),
            ("$KV.kiln_batches.b1".into(), "$KV.kiln_batches.*"),
        ] {
            assert_eq!(first(&subject).as_deref(), Some(pattern), "{subject}");
        }
        assert_eq!(first("kiln.unknown.x"), None);
        // Every `$ref` resolves.
        let doc = document(&names);
        let text = doc.to_string();
        for part in text.split("\"#/$defs/").skip(1) {
            let name = &part[..part.find('"').unwrap()];
            assert!(doc["$defs"].get(name).is_some(), "dangling $ref {name}");
        }
    }

    /// `docs/asyncapi.json` likewise (the same command writes it: `kiln schema --asyncapi`);
    /// every channel is a subject of the schema, every `$ref` resolves.
    #[test]
    fn the_committed_asyncapi_document_is_what_the_types_generate() {
        let names = Names::new("kiln");
        let doc = asyncapi(&names);
        let text = doc.to_string();
        for part in text.split("\"#/").skip(1) {
            let path = &part[..part.find('"').unwrap()];
            let mut at = &doc;
            for step in path.split('/') {
                at = at.get(step).unwrap_or_else(|| panic!("dangling $ref #/{path}"));
            }
        }
        let schema = document(&names);
        let subjects = schema["x-kiln-subjects"].as_array().unwrap();
        let with_reply = subjects.iter().filter(|s| s.get("reply").is_some()).count();
        assert_eq!(doc["channels"].as_object().unwrap().len(), subjects.len() + with_reply);
        assert_eq!(doc["operations"].as_object().unwrap().len(), subjects.len());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/asyncapi.json");
        let generated = asyncapi_text(&names);
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/asyncapi.json differs from what the wire types generate: write it again with \
             `KILN_BLESS=1 cargo test -p kiln-contract schema` (or `kiln schema --asyncapi --write docs/asyncapi.json`) and commit it"
        );
    }

    /// `docs/schema/protocol.json` is what the types generate. After changing a wire type, write
    /// it again: `KILN_BLESS=1 cargo test -p kiln-contract schema` (or
    /// `kiln schema --write docs/schema/protocol.json`), and commit it.
    #[test]
    fn the_committed_schema_is_what_the_types_generate() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schema/protocol.json");
        let generated = document_text(&Names::new("kiln"));
        if std::env::var_os("KILN_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/schema/protocol.json differs from what the wire types generate: write it again with \
             `KILN_BLESS=1 cargo test -p kiln-contract schema` (or `kiln schema --write docs/schema/protocol.json`) and commit it"
        );
    }
}
