//! `GET /openapi.json`: the gateway's OpenAPI 3 document. Its schemas are generated from the
//! same Rust types the NATS API serializes (`kiln_core::protocol`, via schemars), so the
//! document cannot drift from the wire; only the list of paths is written here, and a test
//! checks it against the router's.

use axum::Json;
use kiln_core::protocol::*;
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use super::error::HttpError;
use super::v1::FileView;

/// Every route of the native API: method, path, summary, request schema, reply schema, and
/// whether the reply is an event stream.
pub const NATIVE_ROUTES: [(&str, &str, &str); 18] = [
    ("post", "/v1/jobs", "Submit a job (JSON SubmitRequest, or multipart: `model`, `params`, file and text parts as inputs)"),
    ("get", "/v1/jobs", "List jobs, newest first (?status=&model=&limit=&dead_letter=&label=name:value, label repeatable)"),
    ("get", "/v1/jobs/{id}", "A job"),
    ("post", "/v1/jobs/{id}/cancel", "Cancel a job"),
    ("get", "/v1/jobs/{id}/events", "The job's events as SSE: history, then live; resumes after Last-Event-ID"),
    ("get", "/v1/jobs/{id}/artifacts/{name}", "An artifact's bytes (ETag = sha256, Range)"),
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
    ("get", "/healthz", "The process is up"),
    ("get", "/readyz", "NATS connected and at least one node serving"),
];

/// The OpenAPI document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let mut schema = |name: &str| -> Value {
        let s = match name {
            "SubmitRequest" => generator.subschema_for::<SubmitRequest>(),
            "SubmitReply" => generator.subschema_for::<SubmitReply>(),
            "JobView" => generator.subschema_for::<JobView>(),
            "ListJobsReply" => generator.subschema_for::<ListJobsReply>(),
            "Event" => generator.subschema_for::<Event>(),
            "FileView" => generator.subschema_for::<FileView>(),
            "BatchSubmitRequest" => generator.subschema_for::<BatchSubmitRequest>(),
            "BatchReply" => generator.subschema_for::<BatchReply>(),
            "BatchView" => generator.subschema_for::<BatchView>(),
            "ModelsReply" => generator.subschema_for::<ModelsReply>(),
            "ClusterReply" => generator.subschema_for::<ClusterReply>(),
            "Error" => generator.subschema_for::<HttpError>(),
            other => unreachable!("no schema {other}"),
        };
        serde_json::to_value(s).expect("schemas serialize")
    };
    let error = schema("Error");
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in NATIVE_ROUTES {
        let (request, reply): (Option<&str>, Option<&str>) = match (method, path) {
            ("post", "/v1/jobs") => (Some("SubmitRequest"), Some("SubmitReply")),
            ("get", "/v1/jobs") => (None, Some("ListJobsReply")),
            ("get", "/v1/jobs/{id}") | ("post", "/v1/jobs/{id}/cancel") => (None, Some("JobView")),
            ("post", "/v1/batches") => (Some("BatchSubmitRequest"), Some("BatchReply")),
            ("post", "/v1/batches/{id}/retry") => (None, Some("BatchReply")),
            ("get", "/v1/batches/{id}") | ("post", "/v1/batches/{id}/cancel") => (None, Some("BatchView")),
            ("put", "/v1/files/{name}") => (None, Some("FileView")),
            ("get", "/v1/models") => (None, Some("ModelsReply")),
            ("get", "/v1/cluster") => (None, Some("ClusterReply")),
            _ => (None, None),
        };
        let ok = if path.ends_with("/events") {
            json!({"description": "text/event-stream; each `data:` is an Event", "content": {"text/event-stream": {"schema": schema("Event")}}})
        } else if let Some(r) = reply {
            json!({"description": "OK", "content": {"application/json": {"schema": schema(r)}}})
        } else {
            json!({"description": "OK"})
        };
        let status = if method == "post" && (path == "/v1/jobs" || path == "/v1/batches" || path == "/v1/files" || path.ends_with("/retry"))
            || method == "put"
        {
            "201"
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
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if let Some(r) = request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema(r)}}});
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

pub async fn serve() -> Json<Value> {
    Json(document())
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
}
