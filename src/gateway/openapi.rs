//! `GET /openapi.json`: the gateway's OpenAPI 3 document, derived from the router itself.
//!
//! Every route of the native API (`/v1/...`, `/healthz`, `/readyz`) is registered through
//! [`ApiRoutes::route`], which takes the route's [`Op`] (method, path, operation id, tag,
//! summary, parameters, body, replies) with its handler: the axum router and the document's
//! `paths` are built from that one table ([`super::api_routes`]), so a route cannot be served
//! without being documented, nor documented without being served. Schemas are generated from
//! the same Rust types the NATS API serializes (`kiln_core::protocol`, via schemars): an
//! operation that forwards to a `kiln.api` endpoint ([`Op::forwards`]) takes that
//! [`Endpoint`]'s reply (and, with [`Op::endpoint_body`], request) type, so the document cannot
//! drift from the wire, and a test checks that every endpoint but the NATS-only ones has a
//! route. The configured `[[http.routes]]` (the seeds' contracts) are added from their tables:
//! the fields each reads, and its templates as examples. `tests/openapi_client.rs` generates a
//! TypeScript client from the live document (openapi-typescript) and runs it against a real
//! gateway.
//!
//! Adding a route: in `v1::routes()` (or [`super::api_routes`] for one outside `/v1`), add
//!
//! ```ignore
//! .route(
//!     Op::get("/v1/jobs/{id}/webhooks", "listJobWebhooks", "jobs", "The job's webhook deliveries")
//!         .reply(schema::<WebhookDeliveries>),
//!     list_webhooks,
//! )
//! ```
//!
//! with the path in axum's syntax (`{id}`, `{*name}`), a unique camelCase operation id, one of
//! the [`TAGS`], and what it reads and answers: [`Op::query`], [`Op::header`],
//! [`Op::json_body`] (a type deriving `schemars::JsonSchema`), [`Op::multipart_body`],
//! [`Op::bytes_body`]; [`Op::reply`], [`Op::status`] (201...), [`Op::bytes`], [`Op::events`];
//! [`Op::errors`] for error statuses beyond those derived from its shape. Path parameters come
//! from the path by themselves. The unit tests below check ids, tags and schemas.

use std::sync::LazyLock;

use axum::extract::State;
use axum::handler::Handler;
use axum::routing::MethodFilter;
use axum::{Json, Router};
use kiln_core::http::{HttpConfig, RouteConfig, RouteKind};
use kiln_core::protocol::*;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Value};

use super::error::HttpError;
use super::Gateway;
use kiln_core::endpoint::Endpoint;

/// Generates (or references) the schema of a type: what [`Op::reply`], [`Op::json_body`] and
/// [`Op::query`] take.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`, as a [`SchemaFn`]: `schema::<JobView>`.
pub fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// The tags operations are grouped by, with what each covers (Swagger UI and ReDoc show them
/// as sections; an operation's tag must be one of these).
pub const TAGS: [(&str, &str); 6] = [
    ("jobs", "Submit jobs, follow their events, read their state, previews and artifacts"),
    ("files", "Upload input files, download them again"),
    ("batches", "Many jobs of one model at once"),
    ("cluster", "The cluster's models, nodes, GPU slots and queues"),
    ("health", "Probes: no API key needed"),
    ("configured routes", "The seeds' own contracts, from [[http.routes]] (docs/HTTP.md)"),
];

/// An HTTP method of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    /// As OpenAPI writes it (lower case).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Method::Get => MethodFilter::GET,
            Method::Post => MethodFilter::POST,
            Method::Put => MethodFilter::PUT,
            Method::Delete => MethodFilter::DELETE,
        }
    }
}

/// What an operation's success answers.
enum Reply {
    /// JSON of the forwarded endpoint's reply type.
    Endpoint,
    /// JSON of a type.
    Json(SchemaFn),
    /// JSON of a schema written here (`/healthz`, `/readyz`).
    Inline(Value),
    /// `text/event-stream`; a job's stream also carries previews.
    Events { previews: bool },
    /// Raw bytes of this media type.
    Bytes(&'static str),
}

/// The schema of a JSON body.
enum BodySchema {
    /// The forwarded endpoint's request type.
    Endpoint,
    Type(SchemaFn),
}

/// One operation of the native API: its route and what the document says of it. Built with
/// [`Op::get`] (...) and the methods below; registered with [`ApiRoutes::route`].
pub struct Op {
    pub method: Method,
    /// In axum's syntax (`/v1/files/{*name}`).
    pub path: &'static str,
    pub id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    /// The `kiln.api` endpoint it forwards to, if any.
    pub forwards: Option<Endpoint>,
    /// No API key needed (`super::is_public` must agree; a test checks).
    pub public: bool,
    description: Option<&'static str>,
    status: u16,
    reply: Option<Reply>,
    json_body: Option<BodySchema>,
    multipart_body: Option<Value>,
    bytes_body: bool,
    query: Vec<(&'static str, SchemaFn, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
    reply_headers: Vec<(&'static str, &'static str)>,
    responses: Vec<(u16, &'static str, Option<Value>)>,
    errors: Vec<u16>,
}

impl Op {
    fn new(method: Method, path: &'static str, id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op {
            method,
            path,
            id,
            tag,
            summary,
            forwards: None,
            public: false,
            description: None,
            status: 200,
            reply: None,
            json_body: None,
            multipart_body: None,
            bytes_body: false,
            query: vec![],
            headers: vec![],
            reply_headers: vec![],
            responses: vec![],
            errors: vec![],
        }
    }
    pub fn get(path: &'static str, id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Get, path, id, tag, summary)
    }
    pub fn post(path: &'static str, id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Post, path, id, tag, summary)
    }
    pub fn put(path: &'static str, id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Put, path, id, tag, summary)
    }
    pub fn delete(path: &'static str, id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op::new(Method::Delete, path, id, tag, summary)
    }
    /// A longer text (Markdown) below the summary.
    pub fn description(mut self, text: &'static str) -> Op {
        self.description = Some(text);
        self
    }
    /// Forwards to this `kiln.api` endpoint: its reply is the endpoint's reply type.
    pub fn forwards(mut self, endpoint: Endpoint) -> Op {
        self.forwards = Some(endpoint);
        self.reply = Some(Reply::Endpoint);
        self
    }
    /// The JSON body is the forwarded endpoint's request type.
    pub fn endpoint_body(mut self) -> Op {
        self.json_body = Some(BodySchema::Endpoint);
        self
    }
    /// A JSON body of a type.
    pub fn json_body(mut self, schema: SchemaFn) -> Op {
        self.json_body = Some(BodySchema::Type(schema));
        self
    }
    /// A `multipart/form-data` body of this (object) schema; with [`Op::json_body`], either.
    pub fn multipart_body(mut self, schema: Value) -> Op {
        self.multipart_body = Some(schema);
        self
    }
    /// The raw body is the payload (any content type).
    pub fn bytes_body(mut self) -> Op {
        self.bytes_body = true;
        self
    }
    /// An optional query parameter.
    pub fn query(mut self, name: &'static str, schema: SchemaFn, description: &'static str) -> Op {
        self.query.push((name, schema, description));
        self
    }
    /// An optional request header.
    pub fn header(mut self, name: &'static str, description: &'static str) -> Op {
        self.headers.push((name, description));
        self
    }
    /// The success status (200 unless said).
    pub fn status(mut self, status: u16) -> Op {
        self.status = status;
        self
    }
    /// The success reply is JSON of a type.
    pub fn reply(mut self, schema: SchemaFn) -> Op {
        self.reply = Some(Reply::Json(schema));
        self
    }
    /// The success reply is JSON of this schema.
    pub fn reply_inline(mut self, schema: Value) -> Op {
        self.reply = Some(Reply::Inline(schema));
        self
    }
    /// The success reply is an SSE stream of events (and, `previews`, a job's live previews).
    pub fn events(mut self, previews: bool) -> Op {
        self.reply = Some(Reply::Events { previews });
        self
    }
    /// The success reply is raw bytes of this media type (`*/*`: the object's own).
    pub fn bytes(mut self, media_type: &'static str) -> Op {
        self.reply = Some(Reply::Bytes(media_type));
        self
    }
    /// A header of the success reply.
    pub fn reply_header(mut self, name: &'static str, description: &'static str) -> Op {
        self.reply_headers.push((name, description));
        self
    }
    /// Bytes served as objects are (`gateway::objects`): `Range` (206, or 416 when unsatisfiable)
    /// and `If-None-Match` on the ETag (304).
    pub fn byte_ranges(self) -> Op {
        self.header("Range", "`bytes=a-b`, `bytes=a-` or `bytes=-n`")
            .header("If-None-Match", "An ETag: 304 when it is the bytes'")
            .response(206, "The range asked for", None)
            .response(304, "Not modified", None)
            .errors(&[416])
    }
    /// Another response, not an error (206, 304...), with its JSON schema if it has a body.
    pub fn response(mut self, status: u16, description: &'static str, schema: Option<Value>) -> Op {
        self.responses.push((status, description, schema));
        self
    }
    /// Error statuses beyond those its shape implies (see [`error_statuses`]).
    pub fn errors(mut self, statuses: &[u16]) -> Op {
        self.errors.extend_from_slice(statuses);
        self
    }
    /// Served without an API key.
    pub fn public(mut self) -> Op {
        self.public = true;
        self
    }

    /// The path as OpenAPI writes it.
    pub fn openapi_path(&self) -> String {
        openapi_path(self.path)
    }
}

/// The native API's routes: each registered in the axum router with its [`Op`], so the
/// document is built from what the router serves ([`super::api_routes`]).
#[derive(Default)]
pub struct ApiRoutes {
    router: Router<Gateway>,
    ops: Vec<Op>,
}

impl ApiRoutes {
    pub fn new() -> ApiRoutes {
        ApiRoutes::default()
    }

    /// Serves `op.method op.path` with `handler`, and documents it as `op`. Several methods
    /// of one path are several calls (axum merges them).
    pub fn route<H, T>(mut self, op: Op, handler: H) -> ApiRoutes
    where
        H: Handler<T, Gateway>,
        T: 'static,
    {
        self.router = self.router.route(op.path, axum::routing::on(op.method.filter(), handler));
        self.ops.push(op);
        self
    }

    /// Every registered route's operation, in registration order.
    pub fn operations(&self) -> &[Op] {
        &self.ops
    }

    pub fn into_router(self) -> Router<Gateway> {
        self.router
    }
}

/// The endpoints that no native route forwards to: a job's result is its view's `artifacts`
/// (`GET /v1/jobs/{id}`), and `control` is for operators, over NATS only.
pub const NATS_ONLY: [Endpoint; 2] = [Endpoint::Result, Endpoint::Control];

/// The document as a gateway with this configuration serves it: the native API, the
/// configured routes, and whether a request needs an API key (a gateway without
/// `[[http.api_keys]]` asks for none).
pub fn document_for(config: &HttpConfig) -> Value {
    let mut doc = document_with(&config.routes);
    if config.api_keys.is_empty() {
        // `{}`: no key is one of the ways in.
        doc["security"].as_array_mut().expect("security").push(json!({}));
    }
    doc
}

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

/// A configured route's operation id: `route` and its method and path in camel case
/// (`POST /predict` is `routePostPredict`, `GET /stream/{task_id}` `routeGetStreamTaskId`);
/// unique since a route's method and path are. Pure.
pub fn route_operation_id(method: &str, path: &str) -> String {
    let mut id = String::from("route");
    for word in std::iter::once(method).chain(path.split(|c: char| !c.is_ascii_alphanumeric())) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            id.push(first.to_ascii_uppercase());
            id.extend(chars.map(|c| c.to_ascii_lowercase()));
        }
    }
    id
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
        "operationId": route_operation_id(&route.method, &route.path),
        "summary": summary,
        "tags": ["configured routes"],
        "responses": {
            "200": ok,
            "default": {"description": "An error", "content": {"application/json": {"example": error_example}}},
        },
    });
    set_path_parameters(&mut op, &openapi_path(&route.path));
    if matches!(route.kind, RouteKind::Submit | RouteKind::Batch) {
        add_idempotency_key_header(&mut op);
    }
    if matches!(route.kind, RouteKind::Events | RouteKind::BatchEvents) {
        op["responses"]["204"] = no_content_after_the_end();
    }
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

/// The OpenAPI document of the native API (built once: the route table does not change).
pub fn document() -> Value {
    static NATIVE: LazyLock<Value> = LazyLock::new(|| document_of(super::api_routes().operations()));
    NATIVE.clone()
}

/// Where the request side's schemas are referenced while the document is built; resolved to
/// `#/components/schemas/` by [`merge_schemas`].
const REQUEST_DEFINITIONS: &str = "/components/requestSchemas";

/// The schema generators of one document: replies as the gateway serializes them (a field
/// always sent is `required`), requests and parameters as it deserializes them (a field with a
/// default may be left out). A type whose two schemas differ is listed twice, its request
/// side as `<Name>Input` (FastAPI's convention).
pub struct Generators {
    pub replies: SchemaGenerator,
    pub requests: SchemaGenerator,
}

/// The document of these operations. Pure.
pub fn document_of(ops: &[Op]) -> Value {
    let mut generators = Generators {
        replies: SchemaSettings::openapi3().for_serialize().into_generator(),
        requests: SchemaSettings::openapi3().for_deserialize().with(|s| s.definitions_path = REQUEST_DEFINITIONS.into()).into_generator(),
    };
    let error = value(generators.replies.subschema_for::<HttpError>());
    let mut paths = serde_json::Map::new();
    for op in ops {
        let path = op.openapi_path();
        let entry = paths.entry(path.clone()).or_insert_with(|| json!({}));
        assert!(entry.get(op.method.as_str()).is_none(), "{} {path} is registered twice", op.method.as_str());
        entry[op.method.as_str()] = operation(op, &mut generators);
    }
    let retry_after = json!({"description": "Seconds to wait before trying again", "schema": {"type": "integer"}});
    let doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Kiln HTTP gateway",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The NATS API of Kiln over HTTP (docs/HTTP.md). Every error is `{code, message}` \
                (`HttpError`) with the HTTP status of its code. Swagger UI is at `/docs`, ReDoc at `/redoc`.",
        },
        "tags": TAGS.iter().map(|(name, description)| json!({"name": name, "description": description})).collect::<Vec<_>>(),
        "security": [{"bearer": []}, {"access_token": []}],
        "paths": paths,
        "components": {
            "schemas": {},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of `[[http.api_keys]]`: `Authorization: Bearer <key>`. A gateway on a loopback \
                        address without keys asks for none.",
                },
                "access_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "The same key in the query, for `EventSource` and `<img src>`, which cannot send headers.",
                },
            },
            "responses": {
                "Error": {"description": "An error: `{code, message}`", "content": {"application/json": {"schema": error.clone()}}},
                "RetryLater": {
                    "description": "Overloaded, over a quota, or no node answers: `{code, message}`; retry after `Retry-After`",
                    "headers": {"Retry-After": retry_after},
                    "content": {"application/json": {"schema": error}},
                },
            },
        },
    });
    merge_schemas(doc, generators)
}

/// Puts both sides' schemas under `#/components/schemas/`: one entry for a type whose two
/// schemas are the same, else the request side's as `<Name>Input`; and points the request
/// side's references at them. Pure.
fn merge_schemas(doc: Value, generators: Generators) -> Value {
    let Generators { mut replies, mut requests } = generators;
    let mut schemas = replies.take_definitions(true);
    let request_side = requests.take_definitions(true);
    let mut names = vec![];
    for (name, schema) in &request_side {
        let merged = match schemas.get(name) {
            Some(same) if same == schema => name.clone(),
            Some(_) => format!("{name}Input"),
            None => name.clone(),
        };
        names.push((name.clone(), merged));
    }
    for ((_, merged), schema) in names.iter().zip(request_side.into_values()) {
        schemas.entry(merged.clone()).or_insert(schema);
    }
    let mut text = serde_json::to_string(&json!({"doc": doc, "schemas": schemas})).expect("serializes");
    for (name, merged) in &names {
        text = text.replace(&format!("\"#{REQUEST_DEFINITIONS}/{name}\""), &format!("\"#/components/schemas/{merged}\""));
    }
    let Value::Object(mut both) = serde_json::from_str(&text).expect("parses") else { unreachable!("an object") };
    let mut doc = both.remove("doc").expect("doc");
    doc["components"]["schemas"] = both.remove("schemas").expect("schemas");
    doc
}

fn value(schema: Schema) -> Value {
    serde_json::to_value(schema).expect("schemas serialize")
}

/// The error statuses an operation documents: those its shape implies (400 for any input,
/// 401 unless public, 404 for a path naming something, 413 for a body, 503 when it needs
/// NATS), and its own [`Op::errors`]. Public operations (probes) answer their own bodies.
pub fn error_statuses(op: &Op) -> Vec<u16> {
    if op.public {
        return op.errors.clone();
    }
    let has_path_params = op.path.contains('{');
    let has_body = op.json_body.is_some() || op.multipart_body.is_some() || op.bytes_body;
    let mut statuses = vec![401, 503];
    if has_path_params || has_body || !op.query.is_empty() || !op.headers.is_empty() {
        statuses.push(400);
    }
    if has_path_params {
        statuses.push(404);
    }
    if has_body {
        statuses.push(413);
    }
    statuses.extend(&op.errors);
    statuses.sort_unstable();
    statuses.dedup();
    statuses
}

/// One operation as OpenAPI writes it.
fn operation(op: &Op, generators: &mut Generators) -> Value {
    let generator = &mut generators.replies;
    let reply = match &op.reply {
        None => json!({"description": "OK"}),
        Some(Reply::Endpoint) => {
            let endpoint = op.forwards.expect("Reply::Endpoint comes with the endpoint");
            json!({"description": "OK", "content": {"application/json": {"schema": value(endpoint.reply_schema(generator))}}})
        }
        Some(Reply::Json(schema)) => json!({"description": "OK", "content": {"application/json": {"schema": value(schema(generator))}}}),
        Some(Reply::Inline(schema)) => json!({"description": "OK", "content": {"application/json": {"schema": schema}}}),
        Some(Reply::Events { previews }) => {
            let event = value(generator.subschema_for::<Event>());
            // A job's stream also carries live previews (`event: preview`), without an id.
            let description = if *previews {
                generator.subschema_for::<kiln_core::preview::PreviewView>();
                "text/event-stream: the history, then live events, until the terminal one; each `data:` is an `Event` \
                 (`event:` its type, `id:` its sequence), or a `PreviewView` for `event: preview`"
            } else {
                "text/event-stream: the history, then live events, until the terminal one; each `data:` is an `Event`"
            };
            json!({"description": description, "content": {"text/event-stream": {"schema": event}}})
        }
        Some(Reply::Bytes(media_type)) => {
            json!({"description": "The bytes", "content": {*media_type: {"schema": {"type": "string", "format": "binary"}}}})
        }
    };
    let mut reply = reply;
    for (name, description) in &op.reply_headers {
        reply["headers"][*name] = json!({"description": description, "schema": {"type": "string"}});
    }
    let mut responses = serde_json::Map::new();
    responses.insert(op.status.to_string(), reply);
    for (status, description, schema) in &op.responses {
        let mut response = json!({"description": description});
        if let Some(schema) = schema {
            response["content"] = json!({"application/json": {"schema": schema}});
        }
        responses.insert(status.to_string(), response);
    }
    for status in error_statuses(op) {
        let which = if matches!(status, 429 | 503) { "RetryLater" } else { "Error" };
        responses.entry(status.to_string()).or_insert_with(|| json!({"$ref": format!("#/components/responses/{which}")}));
    }
    if !op.public {
        responses.insert("default".into(), json!({"$ref": "#/components/responses/Error"}));
    }
    let mut out = json!({
        "operationId": op.id,
        "tags": [op.tag],
        "summary": op.summary,
        "responses": responses,
    });
    if let Some(description) = op.description {
        out["description"] = json!(description);
    }
    if let Some(endpoint) = op.forwards {
        let note = format!("Forwards to `kiln.api.{}` (docs/PROTOCOL.md).", endpoint.name());
        out["description"] = json!(match op.description {
            Some(d) => format!("{d}\n\n{note}"),
            None => note,
        });
    }
    if op.public {
        out["security"] = json!([]);
    }
    set_path_parameters(&mut out, &op.openapi_path());
    let generator = &mut generators.requests;
    for (name, schema, description) in &op.query {
        let param = json!({"name": name, "in": "query", "required": false, "description": description, "schema": value(schema(generator))});
        push_parameter(&mut out, param);
    }
    for (name, description) in &op.headers {
        push_parameter(
            &mut out,
            json!({"name": name, "in": "header", "required": false, "description": description, "schema": {"type": "string"}}),
        );
    }
    let mut content = serde_json::Map::new();
    match &op.json_body {
        Some(BodySchema::Endpoint) => {
            let endpoint = op.forwards.expect("endpoint_body() needs forwards()");
            content.insert("application/json".into(), json!({"schema": value(endpoint.request_schema(generator))}));
        }
        Some(BodySchema::Type(schema)) => {
            content.insert("application/json".into(), json!({"schema": value(schema(generator))}));
        }
        None => {}
    }
    if let Some(form) = &op.multipart_body {
        content.insert("multipart/form-data".into(), json!({"schema": form}));
    }
    if op.bytes_body {
        content.insert("*/*".into(), json!({"schema": {"type": "string", "format": "binary"}}));
    }
    if !content.is_empty() {
        out["requestBody"] = json!({"required": true, "content": content});
    }
    out
}

fn push_parameter(op: &mut Value, param: Value) {
    match op["parameters"].as_array_mut() {
        Some(params) => params.push(param),
        None => op["parameters"] = json!([param]),
    }
}

pub async fn serve(State(gateway): State<Gateway>) -> Json<Value> {
    Json(document_for(gateway.config()))
}

/// The `Idempotency-Key` request header of a submit (docs/HTTP.md): the body's idempotency
/// key, in a header; both given and different is a 400.
fn add_idempotency_key_header(op: &mut Value) {
    let header = json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "The submit's idempotency key (as the body's idempotency_key): the same key gives the same job. Both given and different: 400",
        "schema": {"type": "string"},
    });
    match op["parameters"].as_array_mut() {
        Some(params) => params.push(header),
        None => op["parameters"] = json!([header]),
    }
}

/// The answer of an event stream resumed (`Last-Event-ID`) after its terminal event.
fn no_content_after_the_end() -> Value {
    json!({"description": "Resumed after the terminal event: nothing follows (an EventSource stops reconnecting)"})
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
    use std::collections::BTreeSet;

    fn registered() -> Vec<(&'static str, String)> {
        super::super::api_routes().operations().iter().map(|op| (op.method.as_str(), op.openapi_path())).collect()
    }

    /// Every route the router registers is in the document, and the document has no operation
    /// the router does not serve: both come from `api_routes()`, checked here both ways.
    #[test]
    fn the_document_lists_exactly_the_registered_routes_and_resolves_every_ref() {
        let doc = document();
        let routes: BTreeSet<(String, String)> = registered().into_iter().map(|(m, p)| (m.to_string(), p)).collect();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        assert_eq!(routes, documented);
        assert!(routes.len() >= 20, "{routes:?}");
        let text = doc.to_string();
        for (prefix, kind) in [("\"$ref\":\"#/components/schemas/", "schemas"), ("\"$ref\":\"#/components/responses/", "responses")] {
            let defined = doc["components"][kind].as_object().expect(kind);
            for r in text.split(prefix).skip(1) {
                let name = &r[..r.find('"').expect("quoted")];
                assert!(defined.contains_key(name), "unresolved $ref {kind}/{name}");
            }
        }
        assert!(!text.contains(REQUEST_DEFINITIONS), "every request-side reference is resolved");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        assert!(schemas.contains_key("JobView") && schemas.contains_key("SubmitRequest") && schemas.contains_key("HttpError"));
        // A request's defaulted fields may be left out; a reply's fields always sent are required.
        let required = |name: &str| -> Vec<String> {
            schemas[name]["required"].as_array().map(|r| r.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default()
        };
        assert_eq!(required("SubmitRequest"), ["model"]);
        assert!(
            ["job_id", "status", "artifacts", "inputs"].iter().all(|f| required("JobView").iter().any(|r| r == f)),
            "{:?}",
            required("JobView")
        );
        assert!(!required("HttpError").iter().any(|r| r == "retry_after_ms"));
    }

    /// What a generated client needs of each operation: a unique operation id, a known tag, a
    /// summary; a reply with content where there is one; error bodies.
    #[test]
    fn every_operation_has_a_unique_id_a_known_tag_and_typed_replies() {
        let doc = document();
        let mut ids = BTreeSet::new();
        for op in super::super::api_routes().operations() {
            let what = format!("{} {}", op.method.as_str(), op.path);
            assert!(ids.insert(op.id), "{what}: operation id {} twice", op.id);
            assert!(op.id.chars().all(|c| c.is_ascii_alphanumeric()) && op.id.starts_with(|c: char| c.is_ascii_lowercase()), "{what}");
            assert!(TAGS.iter().any(|(t, _)| *t == op.tag), "{what}: tag {} is not in TAGS", op.tag);
            assert!(!op.summary.is_empty(), "{what}");
            assert_eq!(op.public, super::super::is_public(op.path), "{what}: public in the table and in is_public agree");
            let documented = &doc["paths"][op.openapi_path()][op.method.as_str()];
            let ok = &documented["responses"][op.status.to_string()];
            assert!(ok["content"].is_object(), "{what}: the success reply has no content: {documented:#}");
            if !op.public {
                assert_eq!(documented["responses"]["401"]["$ref"], "#/components/responses/Error", "{what}");
                assert!(documented.get("security").is_none(), "{what}: needs the key like the rest");
            }
            for name in op.openapi_path().split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
                let params = documented["parameters"].as_array().expect("parameters");
                assert!(params.iter().any(|p| p["name"] == name && p["in"] == "path"), "{what}: path parameter {name}");
            }
        }
        let list = &doc["paths"]["/v1/jobs"]["get"]["parameters"];
        let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["status", "model", "limit", "dead_letter", "label"]);
        assert_eq!(list[0]["schema"]["$ref"], "#/components/schemas/JobState");
        assert_eq!(list[4]["schema"]["type"], "array");
        let submit = &doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"];
        assert_eq!(submit["multipart/form-data"]["schema"]["required"][0], "model");
        assert_eq!(doc["paths"]["/v1/files/{name}"]["put"]["requestBody"]["content"]["*/*"]["schema"]["format"], "binary");
        assert_eq!(doc["paths"]["/v1/jobs"]["post"]["responses"]["429"]["$ref"], "#/components/responses/RetryLater");
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }

    /// A gateway without API keys says so: no key is one of the ways in.
    #[test]
    fn the_security_requirement_follows_the_configured_keys() {
        let open = document_for(&HttpConfig::default());
        assert!(open["security"].as_array().unwrap().contains(&json!({})), "{}", open["security"]);
        let toml = "[http]\n[[http.api_keys]]\nname = \"a\"\nsha256 = \"00\"\n";
        let config = kiln_core::config::ClusterConfig::from_toml(toml, "keys").expect("config");
        let keyed = document_for(&config.http);
        assert_eq!(keyed["security"], json!([{"bearer": []}, {"access_token": []}]));
    }

    #[test]
    fn submits_take_an_idempotency_key_header_and_event_streams_answer_204() {
        let doc = document();
        for path in ["/v1/jobs", "/v1/batches"] {
            let params = doc["paths"][path]["post"]["parameters"].as_array().expect("parameters");
            assert!(params.iter().any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header"), "{path}");
        }
        let listing = doc["paths"]["/v1/jobs"]["get"]["parameters"].as_array().cloned().unwrap_or_default();
        assert!(!listing.iter().any(|p| p["name"] == "Idempotency-Key"), "listing is no submit");
        for path in ["/v1/jobs/{id}/events", "/v1/batches/{id}/events"] {
            assert!(doc["paths"][path]["get"]["responses"]["204"].is_object(), "{path}");
        }
    }

    /// Every `kiln.api` endpoint is reached over HTTP by a native route, or is one of the few
    /// that are NATS-only: an endpoint added without its route (or its place in `NATS_ONLY`)
    /// fails here. And a route's reply is its endpoint's.
    #[test]
    fn every_nats_endpoint_has_a_native_route_or_is_nats_only() {
        let routed: Vec<Endpoint> = super::super::api_routes().operations().iter().filter_map(|op| op.forwards).collect();
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

    /// A route registered on the gateway's routers the plain axum way (`.route("/path", ..)`)
    /// bypasses the table and would be served undocumented: the gateway's router files may
    /// name only documented paths, and the few pages that are not part of the API.
    #[test]
    fn no_route_is_registered_outside_the_table() {
        const NOT_API: [&str; 6] = ["/", "/console/app.js", "/console/style.css", "/openapi.json", "/docs", "/redoc"];
        let documented: BTreeSet<String> = registered().into_iter().map(|(_, p)| p).collect();
        let sources = [
            ("mod.rs", include_str!("mod.rs")),
            ("v1.rs", include_str!("v1.rs")),
            ("console.rs", include_str!("console.rs")),
            ("docs.rs", include_str!("docs.rs")),
            ("events.rs", include_str!("events.rs")),
            ("objects.rs", include_str!("objects.rs")),
        ];
        let mut seen = 0;
        for (file, text) in sources {
            for call in text.split(".route(\"").skip(1) {
                let path = &call[..call.find('"').expect("quoted")];
                seen += 1;
                assert!(
                    NOT_API.contains(&path) || documented.contains(&openapi_path(path)),
                    "{file} registers {path} outside api_routes(): register it with its Op (see the module docs)"
                );
            }
        }
        assert!(seen >= NOT_API.len(), "the scan finds the plain routes ({seen})");
    }

    #[test]
    fn configured_routes_have_operation_ids() {
        assert_eq!(route_operation_id("POST", "/predict"), "routePostPredict");
        assert_eq!(route_operation_id("GET", "/stream/{task_id}"), "routeGetStreamTaskId");
        assert_eq!(route_operation_id("GET", "/api/tempfile/download/{*file_id}"), "routeGetApiTempfileDownloadFileId");
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
