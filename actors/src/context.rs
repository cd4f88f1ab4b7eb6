//! What every actor of a node shares: read-only config and cheap handles. Cloned into each
//! actor's arguments; nothing in here is mutable state (that lives in the actors).

use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;

use kiln_core::config::ClusterConfig;
use kiln_core::nats::{RegistryCache, Resources};

#[derive(Clone)]
pub struct NodeContext {
    pub config: Arc<ClusterConfig>,
    pub resources: Resources,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// Root of the per-slot working directories (job inputs and outputs).
    pub work_dir: PathBuf,
    /// Models resident on each slot of this node, kept by the inference actors and read by
    /// the dispatcher to prefer a slot where the job's model is already warm.
    pub warm: Arc<DashMap<String, Vec<String>>>,
    /// The local, watch-fed view of the cluster registry.
    pub registry: RegistryCache,
    /// Fired when the cluster asks this node to drain (`kiln drain <node>`, through its
    /// [`NodeControl`](crate::node_control) actor); the binary then leaves gracefully.
    pub drain_requested: Arc<tokio::sync::Notify>,
    /// Changes when this process stood still (SIGSTOP, a paused VM): the loss detector, the
    /// registry writer and running jobs re-check what they knew before acting on it.
    pub stall: kiln_core::stall::StallWatch,
}

impl NodeContext {
    /// The folder where one slot keeps one job's files: `<work>/<slot-key>/<job_id>`.
    pub fn job_dir(&self, slot: &str, job_id: &str) -> PathBuf {
        self.work_dir.join(kiln_core::config::slot_key(slot)).join(job_id)
    }
}
