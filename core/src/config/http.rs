//! The `[http]` section of `cluster.toml`: the HTTP + SSE gateway's address, limits, API keys,
//! CORS origins, and the configured routes that keep the seeds' own HTTP contracts working
//! (`[[http.routes]]`, see `docs/HTTP.md` and `examples/http/`).
//!
//! A route is data, not code: a method and a path, what kind of thing it does (submit, status,
//! events, artifact, upload, download, health, batch, batch_events), which model it runs, how the request's fields
//! become the job's inputs and params, how Kiln's statuses and stages are named for that client,
//! and a JSON template of the body it answers with.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::connection::redact;
use super::error::{invalid, ConfigError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where `kiln up` (and `kiln gateway` without `--http-addr`) serves HTTP; `""` disables
    /// the gateway of `kiln up`.
    pub addr: String,
    /// Largest JSON body (a submit, a batch) the gateway reads; past it, `413` before the body
    /// is read whole.
    pub max_body_bytes: usize,
    /// Largest uploaded file (`PUT /v1/files/{name}`, a multipart file part).
    pub max_upload_bytes: u64,
    /// A client must send its request head within this long (slowloris), and a body may go
    /// this long without a byte.
    pub header_timeout_ms: u64,
    /// Origins allowed by CORS (`*` for any); empty: same-origin only.
    pub cors_origins: Vec<String>,
    /// API keys (`Authorization: Bearer <key>`), stored as their sha256. None configured: no
    /// key is asked, which is allowed only on a loopback address.
    pub api_keys: Vec<ApiKeyConfig>,
    /// The seeds' HTTP contracts (and any other team's), as configuration.
    pub routes: Vec<RouteConfig>,
    /// Other files whose `[[models]]` and `[[http.routes]]` this one serves too (each seed's
    /// table in `examples/http/` is one): one gateway for several tables. Relative paths in an
    /// included file resolve against that file's folder; its other sections are ignored.
    pub include: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:8080".into(),
            max_body_bytes: 1 << 20,
            max_upload_bytes: 1 << 30,
            header_timeout_ms: 10_000,
            cors_origins: vec![],
            api_keys: vec![],
            routes: vec![],
            include: vec![],
        }
    }
}

/// One API key: a tenant's name, the key's sha256 (hex; `kiln gateway --hash-key KEY` prints
/// it), and the NATS credentials and prefix the gateway uses for that tenant's requests (the
/// same keys as `[nats]`; all empty: the gateway's own connection).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeyConfig {
    pub name: String,
    pub sha256: String,
    /// The tenant's subject and bucket prefix; empty: the gateway's `nats.prefix`.
    pub prefix: String,
    pub user: String,
    pub password: String,
    pub token: String,
    pub nkey_seed_file: String,
    pub creds_file: String,
}

impl std::fmt::Debug for ApiKeyConfig {
    /// Never prints a secret: the hash is not one, but the NATS password and token are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

impl ApiKeyConfig {
    /// True when the key has NATS credentials of its own (a tenant's connection).
    pub fn has_credentials(&self) -> bool {
        !(self.user.is_empty()
            && self.token.is_empty()
            && self.nkey_seed_file.is_empty()
            && self.creds_file.is_empty()
            && self.prefix.is_empty())
    }
}

/// What a configured route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    /// Submits a job from a JSON or multipart body.
    Submit,
    /// Answers the job's state, through `response`.
    Status,
    /// Server-Sent Events of the job, each rendered through `response`.
    Events,
    /// The first of `artifacts` that the job has, as a file.
    Artifact,
    /// Stores the multipart `file` part in the files bucket.
    Upload,
    /// Streams an uploaded file, or an artifact by its object name.
    Download,
    /// The model's readiness, through `response`.
    Health,
    /// Submits a batch: one item per element of the request's `items_field` list, each built
    /// by the route's `inputs`/`params`/`labels` from the body with the element as `item`.
    Batch,
    /// Server-Sent Events of a batch, each of its events rendered through the template that
    /// `response` holds under the event's name (`started`, `item_completed`, `item_failed`,
    /// `progress`, `finished`); a name without a template sends nothing.
    BatchEvents,
}

/// How the `{...}` id in a route's path names the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobRefKind {
    /// It is Kiln's job id.
    #[default]
    JobId,
    /// It is the client's own id, submitted as the idempotency key (`key_field`): the job id
    /// is derived from it and the route's model.
    Key,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `GET`, `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// An axum path: `/check_status/{task_id}`; the one `{...}` names the job (or the file).
    pub path: String,
    pub kind: RouteKind,
    /// The model the route runs (submit), or reads (status/events with `job_ref = "key"`,
    /// health).
    #[serde(default)]
    pub model: String,
    /// Or: the request field that names the model, mapped through `models`.
    #[serde(default)]
    pub model_field: String,
    /// The client's model names -> Kiln models (`flux-1-dev` -> `tiny-sampler`).
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// Kiln input -> the request field it comes from (a dotted path in a JSON body, a part
    /// name in a multipart one).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Kiln input -> the multipart file part uploaded to become it.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Kiln input -> the request field holding the id of a file uploaded before (an object
    /// in the files bucket: the seeds' temp-file ids).
    #[serde(default)]
    pub file_ids: BTreeMap<String, String>,
    /// Kiln param -> the request field it comes from. Missing fields are left out.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Job label -> the request field it comes from (seed 002's `session_id`): what the client
    /// names its job by, kept beside the job instead of passed to the model as a param (a
    /// model that declares its params refuses unknown ones). Missing fields are left out.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A batch route: the request field holding the list of items (seed 004's `storyboards`).
    #[serde(default)]
    pub items_field: String,
    /// The request field that becomes the idempotency key (the client's own task id).
    #[serde(default)]
    pub key_field: String,
    #[serde(default)]
    pub job_ref: JobRefKind,
    /// Kiln status -> the client's name for it; `""` leaves that status out of an event
    /// stream. Unlisted statuses keep Kiln's name.
    #[serde(default)]
    pub statuses: BTreeMap<String, String>,
    /// Stages (from progress events) that an event stream reports as statuses of their own.
    #[serde(default)]
    pub stages: Vec<String>,
    /// The SSE event name (`status` for seed 003); default `message` (`onmessage`).
    #[serde(default)]
    pub event: String,
    /// Artifact names to serve, the first one the job has wins (`scene.sog`, `scene.ply`).
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// The JSON body answered (status, submit, upload, health) or sent per event (events):
    /// strings of the form `$name` are replaced by values, and a field whose value is absent
    /// is left out. See docs/HTTP.md for the names.
    #[serde(default)]
    pub response: serde_json::Value,
    /// The JSON body of an error, as a template of `$code`, `$message`, `$field` (the request
    /// field it is about, when one is) and `$status` (the HTTP status): the client's own error
    /// shape. Default: Kiln's `{"code", "message"}`.
    #[serde(default)]
    pub error: serde_json::Value,
}

impl HttpConfig {
    /// Checks what serde cannot: methods, paths, and that each route names what its kind needs.
    pub fn validate(&self, model_exists: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        for (i, key) in self.api_keys.iter().enumerate() {
            if key.name.is_empty() {
                return Err(invalid(format!("http.api_keys[{i}].name"), "must be set"));
            }
            if !key.prefix.is_empty() && !crate::ids::is_valid_token(&key.prefix) {
                return Err(invalid(format!("http.api_keys[{i}].prefix"), "must be letters, digits, '-' or '_'"));
            }
            if key.sha256.len() != 64 || !key.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(format!("http.api_keys[{i}].sha256"), "must be the 64 hex digits of the key's sha256"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = |k: &str| format!("http.routes[{i}].{k}");
            if !["GET", "POST", "PUT", "DELETE"].contains(&r.method.as_str()) {
                return Err(invalid(at("method"), "must be GET, POST, PUT or DELETE"));
            }
            if !r.path.starts_with('/') || r.path.starts_with("/v1/") || r.path == "/" || r.path.starts_with("/console") {
                return Err(invalid(at("path"), "must start with '/' and not take `/`, `/v1/...` or `/console...`"));
            }
            if !seen.insert((r.method.clone(), r.path.clone())) {
                return Err(invalid(at("path"), format!("{} {} is configured twice", r.method, r.path)));
            }
            let names_model = !r.model.is_empty() || !r.model_field.is_empty();
            for m in std::iter::once(&r.model).chain(r.models.values()).filter(|m| !m.is_empty()) {
                if !model_exists(m) {
                    return Err(invalid(at("model"), format!("model {m:?} is not configured")));
                }
            }
            let takes_id = r.path.contains('{');
            match r.kind {
                RouteKind::Submit | RouteKind::Batch if !names_model => {
                    return Err(invalid(at("model"), "a submit or batch route needs `model` or `model_field`"))
                }
                RouteKind::Batch if r.items_field.is_empty() => {
                    return Err(invalid(at("items_field"), "a batch route needs the request field that lists its items"))
                }
                RouteKind::BatchEvents if !r.response.is_object() => {
                    return Err(invalid(at("response"), "a batch_events route needs a template per event name"))
                }
                RouteKind::Status | RouteKind::Artifact | RouteKind::Download | RouteKind::BatchEvents if !takes_id => {
                    return Err(invalid(at("path"), "needs a `{id}` segment naming the job (or the file)"))
                }
                RouteKind::Events if !takes_id && r.model.is_empty() => {
                    return Err(invalid(at("model"), "an events route without a `{id}` follows every job of `model`, which must be set"))
                }
                RouteKind::Artifact if r.artifacts.is_empty() => return Err(invalid(at("artifacts"), "must name at least one artifact")),
                RouteKind::Health if r.model.is_empty() => return Err(invalid(at("model"), "a health route needs `model`")),
                _ => {}
            }
            // The names are checked now; the values (the request's) at submit.
            let names: crate::protocol::Labels = r.labels.keys().map(|n| (n.clone(), String::new())).collect();
            if let Some(why) = crate::protocol::invalid_labels(&names) {
                return Err(invalid(at("labels"), why));
            }
            if r.job_ref == JobRefKind::Key && r.model.is_empty() {
                return Err(invalid(at("job_ref"), "`key` derives the job id from the key and `model`, which must be set"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(toml_text: &str) -> HttpConfig {
        #[derive(Deserialize)]
        struct Doc {
            http: HttpConfig,
        }
        toml::from_str::<Doc>(toml_text).unwrap().http
    }

    #[test]
    fn batch_routes_need_their_list_and_their_templates() {
        let ok = routes(
            r#"
            [[http.routes]]
            method = "POST"
            path = "/api/text2image"
            kind = "batch"
            model = "m"
            items_field = "storyboards"
            [[http.routes]]
            method = "GET"
            path = "/api/text2image/{id}/stream"
            kind = "batch_events"
            response = { progress = { type = "progress", current = "$done" } }
            "#,
        );
        ok.validate(|m| m == "m").unwrap();
        let mut no_list = ok.clone();
        no_list.routes[0].items_field = String::new();
        assert!(no_list.validate(|_| true).unwrap_err().to_string().contains("items_field"));
        let mut no_templates = ok.clone();
        no_templates.routes[1].response = serde_json::Value::Null;
        assert!(no_templates.validate(|_| true).unwrap_err().to_string().contains("response"));
        let mut no_id = ok;
        no_id.routes[1].path = "/api/text2image/stream".into();
        assert!(no_id.validate(|_| true).unwrap_err().to_string().contains("path"));
    }
}
