//! The node's probes, served with its metrics on `node.metrics_addr`:
//!
//! - `GET /healthz`: 200 `{"status":"ok"}` while the process lives (liveness);
//! - `GET /readyz`: 200 when the node is connected to NATS, its streams and buckets exist and
//!   its slots are in the registry, and it is neither starting nor draining; 503 otherwise,
//!   with every check and why it fails (readiness);
//! - `GET /metrics`: the Prometheus text ([`crate::metrics`]);
//! - any other path: 404.
//!
//! The decision is [`readiness`], a pure function over [`ReadinessInputs`]; [`NodeHealth`] is
//! what the running node shares with the server to gather those inputs at each request.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kiln_core::nats::Resources;
use kiln_core::task::{self, TaskGuard, TaskKind};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

/// How long one readiness request waits for the server's answers (as the gateway's
/// `/readyz`): a server that takes longer is not serving this node. A probe's own timeout
/// must be longer (Kubernetes: `timeoutSeconds: 3` or more).
const LOOKUP_PATIENCE: Duration = Duration::from_secs(2);

/// Where the node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NodePhase {
    /// Connecting, creating its streams, starting its actors.
    Starting = 0,
    Running = 1,
    /// Stopping: takes no new jobs, finishes the running ones, then leaves.
    Draining = 2,
}

/// The answer of one look-up at the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    Failed(String),
    /// Not asked: no connection to ask on.
    NotChecked,
}

/// What readiness is decided from, gathered at each `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessInputs {
    pub phase: NodePhase,
    /// None before the node has a connection (it is starting).
    pub nats_connected: Option<bool>,
    /// The streams and buckets the server lacks.
    pub missing_streams: Lookup<Vec<String>>,
    /// The slots this node is configured with.
    pub slots: Vec<String>,
    /// This node's slots that the registry holds a fresh entry for.
    pub registered_slots: Lookup<Vec<String>>,
}

/// One line of the `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<Check>,
}

/// Ready when every check passes: the node runs (not starting, not draining), NATS is
/// connected, no stream or bucket is missing and every configured slot is registered.
pub fn readiness(inputs: &ReadinessInputs) -> Readiness {
    let node = match inputs.phase {
        NodePhase::Starting => (false, "starting".to_string()),
        NodePhase::Running => (true, "running".to_string()),
        NodePhase::Draining => (false, "draining: finishing its running jobs, taking no new ones".to_string()),
    };
    let nats = match inputs.nats_connected {
        None => (false, "not connected yet".to_string()),
        Some(true) => (true, "connected".to_string()),
        Some(false) => (false, "disconnected (the client reconnects by itself)".to_string()),
    };
    let not_checked = || (false, "not checked: no NATS connection".to_string());
    let streams = match &inputs.missing_streams {
        Lookup::Found(missing) if missing.is_empty() => (true, "present".to_string()),
        Lookup::Found(missing) => (false, format!("missing: {}", missing.join(", "))),
        Lookup::Failed(e) => (false, format!("cannot read: {e}")),
        Lookup::NotChecked => not_checked(),
    };
    let slots = match &inputs.registered_slots {
        Lookup::Found(registered) => {
            let missing: Vec<&str> = inputs.slots.iter().filter(|s| !registered.contains(s)).map(String::as_str).collect();
            if missing.is_empty() {
                (true, format!("registered: {}", inputs.slots.join(", ")))
            } else {
                (false, format!("not in the registry: {}", missing.join(", ")))
            }
        }
        Lookup::Failed(e) => (false, format!("cannot read the registry: {e}")),
        Lookup::NotChecked => not_checked(),
    };
    let checks: Vec<Check> = [("node", node), ("nats", nats), ("streams", streams), ("slots", slots)]
        .into_iter()
        .map(|(name, (ok, detail))| Check { name, ok, detail })
        .collect();
    Readiness { ready: checks.iter().all(|c| c.ok), checks }
}

/// What the node's server reads: its phase, and (once connected) where to look.
#[derive(Clone, Default)]
pub struct NodeHealth(Arc<HealthShared>);

#[derive(Default)]
struct HealthShared {
    phase: AtomicU8,
    connected: OnceLock<Connected>,
}

struct Connected {
    resources: Resources,
    node: String,
    slots: Vec<String>,
}

impl NodeHealth {
    pub fn phase(&self) -> NodePhase {
        match self.0.phase.load(Ordering::Relaxed) {
            0 => NodePhase::Starting,
            1 => NodePhase::Running,
            _ => NodePhase::Draining,
        }
    }

    pub fn set_phase(&self, phase: NodePhase) {
        self.0.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The node has its connection and resources: readiness can look at them from now on.
    pub fn connected(&self, resources: Resources, node: String, slots: Vec<String>) {
        let _ = self.0.connected.set(Connected { resources, node, slots });
    }

    /// Reads the inputs of [`readiness`] now, each server look-up bounded by
    /// [`LOOKUP_PATIENCE`].
    pub async fn inputs(&self) -> ReadinessInputs {
        let phase = self.phase();
        let Some(c) = self.0.connected.get() else {
            return ReadinessInputs {
                phase,
                nats_connected: None,
                missing_streams: Lookup::NotChecked,
                slots: vec![],
                registered_slots: Lookup::NotChecked,
            };
        };
        let connected = c.resources.client.connection_state() == async_nats::connection::State::Connected;
        let (missing_streams, registered_slots) = if connected {
            let streams = bounded(c.resources.missing_streams());
            let registered = bounded(async {
                let entries = c.resources.gpu_entries(Some(&c.node), false).await?;
                Ok(entries.into_iter().map(|g| g.slot).collect())
            });
            tokio::join!(streams, registered)
        } else {
            (Lookup::NotChecked, Lookup::NotChecked)
        };
        ReadinessInputs { phase, nats_connected: Some(connected), missing_streams, slots: c.slots.clone(), registered_slots }
    }
}

async fn bounded<T>(lookup: impl std::future::Future<Output = Result<T, kiln_core::nats::StoreError>>) -> Lookup<T> {
    match tokio::time::timeout(LOOKUP_PATIENCE, lookup).await {
        Ok(Ok(found)) => Lookup::Found(found),
        Ok(Err(e)) => Lookup::Failed(e.to_string()),
        Err(_) => Lookup::Failed(format!("no answer within {} ms", LOOKUP_PATIENCE.as_millis())),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve health and metrics on {addr} (node.metrics_addr; \"\" disables it): {reason}")]
pub struct ServeError {
    pub addr: String,
    pub reason: String,
}

#[derive(Clone)]
struct ServerState {
    health: NodeHealth,
    metrics: PrometheusHandle,
}

/// Binds `addr` and serves the probes and the metrics until the returned guard drops.
pub async fn serve(addr: &str, health: NodeHealth) -> Result<TaskGuard<()>, ServeError> {
    let error = |reason: String| ServeError { addr: addr.to_string(), reason };
    let metrics = crate::metrics::recorder().map_err(error)?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| error(e.to_string()))?;
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"error": "no such path (/healthz, /readyz, /metrics)"})))
        })
        .with_state(ServerState { health, metrics });
    Ok(task::spawn(TaskKind::OwnerLoop, "node health server", async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!(error = %e, "the health and metrics server stopped");
        }
    }))
}

/// `GET /healthz`: the process is up (the node's and the gateway's).
pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 when [`readiness`] says so, else 503 with `Retry-After`.
async fn readyz(State(state): State<ServerState>) -> Response {
    let Readiness { ready, checks } = readiness(&state.health.inputs().await);
    let body = serde_json::json!({ "status": if ready { "ready" } else { "not ready" }, "checks": checks });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let mut response = (status, axum::Json(body)).into_response();
    if !ready {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// `GET /metrics`: the Prometheus text exposition format.
async fn metrics_text(State(state): State<ServerState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> ReadinessInputs {
        ReadinessInputs {
            phase: NodePhase::Running,
            nats_connected: Some(true),
            missing_streams: Lookup::Found(vec![]),
            slots: vec!["cuda:0".into(), "cuda:1".into()],
            registered_slots: Lookup::Found(vec!["cuda:1".into(), "cuda:0".into()]),
        }
    }

    fn failing(r: &Readiness) -> Vec<&str> {
        r.checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
    }

    #[test]
    fn a_running_connected_registered_node_is_ready() {
        let r = readiness(&running());
        assert!(r.ready, "{r:?}");
        assert_eq!(r.checks.iter().map(|c| c.name).collect::<Vec<_>>(), ["node", "nats", "streams", "slots"]);
    }

    #[test]
    fn starting_and_draining_nodes_are_not_ready() {
        for phase in [NodePhase::Starting, NodePhase::Draining] {
            let r = readiness(&ReadinessInputs { phase, ..running() });
            assert!(!r.ready);
            assert_eq!(failing(&r), ["node"]);
        }
        let draining = readiness(&ReadinessInputs { phase: NodePhase::Draining, ..running() });
        assert!(draining.checks[0].detail.starts_with("draining"));
    }

    #[test]
    fn without_nats_nothing_else_is_checked() {
        let r = readiness(&ReadinessInputs {
            nats_connected: Some(false),
            missing_streams: Lookup::NotChecked,
            registered_slots: Lookup::NotChecked,
            ..running()
        });
        assert_eq!(failing(&r), ["nats", "streams", "slots"]);
        assert!(r.checks[1].detail.starts_with("disconnected"));
        assert!(r.checks[2].detail.contains("not checked"));
        let before_connecting = readiness(&ReadinessInputs { phase: NodePhase::Starting, nats_connected: None, ..running() });
        assert_eq!(before_connecting.checks[1].detail, "not connected yet");
    }

    #[test]
    fn a_missing_stream_or_slot_is_named() {
        let r = readiness(&ReadinessInputs { missing_streams: Lookup::Found(vec!["KV_kiln_gpus".into()]), ..running() });
        assert_eq!(failing(&r), ["streams"]);
        assert_eq!(r.checks[2].detail, "missing: KV_kiln_gpus");
        let r = readiness(&ReadinessInputs { registered_slots: Lookup::Found(vec!["cuda:0".into()]), ..running() });
        assert_eq!(failing(&r), ["slots"]);
        assert_eq!(r.checks[3].detail, "not in the registry: cuda:1");
    }

    #[test]
    fn a_lookup_that_fails_fails_its_check() {
        let r = readiness(&ReadinessInputs {
            missing_streams: Lookup::Failed("timed out".into()),
            registered_slots: Lookup::Failed("timed out".into()),
            ..running()
        });
        assert_eq!(failing(&r), ["streams", "slots"]);
        assert!(r.checks[3].detail.contains("timed out"));
    }
}
