//! The native REST API, `/v1/...`: one route per `kiln.api.*` endpoint with the same JSON
//! bodies (docs/HTTP.md lists them), plus what HTTP clients need on top: multipart submits whose
//! file parts become inputs, SSE event streams, and files and artifacts streamed both ways.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use kiln_core::endpoint::Endpoint;
use kiln_core::job::JobState;
use kiln_core::nats::objects::{content_type_for, StoredObject};
use kiln_core::protocol::{BatchSubmitRequest, Event, InputValue, ListJobsRequest, QueueRequest, SubmitRequest};
use serde::de::DeserializeOwned;

use super::error::HttpError;
use super::events::parse_last_event_id;
use super::objects;
use super::openapi::{schema, ApiRoutes, Op};
use super::origin::Origin;
use super::{Gateway, Tenant};

/// The native API's routes, each with its OpenAPI operation (see [`super::openapi`]: the
/// document is built from this table, so a route added here is documented by the same line).
pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .route(
            Op::post("/v1/jobs", "submitJob", "jobs", "Submit a job")
                .description(
                    "A JSON `SubmitRequest`, or `multipart/form-data`: the text parts `model`, `params` (a JSON object), \
                     optionally `inputs` and `labels` (JSON objects), `priority`, `idempotency_key`, `max_attempts`, \
                     `reuse`; each file part is uploaded to the files bucket and becomes an `{\"object\": name}` input of \
                     its part's name, each other text part an inline input of its name.",
                )
                .forwards(Endpoint::Submit)
                .endpoint_body()
                .multipart_body(submit_form_schema())
                .header("Idempotency-Key", "The submit's idempotency key (as the body's `idempotency_key`): the same key gives the same job; both given and different: 400")
                .status(201)
                .reply_header("Location", "/v1/jobs/{id}")
                .errors(&[404, 429]),
            submit,
        )
        .route(
            Op::get("/v1/jobs", "listJobs", "jobs", "List jobs, newest first")
                .forwards(Endpoint::Jobs)
                .query("status", schema::<JobState>, "Only jobs in this state")
                .query("model", schema::<String>, "Only jobs of this model")
                .query("limit", schema::<u32>, "At most this many (default 100, at most 1000)")
                .query("dead_letter", schema::<bool>, "Only jobs that failed after their last attempt")
                .query("label", schema::<Vec<String>>, "`name:value`; repeatable, every one must match"),
            list_jobs,
        )
        .route(Op::get("/v1/jobs/{id}", "getJob", "jobs", "A job as it is now").forwards(Endpoint::Status), get_job)
        .route(
            Op::post("/v1/jobs/{id}/cancel", "cancelJob", "jobs", "Cancel a job: a queued one at once, a running one through its node")
                .forwards(Endpoint::Cancel),
            cancel_job,
        )
        .route(
            Op::get("/v1/jobs/{id}/events", "jobEvents", "jobs", "The job's events as SSE: history, then live")
                .description(
                    "Every stream starts with `retry:`. The server closes the stream after the terminal event. A client \
                     that reconnects with `Last-Event-ID` (or `?last_event_id=`) gets exactly the events after it, on \
                     any gateway; after the terminal event that is 204, which stops an `EventSource` reconnecting.",
                )
                .events(true)
                .header("Last-Event-ID", "Resume after this event id (what `EventSource` sends by itself)")
                .response(204, "Resumed after the terminal event: nothing follows (an EventSource stops reconnecting)", None)
                .query("last_event_id", schema::<u64>, "As `Last-Event-ID`, for clients that cannot send it"),
            job_events,
        )
        .route(
            Op::get("/v1/jobs/{id}/artifacts/{name}", "getArtifact", "jobs", "An artifact's bytes")
                .description("With `Content-Type`, `ETag` (the sha256), `Accept-Ranges`; a single `Range` is answered with 206.")
                .bytes("application/octet-stream")
                .reply_header("ETag", "The sha256 of the bytes, quoted")
                .byte_ranges(),
            get_artifact,
        )
        .route(
            Op::get("/v1/jobs/{id}/preview", "getJobPreview", "jobs", "The job's newest live preview, its image bytes")
                .description("Kept 10 minutes after it was sent; 404 when there is none. Never an artifact.")
                .bytes("image/*")
                .reply_header("Kiln-Attempt", "The attempt that sent it")
                .reply_header("Kiln-Preview-Seq", "Its number within the attempt, from 1")
                .reply_header("Kiln-Ts-Ms", "When it was sent, Unix ms"),
            get_preview,
        )
        .route(
            Op::get("/v1/jobs/{id}/webhooks", "listJobWebhooks", "jobs", "The job's webhook delivery log")
                .description("Each attempt: its message, status code or error, latency, verdict (docs/PROTOCOL.md, Webhooks).")
                .forwards(Endpoint::Webhooks),
            job_webhooks,
        )
        .route(
            Op::post("/v1/jobs/{id}/webhooks/redeliver", "redeliverJobWebhooks", "jobs", "Send the job's last event to its webhooks again")
                .description("202: queued, delivered as any message is, with the same `webhook-id`; the log shows the attempts.")
                .forwards(Endpoint::WebhooksRedeliver)
                .status(202),
            redeliver_webhooks,
        )
        .route(
            Op::post("/v1/files", "uploadFiles", "files", "Upload files; each is stored as uploads/<uuid>/<name>")
                .multipart_body(serde_json::json!({
                    "type": "object",
                    "description": "Every part with a file name is a file to store",
                    "additionalProperties": {"type": "string", "format": "binary"},
                }))
                .status(201)
                .reply(schema::<FilesView>),
            upload_files,
        )
        .route(
            Op::get("/v1/files/{*name}", "getFile", "files", "An uploaded file's bytes")
                .description("Like an artifact: `ETag`, `Range`, `If-None-Match`. The name may hold `/`.")
                .bytes("application/octet-stream")
                .byte_ranges(),
            get_file,
        )
        .route(
            Op::put("/v1/files/{*name}", "putFile", "files", "Upload one file under a name (the raw body)")
                .description("The body's `Content-Type` is stored with it (guessed from the name when absent). The name may hold `/`.")
                .bytes_body()
                .status(201)
                .reply(schema::<FileView>),
            put_file,
        )
        .route(
            Op::post("/v1/batches", "submitBatch", "batches", "Submit a batch: one job per item")
                .forwards(Endpoint::SubmitBatch)
                .endpoint_body()
                .header("Idempotency-Key", "The submit's idempotency key (as the body's `idempotency_key`): the same key gives the same job; both given and different: 400")
                .status(201)
                .reply_header("Location", "/v1/batches/{id}")
                .errors(&[404, 429]),
            submit_batch,
        )
        .route(
            Op::get("/v1/batches/{id}", "getBatch", "batches", "A batch: its summary and each item's job").forwards(Endpoint::Batch),
            get_batch,
        )
        .route(
            Op::get("/v1/batches/{id}/events", "batchEvents", "batches", "The batch's events as SSE: history, then live")
                .events(false)
                .header("Last-Event-ID", "Resume after this event id")
                .response(204, "Resumed after the terminal event: nothing follows (an EventSource stops reconnecting)", None)
                .query("last_event_id", schema::<u64>, "As `Last-Event-ID`"),
            batch_events,
        )
        .route(
            Op::post("/v1/batches/{id}/retry", "retryBatch", "batches", "A new batch of a finished batch's failed and cancelled items")
                .forwards(Endpoint::RetryBatch)
                .status(201),
            retry_batch,
        )
        .route(
            Op::post("/v1/batches/{id}/cancel", "cancelBatch", "batches", "Cancel a batch: its held items and every job not ended")
                .forwards(Endpoint::CancelBatch),
            cancel_batch,
        )
        .route(
            Op::get("/v1/models", "listModels", "cluster", "The cluster's models and where each is warm").forwards(Endpoint::Models),
            models,
        )
        .route(Op::get("/v1/cluster", "getCluster", "cluster", "Every live node and GPU slot").forwards(Endpoint::Cluster), cluster)
        .route(
            Op::get("/v1/queue", "getQueue", "cluster", "Each model's queue: depth by lane, oldest wait, running, slots, desired slots")
                .forwards(Endpoint::Queue)
                .query("model", schema::<String>, "Only this model")
                .errors(&[404]),
            queue,
        )
}

/// The multipart form of `POST /v1/jobs` (see [`submit_from_form`]).
fn submit_form_schema() -> serde_json::Value {
    let json_text = |what: &str| serde_json::json!({"type": "string", "description": format!("{what}, as JSON text")});
    serde_json::json!({
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "params": json_text("The job's params: a JSON object"),
            "inputs": json_text("More inputs: a JSON object of `InputValue`s"),
            "labels": json_text("The job's labels: a JSON object of strings"),
            "priority": {"type": "integer", "minimum": 0, "maximum": 255},
            "idempotency_key": {"type": "string"},
            "max_attempts": {"type": "integer", "minimum": 1},
            "reuse": {"type": "boolean"},
        },
        "additionalProperties": {
            "type": "string",
            "format": "binary",
            "description": "A file part becomes an `{\"object\": ..}` input of its part's name; a text part an inline input",
        },
    })
}

type TenantOf = Extension<Arc<Tenant>>;

/// Reads a JSON body of at most `http.max_body_bytes`: a `Content-Length` past it is refused
/// before a byte is read, a body that turns out longer is cut at the limit.
pub async fn read_json<T: DeserializeOwned>(gateway: &Gateway, headers: &HeaderMap, body: Body) -> Result<T, HttpError> {
    let bytes = read_limited(gateway, headers, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| HttpError::bad_request(format!("malformed JSON body: {e}")))
}

/// Reads a body of at most `http.max_body_bytes` (see [`read_json`]). A body refused for its
/// size is still read to its end and dropped when that end is near
/// ([`drains_refused_body`]) before the 413 goes out.
pub async fn read_limited(gateway: &Gateway, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, HttpError> {
    let limit = gateway.config().max_body_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large =
        || HttpError::too_large(format!("the body is larger than {limit} bytes (http.max_body_bytes); upload files to /v1/files"));
    let mut data = body.into_data_stream();
    if declared.is_some_and(|n| n > limit as u64) {
        if drains_refused_body(declared, 0) {
            drain(&mut data, 0).await;
        }
        return Err(too_large());
    }
    let mut bytes = bytes::BytesMut::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| HttpError::bad_request(format!("cannot read the body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            drain(&mut data, (bytes.len() + chunk.len()) as u64).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.freeze())
}

/// How much more of a refused body the gateway reads and drops, and for how long at most,
/// before it answers. A server that answers and closes while the client still sends leaves
/// unread bytes in its socket, so its kernel resets the connection, and the client, still
/// writing, sees a connection error instead of the 413 (a chunked upload under load did).
/// Read to its end, the body costs neither the answer nor the connection.
const REFUSED_BODY_DRAIN_BYTES: u64 = 4 << 20;
const REFUSED_BODY_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a refused body, `declared` long (`None`: chunked) with `read` bytes of it read, is
/// worth reading to its end: not when the end is known to be further than
/// [`REFUSED_BODY_DRAIN_BYTES`] (a declared gigabyte is answered before it is sent).
fn drains_refused_body(declared: Option<u64>, read: u64) -> bool {
    declared.is_none_or(|n| n.saturating_sub(read) <= REFUSED_BODY_DRAIN_BYTES)
}

/// Reads and drops the rest of a refused body, at most [`REFUSED_BODY_DRAIN_BYTES`] more in
/// at most [`REFUSED_BODY_DRAIN_TIME`]; a client that sends more or stalls gets its answer
/// anyway (and, past a limit, a closed connection).
async fn drain(data: &mut axum::body::BodyDataStream, already: u64) {
    let mut dropped = 0u64;
    let reading = async {
        while let Some(Ok(chunk)) = data.next().await {
            dropped += chunk.len() as u64;
            if dropped > REFUSED_BODY_DRAIN_BYTES {
                break;
            }
        }
    };
    if tokio::time::timeout(REFUSED_BODY_DRAIN_TIME, reading).await.is_err() {
        tracing::debug!(read = already, "a refused body was not sent to its end in time; answering anyway");
    }
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"))
}

/// A multipart body as read: its text parts (as JSON values: numbers and booleans parsed, the
/// rest strings) and its file parts, each already stored in the files bucket.
pub struct Form {
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub files: BTreeMap<String, UploadedFile>,
}

/// A file part stored in the files bucket.
#[derive(Debug, Clone)]
pub struct UploadedFile {
    pub stored: StoredObject,
    pub original_name: String,
}

/// A text part's value: a JSON number or boolean when it reads as one (`focal_length=1000`),
/// else the text.
pub fn form_value(text: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v,
        _ => serde_json::Value::String(text.to_string()),
    }
}

/// Reads a multipart body: text parts of at most `http.max_body_bytes` each, file parts (those
/// with a file name) streamed into the files bucket as `uploads/<uuid>/<name>`, each at most
/// `http.max_upload_bytes`. On any error the files stored so far are deleted again.
pub async fn read_form(gateway: &Gateway, tenant: &Tenant, request: Request) -> Result<Form, HttpError> {
    read_form_as(gateway, tenant, request, upload_name).await
}

/// The object name of an uploaded file part: `uploads/<uuid>/<name>`.
pub fn upload_name(file_name: &str) -> String {
    format!("uploads/{}/{}", uuid::Uuid::new_v4(), objects::safe_file_name(file_name))
}

/// [`read_form`], with file parts stored under the names `name_file` gives their file names.
pub async fn read_form_as(gateway: &Gateway, tenant: &Tenant, request: Request, name_file: fn(&str) -> String) -> Result<Form, HttpError> {
    let mut multipart =
        Multipart::from_request(request, &()).await.map_err(|e| HttpError::bad_request(format!("malformed multipart body: {e}")))?;
    let mut form = Form { fields: Default::default(), files: Default::default() };
    let result = read_parts(gateway, tenant, &mut multipart, &mut form, name_file).await;
    if let Err(e) = result {
        forget_files(tenant, &form).await;
        return Err(e);
    }
    Ok(form)
}

async fn read_parts(
    gateway: &Gateway,
    tenant: &Tenant,
    multipart: &mut Multipart,
    form: &mut Form,
    name_file: fn(&str) -> String,
) -> Result<(), HttpError> {
    let config = gateway.config();
    let bad = |e: axum::extract::multipart::MultipartError| HttpError::bad_request(format!("malformed multipart body: {e}"));
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        if name.is_empty() {
            return Err(HttpError::bad_request("a multipart part has no name"));
        }
        if let Some(file_name) = field.file_name().map(str::to_string) {
            let object = name_file(&file_name);
            let content_type = match field.content_type() {
                Some(ct) if ct != "application/octet-stream" => ct.to_string(),
                _ => content_type_for(&objects::safe_file_name(&file_name)).to_string(),
            };
            let stored = objects::upload(
                tenant.client.jetstream(),
                &tenant.names().files_bucket(),
                &object,
                &content_type,
                Box::pin(&mut field),
                config.max_upload_bytes,
            )
            .await?;
            form.files.insert(name, UploadedFile { stored, original_name: file_name });
        } else {
            let mut text = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(bad)? {
                text.extend_from_slice(&chunk);
                if text.len() > config.max_body_bytes {
                    return Err(HttpError::too_large(format!(
                        "part {name:?} is larger than {} bytes (http.max_body_bytes)",
                        config.max_body_bytes
                    )));
                }
            }
            let text = String::from_utf8(text).map_err(|_| HttpError::bad_request(format!("part {name:?} is not UTF-8 text")))?;
            form.fields.insert(name, form_value(&text));
        }
    }
    Ok(())
}

/// Deletes the files a failed request uploaded: nothing refers to them.
pub async fn forget_files(tenant: &Tenant, form: &Form) {
    if form.files.is_empty() {
        return;
    }
    if let Ok(store) = tenant.client.jetstream().get_object_store(tenant.names().files_bucket()).await {
        for f in form.files.values() {
            let _ = store.delete(&f.stored.name).await;
        }
    }
}

/// A multipart submit as a [`SubmitRequest`]: `model`; `params`, `inputs` and `labels` as JSON objects;
/// `priority`, `idempotency_key`, `max_attempts`, `reuse`, `webhook`; every file part an object input;
/// every other text part an inline input of that name.
fn submit_from_form(form: &Form) -> Result<SubmitRequest, HttpError> {
    let mut request = SubmitRequest::default();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (name, value) in &form.fields {
        match name.as_str() {
            "model" => request.model = text(value),
            "params" => {
                request.params = serde_json::from_str(&text(value))
                    .map_err(|e| HttpError::bad_request(format!("part `params` is not a JSON object: {e}")))?
            }
            "inputs" => {
                let inputs: BTreeMap<String, InputValue> = serde_json::from_str(&text(value))
                    .map_err(|e| HttpError::bad_request(format!("part `inputs` is not a JSON object: {e}")))?;
                request.inputs.extend(inputs);
            }
            "priority" => {
                request.priority = value
                    .as_u64()
                    .and_then(|p| u8::try_from(p).ok())
                    .ok_or_else(|| HttpError::bad_request("part `priority` must be 0 to 255"))?
            }
            // The job's labels, as a JSON object of strings (as in a JSON submit), not an
            // input named `labels`.
            "labels" => {
                request.labels = serde_json::from_str(&text(value))
                    .map_err(|e| HttpError::bad_request(format!("part `labels` is not a JSON object of strings: {e}")))?
            }
            "idempotency_key" => request.idempotency_key = Some(text(value)),
            "max_attempts" => {
                request.max_attempts = Some(
                    value
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| HttpError::bad_request("part `max_attempts` must be a number"))?,
                )
            }
            "reuse" => request.reuse = value.as_bool().unwrap_or(false),
            // The job's webhook, as the JSON object a JSON submit takes.
            "webhook" => {
                request.webhook = Some(
                    serde_json::from_str(&text(value))
                        .map_err(|e| HttpError::bad_request(format!("part `webhook` is not a webhook object {{url, events}}: {e}")))?,
                )
            }
            _ => {
                request.inputs.insert(name.clone(), InputValue::Inline(serde_json::Value::String(text(value))));
            }
        }
    }
    for (name, file) in &form.files {
        request.inputs.insert(name.clone(), InputValue::Object { object: file.stored.name.clone() });
    }
    if request.model.is_empty() {
        return Err(HttpError::bad_request("a multipart submit needs a `model` part"));
    }
    Ok(request)
}

/// The `Idempotency-Key` request header (`None` without one, or an empty one).
pub fn header_key(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(v) => {
            let key = v.to_str().map_err(|_| HttpError::bad_request("the Idempotency-Key header is not visible ASCII text"))?.trim();
            Ok(Some(key.to_string()).filter(|k| !k.is_empty()))
        }
    }
}

/// The request header of [`header_key`].
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A submit's idempotency key from the `Idempotency-Key` header and the body's
/// `idempotency_key`, which mean the same: either one, or both when they are equal; two
/// different keys are a `bad_request` about the field (which one would the client mean?). Pure.
pub fn merge_keys(header: Option<String>, body: Option<String>, field: &str) -> Result<Option<String>, HttpError> {
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(HttpError::bad_field(
            field,
            format!("the Idempotency-Key header ({h:?}) and the body's {field} ({b:?}) differ: send one, or the same in both"),
        )),
        (h, b) => Ok(h.or(b)),
    }
}

/// `POST /v1/jobs`: a JSON [`SubmitRequest`], or a multipart form (see [`submit_from_form`]).
/// An `Idempotency-Key` header is the body's `idempotency_key` ([`merge_keys`]).
/// The job carries the request's [`Origin`]: its trace context (the `kiln.http` span's, or the
/// caller's `traceparent` as it came), sent in the NATS request's headers so the job's spans
/// join the caller's trace, and its API key's name as the `api_key` label.
async fn submit(
    State(gateway): State<Gateway>,
    Extension(tenant): TenantOf,
    origin: Origin,
    request: Request,
) -> Result<Response, HttpError> {
    let header = header_key(request.headers())?;
    let (mut submit, form) = if is_multipart(request.headers()) {
        let form = read_form(&gateway, &tenant, request).await?;
        match submit_from_form(&form) {
            Ok(s) => (s, Some(form)),
            Err(e) => {
                forget_files(&tenant, &form).await;
                return Err(e);
            }
        }
    } else {
        let (parts, body) = request.into_parts();
        (read_json::<SubmitRequest>(&gateway, &parts.headers, body).await?, None)
    };
    submit.idempotency_key = match merge_keys(header, submit.idempotency_key.take(), "idempotency_key") {
        Ok(key) => key,
        Err(e) => {
            if let Some(form) = form {
                forget_files(&tenant, &form).await;
            }
            return Err(e);
        }
    };
    origin.stamp_submit(&mut submit);
    match tenant.client.submit_traced(&submit, origin.trace()).await {
        Ok(reply) => {
            let location = format!("/v1/jobs/{}", reply.job_id);
            Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(reply)).into_response())
        }
        Err(e) => {
            if let Some(form) = form {
                forget_files(&tenant, &form).await;
            }
            Err(e.into())
        }
    }
}

#[derive(serde::Deserialize)]
struct JobsQuery {
    status: Option<String>,
    model: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    dead_letter: bool,
}

/// Parses a job status named in a query (`?status=failed`).
pub fn parse_status(s: &str) -> Result<JobState, HttpError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| HttpError::bad_request(format!("unknown status {s:?} (queued, running, retrying, completed, failed, cancelled)")))
}

/// The `label=name:value` pairs of a query (repeatable, so not a field of [`JobsQuery`]).
pub fn labels_of(raw: Option<&str>) -> Result<kiln_core::protocol::Labels, HttpError> {
    let pairs = form_urlencoded::parse(raw.unwrap_or("").as_bytes()).filter(|(key, _)| key == "label");
    pairs
        .map(|(_, pair)| {
            pair.split_once(':')
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .ok_or_else(|| HttpError::bad_request(format!("label {pair:?} is not name:value")))
        })
        .collect()
}

async fn list_jobs(
    Extension(tenant): TenantOf,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    query: Result<Query<JobsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = query.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let labels = labels_of(raw.as_deref())?;
    let status = q.status.as_deref().filter(|s| !s.is_empty()).map(parse_status).transpose()?;
    let request = ListJobsRequest { status, model: q.model.filter(|m| !m.is_empty()), dead_letter: q.dead_letter, limit: q.limit, labels };
    Ok(Json(tenant.client.jobs(&request).await?).into_response())
}

async fn get_job(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.status(&id).await?).into_response())
}

async fn cancel_job(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.cancel(&id).await?).into_response())
}

/// `GET /v1/jobs/{id}/webhooks`: the job's webhook delivery log.
async fn job_webhooks(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.webhooks(&id).await?).into_response())
}

/// `POST /v1/jobs/{id}/webhooks/redeliver`: the job's last event sent to its webhooks again
/// (202: queued, delivered as any message is; the log shows the attempts).
async fn redeliver_webhooks(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok((StatusCode::ACCEPTED, Json(tenant.client.redeliver_webhooks(&id).await?)).into_response())
}

/// The SSE name of an event: its `type` (`status`, `progress`, `item_completed`...).
pub fn event_name(e: &Event) -> String {
    serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "message".into())
}

/// Where a stream resumes: `Last-Event-ID` (what `EventSource` sends on a reconnect), else a
/// `last_event_id` query parameter.
pub fn resume_point(headers: &HeaderMap, query: Option<&str>) -> Result<Option<u64>, HttpError> {
    let header = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let from_query = super::query_param(query, "last_event_id");
    parse_last_event_id(header.or(from_query.as_deref())).map_err(HttpError::bad_request)
}

/// An SSE response of `events`: every event's JSON with its stream sequence as `id` and its
/// type as `event`; it ends after the terminal event, or when the gateway stops. `previews`,
/// for a job, come in between as `event: preview` without an `id` (they are live only, so a
/// client's `Last-Event-ID` stays the last event's).
fn event_stream(
    gateway: &Gateway,
    events: impl futures::Stream<Item = super::events::Sequenced> + Send + 'static,
    previews: Option<futures::stream::BoxStream<'static, kiln_client::Preview>>,
) -> Response {
    enum Item {
        // Boxed: an event is four times a preview's handle (clippy's large_enum_variant).
        Event(Box<super::events::Sequenced>),
        Preview(kiln_client::Preview),
        End,
    }
    let events = events.map(|e| Item::Event(Box::new(e))).chain(futures::stream::once(async { Item::End }));
    let items = match previews {
        Some(previews) => futures::stream::select(events, previews.map(Item::Preview)).boxed(),
        None => events.boxed(),
    };
    let events = items.take_while(|item| std::future::ready(!matches!(item, Item::End))).filter_map(|item| {
        let event = match item {
            Item::Event(event) => {
                let (seq, e) = *event;
                Some(SseEvent::default().id(seq.to_string()).event(event_name(&e)).json_data(&e).expect("events serialize"))
            }
            Item::Preview(p) => Some(SseEvent::default().event("preview").json_data(p.view()).expect("previews serialize")),
            Item::End => None,
        };
        std::future::ready(event.map(Ok::<_, std::convert::Infallible>))
    });
    let events = events.take_until(gateway.shutdown_token().cancelled_owned());
    super::events::sse_response(events)
}

/// How long an event stream waits for its first event before it reads the record instead.
const RECORD_CHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(3);

/// The event stream of a job or batch that exists (a 404 otherwise, not an empty stream).
/// Its first event proves it exists as well as `exists` (the record) does, and comes as soon:
/// whichever answers first decides, so a client's first event waits for one of the two, not
/// both. A stream with nothing to send waits for `exists`. `exists` answers whether the job or
/// batch has settled: a resumed stream of a settled one with nothing left is `204 No Content`
/// ([`super::events::resumed_after_the_end`]).
async fn events_once(
    gateway: &Gateway,
    tenant: &Tenant,
    id: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    exists: impl std::future::Future<Output = Result<bool, crate::client::ClientError>>,
    previews: Option<futures::stream::BoxStream<'static, kiln_client::Preview>>,
) -> Result<Response, HttpError> {
    let after = resume_point(headers, query)?;
    let mut events = Box::pin(tenant.feeds.subscribe(id, after).peekable());
    // The record is read only if no event came first within a few milliseconds: for a job
    // with events (nearly every one) that request, and the node's work for it, are saved.
    let exists = async {
        tokio::time::sleep(RECORD_CHECK_AFTER).await;
        exists.await
    };
    tokio::pin!(exists);
    let ended = tokio::select! {
        first = events.as_mut().peek() => {
            let next = first.map(|e| e.0);
            match next {
                None => super::events::resumed_after_the_end(after, exists.as_mut().await?, None),
                Some(_) => false,
            }
        }
        found = &mut exists => {
            let settled = found?;
            if after.is_some() && settled {
                // Settled: the feed reaches the terminal event soon (it is in the stream, or
                // about to be), and ends after it.
                match tokio::time::timeout(super::events::SETTLED_PATIENCE, events.as_mut().peek()).await {
                    Ok(first) => super::events::resumed_after_the_end(after, settled, first.map(|e| e.0)),
                    Err(_) => false,
                }
            } else {
                false
            }
        }
    };
    if ended {
        return Ok(super::events::no_content());
    }
    Ok(event_stream(gateway, events, previews))
}

async fn job_events(
    State(gateway): State<Gateway>,
    Extension(tenant): TenantOf,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, HttpError> {
    let exists = async { tenant.client.status(&id).await.map(|v| v.status.is_terminal()) };
    // Subscribed before the newest kept preview is read (a preview sent meanwhile is not
    // missed), which goes first: a client that comes late shows it at once. The live one it
    // may also be is not sent twice.
    let live = tenant.client.previews(&id).await?;
    // A client resuming (Last-Event-ID) has seen the previews of its first stream: it gets
    // only new ones, so a stream resumed after the job's end has nothing to send (204).
    let resuming = matches!(resume_point(&headers, uri.query()), Ok(Some(_)));
    let newest = if resuming {
        None
    } else {
        tenant.client.preview(&id).await.unwrap_or_else(|e| {
            tracing::debug!(job_id = %id, error = %e, "cannot read the newest preview");
            None
        })
    };
    let sent = newest.as_ref().map(|p| (p.attempt, p.seq));
    let live = live.filter(move |p| std::future::ready(Some((p.attempt, p.seq)) != sent));
    let previews = futures::stream::iter(newest).chain(live).boxed();
    events_once(&gateway, &tenant, &id, &headers, uri.query(), exists, Some(previews)).await
}

/// `GET /v1/jobs/{id}/preview`: the newest live preview of a job, its bytes with their
/// content type, while `KILN_PREVIEWS` keeps it (10 minutes); a coded 404 when there is none
/// (or no such job).
async fn get_preview(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    let Some(preview) = tenant.client.preview(&id).await? else {
        // Which 404: the job's own `not_found` when there is no such job.
        tenant.client.status(&id).await?;
        return Err(HttpError::not_found(format!("job {id} has no preview (its model sends none, none came yet, or the newest expired)")));
    };
    let headers = [
        (header::CONTENT_TYPE, preview.content_type.clone()),
        (header::CACHE_CONTROL, "no-store".to_string()),
        (header::HeaderName::from_static("kiln-attempt"), preview.attempt.to_string()),
        (header::HeaderName::from_static("kiln-preview-seq"), preview.seq.to_string()),
        (header::HeaderName::from_static("kiln-ts-ms"), preview.ts_ms.to_string()),
    ];
    Ok((headers, preview.data).into_response())
}

async fn get_artifact(
    Extension(tenant): TenantOf,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let view = tenant.client.status(&id).await?;
    let Some(artifact) = view.artifacts.iter().find(|a| a.name == name) else {
        let names: Vec<&str> = view.artifacts.iter().map(|a| a.name.as_str()).collect();
        return Err(HttpError::not_found(format!("job {id} has no artifact {name:?} (it has: {})", names.join(", "))));
    };
    let download = objects::open(tenant.client.jetstream(), &artifact.bucket, &artifact.object).await?;
    objects::respond(download, &headers, Some(&artifact.name)).await
}

/// What an upload answers: the object's name, size, sha256 and content type.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct FileView {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: String,
    /// The name the client gave it (multipart uploads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_name: Option<String>,
}

/// What `POST /v1/files` answers: every file part stored.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct FilesView {
    pub files: Vec<FileView>,
}

impl FileView {
    fn of(stored: &StoredObject, original_name: Option<String>) -> FileView {
        FileView {
            name: stored.name.clone(),
            size: stored.size,
            sha256: stored.sha256.clone(),
            content_type: stored.content_type.clone(),
            original_name,
        }
    }
}

/// `PUT /v1/files/{name}`: the body, streamed into the files bucket under that name.
async fn put_file(
    State(gateway): State<Gateway>,
    Extension(tenant): TenantOf,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, HttpError> {
    let limit = gateway.config().max_upload_bytes;
    let headers = request.headers();
    if headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > limit) {
        return Err(HttpError::too_large(format!("the file is larger than the limit of {limit} bytes (http.max_upload_bytes)")));
    }
    let content_type = match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) if ct != "application/octet-stream" && !ct.is_empty() => ct.to_string(),
        _ => content_type_for(&name).to_string(),
    };
    let body = request.into_body().into_data_stream();
    let stored = objects::upload(tenant.client.jetstream(), &tenant.names().files_bucket(), &name, &content_type, body, limit).await?;
    Ok((StatusCode::CREATED, Json(FileView::of(&stored, None))).into_response())
}

/// `POST /v1/files`: every file part of a multipart body, each as `uploads/<uuid>/<name>`.
async fn upload_files(State(gateway): State<Gateway>, Extension(tenant): TenantOf, request: Request) -> Result<Response, HttpError> {
    if !is_multipart(request.headers()) {
        return Err(HttpError::bad_request("POST /v1/files takes multipart/form-data (or PUT /v1/files/{name} with the raw body)"));
    }
    let form = read_form(&gateway, &tenant, request).await?;
    if form.files.is_empty() {
        return Err(HttpError::bad_request("the multipart body has no file part (a part with a filename)"));
    }
    let files: Vec<FileView> = form.files.values().map(|f| FileView::of(&f.stored, Some(f.original_name.clone()))).collect();
    Ok((StatusCode::CREATED, Json(FilesView { files })).into_response())
}

async fn get_file(Extension(tenant): TenantOf, Path(name): Path<String>, headers: HeaderMap) -> Result<Response, HttpError> {
    if !kiln_core::ids::is_valid_object_name(&name) {
        return Err(HttpError::bad_request(format!("file name {name:?} is invalid (no '..' or empty segments)")));
    }
    let download = objects::open(tenant.client.jetstream(), &tenant.names().files_bucket(), &name).await?;
    let base = name.rsplit('/').next().map(str::to_string);
    objects::respond(download, &headers, base.as_deref()).await
}

/// Every item's job carries the request's [`Origin`], as a submit's job does.
async fn submit_batch(
    State(gateway): State<Gateway>,
    Extension(tenant): TenantOf,
    origin: Origin,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let header = header_key(&headers)?;
    let mut request: BatchSubmitRequest = read_json(&gateway, &headers, body).await?;
    request.idempotency_key = merge_keys(header, request.idempotency_key.take(), "idempotency_key")?;
    origin.stamp_batch(&mut request);
    let reply = tenant.client.submit_batch_traced(&request, origin.trace()).await?;
    let location = format!("/v1/batches/{}", reply.batch_id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(reply)).into_response())
}

async fn get_batch(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.batch(&id).await?).into_response())
}

async fn batch_events(
    State(gateway): State<Gateway>,
    Extension(tenant): TenantOf,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, HttpError> {
    let exists = async { tenant.client.batch(&id).await.map(|b| b.summary.status != kiln_core::batch::BatchStatus::Running) };
    events_once(&gateway, &tenant, &id, &headers, uri.query(), exists, None).await
}

/// The retry's jobs join this request's trace; their labels are the first batch's items'.
async fn retry_batch(Extension(tenant): TenantOf, origin: Origin, Path(id): Path<String>) -> Result<Response, HttpError> {
    let reply = tenant.client.retry_batch_traced(&id, origin.trace()).await?;
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}

async fn cancel_batch(Extension(tenant): TenantOf, Path(id): Path<String>) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.cancel_batch(&id).await?).into_response())
}

async fn models(Extension(tenant): TenantOf) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.models().await?).into_response())
}

async fn cluster(Extension(tenant): TenantOf) -> Result<Response, HttpError> {
    Ok(Json(tenant.client.cluster().await?).into_response())
}

/// `GET /v1/queue[?model=M]`: `kiln.api.queue`'s reply.
async fn queue(
    Extension(tenant): TenantOf,
    query: Result<Query<QueueRequest>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(mut request) = query.map_err(|e| HttpError::bad_request(e.body_text()))?;
    request.model = request.model.filter(|m| !m.is_empty());
    Ok(Json(tenant.client.queue(&request).await?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_body_is_read_to_its_end_only_when_the_end_is_near() {
        assert!(drains_refused_body(None, 70_000), "chunked: read on, up to the drain limit");
        assert!(drains_refused_body(Some(200_000), 0));
        assert!(drains_refused_body(Some(REFUSED_BODY_DRAIN_BYTES + 100), 100));
        assert!(!drains_refused_body(Some(REFUSED_BODY_DRAIN_BYTES + 1), 0));
        assert!(!drains_refused_body(Some(1_000_000_000), 0), "a declared gigabyte is answered before it is sent");
    }

    #[test]
    fn form_values_keep_numbers_and_text() {
        assert_eq!(form_value("1000"), serde_json::json!(1000));
        assert_eq!(form_value("2.5"), serde_json::json!(2.5));
        assert_eq!(form_value("true"), serde_json::json!(true));
        assert_eq!(form_value("a cat"), serde_json::json!("a cat"));
        assert_eq!(form_value("[1]"), serde_json::json!("[1]"));
    }

    #[test]
    fn a_multipart_submit_needs_a_model_and_maps_its_parts() {
        let mut form = Form { fields: Default::default(), files: Default::default() };
        assert!(submit_from_form(&form).is_err());
        form.fields.insert("model".into(), "demo".into());
        form.fields.insert("prompt".into(), "a cat".into());
        form.fields.insert("params".into(), r#"{"steps": 3}"#.into());
        form.files.insert(
            "image".into(),
            UploadedFile {
                stored: StoredObject { name: "uploads/u/cat.png".into(), size: 1, sha256: "x".into(), content_type: "image/png".into() },
                original_name: "cat.png".into(),
            },
        );
        let s = submit_from_form(&form).unwrap();
        assert_eq!(s.model, "demo");
        assert_eq!(s.params["steps"], 3);
        assert_eq!(s.inputs["prompt"], InputValue::Inline("a cat".into()));
        assert_eq!(s.inputs["image"], InputValue::Object { object: "uploads/u/cat.png".into() });
        form.fields.insert("params".into(), "[1]".into());
        assert!(submit_from_form(&form).is_err());
    }

    #[test]
    fn the_idempotency_key_header_means_the_body_field() {
        let key = |s: &str| Some(s.to_string());
        assert_eq!(merge_keys(key("a"), None, "idempotency_key").unwrap(), key("a"));
        assert_eq!(merge_keys(None, key("b"), "idempotency_key").unwrap(), key("b"));
        assert_eq!(merge_keys(key("a"), key("a"), "idempotency_key").unwrap(), key("a"));
        assert_eq!(merge_keys(None, None, "idempotency_key").unwrap(), None);
        let e = merge_keys(key("a"), key("b"), "idempotency_key").unwrap_err();
        assert_eq!((e.status, e.code.as_str(), e.field.as_deref()), (400, "bad_request", Some("idempotency_key")));
        let mut h = HeaderMap::new();
        assert_eq!(header_key(&h).unwrap(), None);
        h.insert(IDEMPOTENCY_KEY, " k-1 ".parse().unwrap());
        assert_eq!(header_key(&h).unwrap(), key("k-1"));
        h.insert(IDEMPOTENCY_KEY, "".parse().unwrap());
        assert_eq!(header_key(&h).unwrap(), None);
        h.insert(IDEMPOTENCY_KEY, axum::http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap());
        assert_eq!(header_key(&h).unwrap_err().status, 400);
    }

    #[test]
    fn resume_points_come_from_the_header_or_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None).unwrap(), None);
        assert_eq!(resume_point(&h, Some("a=1&last_event_id=7")).unwrap(), Some(7));
        h.insert("last-event-id", "9".parse().unwrap());
        assert_eq!(resume_point(&h, Some("last_event_id=7")).unwrap(), Some(9));
        h.insert("last-event-id", "nine".parse().unwrap());
        assert_eq!(resume_point(&h, None).unwrap_err().status, 400);
    }
}
