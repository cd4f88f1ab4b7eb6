//! Node bootstrap: connect to NATS (or start the embedded server), create the NATS resources,
//! start the actor tree and the API service. Used by `kiln up`, `kiln node`, the demo, the
//! benchmark and the tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_actors::loss_detector::{hand_back, HandBackScope};
use kiln_actors::{NodeContext, NodeHandle};
use kiln_core::config::ClusterConfig;
use kiln_core::nats::{resources, NatsServer, Resources};

use crate::health::{NodeHealth, NodePhase};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Server(#[from] kiln_core::nats::server::ServerError),
    #[error("{0}")]
    Store(#[from] kiln_core::nats::StoreError),
    #[error("{0}")]
    Node(#[from] kiln_actors::NodeError),
    #[error("a node named {0:?} is already alive in the registry (node names must be unique)")]
    DuplicateName(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Health(#[from] crate::health::ServeError),
}

/// How long this process must stand still (no tick of its stall watch) to count as stopped:
/// past it, the requests it held are refused and what it knew of the cluster is re-checked.
/// Far above any scheduling delay of a live process, well below a client's request timeout
/// plus the time it takes to notice.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(1500);

/// A node running in this process.
pub struct RunningNode {
    pub name: String,
    pub resources: Resources,
    pub url: String,
    handle: Option<NodeHandle>,
    api: kiln_core::task::TaskGuard<()>,
    /// The embedded nats-server, when this node started one (`kiln up`).
    pub server: Option<NatsServer>,
    /// Fires when the cluster asks this node to drain (`kiln drain <node>`, through its
    /// NodeControl actor).
    drain_requested: Arc<tokio::sync::Notify>,
    diagnostics: kiln_core::task::TaskGuard<()>,
    /// Refreshes the queue gauges while this node is the one exporting them.
    _queue_gauges: kiln_core::task::TaskGuard<()>,
    _queue_sweep: Option<kiln_core::task::TaskGuard<()>>,
    /// What `/readyz` reads: this node's phase and connection.
    health: NodeHealth,
    /// The server of `/healthz`, `/readyz` and `/metrics` on `node.metrics_addr`; None when
    /// that is "". It lives until the node has drained, so a draining node answers 503.
    _health_server: Option<kiln_core::task::TaskGuard<()>>,
    _work_dir: Option<tempfile::TempDir>,
}

/// How long start-up keeps retrying when JetStream does not answer.
const JETSTREAM_START_PATIENCE: Duration = Duration::from_secs(60);

/// Creates (or opens) every stream, bucket and consumer and the registry cache, retrying
/// while JetStream times out: a node (re)started while its nats-server restarts connects, then
/// finds JetStream not answering for a moment. It used to exit then, and stay down (found by
/// the long chaos profile once node restarts and server restarts got more frequent). Any other
/// error, or a JetStream that stays silent for a minute, fails the start.
async fn ensure_resources(
    client: async_nats::Client,
    config: &ClusterConfig,
) -> Result<(Resources, kiln_core::nats::RegistryCache), StartError> {
    let deadline = tokio::time::Instant::now() + JETSTREAM_START_PATIENCE;
    loop {
        let attempt = async {
            let resources = Resources::ensure(client.clone(), config).await?;
            let registry = resources.registry_cache().await?;
            Ok::<_, kiln_core::nats::StoreError>((resources, registry))
        };
        match attempt.await {
            Ok(ready) => return Ok(ready),
            Err(kiln_core::nats::StoreError::Nats(e)) if start_may_retry(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "JetStream does not answer yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether a start-up error of creating the streams and buckets passes by trying again:
/// JetStream timing out, or another node creating the same stream at the same moment (the
/// create answers "already in use", and the read that follows can fail while the new stream's
/// replicas form: node `b` of the partition test exited so once, on a fresh three-server
/// cluster, when all three nodes started together).
fn start_may_retry(error: &str) -> bool {
    error.contains("timed out") || error.contains("already in use")
}

/// The host name, for a node that is not given one.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    let cleaned: String = raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
    if cleaned.is_empty() {
        "node".into()
    } else {
        cleaned
    }
}

/// The embedded server's JetStream folder: `nats.state_dir`, else `$KILN_CACHE/state`.
pub fn embedded_state_dir(config: &ClusterConfig) -> PathBuf {
    if config.nats.state_dir.is_empty() {
        kiln_core::cache_dir().join("state")
    } else {
        PathBuf::from(&config.nats.state_dir)
    }
}

impl RunningNode {
    /// Starts a node. With `nats.url = "embedded"` it first starts a nats-server child.
    ///
    /// The health and metrics server binds first, so that a liveness probe passes during a
    /// long start (JetStream patience, the watch of an old registry entry) and a taken
    /// `node.metrics_addr` fails the start at once: a node whose probes cannot be served would
    /// never be ready to its orchestrator, and a warning in its log would not say why.
    pub async fn start(mut config: ClusterConfig) -> Result<RunningNode, StartError> {
        let health = NodeHealth::default();
        let health_server = match config.node.metrics_addr.as_str() {
            "" => None,
            addr => Some(crate::health::serve(addr, health.clone()).await?),
        };
        let server = if config.nats.url == "embedded" {
            let server = NatsServer::start(&embedded_state_dir(&config), config.nats.embedded_port)?;
            tracing::info!(url = %server.url(), "embedded nats-server started");
            config.nats.url = server.url();
            Some(server)
        } else {
            None
        };
        if config.node.name.is_empty() {
            config.node.name = host_name();
        }
        let name = config.node.name.clone();
        let client = resources::connect(&config.nats, &format!("kiln-node-{name}")).await?;
        let (resources, registry) = ensure_resources(client, &config).await?;
        health.connected(resources.clone(), name.clone(), config.node.slots.clone());
        // A same-named entry is either another live process (refuse) or the remains of this
        // node's previous life, killed before it could remove them (proceed). Tell them apart
        // by watching its heartbeat for one loss threshold, the silence every detector of the
        // cluster declares a node lost by (a live node writes several heartbeats within it).
        // It used to watch for a whole registry TTL, after which the entry listing the old
        // life's deliveries had expired: nothing was handed back, and the job waited out the
        // ack wait (25 to 30 s instead of about one threshold; issue 23 item 4).
        // An entry whose heartbeat is already older than the TTL (the server has not removed it
        // yet) is a dead life for sure.
        let previous = registry.nodes_including_stale().into_iter().find(|e| e.node == name);
        if let Some(seen) = &previous {
            if registry.node(&name).is_some() {
                let loss_after = Duration::from_millis(config.node.loss_after_ms);
                tracing::info!(node = %name, "a node of this name is in the registry; checking whether it is alive");
                let deadline = tokio::time::Instant::now() + loss_after;
                let moved =
                    |now: &kiln_core::protocol::NodeEntry| (now.started_ms, now.heartbeat_ms) != (seen.started_ms, seen.heartbeat_ms);
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(config.node.heartbeat_ms.min(100))).await;
                    if registry.node(&name).is_some_and(|now| moved(&now)) {
                        return Err(StartError::DuplicateName(name));
                    }
                }
                // The watch may lag: the server's copy decides, as for the loss detector.
                if resources.node_entry_fresh(&name).await.ok().flatten().is_some_and(|now| moved(&now)) {
                    return Err(StartError::DuplicateName(name));
                }
            }
            // Its previous life is dead: hand back the deliveries it held now, rather than
            // after the ack wait (a survivor may have done it already; the claim decides).
            let silent_ms = kiln_core::now_ms().saturating_sub(seen.heartbeat_ms);
            let _ = hand_back(&resources, &name, seen.started_ms, Some(silent_ms), HandBackScope::Node).await;
        }
        // A previous life whose node entry expired already (a restart more than a registry TTL
        // after the crash) may still list deliveries: they are kept for the ack wait.
        match resources.held_jobs(&name).await {
            Ok(Some(held)) if !held.jobs.is_empty() && previous.as_ref().is_none_or(|p| p.started_ms != held.started_ms) => {
                let _ = hand_back(&resources, &name, held.started_ms, None, HandBackScope::Deliveries).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the deliveries of this node's previous life; they return after the ack wait"),
        }
        let (work_dir, temp) = if config.node.work_dir.is_empty() {
            let t = tempfile::Builder::new().prefix(&format!("kiln-{name}-")).tempdir()?;
            (t.path().to_path_buf(), Some(t))
        } else {
            (PathBuf::from(&config.node.work_dir), None)
        };
        std::fs::create_dir_all(&work_dir)?;
        let url = config.nats.url.clone();
        let config = Arc::new(config);
        let drain_requested = Arc::new(tokio::sync::Notify::new());
        let stall = kiln_core::stall::StallWatch::start(STALL_THRESHOLD);
        let ctx = NodeContext {
            config: config.clone(),
            resources: resources.clone(),
            store: Arc::new(resources.clone()),
            node: name.clone(),
            work_dir,
            workspaces: Default::default(),
            warm: Default::default(),
            room: Default::default(),
            registry: registry.clone(),
            drain_requested: drain_requested.clone(),
            stall: stall.clone(),
        };
        let handle = NodeHandle::start(ctx).await?;
        let models: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
        crate::metrics::zero_counters(&models, &config.node.slots);
        let queue_gauges = crate::queue_gauges::spawn(resources.clone(), registry.clone(), name.clone(), config.autoscale.clone());
        let queue_sweep = crate::queue_sweep::spawn(resources.clone(), registry.clone(), name.clone(), config.fair_share.idle_queue_s);
        let api = crate::api::ApiService::new(resources.clone(), config, registry, stall).start().await?;
        let diagnostics = crate::diag::serve(resources.clone(), name.clone()).await?;
        health.set_phase(NodePhase::Running);
        tracing::info!(node = %name, url = %url, "node started");
        Ok(RunningNode {
            name,
            resources,
            url,
            handle: Some(handle),
            api,
            server,
            drain_requested,
            diagnostics,
            _queue_gauges: queue_gauges,
            _queue_sweep: queue_sweep,
            health,
            _health_server: health_server,
            _work_dir: temp,
        })
    }

    /// Resolves when an operator asks this node to drain.
    /// From then on `/readyz` answers 503: a load balancer stops sending before the drain.
    pub async fn drain_requested(&self) {
        self.drain_requested.notified().await;
        self.health.set_phase(NodePhase::Draining);
    }

    /// True once the actor tree stopped by itself (a node actor failed).
    pub fn failed(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| h.is_finished())
    }

    /// Graceful leave: stop pulling, finish running jobs (up to `grace`), remove the registry
    /// entries, stop the actors, then the API. The embedded server, if any, stops last.
    pub async fn shutdown(mut self, grace: Duration) {
        self.health.set_phase(NodePhase::Draining);
        // The API keeps answering while running jobs finish: submits still land durably in the
        // queue (for other nodes, or this one's next start), and status stays readable.
        if let Some(h) = self.handle.take() {
            h.drain_and_stop(grace).await;
        }
        self.api.abort();
        self.diagnostics.abort();
        let _ = self.resources.client.flush().await;
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::start_may_retry;

    #[test]
    fn a_creation_race_and_a_silent_jetstream_are_retried_and_nothing_else() {
        assert!(start_may_retry("cannot create OBJ_kiln_results_noop: jetstream request timed out"));
        assert!(start_may_retry(
            "cannot create kiln_results_noop: bucket creation failed: jetstream error: stream name already in use with a different configuration (code 400, error code 10058)"
        ));
        assert!(!start_may_retry(
            "cannot create KILN_JOBS with nats.replicas = 3: that needs a NATS cluster with at least 3 JetStream servers up"
        ));
        assert!(!start_may_retry("authorization violation"));
    }
}
