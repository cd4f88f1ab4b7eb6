//! `[[http.routes]]`: the seed services' own HTTP contracts, served from configuration. Each
//! route is one of a few kinds (submit, status, events, artifact, upload, download, health,
//! batch, batch_events);
//! its table says which model, which request fields become which inputs and params, what the
//! client calls each status and stage, and the JSON it answers with (a [`template`]).
//! `examples/http/` holds the tables of seeds 001 to 004.
//!
//! [`template`]: super::template

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use kiln_core::batch::{BatchStatus, BatchSummary};
use kiln_core::http::{JobRefKind, RouteConfig, RouteKind};
use kiln_core::job::JobState;
use kiln_core::protocol::{
    ApiError, BatchItemEvent, BatchItemRequest, BatchSubmitRequest, BatchView, ErrorCode, Event, EventKind, InputValue, JobView,
    SubmitRequest,
};
use kiln_core::task::{self, TaskKind};
use serde_json::{json, Value};

use super::error::HttpError;
use super::origin::Origin;
use super::template::{lookup, render};
use super::v1::{form_value, read_form, read_form_as, read_json, read_limited, resume_point, Form};
use super::{objects, Gateway, Tenant};

/// The routes of the table, grouped by path (one path may take several methods).
pub fn router(routes: &[RouteConfig]) -> Router<Gateway> {
    let mut by_path: BTreeMap<&str, MethodRouter<Gateway>> = BTreeMap::new();
    for route in routes {
        let filter = match route.method.as_str() {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "PUT" => MethodFilter::PUT,
            _ => MethodFilter::DELETE,
        };
        let config = Arc::new(route.clone());
        let handler = move |State(gateway): State<Gateway>,
                            Extension(tenant): Extension<Arc<Tenant>>,
                            Path(ids): Path<BTreeMap<String, String>>,
                            request: Request| {
            let config = config.clone();
            async move {
                let id = ids.into_values().next();
                serve(&config, &gateway, &tenant, id, request).await.unwrap_or_else(|e| error_response(&config, e))
            }
        };
        let entry = by_path.remove(route.path.as_str()).unwrap_or_default();
        by_path.insert(&route.path, entry.on(filter, handler));
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods.layer(axum::extract::DefaultBodyLimit::disable()));
    }
    router
}

/// Without `{...}` in the path, `Path` extracts nothing: treat it as no id.
async fn serve(
    route: &RouteConfig,
    gateway: &Gateway,
    tenant: &Tenant,
    id: Option<String>,
    request: Request,
) -> Result<Response, HttpError> {
    match route.kind {
        RouteKind::Submit => submit(route, gateway, tenant, request).await,
        RouteKind::Status => {
            let view = tenant.client.status(&job_id(route, id)?).await?;
            let mut vars = job_vars(route, &view, None);
            if !route.artifacts.is_empty() {
                vars["artifact"] = json_artifact(route, tenant, &view).await?;
            }
            Ok(Json(respond_with(route, &vars, || serde_json::to_value(&view).unwrap_or_default())).into_response())
        }
        RouteKind::Events => events(route, gateway, tenant, id, request.headers(), request.uri().query()).await,
        RouteKind::Artifact => artifact(route, tenant, id, request.headers()).await,
        RouteKind::Upload => upload(route, gateway, tenant, request).await,
        RouteKind::Download => download(tenant, id, request.headers()).await,
        RouteKind::Health => health(route, tenant).await,
        RouteKind::Batch => batch(route, gateway, tenant, request).await,
        RouteKind::BatchEvents => batch_events(route, gateway, tenant, id, request.headers(), request.uri().query()).await,
    }
}

/// An error in the route's own shape (`error`, a template of `$code`, `$message`, `$field`,
/// `$status`), with the status and headers Kiln's `{code, message}` would have had.
fn error_response(route: &RouteConfig, e: HttpError) -> Response {
    if route.error.is_null() {
        return e.into_response();
    }
    let vars = json!({"code": e.code, "message": e.message, "field": e.field, "status": e.status});
    let body = render(&route.error, &vars);
    let kiln = e.into_response();
    let mut response = (kiln.status(), Json(body)).into_response();
    for name in [axum::http::header::RETRY_AFTER, axum::http::header::WWW_AUTHENTICATE] {
        if let Some(v) = kiln.headers().get(&name) {
            response.headers_mut().insert(name, v.clone());
        }
    }
    response
}

fn respond_with(route: &RouteConfig, vars: &Value, default: impl FnOnce() -> Value) -> Value {
    if route.response.is_null() {
        default()
    } else {
        render(&route.response, vars)
    }
}

/// The job a path's id names: Kiln's id, or (with `job_ref = "key"`) the id derived from the
/// client's own id and the route's model.
fn job_id(route: &RouteConfig, id: Option<String>) -> Result<String, HttpError> {
    let id = id.filter(|i| !i.is_empty()).ok_or_else(|| HttpError::bad_request("the path names no job"))?;
    Ok(match route.job_ref {
        JobRefKind::JobId => id,
        JobRefKind::Key => kiln_core::keys::idempotent_job_id(&route.model, &id),
    })
}

/// What the client calls a Kiln status on this route (`None`: the route leaves it out).
pub fn client_status(route: &RouteConfig, status: JobState) -> Option<String> {
    client_name(route, status.as_str())
}

/// What the client calls a Kiln status (a job's or a batch's) on this route, through
/// `statuses`; `None` for one mapped to `""`.
fn client_name(route: &RouteConfig, kiln: &str) -> Option<String> {
    match route.statuses.get(kiln) {
        Some(name) if name.is_empty() => None,
        Some(name) => Some(name.clone()),
        None => Some(kiln.to_string()),
    }
}

/// What one Kiln event is in a route's event stream: a status (and progress) the client knows,
/// or nothing. Status events map through `statuses`; progress events whose stage is one of
/// `stages` report that stage as the status. Pure.
pub fn client_event(route: &RouteConfig, event: &Event) -> Option<(String, Option<f32>)> {
    match event.kind {
        EventKind::Status => client_status(route, event.status?).map(|s| (s, None)),
        EventKind::Progress => {
            let stage = event.stage.as_ref()?;
            route.stages.contains(stage).then(|| (stage.clone(), event.progress))
        }
        _ => None,
    }
}

/// The variables of a job's templates: its id, the client's status, params, inputs, error,
/// artifacts by name (each with `object`, `size`, `sha256`, `content_type`, `url`), times.
fn job_vars(route: &RouteConfig, view: &JobView, status: Option<&str>) -> Value {
    let artifacts: serde_json::Map<String, Value> = view
        .artifacts
        .iter()
        .map(|a| {
            let url = format!("/v1/jobs/{}/artifacts/{}", view.job_id, a.name);
            (a.name.clone(), json!({"object": a.object, "size": a.size, "sha256": a.sha256, "content_type": a.content_type, "url": url}))
        })
        .collect();
    let status = status.map(str::to_string).or_else(|| client_status(route, view.status));
    json!({
        "job_id": view.job_id,
        "model": view.model,
        "status": status,
        "kiln_status": view.status.as_str(),
        "attempt": view.attempt,
        "params": view.params,
        "labels": view.labels,
        "inputs": view.inputs,
        "error": view.error.as_ref().map(|e| e.message.clone()),
        "error_code": view.error.as_ref().map(|e| e.code.as_str()),
        "artifacts": artifacts,
        "created_ms": view.created_ms,
        "created_at": format_time(view.created_ms),
        "finished_ms": view.finished_ms,
    })
}

/// `2025-01-08 12:34:56` (UTC), the seeds' timestamp format.
fn format_time(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second())
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn submit(route: &RouteConfig, gateway: &Gateway, tenant: &Tenant, request: Request) -> Result<Response, HttpError> {
    let header = super::v1::header_key(request.headers())?;
    let origin = Origin::of(request.extensions());
    let multipart =
        request.headers().get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("multipart/form-data"));
    let urlencoded = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let (body, form) = if multipart {
        let form = read_form(gateway, tenant, request).await?;
        (Value::Object(form.fields.clone()), Some(form))
    } else if urlencoded {
        // An HTML form's default encoding (or `curl -d`): its fields, as a multipart body's
        // text parts; a route that needs a file then says which part is missing.
        let (parts, body) = request.into_parts();
        let bytes = read_limited(gateway, &parts.headers, body).await?;
        let fields = form_urlencoded::parse(&bytes).map(|(k, v)| (k.into_owned(), form_value(&v))).collect();
        (Value::Object(fields), None)
    } else {
        let (parts, body) = request.into_parts();
        // No body at all reads as `{}`: the route then says which field or part it needs.
        let empty = parts.headers.get("content-length").is_some_and(|v| v.as_bytes() == b"0");
        let value = if empty { json!({}) } else { read_json::<Value>(gateway, &parts.headers, body).await? };
        (value, None)
    };
    let key_field = if route.key_field.is_empty() { "Idempotency-Key" } else { route.key_field.as_str() };
    // The header is the route's key field, if it has one, or the key of a route without.
    let built = submit_request(route, &body, form.as_ref()).and_then(|mut s| {
        s.idempotency_key = super::v1::merge_keys(header, s.idempotency_key.take(), key_field)?;
        origin.stamp_submit(&mut s);
        Ok(s)
    });
    let result = match built {
        Ok(submit) => tenant
            .client
            .submit_traced(&submit, origin.trace())
            .await
            .map(|reply| (submit, reply))
            .map_err(|e| in_route_terms(route, e.into())),
        Err(e) => Err(e),
    };
    let (submit, reply) = match result {
        Ok(r) => r,
        Err(e) => {
            if let Some(form) = &form {
                super::v1::forget_files(tenant, form).await;
            }
            return Err(e);
        }
    };
    let vars = json!({
        "job_id": reply.job_id,
        "status": client_status(route, reply.status),
        "kiln_status": reply.status.as_str(),
        "duplicate": reply.duplicate,
        "request": body,
        "params": submit.params,
        "labels": submit.labels,
        "model": submit.model,
    });
    Ok(Json(respond_with(route, &vars, || json!({"task_id": reply.job_id, "status": vars["status"]}))).into_response())
}

/// The submit a route's table makes of a request body (and the files of a multipart one).
pub fn submit_request(route: &RouteConfig, body: &Value, form: Option<&Form>) -> Result<SubmitRequest, HttpError> {
    let model = if !route.model_field.is_empty() {
        let named = lookup(body, &route.model_field)
            .and_then(as_text)
            .ok_or_else(|| HttpError::bad_field(&route.model_field, format!("the request needs the field {:?}", route.model_field)))?;
        match route.models.get(&named) {
            Some(m) => m.clone(),
            None if route.models.is_empty() => named,
            None => {
                let known: Vec<&str> = route.models.keys().map(String::as_str).collect();
                return Err(ApiError::new(
                    ErrorCode::UnknownModel,
                    format!("model {named:?} is not served here; known: {}", known.join(", ")),
                )
                .into());
            }
        }
    } else {
        route.model.clone()
    };
    let mut submit = SubmitRequest { model, ..Default::default() };
    for (input, field) in &route.inputs {
        if let Some(v) = lookup(body, field).filter(|v| !v.is_null()) {
            submit.inputs.insert(input.clone(), InputValue::Inline(v.clone()));
        }
    }
    for (input, field) in &route.file_ids {
        if let Some(v) = lookup(body, field).and_then(as_text) {
            submit.inputs.insert(input.clone(), InputValue::Object { object: v });
        }
    }
    if let Some(form) = form {
        for (input, part) in &route.files {
            if let Some(f) = form.files.get(part) {
                // An empty file is no image or audio: refused here rather than failing the
                // job later with the engine's own words.
                if f.stored.size == 0 {
                    return Err(HttpError::bad_field(part, format!("file part {part:?} is empty")));
                }
                submit.inputs.insert(input.clone(), InputValue::Object { object: f.stored.name.clone() });
            }
        }
    }
    for (input, part) in &route.files {
        if !submit.inputs.contains_key(input) {
            return Err(HttpError::bad_field(part, format!("the request needs a file part {part:?} (multipart/form-data)")));
        }
    }
    for (param, field) in &route.params {
        if let Some(v) = lookup(body, field).filter(|v| !v.is_null()) {
            submit.params.insert(param.clone(), v.clone());
        }
    }
    for (label, field) in &route.labels {
        if let Some(v) = lookup(body, field).filter(|v| !v.is_null()) {
            let text = as_text(v).ok_or_else(|| HttpError::bad_field(field, format!("field {field:?} must be a string or a number")))?;
            submit.labels.insert(label.clone(), text);
        }
    }
    if !route.key_field.is_empty() {
        submit.idempotency_key = lookup(body, &route.key_field).and_then(as_text);
        if route.job_ref == JobRefKind::Key && submit.idempotency_key.is_none() {
            return Err(HttpError::bad_field(&route.key_field, format!("the request needs the field {:?}", route.key_field)));
        }
    }
    Ok(submit)
}

/// A submit's error in the words of the route's client: Kiln's names of inputs, params and
/// labels (`needs input "audio"`) become the request fields they come from (`needs field
/// "audio_id"`), and the first such field is the error's `field`. Pure.
pub fn in_route_terms(route: &RouteConfig, mut e: HttpError) -> HttpError {
    if e.code != "bad_request" {
        return e;
    }
    let mut renames: Vec<(String, String, &str)> = vec![];
    for (input, field) in route.inputs.iter().chain(&route.file_ids) {
        renames.push((format!("input {input:?}"), format!("field {field:?}"), field));
    }
    for (input, part) in &route.files {
        renames.push((format!("input {input:?}"), format!("file part {part:?}"), part));
    }
    for (param, field) in &route.params {
        renames.push((format!("param {param:?}"), format!("field {field:?}"), field));
    }
    for (label, field) in &route.labels {
        renames.push((format!("label {label:?}"), format!("field {field:?}"), field));
    }
    // The field the message names first (in Kiln's words) is the one it is about.
    let original = e.message.clone();
    let mut first: Option<(usize, &str)> = None;
    for (kiln, client, field) in &renames {
        if let Some(at) = original.find(kiln.as_str()) {
            if first.is_none_or(|(f, _)| at < f) {
                first = Some((at, *field));
            }
            e.message = e.message.replace(kiln.as_str(), client);
        }
    }
    if e.field.is_none() {
        e.field = first.map(|(_, f)| f.to_string());
    }
    e
}

async fn events(
    route: &RouteConfig,
    gateway: &Gateway,
    tenant: &Tenant,
    id: Option<String>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, HttpError> {
    if id.is_none() {
        return model_events(route, gateway, tenant, headers, query).await;
    }
    let after = resume_point(headers, query)?;
    let job_id = job_id(route, id)?;
    let first = tenant.client.status(&job_id).await?;
    let route = Arc::new(route.clone());
    let client = tenant.client.clone();
    let name = event_name(&route);
    let last_body: Arc<Mutex<Option<Value>>> = Default::default();
    let settled = first.status.is_terminal();
    let first = Arc::new(first);
    let mut feed = Box::pin(tenant.feeds.subscribe(&job_id, after).peekable());
    if ended(after, settled, feed.as_mut()).await {
        return Ok(super::events::no_content());
    }
    let stream = feed
        .then(move |(seq, event)| {
            let (route, client, first, last_body, name) = (route.clone(), client.clone(), first.clone(), last_body.clone(), name.clone());
            async move {
                let (status, progress) = client_event(&route, &event)?;
                // The ending carries the artifacts and the error: read them from the record.
                let view = if event.is_terminal() { client.status(&event.job_id).await.ok().map(Arc::new).unwrap_or(first) } else { first };
                let body = event_body(&route, &view, &event, &status, progress);
                let mut last = last_body.lock().expect("last body");
                if last.as_ref() == Some(&body) && !event.is_terminal() {
                    return None;
                }
                *last = Some(body.clone());
                Some(SseEvent::default().id(seq.to_string()).event(name).json_data(&body).expect("json"))
            }
        })
        .filter_map(|e| async move { e.map(Ok::<_, std::convert::Infallible>) })
        .take_until(gateway.shutdown_token().cancelled_owned());
    Ok(super::events::sse_response(stream))
}

/// Whether a stream resumed after `after` is answered 204: the job or batch has settled and its
/// feed has no event after the client's last one ([`super::events::resumed_after_the_end`]).
async fn ended(
    after: Option<u64>,
    settled: bool,
    feed: std::pin::Pin<&mut futures::stream::Peekable<impl futures::Stream<Item = super::events::Sequenced>>>,
) -> bool {
    if after.is_none() || !settled {
        return false;
    }
    match tokio::time::timeout(super::events::SETTLED_PATIENCE, feed.peek()).await {
        Ok(next) => super::events::resumed_after_the_end(after, settled, next.map(|e| e.0)),
        Err(_) => false,
    }
}

/// The SSE event name of a route (`message` unless the table says, so `onmessage` works).
fn event_name(route: &RouteConfig) -> String {
    if route.event.is_empty() {
        "message".to_string()
    } else {
        route.event.clone()
    }
}

/// One event of a job, through the route's template: the job's variables, with the event's
/// status (the client's name), progress, stage and message. Pure.
fn event_body(route: &RouteConfig, view: &JobView, event: &Event, status: &str, progress: Option<f32>) -> Value {
    let mut vars = job_vars(route, view, Some(status));
    // Results belong to the ending only (seed 002's `video_file_id` "only when completed"),
    // even for a client that subscribes after it.
    if !event.is_terminal() {
        vars["artifacts"] = json!({});
    }
    vars["progress"] = json!(progress.or(if event.status == Some(JobState::Completed) { Some(100.0) } else { None }));
    vars["stage"] = json!(event.stage);
    vars["message"] = json!(event.message);
    if let Some(e) = &event.error {
        vars["error"] = json!(e.message);
        vars["error_code"] = json!(e.code.as_str());
    }
    if !matches!(event.status, Some(JobState::Failed | JobState::Cancelled)) {
        vars["error"] = Value::Null;
    }
    respond_with(route, &vars, || json!({"status": status, "progress": vars["progress"]}))
}

/// Jobs whose view a model-wide stream keeps (to know each one's model, params and labels
/// without a lookup per event). Past it the map starts again: a job seen before is looked up
/// once more, nothing is lost.
const MODEL_STREAM_JOBS: usize = 4096;

/// Deletes a model-wide stream's consumer when its client goes (the server would drop it after
/// its inactive threshold anyway; this frees it at once).
struct ConsumerGuard {
    stream: async_nats::jetstream::stream::Stream,
    name: String,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        let (stream, name) = (self.stream.clone(), std::mem::take(&mut self.name));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            task::spawn_on(&runtime, TaskKind::Cleanup, "delete route consumer", async move {
                let _ = stream.delete_consumer(&name).await;
            });
        }
    }
}

/// What a model-wide stream knows while it runs.
struct ModelStream {
    route: Arc<RouteConfig>,
    client: crate::client::Client,
    /// `?label=name:value` filters: every one must match the event's labels.
    wanted: kiln_core::protocol::Labels,
    /// Job id -> its view, `None` for a job of another model (or a batch).
    views: std::collections::HashMap<String, Option<Arc<JobView>>>,
    /// Job id -> the body last sent for it: an identical one is skipped, as per job.
    last_bodies: std::collections::HashMap<String, Value>,
    _consumer: ConsumerGuard,
}

impl ModelStream {
    async fn render(&mut self, seq: u64, event: Event) -> Option<SseEvent> {
        if !self.wanted.iter().all(|(k, v)| event.labels.get(k) == Some(v)) {
            return None;
        }
        let (status, progress) = client_event(&self.route, &event)?;
        let known = match self.views.get(&event.job_id) {
            Some(v) => v.clone(),
            None => {
                let model = &self.route.model;
                let v = self.client.status(&event.job_id).await.ok().filter(|v| &v.model == model).map(Arc::new);
                if self.views.len() >= MODEL_STREAM_JOBS {
                    self.views.clear();
                    self.last_bodies.clear();
                }
                self.views.insert(event.job_id.clone(), v.clone());
                v
            }
        }?;
        let terminal = event.is_terminal();
        let view = if terminal { self.client.status(&event.job_id).await.ok().map(Arc::new).unwrap_or(known) } else { known };
        let body = event_body(&self.route, &view, &event, &status, progress);
        if !terminal && self.last_bodies.get(&event.job_id) == Some(&body) {
            return None;
        }
        if terminal {
            self.last_bodies.remove(&event.job_id);
        } else {
            self.last_bodies.insert(event.job_id.clone(), body.clone());
        }
        Some(SseEvent::default().id(seq.to_string()).event(event_name(&self.route)).json_data(&body).expect("json"))
    }
}

/// An events route without an id in its path: every job of the route's `model` from now on,
/// in one stream that never ends by itself (seed 002's dashboard on its `task_progress`
/// channel), only the jobs carrying every `?label=name:value` given. `Last-Event-ID` resumes
/// after that event, as per job. One consumer per client: a dashboard is one per operator,
/// not one per task.
async fn model_events(
    route: &RouteConfig,
    gateway: &Gateway,
    tenant: &Tenant,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, HttpError> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let after = resume_point(headers, query)?;
    let wanted = super::v1::labels_of(query)?;
    let js = tenant.client.jetstream();
    let stream =
        js.get_stream(tenant.names().events_stream()).await.map_err(|e| HttpError::unavailable(format!("the events stream: {e}")))?;
    let name = format!("gw-{}", uuid::Uuid::new_v4().simple());
    let consumer = stream
        .create_consumer(pull::Config {
            name: Some(name.clone()),
            filter_subject: tenant.names().events_subject_all(),
            deliver_policy: match after {
                Some(seq) => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
                None => DeliverPolicy::New,
            },
            ack_policy: AckPolicy::None,
            memory_storage: true,
            // Should this gateway die, the server drops the consumer soon after.
            inactive_threshold: std::time::Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .map_err(|e| HttpError::unavailable(format!("cannot follow the events: {e}")))?;
    let messages = consumer.messages().await.map_err(|e| HttpError::unavailable(format!("cannot follow the events: {e}")))?;
    let state = ModelStream {
        route: Arc::new(route.clone()),
        client: tenant.client.clone(),
        wanted,
        views: Default::default(),
        last_bodies: Default::default(),
        _consumer: ConsumerGuard { stream, name },
    };
    let events = futures::stream::unfold((messages, state), |(mut messages, mut state)| async move {
        loop {
            let message = match messages.next().await {
                Some(Ok(m)) => m,
                // NATS failed under the stream: it ends, and the client resumes with its
                // Last-Event-ID.
                _ => return None,
            };
            let Ok(info) = message.info() else { continue };
            let seq = info.stream_sequence;
            let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else { continue };
            if let Some(sse) = state.render(seq, event).await {
                return Some((Ok::<_, std::convert::Infallible>(sse), (messages, state)));
            }
        }
    })
    .take_until(gateway.shutdown_token().cancelled_owned());
    Ok(super::events::sse_response(events))
}

/// A batch route: one item per element of the body's `items_field` list, each made by the
/// route's `inputs`, `params` and `labels` (as a submit route's) from the body with the element
/// as its `item` field (`item.image_prompt`, `item` itself for a list of ids). Pure.
pub fn batch_request(route: &RouteConfig, body: &Value) -> Result<BatchSubmitRequest, HttpError> {
    let field = &route.items_field;
    let elements = lookup(body, field)
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| HttpError::bad_field(field, format!("the request needs the field {field:?}, a non-empty list")))?;
    let mut scoped = if body.is_object() { body.clone() } else { json!({}) };
    let mut batch = BatchSubmitRequest::default();
    for element in elements {
        scoped["item"] = element.clone();
        let one = submit_request(route, &scoped, None)?;
        batch.model = one.model;
        batch.idempotency_key = one.idempotency_key;
        batch.items.push(BatchItemRequest { inputs: one.inputs, params: one.params, labels: one.labels });
    }
    Ok(batch)
}

async fn batch(route: &RouteConfig, gateway: &Gateway, tenant: &Tenant, request: Request) -> Result<Response, HttpError> {
    let header = super::v1::header_key(request.headers())?;
    let origin = Origin::of(request.extensions());
    let (parts, body) = request.into_parts();
    let empty = parts.headers.get("content-length").is_some_and(|v| v.as_bytes() == b"0");
    let body = if empty { json!({}) } else { read_json::<Value>(gateway, &parts.headers, body).await? };
    let mut request = batch_request(route, &body)?;
    let key_field = if route.key_field.is_empty() { "Idempotency-Key" } else { route.key_field.as_str() };
    request.idempotency_key = super::v1::merge_keys(header, request.idempotency_key.take(), key_field)?;
    origin.stamp_batch(&mut request);
    let reply = tenant.client.submit_batch_traced(&request, origin.trace()).await.map_err(|e| in_route_terms(route, e.into()))?;
    let vars = json!({
        "batch_id": reply.batch_id,
        "status": client_name(route, BatchStatus::Running.as_str()),
        "kiln_status": BatchStatus::Running.as_str(),
        "total": reply.items.len(),
        "job_ids": reply.items.iter().map(|i| i.job_id.as_str()).collect::<Vec<_>>(),
        "duplicate": reply.duplicate,
        "request": body,
        "model": request.model,
    });
    Ok(Json(respond_with(route, &vars, || json!({"batch_id": reply.batch_id, "total": vars["total"]}))).into_response())
}

/// The variables of every template of a batch's event stream: the batch's id, model, status
/// (the client's name), creation time, counts (`total`, `done`, `completed`, `failed`,
/// `cancelled`) and the ids of the jobs that completed. Pure.
fn batch_vars(route: &RouteConfig, view: &BatchView, summary: &BatchSummary, completed_jobs: &[String]) -> Value {
    json!({
        "batch_id": view.batch_id,
        "model": view.model,
        "status": client_name(route, summary.status.as_str()),
        "kiln_status": summary.status.as_str(),
        "created_ms": view.created_ms,
        "created_at": format_time(view.created_ms),
        "total": summary.total,
        "done": summary.completed + summary.failed + summary.cancelled,
        "completed": summary.completed,
        "failed": summary.failed,
        "cancelled": summary.cancelled,
        "job_ids": completed_jobs,
    })
}

/// An item's variables (`$item.…`): its index, job id, status (the client's name), labels,
/// error, and from its job (when read) its params and artifacts, `artifact` being the first of
/// the route's `artifacts` it has, each with the gateway's `url`. Pure.
fn item_vars(route: &RouteConfig, item: &BatchItemEvent, error: Option<&ApiError>, job: Option<&JobView>) -> Value {
    let mut vars = match job {
        Some(view) => job_vars(route, view, None),
        None => json!({"job_id": item.job_id, "labels": item.labels}),
    };
    let artifact = route.artifacts.iter().find_map(|name| vars["artifacts"].get(name).cloned());
    vars["artifact"] = json!(artifact);
    vars["index"] = json!(item.index);
    vars["status"] = json!(client_status(route, item.status));
    vars["labels"] = json!(item.labels);
    vars["error"] = json!(error.map(|e| e.message.clone()));
    vars["error_code"] = json!(error.map(|e| e.code.as_str()));
    vars
}

/// What a batch's event stream has seen: its counts are its own (one per item's end, in the
/// order the items ended), so `progress` counts 1, 2, … whatever Kiln's `batch_progress`
/// events coalesce.
struct BatchStream {
    route: Arc<RouteConfig>,
    client: crate::client::Client,
    view: BatchView,
    /// Items whose end was seen (a repeated item event is not counted twice).
    ended: std::collections::BTreeSet<u32>,
    summary: BatchSummary,
    completed_jobs: Vec<String>,
    /// `Last-Event-ID`: the history is read from the start (to count), sent after it.
    after: Option<u64>,
}

impl BatchStream {
    fn sse(&self, seq: Option<u64>, template: &str, vars: &Value) -> Option<SseEvent> {
        let template = self.route.response.get(template)?;
        let event = SseEvent::default().event(event_name(&self.route)).json_data(render(template, vars)).expect("json");
        Some(match seq {
            Some(seq) => event.id(seq.to_string()),
            None => event,
        })
    }

    /// The client's events for one of the batch's: an item's end gives its own event and a
    /// `progress`; the batch's end `finished`. Kiln's `batch_progress` gives nothing (the
    /// stream counts item ends itself).
    async fn render(&mut self, seq: u64, event: Event) -> Vec<SseEvent> {
        let mut out = vec![];
        let send = self.after.is_none_or(|after| seq > after);
        match (event.kind, &event.item) {
            (EventKind::ItemCompleted | EventKind::ItemFailed, Some(item)) => {
                if !self.ended.insert(item.index) {
                    return out;
                }
                match item.status {
                    JobState::Completed => {
                        self.summary.completed += 1;
                        self.completed_jobs.push(item.job_id.clone());
                    }
                    JobState::Cancelled => self.summary.cancelled += 1,
                    _ => self.summary.failed += 1,
                }
                if !send {
                    return out;
                }
                let job = self.client.status(&item.job_id).await.ok();
                let mut vars = batch_vars(&self.route, &self.view, &self.summary, &self.completed_jobs);
                vars["item"] = item_vars(&self.route, item, event.error.as_ref(), job.as_ref());
                let name = if item.status == JobState::Completed { "item_completed" } else { "item_failed" };
                out.extend(self.sse(Some(seq), name, &vars));
                let (done, total) = (vars["done"].clone(), vars["total"].clone());
                vars["message"] = json!(format!("{done}/{total}"));
                out.extend(self.sse(Some(seq), "progress", &vars));
            }
            (EventKind::BatchFinished, _) if send => {
                let summary = event.summary.unwrap_or(self.summary);
                let mut vars = batch_vars(&self.route, &self.view, &summary, &self.completed_jobs);
                vars["finished_at"] = json!(format_time(event.ts_ms));
                vars["message"] = json!(format!("{} of {} completed", summary.completed, summary.total));
                out.extend(self.sse(Some(seq), "finished", &vars));
            }
            _ => {}
        }
        out
    }
}

/// A batch's events in the client's shapes: `started` first (unless resuming), then per item
/// `item_completed` or `item_failed` followed by `progress`, and `finished` last; each through
/// the template `response` holds under that name. The stream ends after `finished`.
async fn batch_events(
    route: &RouteConfig,
    gateway: &Gateway,
    tenant: &Tenant,
    id: Option<String>,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, HttpError> {
    let after = resume_point(headers, query)?;
    let batch_id = id.filter(|i| !i.is_empty()).ok_or_else(|| HttpError::bad_request("the path names no batch"))?;
    let view = tenant.client.batch(&batch_id).await?;
    let settled = view.summary.status != BatchStatus::Running;
    let feed = tenant.feeds.subscribe(&batch_id, None);
    // Its own subscription after `after`, on the same feed: the stream below reads the whole
    // history (it counts the items), so it cannot say what follows the client's last event.
    let check = std::pin::pin!(tenant.feeds.subscribe(&batch_id, after).peekable());
    if ended(after, settled, check).await {
        return Ok(super::events::no_content());
    }
    let summary = BatchSummary { status: BatchStatus::Running, total: view.summary.total, completed: 0, failed: 0, cancelled: 0 };
    let state = BatchStream {
        route: Arc::new(route.clone()),
        client: tenant.client.clone(),
        view,
        ended: Default::default(),
        summary,
        completed_jobs: vec![],
        after,
    };
    let started =
        if after.is_none() { state.sse(None, "started", &batch_vars(&state.route, &state.view, &state.summary, &[])) } else { None };
    let events = futures::stream::unfold((Box::pin(feed), state), |(mut feed, mut state)| async move {
        let (seq, event) = feed.next().await?;
        let out = state.render(seq, event).await;
        Some((futures::stream::iter(out), (feed, state)))
    })
    .flatten();
    let events = futures::stream::iter(started)
        .chain(events)
        .map(Ok::<_, std::convert::Infallible>)
        .take_until(gateway.shutdown_token().cancelled_owned());
    Ok(super::events::sse_response(events))
}

/// The first of the route's `artifacts` that a completed job has (`not_found` otherwise).
fn pick_artifact<'a>(route: &RouteConfig, view: &'a JobView) -> Result<&'a kiln_core::protocol::Artifact, HttpError> {
    if view.status != JobState::Completed {
        return Err(HttpError::not_found(format!("task {} has no result: it is {}", view.job_id, view.status.as_str())));
    }
    route
        .artifacts
        .iter()
        .find_map(|name| view.artifacts.iter().find(|a| &a.name == name))
        .ok_or_else(|| HttpError::not_found(format!("task {} has none of {}", view.job_id, route.artifacts.join(", "))))
}

/// Largest JSON artifact a status route reads into its template (`$artifact.<field>`).
const MAX_JSON_ARTIFACT_BYTES: u64 = 1 << 20;

/// A status route with `artifacts`: the first one's JSON content, for the template (seed 003's
/// `/metadata` answers from `metadata.json`).
async fn json_artifact(route: &RouteConfig, tenant: &Tenant, view: &JobView) -> Result<Value, HttpError> {
    let artifact = pick_artifact(route, view)?;
    if artifact.size > MAX_JSON_ARTIFACT_BYTES {
        return Err(HttpError::internal(format!("{} is too large to answer inline", artifact.name)));
    }
    let download = objects::open(tenant.client.jetstream(), &artifact.bucket, &artifact.object).await?;
    let mut data = Vec::with_capacity(artifact.size as usize);
    tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::AsyncReadExt::take(download.object, MAX_JSON_ARTIFACT_BYTES), &mut data)
        .await
        .map_err(|e| HttpError::unavailable(format!("object store: {e}")))?;
    serde_json::from_slice(&data).map_err(|e| HttpError::internal(format!("{} is not JSON: {e}", artifact.name)))
}

async fn artifact(route: &RouteConfig, tenant: &Tenant, id: Option<String>, headers: &HeaderMap) -> Result<Response, HttpError> {
    let view = tenant.client.status(&job_id(route, id)?).await?;
    let artifact = pick_artifact(route, &view)?;
    let download = objects::open(tenant.client.jetstream(), &artifact.bucket, &artifact.object).await?;
    objects::respond(download, headers, Some(&artifact.name)).await
}

async fn upload(route: &RouteConfig, gateway: &Gateway, tenant: &Tenant, request: Request) -> Result<Response, HttpError> {
    // The seeds' file ids are plain uuids: the file part is stored under one.
    let form = read_form_as(gateway, tenant, request, |_| uuid::Uuid::new_v4().to_string()).await?;
    let part = route.files.values().next().map(String::as_str).unwrap_or("file");
    // Only the part the route names: a file under another name is the client's mistake (the
    // seed's API read `file`), as on a submit route; so is an empty file.
    let refused = match form.files.get(part) {
        None => Some(format!("the request needs a file part {part:?} (multipart/form-data)")),
        Some(f) if f.stored.size == 0 => Some(format!("file part {part:?} is empty")),
        Some(_) => None,
    };
    if let Some(why) = refused {
        super::v1::forget_files(tenant, &form).await;
        return Err(HttpError::bad_field(part, why));
    }
    let file = &form.files[part];
    let stored = &file.stored;
    let vars = json!({
        "file_id": stored.name,
        "file_type": objects::file_kind(&stored.content_type),
        "original_name": file.original_name,
        "size": stored.size,
        "sha256": stored.sha256,
        "content_type": stored.content_type,
    });
    Ok(Json(respond_with(route, &vars, || json!({"file_id": stored.name}))).into_response())
}

/// A file by id: an upload in the files bucket, or an artifact by its object name
/// (`<job_id>/<attempt>/<name>`, what a status or event template names `$artifacts.x.object`).
async fn download(tenant: &Tenant, id: Option<String>, headers: &HeaderMap) -> Result<Response, HttpError> {
    let id = id.unwrap_or_default();
    if !kiln_core::ids::is_valid_object_name(&id) {
        return Err(HttpError::bad_request(format!("file id {id:?} is invalid")));
    }
    let js = tenant.client.jetstream();
    match objects::open(js, &tenant.names().files_bucket(), &id).await {
        Ok(d) => return objects::respond(d, headers, id.rsplit('/').next()).await,
        Err(e) if e.status != 404 => return Err(e),
        Err(_) => {}
    }
    let job = id.split('/').next().unwrap_or("");
    let view = match tenant.client.status(job).await {
        Ok(v) => v,
        Err(_) => return Err(HttpError::not_found(format!("file {id:?} does not exist (or has expired)"))),
    };
    let artifact =
        view.artifacts.iter().find(|a| a.object == id).ok_or_else(|| HttpError::not_found(format!("file {id:?} does not exist")))?;
    let d = objects::open(js, &artifact.bucket, &artifact.object).await?;
    objects::respond(d, headers, Some(&artifact.name)).await
}

async fn health(route: &RouteConfig, tenant: &Tenant) -> Result<Response, HttpError> {
    let models = tenant.client.models().await?;
    let model = models.models.iter().find(|m| m.name == route.model);
    let slots = model.map(|m| m.slots.clone()).unwrap_or_default();
    let ready = !slots.is_empty();
    let device = slots.first().and_then(|s| s.rsplit('/').next()).and_then(|s| s.split(':').next()).unwrap_or("none").to_string();
    let vars = json!({
        "status": if ready { "healthy" } else { "unhealthy" },
        "ready": ready,
        "model": route.model,
        "model_loaded": model.is_some_and(|m| !m.warm_on.is_empty()),
        "device": device,
        "slots": slots.len(),
    });
    let body = respond_with(route, &vars, || vars.clone());
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteKind) -> RouteConfig {
        RouteConfig {
            method: "GET".into(),
            path: "/x/{id}".into(),
            kind,
            model: "m".into(),
            model_field: String::new(),
            models: Default::default(),
            inputs: Default::default(),
            files: Default::default(),
            file_ids: Default::default(),
            params: Default::default(),
            key_field: String::new(),
            items_field: String::new(),
            job_ref: JobRefKind::JobId,
            statuses: Default::default(),
            stages: vec![],
            event: String::new(),
            artifacts: vec![],
            response: Value::Null,
            labels: Default::default(),
            error: Value::Null,
        }
    }

    #[test]
    fn statuses_and_stages_come_out_under_the_clients_names() {
        let mut r = route(RouteKind::Events);
        r.statuses = [("running".to_string(), "processing".to_string()), ("queued".to_string(), String::new())].into();
        r.stages = vec!["inference".into()];
        let status = |s| Event::status("j", 1, s);
        assert_eq!(client_event(&r, &status(JobState::Queued)), None);
        assert_eq!(client_event(&r, &status(JobState::Running)), Some(("processing".into(), None)));
        assert_eq!(client_event(&r, &status(JobState::Completed)), Some(("completed".into(), None)));
        assert_eq!(
            client_event(&r, &Event::progress("j", 1, Some("inference".into()), Some(40.0))),
            Some(("inference".into(), Some(40.0)))
        );
        assert_eq!(client_event(&r, &Event::progress("j", 1, Some("warmup".into()), Some(1.0))), None);
        assert_eq!(client_event(&r, &Event::message("j", 1, "hi".into())), None);
    }

    #[test]
    fn a_seed_001_body_becomes_a_submit() {
        let mut r = route(RouteKind::Submit);
        r.model = String::new();
        r.model_field = "model_name".into();
        r.models = [("flux-1-dev".to_string(), "tiny-sampler".to_string())].into();
        r.inputs = [("prompt".to_string(), "prompt".to_string())].into();
        r.params =
            [("width".to_string(), "image_params.width".to_string()), ("negative_prompt".to_string(), "negative_prompt".to_string())]
                .into();
        let body = json!({"model_name": "flux-1-dev", "prompt": "a cat", "image_params": {"width": 64}, "user_id": "u"});
        let s = submit_request(&r, &body, None).unwrap();
        assert_eq!(s.model, "tiny-sampler");
        assert_eq!(s.inputs["prompt"], InputValue::Inline("a cat".into()));
        assert_eq!(s.params["width"], 64);
        assert!(!s.params.contains_key("negative_prompt"));
        let unknown = submit_request(&r, &json!({"model_name": "sdxl"}), None).unwrap_err();
        assert_eq!((unknown.status, unknown.code.as_str()), (404, "unknown_model"));
        assert_eq!(submit_request(&r, &json!({}), None).unwrap_err().status, 400);
    }

    #[test]
    fn a_seed_004_body_becomes_one_item_per_storyboard() {
        let mut r = route(RouteKind::Batch);
        r.items_field = "storyboards".into();
        r.inputs = [("prompt".to_string(), "item.image_prompt".to_string())].into();
        r.params = [("width".to_string(), "item.custom_params.width".to_string()), ("steps".to_string(), "steps".to_string())].into();
        r.labels = [("storyboard_id".to_string(), "item.id".to_string()), ("project_id".to_string(), "project_id".to_string())].into();
        let body = json!({
            "project_id": "p1",
            "steps": 4,
            "storyboards": [{"id": "sb-1", "image_prompt": "a fox", "custom_params": {"width": 32}}, {"id": "sb-2", "image_prompt": "an owl"}],
        });
        let b = batch_request(&r, &body).unwrap();
        assert_eq!(b.model, "m");
        assert_eq!(b.items.len(), 2);
        assert_eq!(b.items[0].inputs["prompt"], InputValue::Inline("a fox".into()));
        assert_eq!((b.items[0].params["width"].clone(), b.items[0].params["steps"].clone()), (json!(32), json!(4)));
        assert!(!b.items[1].params.contains_key("width"), "a storyboard without its own size has none");
        assert_eq!(b.items[1].labels["storyboard_id"], "sb-2");
        assert_eq!(b.items[1].labels["project_id"], "p1");
        // A list of ids: `item` is the element itself.
        r.labels = [("storyboard_id".to_string(), "item".to_string())].into();
        let ids = batch_request(&r, &json!({"storyboards": ["a", "b", "c"]})).unwrap();
        assert_eq!(ids.items.iter().map(|i| i.labels["storyboard_id"].as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        for bad in [json!({}), json!({"storyboards": []}), json!({"storyboards": "sb-1"})] {
            let e = batch_request(&r, &bad).unwrap_err();
            assert_eq!((e.status, e.field.as_deref()), (400, Some("storyboards")), "{bad}");
        }
    }

    #[test]
    fn batch_event_variables_count_and_name_the_item() {
        let mut r = route(RouteKind::BatchEvents);
        r.statuses = [("running".to_string(), "processing".to_string())].into();
        r.artifacts = vec!["image.png".into()];
        let summary = BatchSummary { status: BatchStatus::Running, total: 3, completed: 1, failed: 1, cancelled: 0 };
        let view = BatchView {
            batch_id: "b".into(),
            model: "m".into(),
            status: BatchStatus::Running,
            summary,
            created_ms: 1_736_339_696_000,
            finished_ms: None,
            items: vec![],
            retry_of: None,
            retried_by: None,
            fallback_models: vec![],
            max_concurrency: None,
            reuse: false,
        };
        let vars = batch_vars(&r, &view, &summary, &["j1".to_string()]);
        assert_eq!((vars["status"].as_str(), vars["done"].as_u64(), vars["total"].as_u64()), (Some("processing"), Some(2), Some(3)));
        assert_eq!(vars["created_at"], "2025-01-08 12:34:56");
        let item = BatchItemEvent {
            index: 1,
            job_id: "j2".into(),
            status: JobState::Failed,
            artifacts: vec![],
            labels: [("storyboard_id".to_string(), "sb-2".to_string())].into(),
        };
        let error = ApiError::new(ErrorCode::EngineFailed, "param width must be at most 1024");
        let vars = item_vars(&r, &item, Some(&error), None);
        assert_eq!(vars["labels"]["storyboard_id"], "sb-2");
        assert_eq!((vars["job_id"].as_str(), vars["error"].as_str()), (Some("j2"), Some("param width must be at most 1024")));
        assert!(vars["artifact"].is_null(), "a failed item has no image");
    }

    #[test]
    fn errors_name_the_routes_fields_not_kilns_inputs() {
        let mut r = route(RouteKind::Submit);
        r.file_ids = [("audio".to_string(), "audio_id".to_string()), ("ref_image".to_string(), "ref_image_id".to_string())].into();
        r.files = [("image".to_string(), "file".to_string())].into();
        r.params = [("focal_length".to_string(), "focal_length".to_string()), ("cfg".to_string(), "guidance".to_string())].into();
        let terms = |m: &str| in_route_terms(&r, HttpError::bad_request(m));
        let e = terms(r#"model "echomimic" needs input "audio""#);
        assert_eq!((e.message.as_str(), e.field.as_deref()), (r#"model "echomimic" needs field "audio_id""#, Some("audio_id")));
        let e = terms(r#"model "sharp" needs input "image""#);
        assert_eq!((e.message.as_str(), e.field.as_deref()), (r#"model "sharp" needs file part "file""#, Some("file")));
        let e = terms(r#"model "m": param "cfg" must be a number, not "high""#);
        assert_eq!(
            (e.message.as_str(), e.field.as_deref()),
            (r#"model "m": field "guidance" must be a number, not "high""#, Some("guidance"))
        );
        let e = terms(r#"unknown param "x"; this model takes: cfg, focal_length"#);
        assert_eq!(e.field, None, "a name the route does not map stays");
        let other = in_route_terms(&r, HttpError::not_found(r#"input "audio""#));
        assert_eq!(other.message, r#"input "audio""#, "only bad requests are about fields");
    }

    #[test]
    fn keyed_routes_name_jobs_by_the_clients_id() {
        let mut r = route(RouteKind::Status);
        assert_eq!(job_id(&r, Some("abc".into())).unwrap(), "abc");
        r.job_ref = JobRefKind::Key;
        assert_eq!(job_id(&r, Some("abc".into())).unwrap(), kiln_core::keys::idempotent_job_id("m", "abc"));
        assert!(job_id(&r, None).is_err());
    }

    #[test]
    fn times_read_like_the_seeds() {
        assert_eq!(format_time(1_736_339_696_000), "2025-01-08 12:34:56");
    }
}
