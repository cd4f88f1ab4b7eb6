//! `GET /openapi.json`: the gateway's OpenAPI 3 document. Its schemas are generated from the
//! same Rust types the NATS API serializes (`kiln_core::protocol`, via schemars): a route that
//! forwards to a `kiln.api` endpoint takes that [`Endpoint`]'s request and reply types, so the
//! document cannot drift from the wire; only the list of paths is written here, and a test
//! checks that every endpoint but the NATS-only ones has a route. The configured
//! `[[http.routes]]` (the seeds' contracts) are added from their tables: the fields each reads,
//! and its templates as examples.

use axum::extract::State;
use axum::Json;
use kiln_core::http::{RouteConfig, RouteKind};
use kiln_core::protocol::*;
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use super::error::HttpError;
use super::v1::FileView;
use super::Gateway;
use kiln_core::endpoint::Endpoint;

/// Every route of the native API: method, path, summary, request schema, reply schema, and
/// whether the reply is an event stream.
pub const NATIVE_ROUTES: [(&str, &str, &str); 22] = [
    ("post", "/v1/jobs", "Submit a job (JSON SubmitRequest, or multipart: `model`, `params`, file and text parts as inputs)"),
    ("get", "/v1/jobs", "List jobs, newest first (?status=&model=&limit=&dead_letter=&label=name:value, label repeatable)"),
    ("get", "/v1/jobs/{id}", "A job"),
    ("post", "/v1/jobs/{id}/cancel", "Cancel a job"),
    ("get", "/v1/jobs/{id}/events", "The job's events as SSE: history, then live; resumes after Last-Event-ID"),
    ("get", "/v1/jobs/{id}/artifacts/{name}", "An artifact's bytes (ETag = sha256, Range)"),
    ("get", "/v1/jobs/{id}/preview", "The job's newest live preview: image bytes, kept 10 minutes; 404 when none"),
    ("get", "/v1/jobs/{id}/webhooks", "The job's webhook delivery log: each attempt, its status code or error, its latency"),
    ("post", "/v1/jobs/{id}/webhooks/redeliver", "Send the job's last event to its webhooks again (202; same webhook-id)"),
    ("post", "/v1/files", "Upload files (multipart); each becomes uploads/<uuid>/<name>"),
    ("put", "/v1/files/{name}", "Upload one file under a name (the raw body)"),
    ("get", "/v1/files/{name}", "An uploaded file's bytes"),
    ("post", "/v1/batches", "Submit a batch"),
    ("get", "/v1/batches/{id}", "A batch"),
    ("get", "/v1/batches/{id}/events", "The batch's events as SSE"),
    ("post", "/v1/batches/{id}/retry", "Retry the failed and cancelled items of a finished batch"),
    ("post", "/v1/batches/{id}/cancel", "Cancel a batch"),
    ("get", "/v1/models", "The configured models and where they are warm"),
    ("get", "/v1/cluster", "Every node and GPU slot"),
    ("get", "/v1/queue", "Each model's queue: depth by lane, oldest wait, running, slots, desired slots (?model=)"),
    ("get", "/healthz", "The process is up"),
    ("get", "/readyz", "NATS connected and at least one node serving"),
];

/// The `kiln.api` endpoint a native route forwards to, and whether the route's JSON body is
/// that endpoint's request (otherwise the route's path names the job or batch).
pub fn forwards_to(method: &str, path: &str) -> Option<(Endpoint, bool)> {
    Some(match (method, path) {
        ("post", "/v1/jobs") => (Endpoint::Submit, true),
        ("get", "/v1/jobs") => (Endpoint::Jobs, false),
        ("get", "/v1/jobs/{id}") => (Endpoint::Status, false),
        ("post", "/v1/jobs/{id}/cancel") => (Endpoint::Cancel, false),
        ("post", "/v1/batches") => (Endpoint::SubmitBatch, true),
        ("get", "/v1/batches/{id}") => (Endpoint::Batch, false),
        ("post", "/v1/batches/{id}/retry") => (Endpoint::RetryBatch, false),
        ("post", "/v1/batches/{id}/cancel") => (Endpoint::CancelBatch, false),
        ("get", "/v1/models") => (Endpoint::Models, false),
        ("get", "/v1/cluster") => (Endpoint::Cluster, false),
        ("get", "/v1/queue") => (Endpoint::Queue, false),
        ("get", "/v1/jobs/{id}/webhooks") => (Endpoint::Webhooks, false),
        ("post", "/v1/jobs/{id}/webhooks/redeliver") => (Endpoint::WebhooksRedeliver, false),
        _ => return None,
    })
}

/// The endpoints that no native route forwards to: a job's result is its view's `artifacts`
/// (`GET /v1/jobs/{id}`), and `control` is for operators, over NATS only.
pub const NATS_ONLY: [Endpoint; 2] = [Endpoint::Result, Endpoint::Control];

/// The OpenAPI document of the native API and of the configured `[[http.routes]]`.
pub fn document_with(routes: &[RouteConfig]) -> Value {
    let mut doc = document();
    for route in routes {
        let path = openapi_path(&route.path);
        let method = route.method.to_ascii_lowercase();
        doc["paths"].as_object_mut().expect("paths").entry(path).or_insert_with(|| json!({}))[method] = route_operation(route);
    }
    doc
}

/// An axum path as OpenAPI writes it: `{*file_id}` (which takes slashes) is `{file_id}`.
fn openapi_path(path: &str) -> String {
    path.replace("{*", "{")
}

/// One configured route as an OpenAPI operation: what it does, the request fields its table
/// reads (JSON or multipart; file parts as binary), and its answer's template as the example.
/// Pure.
pub fn route_operation(route: &RouteConfig) -> Value {
    let model = if route.model.is_empty() { format!("the model named by `{}`", route.model_field) } else { route.model.clone() };
    let summary = match route.kind {
        RouteKind::Submit => format!("Submit a job to {model} (a seed's own contract, from [[http.routes]])"),
        RouteKind::Status => "The job's state, in the route's shape".to_string(),
        RouteKind::Events => "The job's events as SSE, in the route's shape".to_string(),
        RouteKind::Artifact => format!("The job's result: the first of {}", route.artifacts.join(", ")),
        RouteKind::Upload => "Upload a file (multipart `file`); answers its id".to_string(),
        RouteKind::Download => "An uploaded file, or a result by its object name".to_string(),
        RouteKind::Health => format!("Whether {} is served", route.model),
        RouteKind::Batch => format!("Submit a batch to {model}: one job per element of `{}`", route.items_field),
        RouteKind::BatchEvents => "The batch's events as SSE: each `data:` is the template of its name".to_string(),
    };
    let error_example = if route.error.is_null() { json!({"code": "$code", "message": "$message"}) } else { route.error.clone() };
    let ok = match route.kind {
        RouteKind::Events | RouteKind::BatchEvents => {
            json!({"description": "text/event-stream; each `data:` is the template", "content": {"text/event-stream": {"example": route.response}}})
        }
        RouteKind::Artifact | RouteKind::Download => json!({"description": "the file's bytes (ETag = sha256, Range)"}),
        _ if route.response.is_null() => json!({"description": "OK (Kiln's own body)"}),
        _ => {
            json!({"description": "OK: the template, `$name` replaced (docs/HTTP.md)", "content": {"application/json": {"example": route.response}}})
        }
    };
    let mut op = json!({
        "summary": summary,
        "tags": ["configured routes"],
        "responses": {
            "200": ok,
            "default": {"description": "An error", "content": {"application/json": {"example": error_example}}},
        },
    });
    set_path_parameters(&mut op, &openapi_path(&route.path));
    let mut fields = serde_json::Map::new();
    let mut files = serde_json::Map::new();
    for field in route.inputs.values().chain(route.file_ids.values()).chain(route.params.values()).chain(route.labels.values()) {
        // A batch route's `item...` fields are read from each element of its list, not the body.
        if route.kind == RouteKind::Batch && (field == "item" || field.starts_with("item.")) {
            continue;
        }
        fields.insert(field.clone(), json!({}));
    }
    if !route.key_field.is_empty() {
        fields.insert(route.key_field.clone(), json!({"type": "string"}));
    }
    if !route.model_field.is_empty() {
        let names: Vec<&String> = route.models.keys().collect();
        let schema = if names.is_empty() { json!({"type": "string"}) } else { json!({"type": "string", "enum": names}) };
        fields.insert(route.model_field.clone(), schema);
    }
    let parts: Vec<String> = match route.kind {
        RouteKind::Upload => vec![route.files.values().next().cloned().unwrap_or_else(|| "file".to_string())],
        _ => route.files.values().cloned().collect(),
    };
    for part in &parts {
        files.insert(part.clone(), json!({"type": "string", "format": "binary"}));
    }
    if !route.items_field.is_empty() {
        fields.insert(route.items_field.clone(), json!({"type": "array"}));
    }
    if matches!(route.kind, RouteKind::Submit | RouteKind::Upload | RouteKind::Batch) {
        let mut content = serde_json::Map::new();
        if files.is_empty() {
            content.insert("application/json".into(), json!({"schema": {"type": "object", "properties": fields}}));
        } else {
            let mut all = fields.clone();
            all.extend(files);
            content.insert("multipart/form-data".into(), json!({"schema": {"type": "object", "properties": all, "required": parts}}));
        }
        op["requestBody"] = json!({"required": true, "content": content});
    }
    op
}

/// The OpenAPI document of the native API.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let value = |s: schemars::Schema| serde_json::to_value(s).expect("schemas serialize");
    let error = value(generator.subschema_for::<HttpError>());
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in NATIVE_ROUTES {
        let forwards = forwards_to(method, path);
        let request = forwards.filter(|(_, body)| *body).map(|(endpoint, _)| value(endpoint.request_schema(&mut generator)));
        let reply = match forwards {
            Some((endpoint, _)) => Some(value(endpoint.reply_schema(&mut generator))),
            None if (method, path) == ("put", "/v1/files/{name}") => Some(value(generator.subschema_for::<FileView>())),
            None => None,
        };
        let ok = if path.ends_with("/events") {
            let event = value(generator.subschema_for::<Event>());
            // A job's stream also carries live previews (`event: preview`), without an id.
            let description = if path.starts_with("/v1/jobs/") {
                "text/event-stream; each `data:` is an Event, or a PreviewView for `event: preview`"
            } else {
                "text/event-stream; each `data:` is an Event"
            };
            if path.starts_with("/v1/jobs/") {
                generator.subschema_for::<kiln_core::preview::PreviewView>();
            }
            json!({"description": description, "content": {"text/event-stream": {"schema": event}}})
        } else if let Some(r) = reply {
            json!({"description": "OK", "content": {"application/json": {"schema": r}}})
        } else {
            json!({"description": "OK"})
        };
        let status = if method == "post" && (path == "/v1/jobs" || path == "/v1/batches" || path == "/v1/files" || path.ends_with("/retry"))
            || method == "put"
        {
            "201"
        } else if path.ends_with("/redeliver") {
            "202" // queued, not yet delivered
        } else {
            "200"
        };
        let mut op = json!({
            "summary": summary,
            "responses": {
                status: ok,
                "default": {"description": "An error: {code, message}", "content": {"application/json": {"schema": error.clone()}}},
            },
        });
        set_path_parameters(&mut op, path);
        if let Some(r) = request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": r}}});
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[method] = op;
    }
    let schemas = generator.take_definitions(true);
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Kiln HTTP gateway", "version": env!("CARGO_PKG_VERSION"),
                 "description": "The NATS API of Kiln over HTTP; see docs/HTTP.md. Errors: {code, message} with the status of each code."},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

pub async fn serve(State(gateway): State<Gateway>) -> Json<Value> {
    Json(document_with(&gateway.config().routes))
}

/// Lists the `{name}` segments of an OpenAPI `path` as the operation's required string path
/// parameters (none: no `parameters` key). One definition for the API's and the seed routes'.
fn set_path_parameters(op: &mut Value, path: &str) {
    let params: Vec<Value> = path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect();
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_names_every_route_and_resolves_every_schema() {
        let doc = document();
        for (method, path, _) in NATIVE_ROUTES {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').expect("quoted")];
            assert!(schemas.contains_key(name), "unresolved $ref {name}");
        }
        assert!(schemas.contains_key("JobView") && schemas.contains_key("SubmitRequest"));
    }

    /// Every `kiln.api` endpoint is reached over HTTP by a native route, or is one of the few
    /// that are NATS-only: an endpoint added without its route (or its place in `NATS_ONLY`)
    /// fails here. And a route's reply is its endpoint's.
    #[test]
    fn every_nats_endpoint_has_a_native_route_or_is_nats_only() {
        let routed: Vec<Endpoint> =
            NATIVE_ROUTES.iter().filter_map(|(method, path, _)| forwards_to(method, path)).map(|(e, _)| e).collect();
        for endpoint in Endpoint::ALL {
            let reached = routed.contains(&endpoint);
            assert!(reached != NATS_ONLY.contains(&endpoint), "{endpoint}: routed {reached}, NATS-only {}", !reached);
        }
        let doc = document();
        let reply = &doc["paths"]["/v1/batches/{id}/retry"]["post"]["responses"]["201"]["content"]["application/json"]["schema"];
        assert_eq!(reply["$ref"], "#/components/schemas/BatchReply", "{reply}");
        let body = &doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/SubmitRequest", "{body}");
        assert!(doc["paths"]["/v1/jobs/{id}/cancel"]["post"].get("requestBody").is_none());
    }

    #[test]
    fn configured_routes_are_listed_with_the_fields_they_read() {
        let table = kiln_core::config::ClusterConfig::from_toml(include_str!("../../examples/http/seed-003-sharp.toml"), "seed 003")
            .expect("table");
        let doc = document_with(&table.http.routes);
        let predict = &doc["paths"]["/predict"]["post"];
        let form = &predict["requestBody"]["content"]["multipart/form-data"]["schema"];
        assert_eq!(form["properties"]["file"]["format"], "binary", "{predict:#}");
        assert!(form["properties"]["focal_length"].is_object(), "{predict:#}");
        assert_eq!(predict["responses"]["200"]["content"]["application/json"]["example"]["task_id"], "$job_id");
        assert_eq!(doc["paths"]["/stream/{task_id}"]["get"]["parameters"][0]["name"], "task_id");
        assert!(doc["paths"]["/v1/jobs"]["post"].is_object(), "the native API stays");
        let download = RouteConfig { path: "/api/tempfile/download/{*file_id}".into(), ..table.http.routes[3].clone() };
        let doc = document_with(&[download]);
        assert!(doc["paths"]["/api/tempfile/download/{file_id}"]["get"].is_object());
    }

    #[test]
    fn a_batch_route_lists_its_list_not_its_items_fields() {
        let table = kiln_core::config::ClusterConfig::from_toml(include_str!("../../examples/http/seed-004-text2image.toml"), "seed 004")
            .expect("table");
        let doc = document_with(&table.http.routes);
        let batch = &doc["paths"]["/api/text2image"]["post"];
        let properties = &batch["requestBody"]["content"]["application/json"]["schema"]["properties"];
        assert_eq!(properties["storyboards"]["type"], "array", "{batch:#}");
        assert!(properties["steps"].is_object() && properties["project_id"].is_object(), "{batch:#}");
        assert!(properties.as_object().unwrap().keys().all(|k| !k.starts_with("item")), "{batch:#}");
        let stream = &doc["paths"]["/api/text2image/{stage_id}/stream"]["get"];
        assert_eq!(stream["responses"]["200"]["content"]["text/event-stream"]["example"]["progress"]["type"], "progress", "{stream:#}");
    }
}
