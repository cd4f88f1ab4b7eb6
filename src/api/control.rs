//! The cluster's endpoints: `models`, `cluster`, `queue`, and the operators' `control` (drain a node,
//! restart a GPU slot, ping a node, through the actor cluster); and the cluster's models, which
//! every submit is checked against.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::reply::internal;
use crate::api::validation;
use crate::api::ApiService;
use kiln_actors::gpu_supervisor::call_gpu;
use kiln_actors::node_control::call_node;
use kiln_actors::wire::{GpuControlReply, GpuControlRequest, NodeControlReply, NodeControlRequest};
use kiln_core::models::ClusterModel;
use kiln_core::protocol::*;

/// How long a control call through the actor cluster may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

impl ApiService {
    pub(super) async fn models(&self) -> Result<ModelsReply, ApiError> {
        let gpus = self.live_gpus().await?;
        let models = self
            .cluster_models()
            .into_values()
            .map(|ClusterModel { decl: m, nodes, conflict }| {
                let serving = gpus.iter().filter(|g| g.state != GpuState::Dead && g.models.contains(&m.name));
                ModelInfo {
                    slots: serving.clone().map(|g| format!("{}/{}", g.node, g.slot)).collect(),
                    warm_on: serving.filter(|g| g.warm_models.contains(&m.name)).map(|g| format!("{}/{}", g.node, g.slot)).collect(),
                    name: m.name,
                    engine: m.engine,
                    max_attempts: m.max_attempts,
                    timeout_ms: m.timeout_ms,
                    required_inputs: m.required_inputs,
                    nodes,
                    conflict,
                    params: m.params,
                }
            })
            .collect();
        Ok(ModelsReply { models })
    }

    pub(super) async fn cluster(&self) -> Result<ClusterReply, ApiError> {
        Ok(ClusterReply { nodes: self.registry.nodes(), gpus: self.live_gpus().await? })
    }

    /// Each model's queue now (or one model's), measured on request: see
    /// `Resources::queue_snapshot`.
    pub(super) async fn queue(&self, req: QueueRequest) -> Result<QueueReply, ApiError> {
        let models: Vec<ModelDecl> = match req.model {
            Some(model) => vec![self.cluster_model(&model, "model")?],
            None => self.cluster_models().into_values().map(|m| m.decl).collect(),
        };
        self.resources.queue_snapshot(&models, self.config.autoscale.target_wait_s).await.map_err(internal)
    }

    pub(super) async fn control(&self, req: ControlRequest) -> Result<ControlReply, ApiError> {
        let node = match &req {
            ControlRequest::Drain { node } | ControlRequest::RestartGpu { node, .. } | ControlRequest::Ping { node } => node.clone(),
        };
        validation::check_node_name(&node)?;
        if self.registry.node(&node).is_none() {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no live node named {node:?}")));
        }
        let via = self.config.node.name.clone();
        let unreachable = || ApiError::internal(format!("no actor-cluster session with {node:?} right now; retry"));
        let reply = match req {
            ControlRequest::Drain { node } => match call_node(&node, NodeControlRequest::Drain, CONTROL_TIMEOUT).await {
                Some(NodeControlReply::Draining { node }) => ControlReply { target: node, outcome: "draining".into(), via },
                _ => return Err(unreachable()),
            },
            ControlRequest::Ping { node } => match call_node(&node, NodeControlRequest::Ping, CONTROL_TIMEOUT).await {
                Some(NodeControlReply::Pong { node }) => ControlReply { target: node, outcome: "pong".into(), via },
                _ => return Err(unreachable()),
            },
            ControlRequest::RestartGpu { node, slot } => {
                if !self.live_gpus_of(&node).await?.iter().any(|g| g.slot == slot) {
                    return Err(ApiError::new(ErrorCode::NotFound, format!("node {node:?} has no slot {slot:?}")));
                }
                match call_gpu(&node, &slot, GpuControlRequest::Restart, CONTROL_TIMEOUT).await {
                    Some(GpuControlReply::Restarting { node, slot }) => {
                        ControlReply { target: format!("{node}/{slot}"), outcome: "restarting".into(), via }
                    }
                    Some(GpuControlReply::NotRunning { node, slot }) => {
                        ControlReply { target: format!("{node}/{slot}"), outcome: "not_running".into(), via }
                    }
                    None => return Err(unreachable()),
                }
            }
        };
        Ok(reply)
    }

    /// The live GPU entries, read from the registry's server (nodes do not watch them).
    pub(super) async fn live_gpus(&self) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(None, false).await.map_err(internal)
    }

    async fn live_gpus_of(&self, node: &str) -> Result<Vec<GpuEntry>, ApiError> {
        self.resources.gpu_entries(Some(node), false).await.map_err(internal)
    }

    /// The cluster's models (see [`kiln_core::models`]): those the live nodes of the registry
    /// declare. This node's own config stands in for its entry until that entry is in the
    /// cache (right after start), so a node always accepts the models it serves itself.
    pub(super) fn cluster_models(&self) -> BTreeMap<String, ClusterModel> {
        let mut nodes = self.registry.nodes();
        let me = &self.config.node.name;
        if !nodes.iter().any(|n| &n.node == me) {
            nodes.push(NodeEntry {
                node: me.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                slots: self.config.node.slots.clone(),
                // Youngest: it does not decide a conflict before its entry is written.
                started_ms: u64::MAX,
                heartbeat_ms: kiln_core::now_ms(),
                running_jobs: 0,
                peers: vec![],
                models: self.config.model_decls(),
            });
        }
        kiln_core::models::cluster_models(&nodes)
    }

    /// The definition of one of the cluster's models, or `unknown_model` naming `what` (see
    /// [`validation::cluster_model`]).
    pub(super) fn cluster_model(&self, name: &str, what: &str) -> Result<ModelDecl, ApiError> {
        validation::cluster_model(&self.cluster_models(), name, what)
    }
}
