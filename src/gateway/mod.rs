//! The HTTP + SSE gateway: Kiln for curl, browsers, `EventSource` and every HTTP front-end the
//! seed services had. It is a NATS client like any other: it uses only `kiln.api.*`, the files
//! and results object stores, the events stream and the live previews (`kiln.previews.*` and
//! the newest kept in `KILN_PREVIEWS`), with its own `[nats]` credentials (and a
//! tenant's, per API key), so it holds no state of its own and scales out by running more.
//!
//! | module       | what                                                                     |
//! |--------------|--------------------------------------------------------------------------|
//! | this file    | the server: tenants, API keys, CORS, limits, the accept loop, `/healthz`   |
//! | [`v1`]       | the native REST API, one route per NATS endpoint; a job's live previews   |
//! | [`routes`]   | `[[http.routes]]`: the seeds' own contracts, as configuration              |
//! | [`template`] | the `$name` response templates of configured routes (pure)                |
//! | [`events`]   | one consumer per followed job, fanned out to every SSE client; resume, `retry:`, 204 |
//! | [`objects`]  | streamed uploads and downloads: limits, `Range`, `ETag`, no half objects  |
//! | [`error`]    | `{code, message}` bodies and the HTTP status of each code                 |
//! | [`openapi`]  | `GET /openapi.json`: the route table ([`api_routes`]) the router and the document are built from |
//! | [`docs`]     | `/docs` (Swagger UI) and `/redoc` (ReDoc), their vendored assets built in |
//! | [`console`]  | the web console's assets, built into the binary                           |
//! | [`http_metrics`] | requests by route template and status, latency; `GET /metrics`        |
//! | [`request_span`] | each request's `kiln.http` span (request id, the caller's `traceparent`) |
//! | [`origin`]   | what every submitted job carries of its request: the trace, the API key's name as the `api_key` label |

pub mod console;
pub mod docs;
pub mod error;
pub mod events;
pub mod http_metrics;
pub mod objects;
pub mod openapi;
pub mod origin;
pub mod request_span;
pub mod routes;
pub mod template;
pub mod v1;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_core::config::NatsConfig;
use kiln_core::http::HttpConfig;
use kiln_core::nats::Names;
use kiln_core::task::{self, TaskGuard, TaskKind};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use error::HttpError;
use events::Feeds;

/// The connection one request is served with: the gateway's own, or an API key's tenant's.
pub struct Tenant {
    pub name: String,
    pub client: Client,
    pub feeds: Feeds,
}

impl Tenant {
    fn new(name: &str, client: Client) -> Tenant {
        let feeds = Feeds::new(client.nats().clone(), client.names().clone());
        Tenant { name: name.to_string(), client, feeds }
    }
    pub fn names(&self) -> &Names {
        self.client.names()
    }
}

struct Shared {
    config: HttpConfig,
    /// Serves every request when no API key is configured.
    default: Arc<Tenant>,
    /// sha256 (hex) of a key -> its tenant and its name (`[[http.api_keys]] name`).
    keys: HashMap<String, (Arc<Tenant>, String)>,
    /// Fired on shutdown: open SSE streams end so the connections can close.
    shutdown: CancellationToken,
}

/// A gateway's shared state: cheap to clone, one per process.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

/// The sha256 (hex) of an API key, as `[[http.api_keys]] sha256` stores it.
pub fn hash_key(key: &str) -> String {
    kiln_core::nats::objects::sha256_hex(key.as_bytes())
}

/// True for an address only this machine can reach.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to NATS: {0}")]
    Nats(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

impl Gateway {
    /// Connects the gateway's NATS connection, and one per API key that has credentials of
    /// its own. Refuses an address others can reach when no API key is configured.
    pub async fn connect(config: HttpConfig, nats: &NatsConfig) -> Result<Gateway, GatewayError> {
        let client = Client::connect_with(nats).await.map_err(|e| GatewayError::Nats(e.to_string()))?;
        let default = Arc::new(Tenant::new("default", client));
        let mut keys = HashMap::new();
        for key in &config.api_keys {
            let tenant = if key.has_credentials() {
                let tenant_nats = NatsConfig {
                    prefix: if key.prefix.is_empty() { nats.prefix.clone() } else { key.prefix.clone() },
                    user: key.user.clone(),
                    password: key.password.clone(),
                    token: key.token.clone(),
                    nkey_seed_file: key.nkey_seed_file.clone(),
                    creds_file: key.creds_file.clone(),
                    ..nats.clone()
                };
                let client = Client::connect_with(&tenant_nats)
                    .await
                    .map_err(|e| GatewayError::Nats(format!("as the NATS user of API key {:?}: {e}", key.name)))?;
                Arc::new(Tenant::new(&key.name, client))
            } else {
                default.clone()
            };
            keys.insert(key.sha256.to_ascii_lowercase(), (tenant, key.name.clone()));
        }
        Ok(Gateway { shared: Arc::new(Shared { config, default, keys, shutdown: CancellationToken::new() }) })
    }

    pub fn config(&self) -> &HttpConfig {
        &self.shared.config
    }

    /// Resolves when the gateway shuts down (SSE streams end with it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Every route: the console, the native API, the configured routes, health.
    pub fn router(&self) -> Router {
        let config = &self.shared.config;
        let cors = cors_layer(&config.cors_origins);
        Router::new()
            .merge(console::router())
            .merge(docs::router())
            // The documented API: /v1 and the probes (a route of it is added in api_routes).
            // Bodies are limited by each handler (JSON: http.max_body_bytes, files:
            // http.max_upload_bytes), with coded errors, instead of axum's fixed default.
            .merge(api_routes().into_router().layer(axum::extract::DefaultBodyLimit::disable()))
            .merge(routes::router(&config.routes))
            .route("/openapi.json", get(openapi::serve))
            .fallback(|| async { HttpError::not_found("no such route (see GET /openapi.json)") })
            .layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .layer(middleware::map_response(error::coded_errors))
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_millis(config.header_timeout_ms)))
            .layer(cors)
            .layer(middleware::from_fn(http_metrics::track))
            .layer(middleware::from_fn(request_span::layer))
            .with_state(self.clone())
    }

    /// Binds `addr` and serves until `stop` resolves; then stops accepting, ends the SSE
    /// streams and lets requests in flight finish (at most 5 s).
    pub async fn serve(
        self,
        addr: &str,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<ServingGateway, GatewayError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| GatewayError::Bind { addr: addr.to_string(), source })?;
        let local = listener.local_addr().map_err(|source| GatewayError::Bind { addr: addr.to_string(), source })?;
        if !is_loopback(&local) && self.shared.config.api_keys.is_empty() {
            return Err(GatewayError::Config(format!(
                "the gateway would serve {local} without API keys: bind to a loopback address or configure [[http.api_keys]]"
            )));
        }
        // The recorder, before the first request: a standalone gateway exports its own metrics
        // (in `kiln up` the node installed it already; one per process).
        if let Err(e) = crate::metrics::recorder() {
            tracing::warn!(error = %e, "no metrics recorder: /metrics answers 500");
        }
        let router = self.router();
        let header_timeout = Duration::from_millis(self.shared.config.header_timeout_ms);
        let shutdown = self.shared.shutdown.clone();
        let task = task::spawn(TaskKind::OwnerLoop, "gateway accept loop", accept_loop(listener, router, header_timeout, shutdown, stop));
        Ok(ServingGateway { addr: local, task })
    }
}

/// A gateway serving in the background.
pub struct ServingGateway {
    pub addr: SocketAddr,
    task: TaskGuard<()>,
}

impl ServingGateway {
    /// Waits until the gateway has stopped (after its stop future resolved).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head (slowloris) is cut after `header_timeout`.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                task::spawn(TaskKind::Connection, "http connection", async move {
                    let _ = connection.await;
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::RANGE,
            header::HeaderName::from_static("last-event-id"),
            header::HeaderName::from_static(v1::IDEMPOTENCY_KEY),
            // A browser app's trace context and request id (request_span.rs).
            header::HeaderName::from_static(kiln_core::trace::TRACEPARENT),
            header::HeaderName::from_static(kiln_core::trace::TRACESTATE),
            header::HeaderName::from_static(request_span::REQUEST_ID),
        ])
        .expose_headers([
            header::ETAG,
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::RETRY_AFTER,
            header::HeaderName::from_static(request_span::REQUEST_ID),
        ]);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        layer.allow_origin(AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok())))
    }
}

/// Every route of the documented API, each with its OpenAPI operation: the native API of
/// [`v1::routes`] and the probes. The router serves them and `/openapi.json` lists them, both
/// from this one table (see [`openapi`] for how to add one).
pub fn api_routes() -> openapi::ApiRoutes {
    use openapi::Op;
    let ready = serde_json::json!({
        "type": "object",
        "required": ["ready", "nats", "nodes"],
        "properties": {
            "ready": {"type": "boolean"},
            "nats": {"type": "string", "enum": ["connected", "disconnected"]},
            "nodes": {"type": "integer", "description": "Nodes that answered"},
        },
    });
    v1::routes()
        .route(
            Op::get("/healthz", "healthz", "health", "The process is up")
                .reply_inline(serde_json::json!({"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}))
                .public(),
            crate::health::healthz,
        )
        .route(
            Op::get("/readyz", "readyz", "health", "NATS connected and at least one node answering")
                .reply_inline(ready.clone())
                .response(503, "Not ready: NATS is away or no node answers (with `Retry-After: 1`)", Some(ready))
                .public(),
            readyz,
        )
        .route(
            Op::get("/metrics", "metrics", "health", "The process's metrics, Prometheus text (docs/HTTP.md, Metrics)")
                .bytes("text/plain; version=0.0.4")
                .public(),
            http_metrics::serve,
        )
}

/// Paths served without a key: the process probes and metrics (as a node's, for Prometheus), the console's assets (the console asks for
/// the key itself), the API's description and its documentation pages (`/docs`, `/redoc`; a
/// "Try it out" there sends the key given under "Authorize"). Public for tests/deploy_files.rs:
/// a probe sends no key, so the paths the manifests probe must be among these.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/favicon.ico" | "/docs" | "/redoc")
        || path.starts_with("/console/")
        || path.starts_with(docs::ASSETS_PREFIX)
}

/// Finds the request's tenant from its API key (`Authorization: Bearer`, or `access_token` in
/// the query for `EventSource`, which cannot send headers). Without configured keys every
/// request is the default tenant's. Keys are compared by their sha256, never logged.
async fn authenticate(State(gateway): State<Gateway>, mut request: Request, next: Next) -> Response {
    let shared = &gateway.shared;
    let tenant = if shared.keys.is_empty() || is_public(request.uri().path()) {
        Some((shared.default.clone(), None))
    } else {
        let bearer = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|k| k.trim().to_string());
        let from_query =
            || request.uri().query().and_then(|_| query_param(request.uri().query(), "access_token").map(|k| k.trim().to_string()));
        bearer.or_else(from_query).and_then(|key| shared.keys.get(&hash_key(&key)).map(|(t, name)| (t.clone(), Some(name.clone()))))
    };
    match tenant {
        Some((t, key_name)) => {
            request.extensions_mut().insert(t);
            if let Some(name) = key_name {
                // Every job this request submits carries it (see `origin`).
                request.extensions_mut().insert(origin::ApiKeyName(name));
            }
            next.run(request).await
        }
        None => HttpError::unauthorized().into_response(),
    }
}

/// The value of `name` in a query string, decoded (an API key may hold `+` or `/`, escaped).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// `GET /readyz`: NATS is connected and at least one node serves. 503 otherwise, saying which.
async fn readyz(State(gateway): State<Gateway>) -> Response {
    let client = &gateway.shared.default.client;
    let connected = client.nats().connection_state() == async_nats::connection::State::Connected;
    let nodes = if connected {
        match tokio::time::timeout(Duration::from_secs(2), client.cluster()).await {
            Ok(Ok(c)) => c.nodes.len(),
            _ => 0,
        }
    } else {
        0
    };
    let ready = connected && nodes > 0;
    let body = serde_json::json!({
        "ready": ready,
        "nats": if connected { "connected" } else { "disconnected" },
        "nodes": nodes,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = (status, axum::Json(body)).into_response();
    if !ready {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_matched_by_their_sha256() {
        assert_eq!(hash_key("secret"), "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b");
    }

    #[test]
    fn query_keys_are_percent_decoded() {
        assert_eq!(query_param(Some("x=1&access_token=a%2Bb%2Fc"), "access_token").as_deref(), Some("a+b/c"));
        assert_eq!(query_param(Some("access_token=plain"), "access_token").as_deref(), Some("plain"));
        assert_eq!(query_param(Some("access_token=bad%zz%"), "access_token").as_deref(), Some("bad%zz%"));
        assert_eq!(query_param(None, "access_token"), None);
    }

    #[test]
    fn only_probes_and_assets_are_public() {
        assert!(is_public("/healthz") && is_public("/console/app.js") && is_public("/"));
        assert!(is_public("/docs") && is_public("/redoc") && is_public("/docs/assets/redoc-2.5.4/redoc.standalone.js"));
        assert!(!is_public("/v1/jobs") && !is_public("/predict") && !is_public("/consolex") && !is_public("/docsx"));
    }
}
