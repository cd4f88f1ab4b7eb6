//! # kiln-actors
//!
//! Every actor of a Kiln node, one per module, each with its arguments, state and messages
//! beside it (ractor's idiom: the actor is a unit struct, state is built in `pre_start`).
//!
//! ```text
//! NodeSupervisor                       node_supervisor.rs  escalates: a failed child stops the node
//! ├── RegistryWriter                   registry_writer.rs  GPU and node entries, heartbeats, TTL
//! ├── Dispatcher                       dispatcher.rs       pulls only while a slot has room (core's placement)
//! │                                    puller.rs           one task per model: reserve slots, fetch, hand over
//! │                                    lease.rs            a job's place on its slot, handed back by drop
//! │   └── JobActor (one per delivery)  job.rs              claim, run, fenced outcome, then ack:
//! │                                    delivery.rs         its delivery protocol (claim, fence, write, events, ack) on kiln_core::store
//! │                                    pipeline.rs         its work (inputs, inference under the slot lease, stages, artifacts)
//! │                                    attempt_events.rs   the sink the pipeline reports into (the delivery implements it)
//! ├── LossDetector                     loss_detector.rs    a silent node's jobs handed back at once
//! ├── NodeControl                      node_control.rs     cluster-wide control: cancel, drain, ping
//! ├── ClusterMesh                      cluster_mesh.rs     a session per peer it talks to
//! │   └── NodeServer (ractor_cluster)                      cookie, sessions, process groups
//! ├── WebhookDelivery                  webhook.rs          job events into signed webhook messages (fan-out), and their delivery
//! ├── StagePool                        stage_pool.rs       pipelines' stage commands (any command), bounded
//! │   └── StageWorker (xN)             stage_worker.rs     one command at a time
//! └── GpuSupervisor (one per slot)     gpu_supervisor.rs   restart budget, backoff, quarantine
//!     └── InferenceActor               inference.rs        the slot's engines; one job, or one TorchScript batch
//! ```
//!
//! Not actors: [`finish`] writes out the end of a job (terminal event, results feed, batch
//! settle) for the job actors and the API's cancel alike; [`context`] holds what they share
//! (config, NATS handles, which models are warm on which slot); [`tunnel`] carries a ractor_cluster session over NATS; [`wire`] is every
//! message that crosses nodes (postcard, versioned); [`NodeHandle`] is the typed handle the
//! binary uses to start, drain and stop a node. The decisions the actors act on are pure code
//! in `kiln-core`: slot placement ([`kiln_core::placement`]), job delivery and retry
//! ([`kiln_core::job`]), restart budget, backoff and every retry schedule
//! ([`kiln_core::policy`]). A delivery reads and writes its job through
//! [`kiln_core::store::JobStore`] (NATS in a node, in memory in its in-process tests).

pub(crate) mod attempt_events;
pub mod cluster_mesh;
pub mod context;
pub(crate) mod delivery;
pub mod dispatcher;
pub mod finish;
pub mod gpu_supervisor;
pub mod inference;
pub mod job;
pub mod lease;
pub mod loss_detector;
pub mod node_control;
pub mod node_supervisor;
pub(crate) mod pipeline;
pub(crate) mod puller;
pub mod registry_writer;
pub mod stage_pool;
pub mod stage_worker;
pub mod tunnel;
pub mod webhook;
pub mod wire;

use std::time::Duration;

use ractor::{Actor, ActorRef};

pub use context::NodeContext;
use dispatcher::DispatcherMsg;
use node_supervisor::{NodeSupervisor, NodeSupervisorMsg};
use registry_writer::RegistryWriterMsg;

/// A running node's actor tree.
pub struct NodeHandle {
    supervisor: ActorRef<NodeSupervisorMsg>,
    join: tokio::task::JoinHandle<()>,
    dispatcher: ActorRef<DispatcherMsg>,
    registry: ActorRef<RegistryWriterMsg>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot start the node's actors: {0}")]
    Spawn(String),
}

impl NodeHandle {
    pub async fn start(ctx: NodeContext) -> Result<NodeHandle, NodeError> {
        let (supervisor, join) = Actor::spawn(Some(format!("kiln-node-{}", ctx.node)), NodeSupervisor, ctx)
            .await
            .map_err(|e| NodeError::Spawn(e.to_string()))?;
        let children = ractor::call!(supervisor, NodeSupervisorMsg::Children).map_err(|e| NodeError::Spawn(e.to_string()))?;
        Ok(NodeHandle { supervisor, join, dispatcher: children.dispatcher, registry: children.registry })
    }

    /// Graceful leave: stop pulling, let running jobs finish (up to `grace`), remove this
    /// node's registry entries, stop the actors. Jobs still running after `grace` are left
    /// unacked and JetStream redelivers them to another node.
    pub async fn drain_and_stop(self, grace: Duration) {
        let _ = self.registry.cast(RegistryWriterMsg::Draining);
        let drained = self.dispatcher.call(DispatcherMsg::Drain, Some(grace)).await;
        if !matches!(drained, Ok(ractor::rpc::CallResult::Success(()))) {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "jobs still running after the drain grace; they will be redelivered");
        }
        let _ = self.registry.call(RegistryWriterMsg::Remove, Some(Duration::from_secs(5))).await;
        self.stop().await;
    }

    /// Stops the actors at once (running jobs are redelivered after the ack wait).
    pub async fn stop(self) {
        let _ = self.supervisor.cast(NodeSupervisorMsg::Shutdown);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.join).await;
    }

    /// Resolves when the node's actor tree stops by itself (a child failed).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}
